//! The contract between the event service and everything that runs or watches it.
//!
//! The operator sets the service's environment variables, the chart's dashboards and alerts query
//! its metrics, and the HPA scales on two of them. Every such name lives here once, so a rename is
//! a compile error in every crate that depends on it instead of a silent mismatch in a cluster.
//! This crate has no dependencies and no I/O.

/// Environment variables read by the event service (each is also a `--flag`; see its `--help`).
pub mod env {
    pub const LISTEN: &str = "EVENTROUTER_LISTEN";
    pub const ADMIN_LISTEN: &str = "EVENTROUTER_ADMIN_LISTEN";
    pub const SOURCE: &str = "EVENTROUTER_SOURCE";
    pub const AMQP_URL: &str = "EVENTROUTER_AMQP_URL";
    pub const AMQP_URL_FILE: &str = "EVENTROUTER_AMQP_URL_FILE";
    pub const EXCHANGE: &str = "EVENTROUTER_EXCHANGE";
    pub const DECLARE_EXCHANGE: &str = "EVENTROUTER_DECLARE_EXCHANGE";
    pub const QUEUE_MAX_LENGTH: &str = "EVENTROUTER_QUEUE_MAX_LENGTH";
    pub const QUEUE_MESSAGE_TTL: &str = "EVENTROUTER_QUEUE_MESSAGE_TTL";
    pub const QUEUE_EXPIRES: &str = "EVENTROUTER_QUEUE_EXPIRES";
    pub const PREFETCH: &str = "EVENTROUTER_PREFETCH";
    pub const PING_INTERVAL: &str = "EVENTROUTER_PING_INTERVAL";
    pub const IDLE_TIMEOUT: &str = "EVENTROUTER_IDLE_TIMEOUT";
    pub const HANDSHAKE_TIMEOUT: &str = "EVENTROUTER_HANDSHAKE_TIMEOUT";
    pub const SEND_QUEUE_BYTES: &str = "EVENTROUTER_SEND_QUEUE_BYTES";
    pub const SLOW_CONSUMER_POLICY: &str = "EVENTROUTER_SLOW_CONSUMER_POLICY";
    pub const DIRECT_WRITES: &str = "EVENTROUTER_DIRECT_WRITES";
    pub const MAX_FRAME_BYTES: &str = "EVENTROUTER_MAX_FRAME_BYTES";
    pub const MAX_SUBSCRIPTIONS: &str = "EVENTROUTER_MAX_SUBSCRIPTIONS";
    pub const MAX_PATTERN_LENGTH: &str = "EVENTROUTER_MAX_PATTERN_LENGTH";
    pub const MAX_EVENT_NAME_LENGTH: &str = "EVENTROUTER_MAX_EVENT_NAME_LENGTH";
    pub const MAX_CONNECTIONS: &str = "EVENTROUTER_MAX_CONNECTIONS";
    pub const MAX_PUBLISH_BYTES: &str = "EVENTROUTER_MAX_PUBLISH_BYTES";
    pub const DRAIN_DURATION: &str = "EVENTROUTER_DRAIN_DURATION";
    pub const SOCKET_SAMPLE_INTERVAL: &str = "EVENTROUTER_SOCKET_SAMPLE_INTERVAL";
    pub const HEAP_TRIM_INTERVAL: &str = "EVENTROUTER_HEAP_TRIM_INTERVAL";
    pub const QUEUE_ALERT_THRESHOLD_BYTES: &str = "EVENTROUTER_QUEUE_ALERT_THRESHOLD_BYTES";
    pub const LOG_FORMAT: &str = "EVENTROUTER_LOG_FORMAT";
    pub const LOG: &str = "EVENTROUTER_LOG";
    /// `true` publishes a `demo.tick` event every second on the embedded bus.
    pub const DEMO: &str = "EVENTROUTER_DEMO";
    /// `true` serves the console page on the main port (default: on with `DEMO`).
    pub const CONSOLE: &str = "EVENTROUTER_CONSOLE";
    /// Set from the downward API; names the instance's RabbitMQ queue.
    pub const POD_NAME: &str = "POD_NAME";
    /// The listening socket's accept backlog (the kernel caps it at `net.core.somaxconn`).
    pub const LISTEN_BACKLOG: &str = "EVENTROUTER_LISTEN_BACKLOG";
    /// `true` (the default) lets an instance over the fleet's mean ask clients to reconnect.
    pub const REBALANCE: &str = "EVENTROUTER_REBALANCE";
    /// The exchange the instances exchange load heartbeats on (default `<exchange>.control`).
    pub const CONTROL_EXCHANGE: &str = "EVENTROUTER_CONTROL_EXCHANGE";
    /// How often an instance publishes its heartbeat.
    pub const HEARTBEAT_INTERVAL: &str = "EVENTROUTER_HEARTBEAT_INTERVAL";
    /// Fraction over the fleet mean that still counts as balanced.
    pub const REBALANCE_TOLERANCE: &str = "EVENTROUTER_REBALANCE_TOLERANCE";
    /// Most connections one instance sheds per second.
    pub const REBALANCE_RATE: &str = "EVENTROUTER_REBALANCE_RATE";
    /// A connection younger than this is never shed.
    pub const REBALANCE_MIN_AGE: &str = "EVENTROUTER_REBALANCE_MIN_AGE";

    // Authentication (see the event service's README, "Security"). Auth is on when at least one
    // key file is set; every `*_FILE` is a path (a mounted Secret) re-read when it changes.
    /// File holding the shared secret for HS256/HS384/HS512 connection tokens.
    pub const AUTH_HMAC_SECRET_FILE: &str = "EVENTROUTER_AUTH_HMAC_SECRET_FILE";
    /// PEM file of one or more public keys (RSA, EC P-256/P-384, Ed25519) for RS*/PS*/ES*/EdDSA tokens.
    pub const AUTH_PUBLIC_KEYS_FILE: &str = "EVENTROUTER_AUTH_PUBLIC_KEYS_FILE";
    /// JWKS (JSON Web Key Set) file of public keys, selected by the token's `kid`.
    pub const AUTH_JWKS_FILE: &str = "EVENTROUTER_AUTH_JWKS_FILE";
    /// Required `iss` of connection tokens (unset: not checked).
    pub const AUTH_ISSUER: &str = "EVENTROUTER_AUTH_ISSUER";
    /// Required `aud` of connection tokens (unset: not checked).
    pub const AUTH_AUDIENCE: &str = "EVENTROUTER_AUTH_AUDIENCE";
    /// Clock skew allowed on `exp` and `nbf`.
    pub const AUTH_LEEWAY: &str = "EVENTROUTER_AUTH_LEEWAY";
    /// The claim listing the patterns a token grants (default `subscribe`).
    pub const AUTH_SUBSCRIBE_CLAIM: &str = "EVENTROUTER_AUTH_SUBSCRIBE_CLAIM";
    /// Comma-separated patterns granted to every authenticated client; `{sub}` is the token's subject.
    pub const AUTH_GRANT_TEMPLATES: &str = "EVENTROUTER_AUTH_GRANT_TEMPLATES";
    /// Comma-separated patterns clients without a token may subscribe to (empty: none).
    pub const AUTH_ANONYMOUS_PATTERNS: &str = "EVENTROUTER_AUTH_ANONYMOUS_PATTERNS";
    /// Largest token accepted, in bytes.
    pub const AUTH_MAX_TOKEN_BYTES: &str = "EVENTROUTER_AUTH_MAX_TOKEN_BYTES";
    /// How often the key files are checked for changes.
    pub const AUTH_RELOAD_INTERVAL: &str = "EVENTROUTER_AUTH_RELOAD_INTERVAL";
    /// JSON file of publish keys (`[{"name","key","events"}]`); when set `POST /publish` needs one.
    pub const PUBLISH_KEYS_FILE: &str = "EVENTROUTER_PUBLISH_KEYS_FILE";
    /// Comma-separated `Origin` values allowed to upgrade (browsers); empty: any origin.
    pub const ALLOWED_ORIGINS: &str = "EVENTROUTER_ALLOWED_ORIGINS";

    // Per-client limits.
    /// Most open connections from one source IP (0: no limit).
    pub const MAX_CONNECTIONS_PER_IP: &str = "EVENTROUTER_MAX_CONNECTIONS_PER_IP";
    /// New connections per second from one source IP (0: no limit); bursts up to the burst below.
    pub const CONNECT_RATE_PER_IP: &str = "EVENTROUTER_CONNECT_RATE_PER_IP";
    /// Burst of new connections from one source IP above the rate.
    pub const CONNECT_BURST_PER_IP: &str = "EVENTROUTER_CONNECT_BURST_PER_IP";
    /// Header holding the client address set by a trusted proxy (e.g. `X-Forwarded-For`); unset: the peer address.
    pub const TRUSTED_PROXY_HEADER: &str = "EVENTROUTER_TRUSTED_PROXY_HEADER";
    /// Frames per second one connection may send (token bucket refill; 0: no limit).
    pub const CLIENT_FRAME_RATE: &str = "EVENTROUTER_CLIENT_FRAME_RATE";
    /// Burst of frames one connection may send above the rate.
    pub const CLIENT_FRAME_BURST: &str = "EVENTROUTER_CLIENT_FRAME_BURST";

    // Missed-event recovery (see the event service's README, "Recovery").
    /// The RabbitMQ stream recoveries read (`--source amqp`); unset: no recovery from RabbitMQ.
    pub const HISTORY_STREAM: &str = "EVENTROUTER_HISTORY_STREAM";
    /// Events the embedded bus keeps for recovery (0: no history).
    pub const HISTORY_MAX_EVENTS: &str = "EVENTROUTER_HISTORY_MAX_EVENTS";
    /// Bytes of event data the embedded bus keeps, and the bound of a RabbitMQ recovery's window.
    pub const HISTORY_MAX_BYTES: &str = "EVENTROUTER_HISTORY_MAX_BYTES";
    /// How long the embedded bus keeps an event (and the stream's `x-max-age` when the service
    /// declares it).
    pub const HISTORY_MAX_AGE: &str = "EVENTROUTER_HISTORY_MAX_AGE";
    /// Most events one `subscribe` with `since` replays; more answers `recovered: false`.
    pub const RECOVERY_MAX_EVENTS: &str = "EVENTROUTER_RECOVERY_MAX_EVENTS";
    /// Most recoveries one instance runs at once; more wait their turn.
    pub const RECOVERY_MAX_CONCURRENT: &str = "EVENTROUTER_RECOVERY_MAX_CONCURRENT";
}

/// The router's history stream: the RabbitMQ stream (queue type `stream`) bound to the events
/// exchange that missed-event recovery reads.
pub mod history {
    /// Appended to the events exchange's name to name the history stream.
    pub const STREAM_SUFFIX: &str = ".history";

    /// The history stream of a router whose events exchange is `exchange`.
    pub fn default_stream(exchange: &str) -> String {
        format!("{exchange}{STREAM_SUFFIX}")
    }
}

/// The router's control exchange: where instances publish their load heartbeats.
pub mod control {
    /// Appended to the events exchange's name to name the control exchange by default.
    pub const EXCHANGE_SUFFIX: &str = ".control";

    /// The default control exchange of a router whose events exchange is `exchange`.
    pub fn default_exchange(exchange: &str) -> String {
        format!("{exchange}{EXCHANGE_SUFFIX}")
    }
}

/// Bounds every AMQP client of the project shares.
pub mod amqp {
    use std::time::Duration;

    /// How long one AMQP method (declare, bind, delete, close) may take before the broker counts
    /// as unresponsive.
    pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Ports and paths of the event service.
pub mod http {
    pub const DEFAULT_PORT: u16 = 8080;
    pub const DEFAULT_ADMIN_PORT: u16 = 9090;
    pub const WS_PATH: &str = "/ws";
    pub const PUBLISH_PATH: &str = "/publish";
    pub const HEALTHZ_PATH: &str = "/healthz";
    pub const READYZ_PATH: &str = "/readyz";
    pub const METRICS_PATH: &str = "/metrics";
    pub const DEBUG_CONNECTIONS_PATH: &str = "/debug/connections";
}

/// WebSocket close codes the service sends (the README documents each).
pub mod close {
    /// The server is shutting down or draining; reconnect (elsewhere).
    pub const GOING_AWAY: u16 = 1001;
    /// The client sent a binary frame; the protocol is JSON text.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Policy violation: repeated invalid frames.
    pub const POLICY: u16 = 1008;
    /// A frame or message over `--max-frame-bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error on the server.
    pub const INTERNAL: u16 = 1011;
    /// The client did not read fast enough and its outbound queue hit `--send-queue-bytes`.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// Nothing was received from the client for `--idle-timeout`.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The server asks the client to reconnect so load spreads over new instances.
    pub const REBALANCE: u16 = 4002;
    /// The connection's token expired and no `refresh` replaced it.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The `auth` message was refused (bad, expired or malformed token), or another op came
    /// first while anonymous access is off.
    pub const UNAUTHORIZED: u16 = 4004;
    /// Authentication is required and no `auth` message arrived within `--handshake-timeout`.
    pub const AUTH_TIMEOUT: u16 = 4005;
    /// A protocol violation: unmasked client frame, reserved bits, bad control frame, unknown opcode.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
}

/// Metric names exported on the admin port. No metric carries a per-connection label.
pub mod metrics {
    pub const PREFIX: &str = "eventrouter_";
    /// Gauge: open WebSocket connections. The HPA's connections-per-pod signal.
    pub const CONNECTIONS: &str = "eventrouter_connections";
    pub const CONNECTIONS_ACCEPTED: &str = "eventrouter_connections_accepted_total";
    pub const CONNECTIONS_REJECTED: &str = "eventrouter_connections_rejected_total";
    pub const DISCONNECTS: &str = "eventrouter_disconnects_total";
    pub const SUBSCRIPTIONS: &str = "eventrouter_subscriptions";
    pub const BINDINGS: &str = "eventrouter_bindings";
    pub const EVENTS_RECEIVED: &str = "eventrouter_events_received_total";
    pub const DELIVERIES: &str = "eventrouter_deliveries_total";
    pub const DROPS: &str = "eventrouter_drops_total";
    pub const DELIVERY_LATENCY: &str = "eventrouter_delivery_latency_seconds";
    pub const CLIENT_FRAMES: &str = "eventrouter_client_frames_total";
    pub const BROKER_UP: &str = "eventrouter_broker_up";
    pub const BROKER_RECONNECTS: &str = "eventrouter_broker_reconnects_total";
    /// Counter: attempts to connect to RabbitMQ and set up the queue that failed.
    pub const BROKER_CONNECT_FAILURES: &str = "eventrouter_broker_connect_failures_total";
    pub const PUBLISH_CONFIRMS: &str = "eventrouter_publish_confirms_total";
    pub const PUBLISH_FAILURES: &str = "eventrouter_publish_failures_total";
    pub const MALFORMED_MESSAGES: &str = "eventrouter_malformed_messages_total";
    /// Gauge: sum over connections of the kernel receive queue (Recv-Q). The HPA's second signal.
    pub const SOCKET_RECV_QUEUE_BYTES: &str = "eventrouter_socket_recv_queue_bytes";
    pub const SOCKET_RECV_QUEUE_MAX_BYTES: &str = "eventrouter_socket_recv_queue_max_bytes";
    pub const SOCKET_RECV_QUEUE_OVER_THRESHOLD: &str =
        "eventrouter_socket_recv_queue_over_threshold_connections";
    pub const SOCKET_SEND_QUEUE_BYTES: &str = "eventrouter_socket_send_queue_bytes";
    pub const SOCKET_SEND_QUEUE_MAX_BYTES: &str = "eventrouter_socket_send_queue_max_bytes";
    pub const SOCKET_SEND_QUEUE_OVER_THRESHOLD: &str =
        "eventrouter_socket_send_queue_over_threshold_connections";
    pub const OUTBOUND_QUEUE_BYTES: &str = "eventrouter_outbound_queue_bytes";
    pub const OUTBOUND_QUEUE_MAX_BYTES: &str = "eventrouter_outbound_queue_max_bytes";
    pub const OUTBOUND_QUEUE_OVER_THRESHOLD: &str =
        "eventrouter_outbound_queue_over_threshold_connections";
    /// Gauge: Recv-Q + Send-Q over all connections: the memory the origin failure could not find.
    pub const KERNEL_BUFFERED_BYTES: &str = "eventrouter_kernel_buffered_bytes";
    /// Gauge: 1 while the instance is draining.
    pub const DRAINING: &str = "eventrouter_draining";
    /// Gauge: the configured `--max-connections` (so alerts can compare).
    pub const MAX_CONNECTIONS: &str = "eventrouter_max_connections";
    /// Gauge: instances heard on the control exchange within the heartbeat TTL, this one included.
    pub const REBALANCE_FLEET_SIZE: &str = "eventrouter_rebalance_fleet_size";
    /// Gauge: connections per active (not draining) instance, from the heartbeats.
    pub const REBALANCE_FLEET_MEAN: &str = "eventrouter_rebalance_fleet_mean";
    /// Counter: connections closed with 4002 so their clients reconnect elsewhere.
    pub const REBALANCE_SHED: &str = "eventrouter_rebalance_shed_total";
    /// Counter: heartbeats received and accepted into the fleet view.
    pub const REBALANCE_HEARTBEATS_RECEIVED: &str =
        "eventrouter_rebalance_heartbeats_received_total";
    /// Counter: heartbeats received and refused (malformed, oversized, unknown version).
    pub const REBALANCE_HEARTBEATS_REJECTED: &str =
        "eventrouter_rebalance_heartbeats_rejected_total";
    /// Counter, label `result`: connection-token checks (`ok`, `expired`, `bad_signature`, ...).
    pub const AUTH_CHECKS: &str = "eventrouter_auth_checks_total";
    /// Counter, label `reason`: publish requests refused by the key check (`missing_key`, `bad_key`, `forbidden`).
    pub const PUBLISH_REJECTED: &str = "eventrouter_publish_rejected_total";
    /// Counter, label `kind`: failed `accept` calls (`no_fd` when out of file descriptors, `other`).
    pub const ACCEPT_ERRORS: &str = "eventrouter_accept_errors_total";
    /// Counter: connections answered 503 and closed because the process was out of file descriptors.
    pub const ACCEPT_SHED: &str = "eventrouter_accept_shed_total";
    /// Counter, label `result`: `subscribe` requests with `since` (`recovered`, `unknown`,
    /// `too_many`, `unavailable`, `off`, `busy`).
    pub const RECOVERIES: &str = "eventrouter_recoveries_total";
    /// Counter: events replayed to recovering clients.
    pub const RECOVERED_EVENTS: &str = "eventrouter_recovered_events_total";
    /// Gauge: recoveries running now (at most `--recovery-max-concurrent`).
    pub const RECOVERIES_ACTIVE: &str = "eventrouter_recoveries_active";
    /// Gauge: recoveries waiting for a turn.
    pub const RECOVERIES_WAITING: &str = "eventrouter_recoveries_waiting";
    /// Histogram: a `subscribe` with `since`, from the request to the replay queued (waiting for
    /// a turn included).
    pub const RECOVERY_SECONDS: &str = "eventrouter_recovery_seconds";

    /// Every metric above, for checks that must cover them all.
    pub const ALL: &[&str] = &[
        CONNECTIONS,
        CONNECTIONS_ACCEPTED,
        CONNECTIONS_REJECTED,
        DISCONNECTS,
        SUBSCRIPTIONS,
        BINDINGS,
        EVENTS_RECEIVED,
        DELIVERIES,
        DROPS,
        DELIVERY_LATENCY,
        CLIENT_FRAMES,
        BROKER_UP,
        BROKER_RECONNECTS,
        BROKER_CONNECT_FAILURES,
        PUBLISH_CONFIRMS,
        PUBLISH_FAILURES,
        MALFORMED_MESSAGES,
        SOCKET_RECV_QUEUE_BYTES,
        SOCKET_RECV_QUEUE_MAX_BYTES,
        SOCKET_RECV_QUEUE_OVER_THRESHOLD,
        SOCKET_SEND_QUEUE_BYTES,
        SOCKET_SEND_QUEUE_MAX_BYTES,
        SOCKET_SEND_QUEUE_OVER_THRESHOLD,
        OUTBOUND_QUEUE_BYTES,
        OUTBOUND_QUEUE_MAX_BYTES,
        OUTBOUND_QUEUE_OVER_THRESHOLD,
        KERNEL_BUFFERED_BYTES,
        DRAINING,
        MAX_CONNECTIONS,
        REBALANCE_FLEET_SIZE,
        REBALANCE_FLEET_MEAN,
        REBALANCE_SHED,
        REBALANCE_HEARTBEATS_RECEIVED,
        REBALANCE_HEARTBEATS_REJECTED,
        AUTH_CHECKS,
        PUBLISH_REJECTED,
        ACCEPT_ERRORS,
        ACCEPT_SHED,
        RECOVERIES,
        RECOVERED_EVENTS,
        RECOVERIES_ACTIVE,
        RECOVERIES_WAITING,
        RECOVERY_SECONDS,
    ];
}

/// Metric names the operator exports on its own admin port.
pub mod operator_metrics {
    /// Counter, label `result` = `ok` | `error`.
    pub const RECONCILES: &str = "eventrouter_operator_reconciles_total";
    /// Counter, label `reason`: why reconciles failed.
    pub const RECONCILE_ERRORS: &str = "eventrouter_operator_reconcile_errors_total";
    /// Histogram of one reconcile's duration.
    pub const RECONCILE_DURATION: &str = "eventrouter_operator_reconcile_duration_seconds";
    /// Gauge: 1 while this process holds the leader Lease.
    pub const LEADER: &str = "eventrouter_operator_leader";
    /// Counter: specs the API server accepted but the operator cannot act on.
    pub const INVALID_SPECS: &str = "eventrouter_operator_invalid_specs_total";
    /// Gauge per router: `current` and `desired` replicas (the routers dashboard's panel).
    pub const ROUTER_REPLICAS: &str = "eventrouter_operator_router_replicas";
    /// The label of `ROUTER_REPLICAS` holding the router's namespace (`namespace` is the operator
    /// pod's own target label).
    pub const ROUTER_NAMESPACE_LABEL: &str = "router_namespace";

    /// Every operator metric.
    pub const ALL: &[&str] = &[
        RECONCILES,
        RECONCILE_ERRORS,
        RECONCILE_DURATION,
        LEADER,
        INVALID_SPECS,
        ROUTER_REPLICAS,
    ];
}

/// Environment variables read by the operator (each is also a `--flag` of `operator run`).
pub mod operator_env {
    pub const NAMESPACE: &str = "EVENTROUTER_OPERATOR_NAMESPACE";
    pub const ADMIN_LISTEN: &str = "EVENTROUTER_OPERATOR_ADMIN_LISTEN";
    pub const LEASE_NAME: &str = "EVENTROUTER_OPERATOR_LEASE_NAME";
    pub const LEASE_NAMESPACE: &str = "EVENTROUTER_OPERATOR_LEASE_NAMESPACE";
    pub const LEASE_DURATION: &str = "EVENTROUTER_OPERATOR_LEASE_DURATION";
    pub const RESYNC_INTERVAL: &str = "EVENTROUTER_OPERATOR_RESYNC_INTERVAL";
    pub const BACKOFF_BASE: &str = "EVENTROUTER_OPERATOR_BACKOFF_BASE";
    pub const BACKOFF_MAX: &str = "EVENTROUTER_OPERATOR_BACKOFF_MAX";
    pub const CLEANUP_TIMEOUT: &str = "EVENTROUTER_OPERATOR_CLEANUP_TIMEOUT";
    pub const CONCURRENCY: &str = "EVENTROUTER_OPERATOR_CONCURRENCY";
    pub const LOG: &str = "EVENTROUTER_OPERATOR_LOG";
    pub const LOG_FORMAT: &str = "EVENTROUTER_OPERATOR_LOG_FORMAT";
    /// This replica's identity; set from the downward API like the service's.
    pub const POD_NAME: &str = super::env::POD_NAME;
}

/// The custom-metric names the operator's HPA asks for (served by the metrics adapter): two of
/// the service's own metrics, so a rename there renames them here.
pub mod autoscaling {
    /// Pods metric: open connections on each pod.
    pub const CONNECTIONS_METRIC: &str = super::metrics::CONNECTIONS;
    /// Pods metric: bytes waiting in the kernel receive queues of each pod's connections.
    pub const RECV_QUEUE_METRIC: &str = super::metrics::SOCKET_RECV_QUEUE_BYTES;
}

/// Target labels Prometheus puts on every router series. The chart's dashboards, alerts and
/// prometheus-adapter rules select on them, so every scrape configuration that collects router
/// metrics (the chart's PodMonitor, the operator's ServiceMonitor, annotation-based scraping) must
/// produce them.
pub mod prometheus {
    /// The pod's namespace (the Prometheus Operator adds it by default).
    pub const NAMESPACE_LABEL: &str = "namespace";
    /// The pod's name (the Prometheus Operator adds it by default).
    pub const POD_LABEL: &str = "pod";
    /// The EventRouter's name, copied by relabeling from the pod label `app.kubernetes.io/instance`.
    pub const ROUTER_LABEL: &str = "router";
    /// The service-discovery meta label the `router` label is copied from.
    pub const ROUTER_LABEL_SOURCE: &str = "__meta_kubernetes_pod_label_app_kubernetes_io_instance";
}

/// Kubernetes names shared by the operator and the chart.
pub mod kube {
    pub const GROUP: &str = "eventrouter.io";
    pub const VERSION: &str = "v1alpha1";
    pub const KIND: &str = "EventRouter";
    pub const FIELD_MANAGER: &str = "eventrouter-operator";
    pub const FINALIZER: &str = "eventrouter.io/cleanup";
    pub const LABEL_NAME: &str = "app.kubernetes.io/name";
    pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
    pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
    pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of `app.kubernetes.io/name` on every router child.
    pub const APP_NAME: &str = "event-router";
    pub const COMPONENT_SERVICE: &str = "event-service";
    pub const MANAGED_BY: &str = "eventrouter-operator";
    /// Name of the container in the router Deployment (dashboards select on it).
    pub const CONTAINER_NAME: &str = "event-service";
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeSet;

    /// Every name in `names` is a valid, prefixed Prometheus metric name, and none repeats.
    fn check_metric_names(names: &[&str]) {
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "a name repeats: {names:?}");
        for name in names {
            assert!(name.starts_with(metrics::PREFIX), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
    }

    #[test]
    fn every_service_and_operator_metric_is_prefixed_valid_and_unique() {
        let all: Vec<&str> = metrics::ALL
            .iter()
            .chain(operator_metrics::ALL)
            .copied()
            .collect();
        check_metric_names(&all);
        assert!(all.iter().all(|n| *n != metrics::PREFIX));
    }

    #[test]
    fn the_autoscaling_metrics_are_service_metrics() {
        for name in [
            autoscaling::CONNECTIONS_METRIC,
            autoscaling::RECV_QUEUE_METRIC,
        ] {
            assert!(metrics::ALL.contains(&name), "{name}");
        }
    }

    #[test]
    fn every_env_var_of_service_and_operator_is_namespaced_and_unique() {
        let operator = [
            operator_env::NAMESPACE,
            operator_env::ADMIN_LISTEN,
            operator_env::LEASE_NAME,
            operator_env::LEASE_NAMESPACE,
            operator_env::LEASE_DURATION,
            operator_env::RESYNC_INTERVAL,
            operator_env::BACKOFF_BASE,
            operator_env::BACKOFF_MAX,
            operator_env::CLEANUP_TIMEOUT,
            operator_env::CONCURRENCY,
            operator_env::LOG,
            operator_env::LOG_FORMAT,
        ];
        let unique: BTreeSet<_> = operator.iter().collect();
        assert_eq!(unique.len(), operator.len());
        for name in operator {
            assert!(name.starts_with("EVENTROUTER_OPERATOR_"), "{name}");
        }
    }

    #[test]
    fn project_close_codes_are_in_the_private_range() {
        for code in [
            close::SLOW_CONSUMER,
            close::IDLE_TIMEOUT,
            close::REBALANCE,
            close::TOKEN_EXPIRED,
            close::UNAUTHORIZED,
            close::AUTH_TIMEOUT,
        ] {
            assert!((4000..5000).contains(&code));
        }
    }
}
