//! The service's Prometheus metrics, registered once on a per-server registry.
//!
//! Names come from `eventrouter_contract::metrics`. No metric carries a per-connection label:
//! labels are small closed sets (`reason`, `kind`, `source`).
//!
//! The socket- and outbound-queue gauges are aggregates of values each connection's own task
//! samples every `--socket-sample-interval` (see `connection`); [`ServiceMetrics::refresh_queue_gauges`]
//! folds the latest samples into sum / max / over-threshold count when `/metrics` is scraped,
//! so the hot path never touches a shared gauge. The broker metrics (`eventrouter_broker_up`,
//! reconnects, publish confirms and failures, malformed messages) belong to the AMQP source,
//! which registers them on the same registry.

use eventrouter_contract::metrics as names;
use eventrouter_runtime::http::AcceptMetrics;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, core::Collector,
};
use strum::IntoEnumIterator;

use crate::connection::ConnRegistry;

/// Why a WebSocket upgrade was refused (`reason` label of the rejected counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum RejectReason {
    MaxConnections,
    Draining,
    BadHandshake,
    /// The `Origin` header is not in `--allowed-origins` (403).
    Origin,
    /// The source address holds `--max-connections-per-ip` connections already (429).
    IpLimit,
    /// The source address opens connections faster than `--connect-rate-per-ip` (429).
    IpRate,
    /// The `Authorization: Bearer` token of the upgrade request was refused (401).
    Unauthorized,
}

impl RejectReason {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a connection ended (`reason` label of the disconnects counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum DisconnectReason {
    /// The client closed (close frame or EOF).
    ClientClosed,
    SlowConsumer,
    IdleTimeout,
    Drain,
    /// Closed with 4002 so the client reconnects to a less loaded instance.
    Rebalance,
    TooBig,
    Binary,
    Abuse,
    /// The `auth` message was refused, or another op came first with anonymous access off (4004).
    Unauthorized,
    /// No `auth` message within `--handshake-timeout` (4005).
    AuthTimeout,
    /// The token expired without a `refresh` (4003).
    TokenExpired,
    /// The client kept sending over `--client-frame-rate` (1008).
    RateLimited,
    /// Closed with 1007: a text frame that is not valid UTF-8.
    InvalidUtf8,
    /// Closed with 1002: a frame that breaks RFC 6455 (unmasked, reserved bits, bad control
    /// frame, unknown opcode).
    ProtocolError,
    /// A transport error, or the connection ended without a close handshake.
    Error,
}

impl DisconnectReason {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Kinds of frame received from clients (`kind` label of the client-frames counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum FrameKind {
    Subscribe,
    Unsubscribe,
    Ping,
    Auth,
    Refresh,
    Invalid,
    /// A frame over `--client-frame-rate`, refused unread.
    RateLimited,
    WsPing,
    WsPong,
    Binary,
    Close,
}

impl FrameKind {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why `accept` failed (`kind` label of the accept-errors counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum AcceptErrorKind {
    /// EMFILE or ENFILE: out of file descriptors (waiting clients are answered 503).
    NoFd,
    Other,
}

impl AcceptErrorKind {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why an event was not delivered to a connection (`reason` label of the drops counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum DropReason {
    /// Dropped to make room under `--slow-consumer-policy drop-oldest`.
    DropOldest,
    /// Discarded with the queue of a connection closed as a slow consumer.
    SlowConsumer,
}

impl DropReason {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Every metric the core service exports.
#[derive(Clone)]
pub struct ServiceMetrics {
    pub connections: IntGauge,
    pub connections_accepted: IntCounter,
    pub connections_rejected: IntCounterVec,
    pub disconnects: IntCounterVec,
    pub subscriptions: IntGauge,
    pub bindings: IntGauge,
    pub events_received: IntCounterVec,
    pub deliveries: IntCounter,
    pub drops: IntCounterVec,
    pub delivery_latency: Histogram,
    pub client_frames: IntCounterVec,
    pub socket_recv_queue_bytes: IntGauge,
    pub socket_recv_queue_max_bytes: IntGauge,
    pub socket_recv_queue_over: IntGauge,
    pub socket_send_queue_bytes: IntGauge,
    pub socket_send_queue_max_bytes: IntGauge,
    pub socket_send_queue_over: IntGauge,
    pub outbound_queue_bytes: IntGauge,
    pub outbound_queue_max_bytes: IntGauge,
    pub outbound_queue_over: IntGauge,
    pub kernel_buffered_bytes: IntGauge,
    pub draining: IntGauge,
    pub max_connections: IntGauge,
    pub auth_checks: IntCounterVec,
    pub publish_rejected: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub accept_shed: IntCounter,
    pub recoveries: IntCounterVec,
    pub recovered_events: IntCounter,
    pub recoveries_active: IntGauge,
    pub recoveries_waiting: IntGauge,
    pub recovery_seconds: Histogram,
}

fn gauge(name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    IntGauge::new(name, help)
}

fn counter_vec(name: &str, help: &str, label: &str) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), &[label])
}

impl ServiceMetrics {
    /// Creates every metric and registers it (plus process metrics) on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = ServiceMetrics {
            connections: gauge(names::CONNECTIONS, "Open WebSocket connections.")?,
            connections_accepted: IntCounter::new(
                names::CONNECTIONS_ACCEPTED,
                "WebSocket upgrades accepted.",
            )?,
            connections_rejected: counter_vec(
                names::CONNECTIONS_REJECTED,
                "WebSocket upgrades refused, by reason.",
                "reason",
            )?,
            disconnects: counter_vec(
                names::DISCONNECTS,
                "Closed WebSocket connections, by reason.",
                "reason",
            )?,
            subscriptions: gauge(
                names::SUBSCRIPTIONS,
                "Patterns held, summed over connections.",
            )?,
            bindings: gauge(
                names::BINDINGS,
                "Distinct patterns bound at the event source.",
            )?,
            events_received: counter_vec(
                names::EVENTS_RECEIVED,
                "Events received from the event source, by source.",
                "source",
            )?,
            deliveries: IntCounter::new(
                names::DELIVERIES,
                "Events enqueued for a client (one per recipient).",
            )?,
            drops: counter_vec(
                names::DROPS,
                "Events not delivered to a client, by reason.",
                "reason",
            )?,
            delivery_latency: Histogram::with_opts(
                HistogramOpts::new(
                    names::DELIVERY_LATENCY,
                    "Publish time to written-to-socket, observed once per write batch for its oldest event.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0,
                ]),
            )?,
            client_frames: counter_vec(
                names::CLIENT_FRAMES,
                "Frames received from clients, by kind.",
                "kind",
            )?,
            socket_recv_queue_bytes: gauge(
                names::SOCKET_RECV_QUEUE_BYTES,
                "Kernel receive queue (Recv-Q) bytes, summed over connections (last samples).",
            )?,
            socket_recv_queue_max_bytes: gauge(
                names::SOCKET_RECV_QUEUE_MAX_BYTES,
                "Largest kernel receive queue of any connection (last samples).",
            )?,
            socket_recv_queue_over: gauge(
                names::SOCKET_RECV_QUEUE_OVER_THRESHOLD,
                "Connections whose Recv-Q exceeds --queue-alert-threshold-bytes.",
            )?,
            socket_send_queue_bytes: gauge(
                names::SOCKET_SEND_QUEUE_BYTES,
                "Kernel send queue (Send-Q, unacknowledged) bytes, summed over connections.",
            )?,
            socket_send_queue_max_bytes: gauge(
                names::SOCKET_SEND_QUEUE_MAX_BYTES,
                "Largest kernel send queue of any connection (last samples).",
            )?,
            socket_send_queue_over: gauge(
                names::SOCKET_SEND_QUEUE_OVER_THRESHOLD,
                "Connections whose Send-Q exceeds --queue-alert-threshold-bytes.",
            )?,
            outbound_queue_bytes: gauge(
                names::OUTBOUND_QUEUE_BYTES,
                "Bytes waiting in the service's own outbound queues, summed over connections.",
            )?,
            outbound_queue_max_bytes: gauge(
                names::OUTBOUND_QUEUE_MAX_BYTES,
                "Largest outbound queue of any connection, in bytes.",
            )?,
            outbound_queue_over: gauge(
                names::OUTBOUND_QUEUE_OVER_THRESHOLD,
                "Connections whose outbound queue exceeds --queue-alert-threshold-bytes.",
            )?,
            kernel_buffered_bytes: gauge(
                names::KERNEL_BUFFERED_BYTES,
                "Recv-Q + Send-Q over all connections: socket memory outside the process RSS.",
            )?,
            draining: gauge(names::DRAINING, "1 while the instance is draining.")?,
            max_connections: gauge(
                names::MAX_CONNECTIONS,
                "The effective --max-connections (at most what the open-files limit holds).",
            )?,
            accept_errors: counter_vec(
                names::ACCEPT_ERRORS,
                "Failed accept calls on the main and admin ports, by kind.",
                "kind",
            )?,
            accept_shed: IntCounter::new(
                names::ACCEPT_SHED,
                "Clients answered 503 and closed because the process was out of file descriptors.",
            )?,
            recoveries: counter_vec(
                names::RECOVERIES,
                "Subscribe requests with `since`, by result (recovered, unknown, too_many, unavailable, off, busy).",
                "result",
            )?,
            recovered_events: IntCounter::new(
                names::RECOVERED_EVENTS,
                "Events replayed to recovering clients.",
            )?,
            recoveries_active: gauge(
                names::RECOVERIES_ACTIVE,
                "Recoveries running now, from their turn until the writer has taken their last replayed event.",
            )?,
            recoveries_waiting: gauge(
                names::RECOVERIES_WAITING,
                "Recoveries waiting for a turn (--recovery-max-concurrent).",
            )?,
            recovery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    names::RECOVERY_SECONDS,
                    "Subscribe with since: from the request to the replay queued, waiting for a turn included.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            auth_checks: counter_vec(
                names::AUTH_CHECKS,
                "Connection-token checks (upgrade header, auth and refresh), by result.",
                "result",
            )?,
            publish_rejected: counter_vec(
                names::PUBLISH_REJECTED,
                "POST /publish requests refused by the publish-key check, by reason.",
                "reason",
            )?,
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.connections.clone()),
            Box::new(m.connections_accepted.clone()),
            Box::new(m.connections_rejected.clone()),
            Box::new(m.disconnects.clone()),
            Box::new(m.subscriptions.clone()),
            Box::new(m.bindings.clone()),
            Box::new(m.events_received.clone()),
            Box::new(m.deliveries.clone()),
            Box::new(m.drops.clone()),
            Box::new(m.delivery_latency.clone()),
            Box::new(m.client_frames.clone()),
            Box::new(m.socket_recv_queue_bytes.clone()),
            Box::new(m.socket_recv_queue_max_bytes.clone()),
            Box::new(m.socket_recv_queue_over.clone()),
            Box::new(m.socket_send_queue_bytes.clone()),
            Box::new(m.socket_send_queue_max_bytes.clone()),
            Box::new(m.socket_send_queue_over.clone()),
            Box::new(m.outbound_queue_bytes.clone()),
            Box::new(m.outbound_queue_max_bytes.clone()),
            Box::new(m.outbound_queue_over.clone()),
            Box::new(m.kernel_buffered_bytes.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.max_connections.clone()),
            Box::new(m.auth_checks.clone()),
            Box::new(m.publish_rejected.clone()),
            Box::new(m.accept_errors.clone()),
            Box::new(m.accept_shed.clone()),
            Box::new(m.recoveries.clone()),
            Box::new(m.recovered_events.clone()),
            Box::new(m.recoveries_active.clone()),
            Box::new(m.recoveries_waiting.clone()),
            Box::new(m.recovery_seconds.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        // Pre-create every labelled series so dashboards see zeros rather than gaps.
        for r in [
            "recovered",
            "unknown",
            "too_many",
            "unavailable",
            "off",
            "busy",
        ] {
            m.recoveries.with_label_values(&[r]);
        }
        for r in RejectReason::iter() {
            m.connections_rejected.with_label_values(&[r.as_str()]);
        }
        for r in DisconnectReason::iter() {
            m.disconnects.with_label_values(&[r.as_str()]);
        }
        for k in FrameKind::iter() {
            m.client_frames.with_label_values(&[k.as_str()]);
        }
        for r in DropReason::iter() {
            m.drops.with_label_values(&[r.as_str()]);
        }
        m.auth_checks.with_label_values(&["ok"]);
        for r in ["missing_key", "bad_key", "forbidden"] {
            m.publish_rejected.with_label_values(&[r]);
        }
        for k in AcceptErrorKind::iter() {
            m.accept_errors.with_label_values(&[k.as_str()]);
        }
        // Process metrics (RSS, CPU, open fds) explain memory next to the socket queues.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// The accept loops' counters (both ports count into the same series).
    pub fn accept_metrics(&self) -> AcceptMetrics {
        let kind = |k: AcceptErrorKind| self.accept_errors.with_label_values(&[k.as_str()]);
        AcceptMetrics {
            errors_no_fd: kind(AcceptErrorKind::NoFd),
            errors_other: kind(AcceptErrorKind::Other),
            shed: self.accept_shed.clone(),
        }
    }

    pub fn disconnect(&self, reason: DisconnectReason) {
        self.disconnects.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn frame(&self, kind: FrameKind) {
        self.client_frames.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.drops.with_label_values(&[reason.as_str()]).inc_by(n);
        }
    }

    /// Folds every connection's latest queue samples into the aggregate gauges.
    pub fn refresh_queue_gauges(&self, conns: &ConnRegistry, threshold: u64) {
        let (mut rq_sum, mut rq_max, mut rq_over) = (0u64, 0u64, 0i64);
        let (mut sq_sum, mut sq_max, mut sq_over) = (0u64, 0u64, 0i64);
        let (mut oq_sum, mut oq_max, mut oq_over) = (0u64, 0u64, 0i64);
        conns.for_each(|c| {
            let s = c.sample();
            rq_sum += s.recv_q;
            rq_max = rq_max.max(s.recv_q);
            rq_over += i64::from(s.recv_q > threshold);
            sq_sum += s.send_q;
            sq_max = sq_max.max(s.send_q);
            sq_over += i64::from(s.send_q > threshold);
            oq_sum += s.outbound;
            oq_max = oq_max.max(s.outbound);
            oq_over += i64::from(s.outbound > threshold);
        });
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.socket_recv_queue_bytes.set(g(rq_sum));
        self.socket_recv_queue_max_bytes.set(g(rq_max));
        self.socket_recv_queue_over.set(rq_over);
        self.socket_send_queue_bytes.set(g(sq_sum));
        self.socket_send_queue_max_bytes.set(g(sq_max));
        self.socket_send_queue_over.set(sq_over);
        self.outbound_queue_bytes.set(g(oq_sum));
        self.outbound_queue_max_bytes.set(g(oq_max));
        self.outbound_queue_over.set(oq_over);
        self.kernel_buffered_bytes.set(g(rq_sum + sq_sum));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_the_documented_snake_case_names() {
        let labels = |values: Vec<&'static str>| values.join(",");
        assert_eq!(
            labels(RejectReason::iter().map(RejectReason::as_str).collect()),
            "max_connections,draining,bad_handshake,origin,ip_limit,ip_rate,unauthorized"
        );
        assert_eq!(
            labels(
                DisconnectReason::iter()
                    .map(DisconnectReason::as_str)
                    .collect()
            ),
            "client_closed,slow_consumer,idle_timeout,drain,rebalance,too_big,binary,abuse,unauthorized,auth_timeout,token_expired,rate_limited,invalid_utf8,protocol_error,error"
        );
        assert_eq!(
            labels(FrameKind::iter().map(FrameKind::as_str).collect()),
            "subscribe,unsubscribe,ping,auth,refresh,invalid,rate_limited,ws_ping,ws_pong,binary,close"
        );
        assert_eq!(
            labels(DropReason::iter().map(DropReason::as_str).collect()),
            "drop_oldest,slow_consumer"
        );
        assert_eq!(
            labels(
                AcceptErrorKind::iter()
                    .map(AcceptErrorKind::as_str)
                    .collect()
            ),
            "no_fd,other"
        );
    }
}
