//! What every task of one server shares: the configuration, metrics, hub, connection registry,
//! connection slots and readiness.
//!
//! Its own module so the layers point one way: the entry point ([`crate::server`]) builds it,
//! the listeners ([`crate::main_port`], [`crate::admin_port`]) read it, and it knows neither.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use prometheus::Registry;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{
    access::Access, config::Config, connection::ConnRegistry, hub::Hub,
    service_metrics::ServiceMetrics, session::SessionSettings,
};

/// Per-connection read buffer, and the most one read takes from the socket. Held for the
/// connection's whole life, so it is a large share of an idle connection's memory
/// (tokio-tungstenite's default, 128 KiB, would dwarf everything else; 2 KiB was a third of the
/// total). Client frames are small (subscribe ~60 bytes, a pong 6): one read still takes a
/// frame or two. A larger frame grows the buffer to its size, and the connection keeps that.
pub const READ_BUFFER_BYTES: usize = 128;

/// Bytes tungstenite buffers before writing through to the socket within one batch.
pub const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Readiness as a value: false while draining or while the event source is down.
#[derive(Clone)]
pub(crate) struct ServiceReadiness {
    draining: Arc<AtomicBool>,
    hub: Arc<Hub>,
}

impl ServiceReadiness {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        Self {
            draining: Arc::new(AtomicBool::new(false)),
            hub,
        }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// From now on `/readyz` answers 503 "draining" and upgrades are refused.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// `None` when ready, else why not (shown by `/readyz`).
    pub(crate) fn not_ready_reason(&self) -> Option<&'static str> {
        if self.is_draining() {
            return Some("draining");
        }
        match self.hub.source() {
            Some(source) if source.is_ready() => None,
            Some(_) => Some("event source unavailable"),
            None => Some("starting"),
        }
    }
}

/// What every task of one server shares.
pub(crate) struct Shared {
    pub config: Config,
    pub registry: Registry,
    pub metrics: ServiceMetrics,
    pub hub: Arc<Hub>,
    pub conns: ConnRegistry,
    pub connection_slots: Arc<Semaphore>,
    pub readiness: ServiceReadiness,
    pub ws_config: WebSocketConfig,
    pub session: Arc<SessionSettings>,
    /// Tokens, publish keys, origins and per-address limits.
    pub access: Arc<Access>,
    /// Notified each time a connection ends (the drain waits on it).
    pub conn_closed: Notify,
    next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        registry: Registry,
        metrics: ServiceMetrics,
        hub: Arc<Hub>,
        access: Arc<Access>,
    ) -> Self {
        let anonymous: Arc<[String]> = access
            .auth
            .as_ref()
            .map(|a| a.anonymous())
            .unwrap_or_default()
            .into();
        Self {
            registry,
            metrics,
            conns: ConnRegistry::default(),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            readiness: ServiceReadiness::new(hub.clone()),
            hub,
            ws_config: ws_config(&config),
            session: Arc::new(SessionSettings {
                ping_interval: config.ping_interval,
                idle_timeout: config.idle_timeout,
                socket_sample_interval: config.socket_sample_interval,
                direct_writes: config.direct_writes,
                max_subscriptions: config.max_subscriptions,
                max_pattern_length: config.max_pattern_length,
                auth: access.auth.clone(),
                anonymous,
                auth_timeout: config.handshake_timeout,
                frame_rate: config.client_frame_rate,
                frame_burst: config.client_frame_burst,
                recovery: Arc::new(crate::history::Recovery::new(
                    crate::history::ReadLimits {
                        max_events: config.recovery_max_events as usize,
                        max_bytes: usize::try_from(config.history_max_bytes).unwrap_or(usize::MAX),
                    },
                    config.recovery_max_concurrent as usize,
                )),
            }),
            access,
            conn_closed: Notify::new(),
            next_id: AtomicU64::new(1),
            config,
        }
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // The outbound queue is bounded by us; tungstenite's buffer then holds at most one write
        // buffer's worth plus one frame, which the queue bound caps.
        .max_write_buffer_size(WRITE_BUFFER_BYTES + config.send_queue_bytes + 64 * 1024)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes))
}
