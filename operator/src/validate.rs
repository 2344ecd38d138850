//! Pure validation of an EventRouter against what the CRD schema could not check.
//!
//! The schema and its CEL rules already reject most bad input at the API server. What is left
//! needs facts from the cluster (does the Secret exist? is KEDA installed?) or parses values
//! (durations). `validate` takes those facts as plain data, never a client, and returns either a
//! `Plan` for `build` or every problem at once, so one status update tells the user everything.
//! `access` checks `spec.auth` and `spec.limits`, `history` checks `spec.history`.

mod access;
mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::uri::AMQPUri;

use crate::crd::{AutoscalingProvider, EventRouter, KeyFile, RecordedBinding};
use crate::topology::DesiredTopology;

pub use self::access::KeyPresence;

/// The longest drain the operator accepts; the pod's grace period is derived from it.
pub const MAX_DRAIN: Duration = Duration::from_secs(15 * 60);
/// The shortest heartbeat interval the event service accepts.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// AMQP names (exchanges, queues, streams) are short strings: at most 255 bytes.
const MAX_EXCHANGE_NAME_BYTES: usize = 255;

/// What the reconciler looked up in the cluster before validating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFacts {
    pub amqp_url: SecretLookup,
    /// The `keda.sh/v1alpha1` ScaledObject API is served.
    pub keda_installed: bool,
    /// The `monitoring.coreos.com/v1` ServiceMonitor API is served.
    pub service_monitor_installed: bool,
    /// Whether each Secret key `spec.auth` references exists (a key file not listed is unchecked).
    pub key_files: BTreeMap<KeyFile, KeyPresence>,
}

/// The AMQP URL as found in the referenced Secret.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretLookup {
    Found(String),
    SecretMissing,
    KeyMissing,
}

impl std::fmt::Debug for SecretLookup {
    // The URL carries credentials: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Found(_) => f.write_str("Found(<redacted>)"),
            Self::SecretMissing => f.write_str("SecretMissing"),
            Self::KeyMissing => f.write_str("KeyMissing"),
        }
    }
}

/// A validated router: everything `build` and the broker step need, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub namespace: String,
    pub drain: Duration,
    pub topology: DesiredTopology,
    /// Autoscaling is on and its provider's API is present (HPA always is).
    pub autoscaler: Option<AutoscalingProvider>,
    /// Autoscaling asks for KEDA but the cluster does not serve ScaledObjects.
    pub keda_missing: bool,
    pub service_monitor: bool,
}

/// Every reason a spec cannot be acted on, as sentences for the status message and the event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<String>,
}

fn is_dns_1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.last().is_some_and(|b| *b != b'-')
}

fn duration(problems: &mut Vec<String>, field: &str, value: &str) -> Option<Duration> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            problems.push(format!("{field} must be longer than zero"));
            None
        }
        Err(error) => {
            problems.push(format!(
                "{field} {value:?} is not a duration like 20s or 1m30s: {error}"
            ));
            None
        }
    }
}

/// Parse `url` with the parser the event service connects with (lapin's `AMQPUri`), so a URL the
/// operator accepts is one every pod can use. The error never repeats the URL: it holds
/// credentials.
fn parse_amqp_url(url: &str) -> Result<AMQPUri, String> {
    url.trim()
        .parse::<AMQPUri>()
        .map_err(|error| error.replace(url.trim(), "<the URL>"))
}

/// Check `router` against `facts`. Pure: no I/O.
pub fn validate(router: &EventRouter, facts: &ClusterFacts) -> Result<Plan, InvalidSpec> {
    let spec = &router.spec;
    let mut problems = Vec::new();
    let name = router.metadata.name.clone().unwrap_or_default();
    let namespace = router.metadata.namespace.clone().unwrap_or_default();

    if !is_dns_1035_label(&name) {
        problems.push(format!(
            "metadata.name {name:?} must be a DNS label (lowercase letters, digits, '-', at most 63, starting with a letter) because the Service is named after it"
        ));
    }

    match &facts.amqp_url {
        SecretLookup::Found(url) => {
            if let Err(error) = parse_amqp_url(url) {
                problems.push(format!(
                    "key {:?} of Secret {:?} must hold an AMQP URL like amqp://user:pass@host:5672/%2f (or amqps://): {error}",
                    spec.rabbitmq.secret_ref.key, spec.rabbitmq.secret_ref.name
                ));
            }
        }
        SecretLookup::SecretMissing => problems.push(format!(
            "Secret {:?} (spec.rabbitmq.secretRef) does not exist",
            spec.rabbitmq.secret_ref.name
        )),
        SecretLookup::KeyMissing => problems.push(format!(
            "Secret {:?} has no key {:?} (spec.rabbitmq.secretRef.key)",
            spec.rabbitmq.secret_ref.name, spec.rabbitmq.secret_ref.key
        )),
    }

    let exchange = router.exchange_name();
    if exchange.starts_with("amq.") {
        problems.push(format!(
            "exchange {exchange:?} is reserved by RabbitMQ (amq.*); set spec.rabbitmq.exchange"
        ));
    }
    let is_upstream = |name: &str| spec.rabbitmq.upstreams.iter().any(|u| u.exchange == name);
    if is_upstream(&exchange) {
        problems.push(format!(
            "upstream exchange {exchange:?} is the router's own exchange"
        ));
    }
    let control_exchange = router.control_exchange_name();
    if control_exchange.len() > MAX_EXCHANGE_NAME_BYTES {
        problems.push(format!(
            "the control exchange {control_exchange:?} would be longer than {MAX_EXCHANGE_NAME_BYTES} bytes; shorten spec.rabbitmq.exchange"
        ));
    }
    if is_upstream(&control_exchange) {
        problems.push(format!(
            "upstream exchange {control_exchange:?} is the router's control exchange (its pods' load heartbeats)"
        ));
    }

    duration(
        &mut problems,
        "spec.rabbitmq.queueMessageTtl",
        &spec.rabbitmq.queue_message_ttl,
    );
    duration(
        &mut problems,
        "spec.rabbitmq.queueExpires",
        &spec.rabbitmq.queue_expires,
    );
    duration(
        &mut problems,
        "spec.websocket.handshakeTimeout",
        &spec.websocket.handshake_timeout,
    );
    duration(
        &mut problems,
        "spec.monitoring.interval",
        &spec.monitoring.interval,
    );
    let ping = duration(
        &mut problems,
        "spec.websocket.pingInterval",
        &spec.websocket.ping_interval,
    );
    let idle = duration(
        &mut problems,
        "spec.websocket.idleTimeout",
        &spec.websocket.idle_timeout,
    );
    if let (Some(ping), Some(idle)) = (ping, idle)
        && ping >= idle
    {
        problems.push(format!(
            "spec.websocket.pingInterval ({}) must be shorter than idleTimeout ({}), or healthy idle clients are closed",
            spec.websocket.ping_interval, spec.websocket.idle_timeout
        ));
    }
    let drain = duration(
        &mut problems,
        "spec.websocket.drainDuration",
        &spec.websocket.drain_duration,
    );
    if let Some(drain) = drain
        && drain > MAX_DRAIN
    {
        problems.push(format!(
            "spec.websocket.drainDuration must be at most {}",
            humantime::format_duration(MAX_DRAIN)
        ));
    }

    let heartbeat = duration(
        &mut problems,
        "spec.rebalance.heartbeatInterval",
        &spec.rebalance.heartbeat_interval,
    );
    if let Some(heartbeat) = heartbeat
        && heartbeat < MIN_HEARTBEAT_INTERVAL
    {
        problems.push(format!(
            "spec.rebalance.heartbeatInterval must be at least {}",
            humantime::format_duration(MIN_HEARTBEAT_INTERVAL)
        ));
    }
    // Zero is a valid minimum age (any connection may be moved), so only the syntax is checked.
    if let Err(error) = humantime::parse_duration(&spec.rebalance.min_connection_age) {
        problems.push(format!(
            "spec.rebalance.minConnectionAge {:?} is not a duration like 60s or 2m: {error}",
            spec.rebalance.min_connection_age
        ));
    }

    access::check(&mut problems, spec, &facts.key_files);
    let stream = router.history_stream_name();
    if let Some(history_spec) = &spec.history {
        history::check(&mut problems, history_spec, &stream);
    }

    let autoscaling = &spec.autoscaling;
    if autoscaling.enabled {
        if autoscaling.min_replicas > autoscaling.max_replicas {
            problems.push("spec.autoscaling.minReplicas must not exceed maxReplicas".into());
        }
        if autoscaling.provider == AutoscalingProvider::Keda
            && autoscaling.prometheus_address.is_none()
        {
            problems
                .push("spec.autoscaling.prometheusAddress is required with provider keda".into());
        }
    }

    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }

    let bindings: BTreeSet<RecordedBinding> = spec
        .rabbitmq
        .upstreams
        .iter()
        .flat_map(|u| {
            u.routing_keys.iter().map(|key| RecordedBinding {
                source: u.exchange.clone(),
                routing_key: key.clone(),
            })
        })
        .collect();
    let keda_missing = autoscaling.enabled
        && autoscaling.provider == AutoscalingProvider::Keda
        && !facts.keda_installed;
    Ok(Plan {
        name,
        namespace,
        drain: drain.unwrap_or(Duration::from_secs(10)),
        topology: DesiredTopology {
            exchange,
            control_exchange,
            bindings,
            history: spec
                .enabled_history()
                .map(|history_spec| history::desired(history_spec, stream)),
        },
        autoscaler: (autoscaling.enabled && !keda_missing).then_some(autoscaling.provider),
        keda_missing,
        service_monitor: spec.monitoring.service_monitor && facts.service_monitor_installed,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{EventRouterSpec, UpstreamBinding};

    pub(crate) fn a_router_named(name: &str) -> EventRouter {
        let mut router = EventRouter::new(name, EventRouterSpec::with_secret("amqp"));
        router.metadata.namespace = Some("events".into());
        router.metadata.uid = Some("0000-uid".into());
        router.metadata.generation = Some(1);
        router
    }

    pub(crate) fn a_cluster_with_the_secret() -> ClusterFacts {
        ClusterFacts {
            amqp_url: SecretLookup::Found("amqp://guest:guest@rabbitmq:5672/%2f".into()),
            keda_installed: false,
            service_monitor_installed: false,
            key_files: BTreeMap::new(),
        }
    }

    fn problems_of(router: &EventRouter, facts: &ClusterFacts) -> Vec<String> {
        validate(router, facts)
            .expect_err("the spec must be rejected")
            .problems
    }

    #[test]
    fn a_default_router_is_valid_and_uses_its_name_as_exchange() {
        let plan = validate(&a_router_named("chat"), &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(plan.topology.exchange, "chat");
        assert_eq!(plan.topology.control_exchange, "chat.control");
        assert!(plan.topology.bindings.is_empty());
        assert_eq!(plan.topology.history, None, "history is off by default");
        assert_eq!(plan.drain, Duration::from_secs(10));
        assert_eq!(plan.autoscaler, None);
    }

    #[test]
    fn a_missing_secret_is_an_invalid_spec_naming_the_secret() {
        let facts = ClusterFacts {
            amqp_url: SecretLookup::SecretMissing,
            ..a_cluster_with_the_secret()
        };
        let problems = problems_of(&a_router_named("chat"), &facts);
        assert_eq!(
            problems,
            vec![r#"Secret "amqp" (spec.rabbitmq.secretRef) does not exist"#.to_string()]
        );
    }

    #[test]
    fn a_secret_without_the_key_or_with_a_non_amqp_url_is_invalid() {
        let facts = ClusterFacts {
            amqp_url: SecretLookup::KeyMissing,
            ..a_cluster_with_the_secret()
        };
        assert!(problems_of(&a_router_named("chat"), &facts)[0].contains("has no key \"url\""));
        let facts = ClusterFacts {
            amqp_url: SecretLookup::Found("http://x".into()),
            ..a_cluster_with_the_secret()
        };
        let problems = problems_of(&a_router_named("chat"), &facts);
        assert!(problems[0].contains("amqp://"), "{problems:?}");
        assert!(
            problems[0].contains("Invalid AMQP scheme: http"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_amqp_url_is_checked_by_the_services_parser_without_echoing_it() {
        for ok in [
            "amqp://guest:guest@rabbitmq:5672/%2f",
            "amqps://user:secret@broker.example/vhost?heartbeat=30",
            "amqp://rabbitmq",
        ] {
            assert!(parse_amqp_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "rabbitmq:5672",
            "amqp://user:secret@rabbitmq/%2f?heartbeat=often",
            "amqp:user:secret",
            "",
        ] {
            let facts = ClusterFacts {
                amqp_url: SecretLookup::Found(bad.into()),
                ..a_cluster_with_the_secret()
            };
            let problems = problems_of(&a_router_named("chat"), &facts);
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert!(!problems[0].contains("secret"), "{bad}: {problems:?}");
        }
    }

    #[test]
    fn a_ping_interval_not_shorter_than_the_idle_timeout_is_invalid() {
        let mut router = a_router_named("chat");
        router.spec.websocket.ping_interval = "60s".into();
        router.spec.websocket.idle_timeout = "60s".into();
        assert!(problems_of(&router, &a_cluster_with_the_secret())[0].contains("pingInterval"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut router = a_router_named("chat");
        router.spec.websocket.drain_duration = "1h".into();
        router.spec.rabbitmq.queue_expires = "soon".into();
        let facts = ClusterFacts {
            amqp_url: SecretLookup::SecretMissing,
            ..a_cluster_with_the_secret()
        };
        assert_eq!(problems_of(&router, &facts).len(), 3);
    }

    #[test]
    fn a_name_that_cannot_name_a_service_is_invalid() {
        assert!(
            problems_of(&a_router_named("Chat.v2"), &a_cluster_with_the_secret())[0]
                .contains("DNS label")
        );
    }

    #[test]
    fn an_upstream_equal_to_the_default_exchange_is_invalid() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.upstreams = vec![UpstreamBinding {
            exchange: "chat".into(),
            routing_keys: vec!["#".into()],
        }];
        assert!(problems_of(&router, &a_cluster_with_the_secret())[0].contains("own exchange"));
    }

    #[test]
    fn upstreams_become_one_binding_per_routing_key() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.upstreams = vec![
            UpstreamBinding {
                exchange: "orders".into(),
                routing_keys: vec!["order.*".into(), "refund.#".into()],
            },
            UpstreamBinding {
                exchange: "users".into(),
                routing_keys: vec!["user.#".into()],
            },
        ];
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        let keys: Vec<_> = plan
            .topology
            .bindings
            .iter()
            .map(|b| (b.source.as_str(), b.routing_key.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("orders", "order.*"),
                ("orders", "refund.#"),
                ("users", "user.#")
            ]
        );
    }

    #[test]
    fn the_control_exchange_follows_the_exchange_and_is_no_upstream() {
        let mut router = a_router_named("chat");
        router.spec.rabbitmq.exchange = Some("events.chat".into());
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(plan.topology.control_exchange, "events.chat.control");

        router.spec.rabbitmq.upstreams = vec![UpstreamBinding {
            exchange: "events.chat.control".into(),
            routing_keys: vec!["#".into()],
        }];
        assert_eq!(
            problems_of(&router, &a_cluster_with_the_secret()),
            vec![
                r#"upstream exchange "events.chat.control" is the router's control exchange (its pods' load heartbeats)"#
                    .to_string()
            ]
        );

        router.spec.rabbitmq.upstreams.clear();
        router.spec.rabbitmq.exchange = Some("e".repeat(250));
        let problems = problems_of(&router, &a_cluster_with_the_secret());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("longer than 255 bytes"),
            "{problems:?}"
        );
    }

    #[test]
    fn rebalance_durations_are_checked_like_the_service_does() {
        let mut router = a_router_named("chat");
        router.spec.rebalance.heartbeat_interval = "50ms".into();
        router.spec.rebalance.min_connection_age = "soon".into();
        let problems = problems_of(&router, &a_cluster_with_the_secret());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(
            problems[0],
            "spec.rebalance.heartbeatInterval must be at least 100ms"
        );
        assert!(
            problems[1].starts_with(r#"spec.rebalance.minConnectionAge "soon" is not a duration"#),
            "{problems:?}"
        );

        router.spec.rebalance.heartbeat_interval = "100ms".into();
        router.spec.rebalance.min_connection_age = "0s".into();
        validate(&router, &a_cluster_with_the_secret()).expect("the service accepts both");
    }

    #[test]
    fn keda_without_its_crd_is_valid_but_flagged_and_without_autoscaler() {
        let mut router = a_router_named("chat");
        router.spec.autoscaling.enabled = true;
        router.spec.autoscaling.provider = AutoscalingProvider::Keda;
        router.spec.autoscaling.prometheus_address = Some("http://prometheus:9090".into());
        let plan = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert!(plan.keda_missing);
        assert_eq!(plan.autoscaler, None);
        let facts = ClusterFacts {
            keda_installed: true,
            ..a_cluster_with_the_secret()
        };
        let plan = validate(&router, &facts).expect("valid");
        assert_eq!(plan.autoscaler, Some(AutoscalingProvider::Keda));
    }

    #[test]
    fn keda_without_a_prometheus_address_is_invalid() {
        let mut router = a_router_named("chat");
        router.spec.autoscaling.enabled = true;
        router.spec.autoscaling.provider = AutoscalingProvider::Keda;
        assert!(
            problems_of(&router, &a_cluster_with_the_secret())[0].contains("prometheusAddress")
        );
    }

    #[test]
    fn min_above_max_replicas_is_invalid_when_autoscaling() {
        let mut router = a_router_named("chat");
        router.spec.autoscaling.enabled = true;
        router.spec.autoscaling.min_replicas = 5;
        router.spec.autoscaling.max_replicas = 3;
        assert!(problems_of(&router, &a_cluster_with_the_secret())[0].contains("minReplicas"));
    }

    #[test]
    fn a_service_monitor_is_planned_only_when_wanted_and_installed() {
        let router = a_router_named("chat");
        assert!(
            !validate(&router, &a_cluster_with_the_secret())
                .expect("valid")
                .service_monitor
        );
        let facts = ClusterFacts {
            service_monitor_installed: true,
            ..a_cluster_with_the_secret()
        };
        assert!(validate(&router, &facts).expect("valid").service_monitor);
        let mut router = a_router_named("chat");
        router.spec.monitoring.service_monitor = false;
        assert!(!validate(&router, &facts).expect("valid").service_monitor);
    }
}
