//! The event service's workload: ServiceAccount, Deployment (env, probes, security, drain),
//! the public Service and the PodDisruptionBudget.

use std::collections::BTreeMap;

use eventrouter_contract::{env, http, kube as names};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec as K8sServiceSpec, SleepAction,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{labels, metadata, selector_labels};
use crate::crd::{EventRouter, EventRouterSpec, KeyFile};
use crate::validate::Plan;

/// Where the pods find the AMQP URL (the Secret is mounted here).
const AMQP_SECRET_DIR: &str = "/etc/eventrouter/amqp";
const AMQP_SECRET_FILE: &str = "url";

/// Where the pods find a key file of `spec.auth`.
struct KeyFileMount {
    volume: &'static str,
    dir: &'static str,
    file: &'static str,
    env: &'static str,
}

impl KeyFileMount {
    /// Each key file gets its own directory: a Secret volume is mounted whole (never with
    /// `subPath`), which is what lets the kubelet swap in a rotated key that the service re-reads.
    fn of(file: KeyFile) -> Self {
        let (volume, dir, name, env) = match file {
            KeyFile::HmacSecret => (
                "auth-hmac",
                "/etc/eventrouter/auth/hmac",
                "secret",
                env::AUTH_HMAC_SECRET_FILE,
            ),
            KeyFile::PublicKeys => (
                "auth-public-keys",
                "/etc/eventrouter/auth/public-keys",
                "keys.pem",
                env::AUTH_PUBLIC_KEYS_FILE,
            ),
            KeyFile::Jwks => (
                "auth-jwks",
                "/etc/eventrouter/auth/jwks",
                "jwks.json",
                env::AUTH_JWKS_FILE,
            ),
            KeyFile::PublishKeys => (
                "publish-keys",
                "/etc/eventrouter/publish-keys",
                "keys.json",
                env::PUBLISH_KEYS_FILE,
            ),
        };
        Self {
            volume,
            dir,
            file: name,
            env,
        }
    }

    fn path(&self) -> String {
        format!("{}/{}", self.dir, self.file)
    }
}

/// Seconds the pod sleeps in preStop so load balancers stop sending new connections first.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Slack on top of preStop + drain before the kubelet kills the container.
const GRACE_SLACK_SECONDS: i64 = 10;
/// Non-root user the container runs as (distroless "nonroot").
const RUN_AS_USER: i64 = 65532;

pub(super) fn service_account(router: &EventRouter, plan: &Plan) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(router, plan, plan.name.clone()),
        // The event service never calls the Kubernetes API.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `tolerancePercent` as the service's fraction of the mean: `15` → `0.15`, `100` → `1.00`.
fn tolerance_fraction(percent: u32) -> String {
    format!("{}.{:02}", percent / 100, percent % 100)
}

fn event_service_env(router: &EventRouter, plan: &Plan) -> Vec<EnvVar> {
    let spec = &router.spec;
    let ws = &spec.websocket;
    let mq = &spec.rabbitmq;
    let rebalance = &spec.rebalance;
    let mut vars = vec![
        env_var(env::LISTEN, format!("0.0.0.0:{}", http::DEFAULT_PORT)),
        env_var(
            env::ADMIN_LISTEN,
            format!("0.0.0.0:{}", http::DEFAULT_ADMIN_PORT),
        ),
        env_var(env::SOURCE, "amqp"),
        env_var(
            env::AMQP_URL_FILE,
            format!("{AMQP_SECRET_DIR}/{AMQP_SECRET_FILE}"),
        ),
        env_var(env::EXCHANGE, plan.topology.exchange.clone()),
        // The operator owns the exchange; pods only bind their own queues to it.
        env_var(env::DECLARE_EXCHANGE, "false"),
        env_var(env::QUEUE_MAX_LENGTH, mq.queue_max_length.to_string()),
        env_var(env::QUEUE_MESSAGE_TTL, mq.queue_message_ttl.clone()),
        env_var(env::QUEUE_EXPIRES, mq.queue_expires.clone()),
        env_var(env::PREFETCH, mq.prefetch.to_string()),
        env_var(env::PING_INTERVAL, ws.ping_interval.clone()),
        env_var(env::IDLE_TIMEOUT, ws.idle_timeout.clone()),
        env_var(env::HANDSHAKE_TIMEOUT, ws.handshake_timeout.clone()),
        env_var(env::SEND_QUEUE_BYTES, ws.send_queue_bytes.to_string()),
        env_var(env::SLOW_CONSUMER_POLICY, ws.slow_consumer_policy.as_ref()),
        env_var(env::MAX_FRAME_BYTES, ws.max_frame_bytes.to_string()),
        env_var(env::MAX_SUBSCRIPTIONS, ws.max_subscriptions.to_string()),
        env_var(env::MAX_CONNECTIONS, ws.max_connections_per_pod.to_string()),
        env_var(env::DRAIN_DURATION, ws.drain_duration.clone()),
        env_var(env::LISTEN_BACKLOG, ws.listen_backlog.to_string()),
        env_var(env::REBALANCE, spec.rebalance_enabled().to_string()),
        // Always explicit: the operator declares this exchange, so the pods must not guess it.
        env_var(
            env::CONTROL_EXCHANGE,
            plan.topology.control_exchange.clone(),
        ),
        env_var(
            env::HEARTBEAT_INTERVAL,
            rebalance.heartbeat_interval.clone(),
        ),
        env_var(
            env::REBALANCE_TOLERANCE,
            tolerance_fraction(rebalance.tolerance_percent),
        ),
        env_var(env::REBALANCE_RATE, rebalance.max_shed_rate.to_string()),
        env_var(env::REBALANCE_MIN_AGE, rebalance.min_connection_age.clone()),
        env_var(env::LOG, spec.log_level.clone()),
        env_var(env::LOG_FORMAT, "json"),
    ];
    vars.extend(access_env(spec));
    vars.extend(history_env(spec, plan));
    vars.push(EnvVar {
        name: env::POD_NAME.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    });
    vars
}

/// The service's auth and limit settings the spec sets; nothing for an unset field, so the
/// service's own default applies. Key files are paths of the mounted Secrets, never contents.
fn access_env(spec: &EventRouterSpec) -> Vec<EnvVar> {
    let mut vars: Vec<EnvVar> = spec
        .key_files()
        .map(|(file, _)| {
            let mount = KeyFileMount::of(file);
            env_var(mount.env, mount.path())
        })
        .collect();
    let mut set = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            vars.push(env_var(name, value));
        }
    };
    let list = |items: &[String]| (!items.is_empty()).then(|| items.join(","));
    if let Some(auth) = &spec.auth {
        set(env::AUTH_ISSUER, auth.issuer.clone());
        set(env::AUTH_AUDIENCE, auth.audience.clone());
        set(env::AUTH_LEEWAY, auth.leeway.clone());
        set(env::AUTH_SUBSCRIBE_CLAIM, auth.subscribe_claim.clone());
        set(env::AUTH_GRANT_TEMPLATES, list(&auth.grant_templates));
        set(env::AUTH_ANONYMOUS_PATTERNS, list(&auth.anonymous_patterns));
        set(env::ALLOWED_ORIGINS, list(&auth.allowed_origins));
        set(
            env::AUTH_MAX_TOKEN_BYTES,
            auth.max_token_bytes.map(|n| n.to_string()),
        );
        set(env::AUTH_RELOAD_INTERVAL, auth.reload_interval.clone());
    }
    if let Some(limits) = &spec.limits {
        set(
            env::MAX_CONNECTIONS_PER_IP,
            limits.max_connections_per_ip.map(|n| n.to_string()),
        );
        set(env::CONNECT_RATE_PER_IP, limits.connect_rate_per_ip.clone());
        set(
            env::CONNECT_BURST_PER_IP,
            limits.connect_burst_per_ip.map(|n| n.to_string()),
        );
        set(
            env::TRUSTED_PROXY_HEADER,
            limits.trusted_proxy_header.clone(),
        );
        set(env::CLIENT_FRAME_RATE, limits.frame_rate.clone());
        set(
            env::CLIENT_FRAME_BURST,
            limits.frame_burst.map(|n| n.to_string()),
        );
    }
    vars
}

/// The stream recoveries read and the recovery bounds, when `spec.history` is enabled; nothing
/// otherwise, so the pods recover nothing from RabbitMQ. The stream's retention is the
/// operator's business (it declares the stream), so none of it reaches the pods.
fn history_env(spec: &EventRouterSpec, plan: &Plan) -> Vec<EnvVar> {
    let (Some(history), Some(stream)) = (spec.enabled_history(), &plan.topology.history) else {
        return Vec::new();
    };
    vec![
        env_var(env::HISTORY_STREAM, stream.stream.clone()),
        env_var(
            env::RECOVERY_MAX_EVENTS,
            history.recovery_max_events.to_string(),
        ),
        env_var(
            env::RECOVERY_MAX_CONCURRENT,
            history.recovery_max_concurrent.to_string(),
        ),
    ]
}

/// One read-only Secret volume and its mount per key file `spec.auth` references.
fn key_file_volumes(spec: &EventRouterSpec) -> (Vec<Volume>, Vec<VolumeMount>) {
    spec.key_files()
        .map(|(file, secret_ref)| {
            let mount = KeyFileMount::of(file);
            let volume = Volume {
                name: mount.volume.into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret_ref.name.clone()),
                    items: Some(vec![KeyToPath {
                        key: secret_ref.key.clone(),
                        path: mount.file.into(),
                        ..KeyToPath::default()
                    }]),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            };
            let volume_mount = VolumeMount {
                name: mount.volume.into(),
                mount_path: mount.dir.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            };
            (volume, volume_mount)
        })
        .unzip()
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Grace period: preStop sleep, then the drain, then slack for the last close frames.
fn termination_grace_seconds(plan: &Plan) -> i64 {
    let drain = i64::try_from(plan.drain.as_secs()).unwrap_or(i64::MAX / 2);
    PRE_STOP_SLEEP_SECONDS + drain + GRACE_SLACK_SECONDS
}

pub(super) fn deployment(router: &EventRouter, plan: &Plan) -> Deployment {
    let spec = &router.spec;
    let selector = selector_labels(&plan.name);
    let mut pod_annotations = BTreeMap::new();
    if spec.monitoring.scrape_annotations {
        pod_annotations.insert("prometheus.io/scrape".to_string(), "true".to_string());
        pod_annotations.insert(
            "prometheus.io/port".to_string(),
            http::DEFAULT_ADMIN_PORT.to_string(),
        );
        pod_annotations.insert(
            "prometheus.io/path".to_string(),
            http::METRICS_PATH.to_string(),
        );
    }
    let mut volume_mounts = vec![
        VolumeMount {
            name: "amqp".into(),
            mount_path: AMQP_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "amqp".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(spec.rabbitmq.secret_ref.name.clone()),
                items: Some(vec![KeyToPath {
                    key: spec.rabbitmq.secret_ref.key.clone(),
                    path: AMQP_SECRET_FILE.into(),
                    ..KeyToPath::default()
                }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("16Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let (key_volumes, key_mounts) = key_file_volumes(spec);
    volumes.extend(key_volumes);
    volume_mounts.extend(key_mounts);
    let container = Container {
        name: names::CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        env: Some(event_service_env(router, plan)),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: i32::from(http::DEFAULT_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: i32::from(http::DEFAULT_ADMIN_PORT),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(http_probe(http::HEALTHZ_PATH, 10, 3)),
        readiness_probe: Some(http_probe(http::READYZ_PATH, 5, 2)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                // A sleep action needs no shell in the (distroless) image.
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        service_account_name: Some(plan.name.clone()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(termination_grace_seconds(plan)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    Deployment {
        metadata: metadata(router, plan, plan.name.clone()),
        spec: Some(DeploymentSpec {
            // With autoscaling on, replicas belongs to the autoscaler: applying it would fight.
            replicas: (!spec.autoscaling.enabled).then_some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    // Surge first: a new pod is ready before an old one drains its clients.
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&plan.name)),
                    annotations: (!pod_annotations.is_empty()).then_some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub(super) fn service(router: &EventRouter, plan: &Plan) -> Service {
    let spec = &router.spec.service;
    let mut meta = metadata(router, plan, plan.name.clone());
    meta.annotations = (!spec.annotations.is_empty()).then(|| spec.annotations.clone());
    Service {
        metadata: meta,
        spec: Some(K8sServiceSpec {
            type_: Some(spec.type_.as_ref().into()),
            selector: Some(selector_labels(&plan.name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: spec.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..K8sServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(super) fn disruption_budget(router: &EventRouter, plan: &Plan) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(router, plan, plan.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(
                router.spec.disruption_budget.max_unavailable,
            )),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&plan.name)),
                ..LabelSelector::default()
            }),
            // A crash-looping pod must not block node drains.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::desired;
    use crate::crd::{AuthSpec, HistorySpec, LimitsSpec, SecretFileRef, SlowConsumerPolicy};
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};

    fn env_of(deployment: &Deployment) -> BTreeMap<String, String> {
        let pod = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec");
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect()
    }

    /// The event service's own default for the flag read from `env_name`, if it has one.
    fn service_default(env_name: &str) -> Option<String> {
        use clap::CommandFactory;
        let command = event_service::config::Config::command();
        let arg = command
            .get_arguments()
            .find(|a| a.get_env() == Some(std::ffi::OsStr::new(env_name)))?;
        arg.get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned())
    }

    #[test]
    fn a_default_spec_runs_the_service_with_its_own_cli_defaults() {
        let env =
            env_of(&desired(&a_router_named("chat"), &a_cluster_with_the_secret()).deployment);
        // Set by the operator on purpose, whatever the service defaults to. Rebalancing follows
        // autoscaling (off here), checked against the service's default below.
        let by_design = [
            env::SOURCE,
            env::AMQP_URL_FILE,
            env::EXCHANGE,
            env::CONTROL_EXCHANGE,
            env::REBALANCE,
            env::LOG_FORMAT,
        ];
        let mut compared = 0;
        for (name, value) in &env {
            if by_design.contains(&name.as_str()) {
                continue;
            }
            let default = service_default(name)
                .unwrap_or_else(|| panic!("the service has no default for {name}"));
            let duration = |v: &str| humantime::parse_duration(v).ok();
            let number = |v: &str| v.parse::<f64>().ok();
            if let (Some(ours), Some(theirs)) = (duration(value), duration(&default)) {
                assert_eq!(ours, theirs, "{name}: {value} vs {default}");
            } else if let (Some(ours), Some(theirs)) = (number(value), number(&default)) {
                // `0.15` and `0.150` are the same fraction.
                assert!((ours - theirs).abs() < 1e-9, "{name}: {value} vs {default}");
            } else {
                assert_eq!(value, &default, "{name}");
            }
            compared += 1;
        }
        // Every env var the operator sets is either compared or set on purpose.
        assert_eq!(compared + by_design.len(), env.len(), "{env:?}");
        assert!(compared >= 21, "{compared} compared");

        // With autoscaling on, a default spec rebalances as the service does by default.
        let mut autoscaled = a_router_named("chat");
        autoscaled.spec.autoscaling.enabled = true;
        let env = env_of(&desired(&autoscaled, &a_cluster_with_the_secret()).deployment);
        assert_eq!(
            Some(env[env::REBALANCE].clone()),
            service_default(env::REBALANCE)
        );
    }

    #[test]
    fn rebalancing_is_on_with_autoscaling_unless_the_spec_says_otherwise() {
        let rebalance_of = |autoscaling: bool, enabled: Option<bool>| {
            let mut router = a_router_named("chat");
            router.spec.autoscaling.enabled = autoscaling;
            router.spec.rebalance.enabled = enabled;
            env_of(&desired(&router, &a_cluster_with_the_secret()).deployment)[env::REBALANCE]
                .clone()
        };
        assert_eq!(rebalance_of(false, None), "false");
        assert_eq!(rebalance_of(true, None), "true");
        assert_eq!(rebalance_of(false, Some(true)), "true");
        assert_eq!(rebalance_of(true, Some(false)), "false");
    }

    #[test]
    fn the_rebalance_settings_and_backlog_come_from_the_spec() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.exchange = Some("events.chat".into());
        router.spec.rebalance.tolerance_percent = 5;
        router.spec.rebalance.max_shed_rate = 25;
        router.spec.rebalance.min_connection_age = "2m".into();
        router.spec.rebalance.heartbeat_interval = "500ms".into();
        router.spec.websocket.listen_backlog = 1024;
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        assert_eq!(env[env::CONTROL_EXCHANGE], "events.chat.control");
        assert_eq!(env[env::REBALANCE_TOLERANCE], "0.05");
        assert_eq!(env[env::REBALANCE_RATE], "25");
        assert_eq!(env[env::REBALANCE_MIN_AGE], "2m");
        assert_eq!(env[env::HEARTBEAT_INTERVAL], "500ms");
        assert_eq!(env[env::LISTEN_BACKLOG], "1024");
    }

    #[test]
    fn the_tolerance_percent_becomes_a_fraction() {
        assert_eq!(tolerance_fraction(0), "0.00");
        assert_eq!(tolerance_fraction(15), "0.15");
        assert_eq!(tolerance_fraction(100), "1.00");
        for percent in 0..=100 {
            let fraction: f64 = tolerance_fraction(percent).parse().expect("a number");
            assert!(
                (fraction * 100.0 - f64::from(percent)).abs() < 1e-9,
                "{percent}"
            );
        }
    }

    #[test]
    fn the_deployment_sets_the_event_service_env_from_the_spec() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.exchange = Some("events.chat".into());
        router.spec.rabbitmq.prefetch = 300;
        router.spec.websocket.slow_consumer_policy = SlowConsumerPolicy::DropOldest;
        router.spec.websocket.max_connections_per_pod = 7000;
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        assert_eq!(env[env::SOURCE], "amqp");
        assert_eq!(env[env::EXCHANGE], "events.chat");
        assert_eq!(env[env::DECLARE_EXCHANGE], "false");
        assert_eq!(env[env::AMQP_URL_FILE], "/etc/eventrouter/amqp/url");
        assert_eq!(env[env::PREFETCH], "300");
        assert_eq!(env[env::SLOW_CONSUMER_POLICY], "drop-oldest");
        assert_eq!(env[env::MAX_CONNECTIONS], "7000");
        assert_eq!(env[env::PING_INTERVAL], "20s");
        assert_eq!(env[env::LISTEN], "0.0.0.0:8080");
        assert!(
            !env.contains_key(env::AMQP_URL),
            "the URL never appears in plain env"
        );
    }

    #[test]
    fn the_pod_is_restricted_probed_spread_and_drains_within_its_grace_period() {
        let mut router = a_router_named("chat");
        router.spec.websocket.drain_duration = "30s".into();
        let d = desired(&router, &a_cluster_with_the_secret());
        let pod = d
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.name, names::CONTAINER_NAME);
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert_eq!(pod.termination_grace_period_seconds, Some(5 + 30 + 10));
        assert!(pod.termination_grace_period_seconds > Some(30));
        let sleep = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref());
        assert_eq!(sleep.map(|s| s.seconds), Some(PRE_STOP_SLEEP_SECONDS));
        let spread = &pod.topology_spread_constraints.as_ref().expect("spread")[0];
        assert_eq!(spread.topology_key, "kubernetes.io/hostname");
        let ports: Vec<_> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        assert_eq!(ports, vec!["http", "metrics"]);
        let annotations = d
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone());
        assert_eq!(
            annotations.expect("scrape annotations")["prometheus.io/port"],
            "9090"
        );
    }

    #[test]
    fn scrape_annotations_can_be_turned_off() {
        let mut router = a_router_named("chat");
        router.spec.monitoring.scrape_annotations = false;
        let d = desired(&router, &a_cluster_with_the_secret());
        let template = &d.deployment.spec.as_ref().expect("spec").template;
        assert_eq!(
            template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone()),
            None
        );
    }

    #[test]
    fn a_disabled_budget_is_not_wanted() {
        let mut router = a_router_named("chat");
        router.spec.disruption_budget.enabled = false;
        assert!(
            desired(&router, &a_cluster_with_the_secret())
                .disruption_budget
                .is_none()
        );
        router.spec.disruption_budget.enabled = true;
        router.spec.disruption_budget.max_unavailable = 2;
        let pdb = desired(&router, &a_cluster_with_the_secret())
            .disruption_budget
            .expect("pdb");
        assert_eq!(
            pdb.spec.and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(2))
        );
    }

    #[test]
    fn the_public_service_exposes_only_the_main_port_with_the_spec_type_and_annotations() {
        let mut router = a_router_named("chat");
        router.spec.service.type_ = crate::crd::ServiceType::LoadBalancer;
        router.spec.service.port = 443;
        router
            .spec
            .service
            .annotations
            .insert("lb.example/idle".into(), "3600".into());
        let svc = desired(&router, &a_cluster_with_the_secret()).service;
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        let ports = spec.ports.expect("ports");
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 443);
        assert_eq!(
            svc.metadata.annotations.expect("annotations")["lb.example/idle"],
            "3600"
        );
    }

    fn pod_of(deployment: &Deployment) -> &PodSpec {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    /// Every env var name the access settings can set.
    const ACCESS_ENV: [&str; 19] = [
        env::AUTH_HMAC_SECRET_FILE,
        env::AUTH_PUBLIC_KEYS_FILE,
        env::AUTH_JWKS_FILE,
        env::AUTH_ISSUER,
        env::AUTH_AUDIENCE,
        env::AUTH_LEEWAY,
        env::AUTH_SUBSCRIBE_CLAIM,
        env::AUTH_GRANT_TEMPLATES,
        env::AUTH_ANONYMOUS_PATTERNS,
        env::AUTH_MAX_TOKEN_BYTES,
        env::AUTH_RELOAD_INTERVAL,
        env::PUBLISH_KEYS_FILE,
        env::ALLOWED_ORIGINS,
        env::MAX_CONNECTIONS_PER_IP,
        env::CONNECT_RATE_PER_IP,
        env::CONNECT_BURST_PER_IP,
        env::TRUSTED_PROXY_HEADER,
        env::CLIENT_FRAME_RATE,
        env::CLIENT_FRAME_BURST,
    ];

    fn a_router_with_every_key_file() -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.auth = Some(AuthSpec {
            hmac_secret_ref: Some(SecretFileRef::new("tokens", "hs256")),
            public_keys_ref: Some(SecretFileRef::new("tokens", "public.pem")),
            jwks_ref: Some(SecretFileRef::new("idp-jwks", "jwks.json")),
            publish_keys_ref: Some(SecretFileRef::new("publishers", "keys")),
            ..AuthSpec::default()
        });
        router
    }

    #[test]
    fn without_auth_or_limits_nothing_is_rendered_and_the_service_defaults_apply() {
        for (auth, limits) in [
            (None, None),
            (Some(AuthSpec::default()), Some(LimitsSpec::default())),
        ] {
            let mut router = a_router_named("chat");
            router.spec.auth = auth;
            router.spec.limits = limits;
            let d = desired(&router, &a_cluster_with_the_secret());
            let env = env_of(&d.deployment);
            for name in ACCESS_ENV {
                assert!(!env.contains_key(name), "{name} must not be set: {env:?}");
            }
            let pod = pod_of(&d.deployment);
            let volumes: Vec<_> = pod
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.as_str())
                .collect();
            assert_eq!(volumes, ["amqp", "tmp"]);
            let mounts: Vec<_> = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert_eq!(mounts, ["/etc/eventrouter/amqp", "/tmp"]);
        }
    }

    #[test]
    fn each_key_file_is_a_whole_read_only_secret_volume_and_its_path_is_the_env_var() {
        let d = desired(
            &a_router_with_every_key_file(),
            &a_cluster_with_the_secret(),
        );
        let env = env_of(&d.deployment);
        let pod = pod_of(&d.deployment);
        let expected = [
            (
                env::AUTH_HMAC_SECRET_FILE,
                "auth-hmac",
                "tokens",
                "hs256",
                "/etc/eventrouter/auth/hmac",
                "secret",
            ),
            (
                env::AUTH_PUBLIC_KEYS_FILE,
                "auth-public-keys",
                "tokens",
                "public.pem",
                "/etc/eventrouter/auth/public-keys",
                "keys.pem",
            ),
            (
                env::AUTH_JWKS_FILE,
                "auth-jwks",
                "idp-jwks",
                "jwks.json",
                "/etc/eventrouter/auth/jwks",
                "jwks.json",
            ),
            (
                env::PUBLISH_KEYS_FILE,
                "publish-keys",
                "publishers",
                "keys",
                "/etc/eventrouter/publish-keys",
                "keys.json",
            ),
        ];
        for (env_name, volume_name, secret, key, dir, file) in expected {
            assert_eq!(env[env_name], format!("{dir}/{file}"), "{env_name}");
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume_name)
                .unwrap_or_else(|| panic!("volume {volume_name}"));
            let source = volume.secret.as_ref().expect("a Secret volume");
            assert_eq!(source.secret_name.as_deref(), Some(secret));
            let items = source.items.as_ref().expect("items select the key");
            assert_eq!(items.len(), 1);
            assert_eq!((items[0].key.as_str(), items[0].path.as_str()), (key, file));
            assert_eq!(
                source.optional, None,
                "a missing Secret keeps the pod from starting"
            );
            let mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volume_name)
                .unwrap_or_else(|| panic!("mount of {volume_name}"));
            assert_eq!(mount.mount_path, dir);
            assert_eq!(mount.read_only, Some(true));
            // A subPath mount is never updated by the kubelet: rotated keys would not arrive.
            assert_eq!(mount.sub_path, None);
            assert_eq!(mount.sub_path_expr, None);
        }
        // Nothing about the Secrets' content reaches the pod template, so rotating a key (a new
        // Secret value) changes no template and restarts no pod.
        let template = &d.deployment.spec.as_ref().expect("spec").template;
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        assert!(
            annotations.keys().all(|k| k.starts_with("prometheus.io/")),
            "{annotations:?}"
        );
        let values_from_secrets = pod.containers[0]
            .env
            .iter()
            .flatten()
            .filter(|e| {
                e.value_from
                    .as_ref()
                    .is_some_and(|v| v.secret_key_ref.is_some())
            })
            .count();
        assert_eq!(values_from_secrets, 0, "keys are files, never env values");
    }

    #[test]
    fn only_the_key_files_set_are_mounted() {
        let mut router = a_router_named("chat");
        router.spec.auth = Some(AuthSpec {
            jwks_ref: Some(SecretFileRef::new("idp", "jwks")),
            ..AuthSpec::default()
        });
        let d = desired(&router, &a_cluster_with_the_secret());
        let env = env_of(&d.deployment);
        assert_eq!(
            env[env::AUTH_JWKS_FILE],
            "/etc/eventrouter/auth/jwks/jwks.json"
        );
        for name in ACCESS_ENV.iter().filter(|n| **n != env::AUTH_JWKS_FILE) {
            assert!(!env.contains_key(*name), "{name}");
        }
        let volumes: Vec<_> = pod_of(&d.deployment)
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["amqp", "tmp", "auth-jwks"]);
    }

    #[test]
    fn auth_and_limit_settings_become_the_service_env_verbatim() {
        let mut router = a_router_with_every_key_file();
        if let Some(auth) = router.spec.auth.as_mut() {
            auth.issuer = Some("https://idp.example.com/".into());
            auth.audience = Some("events".into());
            auth.leeway = Some("30s".into());
            auth.subscribe_claim = Some("topics".into());
            auth.grant_templates = vec!["user.{sub}.#".into(), "broadcast.*".into()];
            auth.anonymous_patterns = vec!["public.#".into()];
            auth.allowed_origins = vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into(),
            ];
            auth.max_token_bytes = Some(4096);
            auth.reload_interval = Some("1m".into());
        }
        router.spec.limits = Some(LimitsSpec {
            max_connections_per_ip: Some(0),
            connect_rate_per_ip: Some("0.5".into()),
            connect_burst_per_ip: Some(5),
            trusted_proxy_header: Some("X-Forwarded-For".into()),
            frame_rate: Some("20".into()),
            frame_burst: Some(40),
        });
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        for (name, value) in [
            (env::AUTH_ISSUER, "https://idp.example.com/"),
            (env::AUTH_AUDIENCE, "events"),
            (env::AUTH_LEEWAY, "30s"),
            (env::AUTH_SUBSCRIBE_CLAIM, "topics"),
            (env::AUTH_GRANT_TEMPLATES, "user.{sub}.#,broadcast.*"),
            (env::AUTH_ANONYMOUS_PATTERNS, "public.#"),
            (
                env::ALLOWED_ORIGINS,
                "https://app.example.com,http://localhost:3000",
            ),
            (env::AUTH_MAX_TOKEN_BYTES, "4096"),
            (env::AUTH_RELOAD_INTERVAL, "1m"),
            (env::MAX_CONNECTIONS_PER_IP, "0"),
            (env::CONNECT_RATE_PER_IP, "0.5"),
            (env::CONNECT_BURST_PER_IP, "5"),
            (env::TRUSTED_PROXY_HEADER, "X-Forwarded-For"),
            (env::CLIENT_FRAME_RATE, "20"),
            (env::CLIENT_FRAME_BURST, "40"),
        ] {
            assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
        }
        for name in ACCESS_ENV {
            assert!(env.contains_key(name), "{name} is set");
        }

        // And the service itself accepts every value, read through its own flags.
        use clap::{CommandFactory, Parser};
        let command = event_service::config::Config::command();
        let mut argv = vec!["event-service".to_owned()];
        for (name, value) in &env {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
                .unwrap_or_else(|| panic!("the service reads no {name}"));
            let long = arg.get_long().expect("every setting has a long flag");
            argv.push(format!("--{long}={value}"));
        }
        let config = event_service::config::Config::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("the service refuses the rendered env: {e}"));
        assert_eq!(config.auth_grant_templates, ["user.{sub}.#", "broadcast.*"]);
        assert_eq!(config.allowed_origins.len(), 2);
        assert_eq!(config.connect_rate_per_ip, 0.5);
        assert_eq!(config.client_frame_burst, 40);
        assert_eq!(config.auth_leeway, std::time::Duration::from_secs(30));
        assert!(config.auth_jwks_file.is_some() && config.publish_keys_file.is_some());
    }

    /// Every env var `spec.history` can set.
    const HISTORY_ENV: [&str; 3] = [
        env::HISTORY_STREAM,
        env::RECOVERY_MAX_EVENTS,
        env::RECOVERY_MAX_CONCURRENT,
    ];

    #[test]
    fn without_history_the_pods_get_no_history_env() {
        for history in [None, Some(HistorySpec::default())] {
            let mut router = a_router_named("chat");
            router.spec.history = history.clone();
            let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
            for name in HISTORY_ENV
                .iter()
                .chain(&[env::HISTORY_MAX_BYTES, env::HISTORY_MAX_AGE])
            {
                assert!(!env.contains_key(*name), "{history:?}: {name} is set");
            }
        }
    }

    #[test]
    fn with_history_the_pods_read_the_operators_stream_within_the_spec_bounds() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.exchange = Some("events.chat".into());
        router.spec.history = Some(HistorySpec {
            max_age: "7D".into(),
            recovery_max_events: 500,
            recovery_max_concurrent: 8,
            ..HistorySpec::enabled()
        });
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        assert_eq!(env[env::HISTORY_STREAM], "events.chat.history");
        assert_eq!(env[env::RECOVERY_MAX_EVENTS], "500");
        assert_eq!(env[env::RECOVERY_MAX_CONCURRENT], "8");
        // The stream's retention is the operator's (it declares the stream); the pods keep
        // their own defaults for their in-memory window.
        assert!(!env.contains_key(env::HISTORY_MAX_AGE), "{env:?}");
        assert!(!env.contains_key(env::HISTORY_MAX_BYTES), "{env:?}");
        // And they never declare it themselves.
        assert_eq!(env[env::DECLARE_EXCHANGE], "false");
    }

    #[test]
    fn the_history_env_is_read_by_the_service_and_its_defaults_are_the_services() {
        use clap::{CommandFactory, Parser};
        let mut router = a_router_named("chat");
        router.spec.history = Some(HistorySpec::enabled());
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        // The CRD's defaults are the service's own.
        for name in [env::RECOVERY_MAX_EVENTS, env::RECOVERY_MAX_CONCURRENT] {
            assert_eq!(Some(env[name].clone()), service_default(name), "{name}");
        }
        // And the service accepts the rendered values at the CRD's bounds.
        router.spec.history = Some(HistorySpec {
            recovery_max_events: 1_000_000,
            recovery_max_concurrent: 4096,
            ..HistorySpec::enabled()
        });
        let env = env_of(&desired(&router, &a_cluster_with_the_secret()).deployment);
        let command = event_service::config::Config::command();
        let mut argv = vec!["event-service".to_owned()];
        for name in HISTORY_ENV {
            let arg = command
                .get_arguments()
                .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
                .unwrap_or_else(|| panic!("the service reads no {name}"));
            let long = arg.get_long().expect("every setting has a long flag");
            argv.push(format!("--{long}={}", env[name]));
        }
        event_service::config::Config::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("the service refuses the rendered env {argv:?}: {e}"));
    }
}
