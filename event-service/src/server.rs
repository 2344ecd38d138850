//! Assembles and runs one event service: the entry points [`serve`] and [`RunningServer`].
//!
//! [`serve`] takes its two listeners and a shutdown future (mini-redis style), so tests, the
//! binary and other crates run the real thing on `127.0.0.1:0`. When the shutdown future
//! completes, the server drains: readiness turns false first, new WebSocket upgrades are refused
//! (503), open clients are closed with 1001 spread evenly over `--drain-duration` (so they do
//! not all reconnect at the same instant), and `serve` closes its listeners and returns once
//! every connection is gone or the drain deadline (`--drain-duration` + 2 s) passed.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use prometheus::Registry;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::{
    admin,
    config::{Config, SourceKind},
    connection::{CloseRequest, ConnRegistry, QueueLimits},
    event::Event,
    http,
    hub::Hub,
    metrics::Metrics,
    session::{CLOSE_GRACE, SessionSettings},
    source::{Source, amqp, memory::MemorySource},
};

/// Per-connection read buffer. tokio-tungstenite's default (128 KiB) would dominate the memory
/// of an idle connection; client frames are small (a ping is ~20 bytes, so one read still takes
/// ~100 of them) and a larger frame just grows the buffer while it is read.
pub const READ_BUFFER_BYTES: usize = 2 * 1024;

/// Bytes tungstenite buffers before writing through to the socket within one batch.
pub const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not read a listener's address: {0}")]
    LocalAddr(std::io::Error),
    #[error("could not register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("could not start the AMQP source: {0}")]
    Amqp(#[from] amqp::AmqpStartError),
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Readiness as a value: false while draining or while the event source is down.
#[derive(Clone)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
    hub: Arc<Hub>,
}

impl Readiness {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// `None` when ready, else why not (shown by `/readyz`).
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.is_draining() {
            return Some("draining");
        }
        match self.hub.source() {
            Some(source) if source.is_ready() => None,
            Some(_) => Some("event source unavailable"),
            None => Some("starting"),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }
}

/// What every task of one server shares.
pub(crate) struct Shared {
    pub config: Config,
    pub registry: Registry,
    pub metrics: Metrics,
    pub hub: Arc<Hub>,
    pub conns: ConnRegistry,
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    pub readiness: Readiness,
    pub ws_config: WebSocketConfig,
    pub session: Arc<SessionSettings>,
    pub conn_closed: Notify,
    next_id: AtomicU64,
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
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

/// Runs the service on the given listeners until `shutdown` completes, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let registry = Registry::new();
    let metrics = Metrics::register(&registry)?;
    metrics
        .max_connections
        .set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
    let hub = Arc::new(Hub::new(
        metrics.clone(),
        QueueLimits {
            max_bytes: config.send_queue_bytes,
            policy: config.slow_consumer_policy,
        },
    ));
    let background = CancellationToken::new();
    let source = match config.source {
        SourceKind::Memory => Source::Memory(MemorySource::new(hub.clone())),
        SourceKind::Amqp => Source::Amqp(
            amqp::AmqpSource::start(&config, hub.clone(), &registry, background.clone()).await?,
        ),
    };
    hub.set_source(source.clone());
    let draining = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        registry,
        metrics: metrics.clone(),
        hub: hub.clone(),
        conns: ConnRegistry::default(),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        readiness: Readiness {
            draining: draining.clone(),
            hub: hub.clone(),
        },
        ws_config: ws_config(&config),
        session: Arc::new(SessionSettings {
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
            socket_sample_interval: config.socket_sample_interval,
            max_subscriptions: config.max_subscriptions,
            max_pattern_length: config.max_pattern_length,
        }),
        conn_closed: Notify::new(),
        next_id: AtomicU64::new(1),
        config,
    });

    tracing::info!(
        listen = %listener.local_addr().map_err(ServeError::LocalAddr)?,
        admin = %admin_listener.local_addr().map_err(ServeError::LocalAddr)?,
        source = source.origin().as_str(),
        "event service started"
    );

    let admin_task = tokio::spawn(admin::accept_loop(
        admin_listener,
        shared.clone(),
        background.clone(),
    ));
    if shared.config.demo {
        tokio::spawn(demo(source.clone(), background.clone()));
    }
    let stop_accepting = CancellationToken::new();
    let accept_task = tokio::spawn(http::accept_loop(
        listener,
        shared.clone(),
        stop_accepting.clone(),
    ));

    shutdown.await;
    drain(&shared, &stop_accepting, accept_task).await;
    background.cancel();
    let _ = admin_task.await;
    tracing::info!("event service stopped");
    Ok(())
}

async fn drain(shared: &Shared, stop_accepting: &CancellationToken, accept_task: JoinHandle<()>) {
    let duration = shared.config.drain_duration;
    let started = tokio::time::Instant::now();
    let deadline = started + duration + CLOSE_GRACE;
    // Readiness first, so load balancers stop sending new clients before anything closes.
    // The listener stays open while draining: `/readyz` answers 503 "draining" to probes (a
    // refused connection would look like a crash), `/publish` keeps working, and new WebSocket
    // upgrades are refused with 503 so clients reconnect to another instance.
    shared.readiness.draining.store(true, Ordering::Release);
    shared.metrics.draining.set(1);
    let conns = shared.conns.snapshot();
    tracing::info!(connections = conns.len(), ?duration, "draining");
    if !conns.is_empty() {
        // Client i closes in the middle of the i-th of n equal slots of the drain duration.
        let step = duration / u32::try_from(conns.len()).unwrap_or(u32::MAX);
        for (i, conn) in conns.iter().enumerate() {
            let at = started + step * u32::try_from(i).unwrap_or(u32::MAX) + step / 2;
            tokio::time::sleep_until(at).await;
            conn.request_close(CloseRequest::Drain);
        }
    }
    // Connections upgraded while the snapshot was taken are closed too; then wait for all.
    loop {
        for conn in shared.conns.snapshot() {
            conn.request_close(CloseRequest::Drain);
        }
        if shared.conns.is_empty() {
            break;
        }
        let closed = shared.conn_closed.notified();
        tokio::select! {
            _ = closed => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(remaining = shared.conns.len(), "drain deadline passed");
                break;
            }
        }
    }
    stop_accepting.cancel();
    let _ = accept_task.await;
}

/// `--demo`: one `demo.tick` event per second on the embedded bus.
async fn demo(source: Source, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let data = Bytes::from(format!("{{\"n\":{n},\"time\":\"{time}\"}}"));
        if let Err(error) = source.publish(vec![Event::new("demo.tick", data)]).await {
            tracing::warn!(%error, "demo event not published");
        }
    }
}

/// A server started in the background, for tests and embedding.
pub struct RunningServer {
    /// The main port's address (`/ws`, `/publish`, `/healthz`, `/readyz`).
    pub addr: SocketAddr,
    /// The admin port's address (`/metrics`, `/debug/connections`).
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// Binds `config.listen` and `config.admin_listen` (use port 0, e.g. [`Config::for_tests`])
    /// and runs [`serve`] in a task.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        let listener = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
        let admin_addr = admin.local_addr().map_err(ServeError::LocalAddr)?;
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let task = tokio::spawn(serve(config, listener, admin, async move {
            signal.cancelled().await
        }));
        Ok(Self {
            addr,
            admin_addr,
            shutdown,
            task,
        })
    }

    /// `ws://addr/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, eventrouter_contract::http::WS_PATH)
    }

    /// `http://addr` of the main port.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://addr` of the admin port.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Starts the drain (as SIGTERM does); [`RunningServer::wait`] returns when it is done.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the server to finish (after [`RunningServer::begin_shutdown`]).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await?
    }

    /// Drains and waits.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.begin_shutdown();
        self.wait().await
    }
}
