//! Pure construction of every Kubernetes object a router wants, from its spec and its `Plan`.
//!
//! Nothing here talks to a cluster. `Desired` is the complete set: `apply` destructures it without
//! `..`, so adding a child here without applying it (or deleting it when undesired) does not
//! compile. Optional children are `Option`s: `None` means "must not exist".

use std::collections::BTreeMap;

use eventrouter_contract::{
    autoscaling as metric_names, env, http, kube as names, prometheus as target_labels,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::broker::DesiredTopology;
use crate::crd::{AutoscalingProvider, EventRouter, ScalingRules, SlowConsumerPolicy};
use crate::validate::Plan;

/// Where the pods find the AMQP URL (the Secret is mounted here).
pub const AMQP_SECRET_DIR: &str = "/etc/eventrouter/amqp";
const AMQP_SECRET_FILE: &str = "url";
/// Seconds the pod sleeps in preStop so load balancers stop sending new connections first.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Slack on top of preStop + drain before the kubelet kills the container.
const GRACE_SLACK_SECONDS: i64 = 10;
/// Label that marks the headless Service the ServiceMonitor scrapes.
pub const METRICS_SERVICE_LABEL: &str = "eventrouter.io/metrics";
/// Non-root user the container runs as (distroless "nonroot").
const RUN_AS_USER: i64 = 65532;

/// The KEDA ScaledObject API.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// The Prometheus Operator ServiceMonitor API.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// Every object a router wants. `None` children must not exist.
#[derive(Clone, Debug)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
    /// Headless Service exposing only the admin port, for the ServiceMonitor and metrics adapters.
    pub metrics_service: Service,
    pub disruption_budget: Option<PodDisruptionBudget>,
    pub horizontal_autoscaler: Option<HorizontalPodAutoscaler>,
    pub scaled_object: Option<DynamicObject>,
    pub service_monitor: Option<DynamicObject>,
    /// The broker side, declared over AMQP rather than applied to the API server.
    pub topology: DesiredTopology,
}

/// Labels on every child; the first two also select the pods.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), names::APP_NAME.to_string()),
        (names::LABEL_INSTANCE.to_string(), name.to_string()),
        (
            names::LABEL_COMPONENT.to_string(),
            names::COMPONENT_SERVICE.to_string(),
        ),
        (
            names::LABEL_MANAGED_BY.to_string(),
            names::MANAGED_BY.to_string(),
        ),
    ])
}

/// The pod selector (stable across upgrades: never add labels here).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), names::APP_NAME.to_string()),
        (names::LABEL_INSTANCE.to_string(), name.to_string()),
    ])
}

/// The selector as the string the scale subresource reports.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn metadata(router: &EventRouter, plan: &Plan, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels(&plan.name)),
        owner_references: owner_reference(router).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

fn owner_reference(router: &EventRouter) -> Option<OwnerReference> {
    router.controller_owner_ref(&())
}

/// Build every child of `router`. Pure.
pub fn build(router: &EventRouter, plan: &Plan) -> Desired {
    Desired {
        service_account: service_account(router, plan),
        deployment: deployment(router, plan),
        service: service(router, plan),
        metrics_service: metrics_service(router, plan),
        disruption_budget: router
            .spec
            .disruption_budget
            .enabled
            .then(|| disruption_budget(router, plan)),
        horizontal_autoscaler: (plan.autoscaler == Some(AutoscalingProvider::Hpa))
            .then(|| horizontal_autoscaler(router, plan)),
        scaled_object: (plan.autoscaler == Some(AutoscalingProvider::Keda))
            .then(|| scaled_object(router, plan)),
        service_monitor: plan.service_monitor.then(|| service_monitor(router, plan)),
        topology: plan.topology.clone(),
    }
}

fn service_account(router: &EventRouter, plan: &Plan) -> ServiceAccount {
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

fn event_service_env(router: &EventRouter, plan: &Plan) -> Vec<EnvVar> {
    let spec = &router.spec;
    let ws = &spec.websocket;
    let mq = &spec.rabbitmq;
    vec![
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
        env_var(
            env::SLOW_CONSUMER_POLICY,
            match ws.slow_consumer_policy {
                SlowConsumerPolicy::Disconnect => "disconnect",
                SlowConsumerPolicy::DropOldest => "drop-oldest",
            },
        ),
        env_var(env::MAX_FRAME_BYTES, ws.max_frame_bytes.to_string()),
        env_var(env::MAX_SUBSCRIPTIONS, ws.max_subscriptions.to_string()),
        env_var(env::MAX_CONNECTIONS, ws.max_connections_per_pod.to_string()),
        env_var(env::DRAIN_DURATION, ws.drain_duration.clone()),
        env_var(env::LOG, spec.log_level.clone()),
        env_var(env::LOG_FORMAT, "json"),
        EnvVar {
            name: env::POD_NAME.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ]
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
pub fn termination_grace_seconds(plan: &Plan) -> i64 {
    let drain = i64::try_from(plan.drain.as_secs()).unwrap_or(i64::MAX / 2);
    PRE_STOP_SLEEP_SECONDS + drain + GRACE_SLACK_SECONDS
}

fn deployment(router: &EventRouter, plan: &Plan) -> Deployment {
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
        volume_mounts: Some(vec![
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
        ]),
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
        volumes: Some(vec![
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
        ]),
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

fn service(router: &EventRouter, plan: &Plan) -> Service {
    let spec = &router.spec.service;
    let mut meta = metadata(router, plan, plan.name.clone());
    meta.annotations = (!spec.annotations.is_empty()).then(|| spec.annotations.clone());
    Service {
        metadata: meta,
        spec: Some(K8sServiceSpec {
            type_: Some(format!("{:?}", spec.type_)),
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

/// Name of the headless metrics Service.
pub fn metrics_service_name(name: &str) -> String {
    format!("{name}-metrics")
}

fn metrics_service(router: &EventRouter, plan: &Plan) -> Service {
    let mut meta = metadata(router, plan, metrics_service_name(&plan.name));
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(METRICS_SERVICE_LABEL.into(), "true".into());
    Service {
        metadata: meta,
        spec: Some(K8sServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&plan.name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: i32::from(http::DEFAULT_ADMIN_PORT),
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..K8sServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn disruption_budget(router: &EventRouter, plan: &Plan) -> PodDisruptionBudget {
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

fn scaling_rules(rules: &ScalingRules) -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(rules.stabilization_window_seconds),
        select_policy: Some("Max".into()),
        policies: Some(vec![HPAScalingPolicy {
            type_: "Pods".into(),
            value: rules.pods_per_minute,
            period_seconds: 60,
        }]),
        ..HPAScalingRules::default()
    }
}

fn pods_metric(name: &str, average: Quantity) -> MetricSpec {
    MetricSpec {
        type_: "Pods".into(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.into(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".into(),
                average_value: Some(average),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }
}

fn horizontal_autoscaler(router: &EventRouter, plan: &Plan) -> HorizontalPodAutoscaler {
    let a = &router.spec.autoscaling;
    HorizontalPodAutoscaler {
        metadata: metadata(router, plan, plan.name.clone()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: plan.name.clone(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![
                pods_metric(
                    metric_names::CONNECTIONS_METRIC,
                    Quantity(a.target_connections_per_pod.to_string()),
                ),
                pods_metric(
                    metric_names::RECV_QUEUE_METRIC,
                    Quantity(a.target_recv_queue_bytes_per_pod.to_string()),
                ),
            ]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_up: Some(scaling_rules(&a.scale_up)),
                scale_down: Some(scaling_rules(&a.scale_down)),
            }),
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// The PromQL KEDA runs for `metric`: the sum over this router's pods (KEDA divides by replicas
/// for an `AverageValue` target).
pub fn keda_query(metric: &str, plan: &Plan) -> String {
    format!(
        "sum({metric}{{namespace=\"{ns}\",pod=~\"{name}-[a-z0-9]+-[a-z0-9]+\"}})",
        ns = plan.namespace,
        name = plan.name
    )
}

fn scaled_object(router: &EventRouter, plan: &Plan) -> DynamicObject {
    let a = &router.spec.autoscaling;
    let address = a.prometheus_address.clone().unwrap_or_default();
    let trigger = |metric: &str, threshold: String| {
        json!({
            "type": "prometheus",
            "name": metric.replace('_', "-"),
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": address,
                "query": keda_query(metric, plan),
                "threshold": threshold,
                // An empty result must not read as zero load (that scales to minimum at peak).
                "ignoreNullValues": "false",
            }
        })
    };
    let behavior = HorizontalPodAutoscalerBehavior {
        scale_up: Some(scaling_rules(&a.scale_up)),
        scale_down: Some(scaling_rules(&a.scale_down)),
    };
    let mut object =
        DynamicObject::new(&plan.name, &scaled_object_resource()).within(&plan.namespace);
    object.metadata = metadata(router, plan, plan.name.clone());
    object.data = json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
            "triggers": [
                trigger(metric_names::CONNECTIONS_METRIC, a.target_connections_per_pod.to_string()),
                trigger(metric_names::RECV_QUEUE_METRIC, a.target_recv_queue_bytes_per_pod.to_string()),
            ],
        }
    });
    object
}

fn service_monitor(router: &EventRouter, plan: &Plan) -> DynamicObject {
    let mut selector = selector_labels(&plan.name);
    selector.insert(METRICS_SERVICE_LABEL.into(), "true".into());
    let mut object =
        DynamicObject::new(&plan.name, &service_monitor_resource()).within(&plan.namespace);
    object.metadata = metadata(router, plan, plan.name.clone());
    object.data = json!({
        "spec": {
            "selector": {"matchLabels": selector},
            "endpoints": [{
                "port": "metrics",
                "path": http::METRICS_PATH,
                "interval": router.spec.monitoring.interval,
                // The dashboards, alerts and adapter rules group by `router`.
                "relabelings": [{
                    "sourceLabels": [target_labels::ROUTER_LABEL_SOURCE],
                    "targetLabel": target_labels::ROUTER_LABEL,
                    "action": "replace",
                }],
            }],
        }
    });
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};
    use crate::validate::{ClusterFacts, validate};

    fn desired(router: &EventRouter, facts: &ClusterFacts) -> Desired {
        let plan = validate(router, facts).expect("fixture is valid");
        build(router, &plan)
    }

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

    fn an_autoscaled_router(provider: AutoscalingProvider) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.autoscaling.enabled = true;
        router.spec.autoscaling.provider = provider;
        router.spec.autoscaling.min_replicas = 3;
        router.spec.autoscaling.max_replicas = 12;
        router.spec.autoscaling.target_connections_per_pod = 2000;
        router.spec.autoscaling.target_recv_queue_bytes_per_pod = 262_144;
        router.spec.autoscaling.prometheus_address = Some("http://prometheus:9090".into());
        router
    }

    #[test]
    fn a_plain_router_gets_a_deployment_with_its_replicas_service_account_service_and_budget() {
        let d = desired(&a_router_named("chat"), &a_cluster_with_the_secret());
        let spec = d.deployment.spec.as_ref().expect("deployment spec");
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(d.service_account.metadata.name.as_deref(), Some("chat"));
        assert_eq!(d.service.metadata.name.as_deref(), Some("chat"));
        assert_eq!(
            d.metrics_service.metadata.name.as_deref(),
            Some("chat-metrics")
        );
        assert!(d.disruption_budget.is_some());
        assert!(d.horizontal_autoscaler.is_none());
        assert!(d.scaled_object.is_none());
        assert!(d.service_monitor.is_none());
    }

    #[test]
    fn every_child_is_owned_by_the_router_as_its_controller() {
        let router = a_router_named("chat");
        let d = desired(&router, &a_cluster_with_the_secret());
        let owners = [
            &d.service_account.metadata,
            &d.deployment.metadata,
            &d.service.metadata,
            &d.metrics_service.metadata,
            &d.disruption_budget.as_ref().expect("pdb").metadata,
        ];
        for meta in owners {
            let owner = &meta.owner_references.as_ref().expect("owner references")[0];
            assert_eq!(owner.kind, "EventRouter");
            assert_eq!(owner.uid, "0000-uid");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("events"));
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
    fn with_hpa_autoscaling_the_deployment_has_no_replicas_and_an_hpa_scales_on_both_pod_metrics() {
        let d = desired(
            &an_autoscaled_router(AutoscalingProvider::Hpa),
            &a_cluster_with_the_secret(),
        );
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
        assert!(d.scaled_object.is_none());
        let hpa = d
            .horizontal_autoscaler
            .expect("an HPA")
            .spec
            .expect("hpa spec");
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(3), 12));
        assert_eq!(hpa.scale_target_ref.name, "chat");
        let metrics: Vec<_> = hpa
            .metrics
            .iter()
            .flatten()
            .map(|m| {
                let pods = m.pods.as_ref().expect("a Pods metric");
                (
                    pods.metric.name.clone(),
                    pods.target.average_value.clone().expect("average").0,
                )
            })
            .collect();
        assert_eq!(
            metrics,
            vec![
                ("eventrouter_connections".to_string(), "2000".to_string()),
                (
                    "eventrouter_socket_recv_queue_bytes".to_string(),
                    "262144".to_string()
                ),
            ]
        );
        let behavior = hpa.behavior.expect("behavior");
        assert_eq!(
            behavior
                .scale_down
                .and_then(|r| r.stabilization_window_seconds),
            Some(300)
        );
    }

    #[test]
    fn with_keda_installed_a_scaled_object_replaces_the_hpa() {
        let facts = ClusterFacts {
            keda_installed: true,
            ..a_cluster_with_the_secret()
        };
        let d = desired(&an_autoscaled_router(AutoscalingProvider::Keda), &facts);
        assert!(d.horizontal_autoscaler.is_none());
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
        let so = d.scaled_object.expect("a ScaledObject");
        assert_eq!(
            so.types.as_ref().map(|t| t.api_version.as_str()),
            Some("keda.sh/v1alpha1")
        );
        let spec = &so.data["spec"];
        assert_eq!(spec["minReplicaCount"], 3);
        assert_eq!(spec["triggers"][0]["type"], "prometheus");
        assert_eq!(spec["triggers"][0]["metadata"]["threshold"], "2000");
        assert_eq!(spec["triggers"][0]["metadata"]["ignoreNullValues"], "false");
        assert_eq!(
            spec["triggers"][1]["metadata"]["query"],
            r#"sum(eventrouter_socket_recv_queue_bytes{namespace="events",pod=~"chat-[a-z0-9]+-[a-z0-9]+"})"#
        );
    }

    #[test]
    fn with_keda_missing_there_is_no_autoscaler_and_still_no_replicas() {
        let d = desired(
            &an_autoscaled_router(AutoscalingProvider::Keda),
            &a_cluster_with_the_secret(),
        );
        assert!(d.horizontal_autoscaler.is_none() && d.scaled_object.is_none());
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
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
    fn a_service_monitor_scrapes_the_metrics_service_when_the_crd_exists() {
        let facts = ClusterFacts {
            service_monitor_installed: true,
            ..a_cluster_with_the_secret()
        };
        let d = desired(&a_router_named("chat"), &facts);
        let sm = d.service_monitor.expect("a ServiceMonitor");
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
        let relabel = &sm.data["spec"]["endpoints"][0]["relabelings"][0];
        assert_eq!(relabel["targetLabel"], "router");
        assert_eq!(
            relabel["sourceLabels"][0],
            "__meta_kubernetes_pod_label_app_kubernetes_io_instance"
        );
        assert_eq!(
            sm.data["spec"]["selector"]["matchLabels"][METRICS_SERVICE_LABEL],
            "true"
        );
        let metrics_labels = d.metrics_service.metadata.labels.expect("labels");
        assert_eq!(metrics_labels[METRICS_SERVICE_LABEL], "true");
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

    #[test]
    fn the_selector_string_matches_the_pod_selector() {
        assert_eq!(
            selector_string("chat"),
            "app.kubernetes.io/instance=chat,app.kubernetes.io/name=event-router"
        );
    }
}
