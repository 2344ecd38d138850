//! Every default of the spec, in one place: serde fills omitted fields with them and schemars
//! writes them into the CRD, so the API server applies the same values. A test in this crate
//! checks they agree with the event service's own command-line defaults.

use std::collections::BTreeMap;

use super::{
    AutoscalingProvider, AutoscalingSpec, DeletionPolicy, DisruptionBudgetSpec, EventRouterSpec,
    HistorySpec, MonitoringSpec, RabbitMqSpec, RebalanceSpec, ScalingRules, SecretKeyRef,
    ServiceSpec, ServiceType, SlowConsumerPolicy, WebSocketSpec,
};

pub(super) fn default_image() -> String {
    format!(
        "ghcr.io/event-router/event-service:{}",
        env!("CARGO_PKG_VERSION")
    )
}
pub(super) fn default_replicas() -> i32 {
    2
}
pub(super) fn default_log_level() -> String {
    "info".into()
}
pub(super) fn default_secret_key() -> String {
    "url".into()
}
pub(super) fn default_queue_max_length() -> u32 {
    100_000
}
pub(super) fn default_queue_message_ttl() -> String {
    "60s".into()
}
pub(super) fn default_queue_expires() -> String {
    "5m".into()
}
pub(super) fn default_prefetch() -> u16 {
    256
}
pub(super) fn default_ping_interval() -> String {
    "20s".into()
}
pub(super) fn default_idle_timeout() -> String {
    "60s".into()
}
pub(super) fn default_handshake_timeout() -> String {
    "10s".into()
}
pub(super) fn default_max_frame_bytes() -> u32 {
    64 * 1024
}
pub(super) fn default_send_queue_bytes() -> u32 {
    1024 * 1024
}
pub(super) fn default_max_subscriptions() -> u32 {
    100
}
pub(super) fn default_max_connections() -> u32 {
    10_000
}
pub(super) fn default_drain_duration() -> String {
    "10s".into()
}
pub(super) fn default_listen_backlog() -> u32 {
    4096
}
pub(super) fn default_rebalance_tolerance_percent() -> u32 {
    15
}
pub(super) fn default_rebalance_max_shed_rate() -> u32 {
    10
}
pub(super) fn default_rebalance_min_connection_age() -> String {
    "60s".into()
}
pub(super) fn default_rebalance_heartbeat_interval() -> String {
    "5s".into()
}
pub(super) fn default_min_replicas() -> i32 {
    2
}
pub(super) fn default_max_replicas() -> i32 {
    10
}
pub(super) fn default_target_connections() -> u32 {
    5_000
}
pub(super) fn default_target_recv_queue_bytes() -> i64 {
    1024 * 1024
}
pub(super) fn default_scale_up() -> ScalingRules {
    ScalingRules {
        stabilization_window_seconds: 0,
        pods_per_minute: 4,
    }
}
pub(super) fn default_scale_down() -> ScalingRules {
    ScalingRules {
        stabilization_window_seconds: 300,
        pods_per_minute: 1,
    }
}
pub(super) fn default_service_port() -> i32 {
    80
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_max_unavailable() -> i32 {
    1
}
pub(super) fn default_scrape_interval() -> String {
    "30s".into()
}
pub(super) fn default_history_max_age() -> String {
    "24h".into()
}
pub(super) fn default_history_max_bytes() -> i64 {
    1024 * 1024 * 1024
}
pub(super) fn default_history_patterns() -> Vec<String> {
    vec!["#".into()]
}
pub(super) fn default_recovery_max_events() -> u32 {
    10_000
}
pub(super) fn default_recovery_max_concurrent() -> u32 {
    64
}

impl Default for WebSocketSpec {
    fn default() -> Self {
        Self {
            ping_interval: default_ping_interval(),
            idle_timeout: default_idle_timeout(),
            handshake_timeout: default_handshake_timeout(),
            max_frame_bytes: default_max_frame_bytes(),
            send_queue_bytes: default_send_queue_bytes(),
            slow_consumer_policy: SlowConsumerPolicy::default(),
            max_subscriptions: default_max_subscriptions(),
            max_connections_per_pod: default_max_connections(),
            drain_duration: default_drain_duration(),
            listen_backlog: default_listen_backlog(),
        }
    }
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            enabled: None,
            tolerance_percent: default_rebalance_tolerance_percent(),
            max_shed_rate: default_rebalance_max_shed_rate(),
            min_connection_age: default_rebalance_min_connection_age(),
            heartbeat_interval: default_rebalance_heartbeat_interval(),
        }
    }
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            provider: AutoscalingProvider::default(),
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_connections_per_pod: default_target_connections(),
            target_recv_queue_bytes_per_pod: default_target_recv_queue_bytes(),
            prometheus_address: None,
            scale_up: default_scale_up(),
            scale_down: default_scale_down(),
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            scrape_annotations: true,
            service_monitor: true,
            interval: default_scrape_interval(),
        }
    }
}

impl Default for HistorySpec {
    /// Every default, history off (`spec.history: {}`).
    fn default() -> Self {
        Self {
            enabled: false,
            max_age: default_history_max_age(),
            max_bytes: default_history_max_bytes(),
            max_segment_bytes: None,
            patterns: default_history_patterns(),
            recovery_max_events: default_recovery_max_events(),
            recovery_max_concurrent: default_recovery_max_concurrent(),
        }
    }
}

impl HistorySpec {
    /// History on, with every default (the stream keeps every event for 24h, at most 1 GiB).
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }
}

impl RabbitMqSpec {
    /// A RabbitMQ section with every default, reading the URL from `secret`'s key `url`.
    pub fn from_secret(secret: &str) -> Self {
        Self {
            secret_ref: SecretKeyRef {
                name: secret.into(),
                key: default_secret_key(),
            },
            exchange: None,
            upstreams: Vec::new(),
            queue_max_length: default_queue_max_length(),
            queue_message_ttl: default_queue_message_ttl(),
            queue_expires: default_queue_expires(),
            prefetch: default_prefetch(),
        }
    }
}

impl EventRouterSpec {
    /// A spec with every default that reads its AMQP URL from `secret` (fixtures and examples).
    pub fn with_secret(secret: &str) -> Self {
        Self {
            image: default_image(),
            image_pull_policy: None,
            replicas: default_replicas(),
            resources: None,
            rabbitmq: RabbitMqSpec::from_secret(secret),
            websocket: WebSocketSpec::default(),
            autoscaling: AutoscalingSpec::default(),
            rebalance: RebalanceSpec::default(),
            service: ServiceSpec::default(),
            disruption_budget: DisruptionBudgetSpec::default(),
            monitoring: MonitoringSpec::default(),
            auth: None,
            limits: None,
            history: None,
            deletion_policy: DeletionPolicy::default(),
            log_level: default_log_level(),
            paused: false,
        }
    }
}
