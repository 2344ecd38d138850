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
    sync::{Arc, Weak},
    time::Duration,
};

use bytes::Bytes;
use prometheus::Registry;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    access::Access,
    admin_port,
    config::{Config, SourceKind},
    connection::{CloseRequest, QueueLimits},
    event::Event,
    history::{
        History,
        ring::{Ring, RingLimits},
        stream::StreamHistory,
    },
    hub::Hub,
    main_port,
    rebalancer::{self, RebalanceMetrics},
    service_metrics::ServiceMetrics,
    session::CLOSE_GRACE,
    source::{EventSink, Source, amqp, memory::MemorySource},
    state::Shared,
};

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
    #[error("invalid rebalancing settings: {0}")]
    Rebalance(#[from] crate::rebalance::SettingsError),
    #[error("invalid authentication settings: {0}")]
    Access(String),
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    OpenFiles(#[from] crate::fd_budget::NoRoom),
}

/// Binds the main port with `--listen-backlog` as the accept queue (tokio's `bind` uses 128,
/// which a burst of reconnects after a drain or a rebalance overflows). The kernel caps the
/// backlog at `net.core.somaxconn`.
pub async fn bind_main(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ServeError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restarted instance rebinds while old sockets linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bind().map_err(|source| ServeError::Bind { addr, source })
}

/// Runs the service on the given listeners until `shutdown` completes, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_observed(config, listener, admin_listener, shutdown, |_| {}).await
}

/// [`serve`], handing the hub (weakly) to `observe` once it exists: tests use it to prove the
/// hub is freed after the server stops.
pub(crate) async fn serve_observed(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    observe: impl FnOnce(Weak<Hub>),
) -> Result<(), ServeError> {
    let mut config = config;
    // Every connection is a descriptor: serve no more than the open-files limit holds.
    config.max_connections = crate::fd_budget::effective_max_connections(config.max_connections)?;
    let access = Arc::new(Access::from_config(&config).map_err(ServeError::Access)?);
    let registry = Registry::new();
    let metrics = ServiceMetrics::register(&registry)?;
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
    observe(Arc::downgrade(&hub));
    let background = CancellationToken::new();
    // The source holds the hub only weakly (hub -> source -> sink must not be an `Arc` cycle,
    // or the hub would never be freed).
    let sink: Weak<dyn EventSink> = Arc::downgrade(&hub) as Weak<dyn EventSink>;
    let source = match config.source {
        SourceKind::Memory => Source::Memory(MemorySource::new(sink)),
        SourceKind::Amqp => Source::Amqp(
            amqp::AmqpSource::start(&config, sink, &registry, background.clone()).await?,
        ),
    };
    hub.set_source(source.clone());
    hub.set_history(match &source {
        Source::Memory(_) if config.history_max_events > 0 => {
            History::Ring(Arc::new(Ring::new(RingLimits {
                max_events: config.history_max_events,
                max_bytes: usize::try_from(config.history_max_bytes).unwrap_or(usize::MAX),
                max_age: config.history_max_age,
            })))
        }
        Source::Amqp(amqp) => match amqp.history_stream() {
            Some(stream) => {
                let history = Arc::new(StreamHistory::new(
                    amqp.clone(),
                    stream.to_owned(),
                    usize::try_from(config.history_max_bytes).unwrap_or(usize::MAX),
                    config.history_max_age,
                ));
                history.spawn_idle_close(background.clone());
                History::Stream(history)
            }
            None => History::Off,
        },
        Source::Memory(_) => History::Off,
    });
    let rebalance_metrics = RebalanceMetrics::register(&registry)?;
    access.spawn_maintenance(config.auth_reload_interval, background.clone());
    crate::heap_trim::spawn(
        config.heap_trim_interval,
        metrics.connections_accepted.clone(),
        metrics.connections.clone(),
        background.clone(),
    );
    let shared = Arc::new(Shared::new(config, registry, metrics, hub, access));
    if let Source::Amqp(amqp) = &source {
        rebalancer::spawn(shared.clone(), amqp, rebalance_metrics, background.clone())?;
    }

    tracing::info!(
        listen = %listener.local_addr().map_err(ServeError::LocalAddr)?,
        admin = %admin_listener.local_addr().map_err(ServeError::LocalAddr)?,
        source = source.origin().as_str(),
        "event service started"
    );

    let admin_task = tokio::spawn(admin_port::serve(
        admin_listener,
        shared.clone(),
        background.clone(),
    ));
    if shared.config.demo {
        tokio::spawn(demo(source.clone(), background.clone()));
    }
    let stop_accepting = CancellationToken::new();
    let accept_task = tokio::spawn(main_port::serve(
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
    shared.readiness.start_draining();
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
        let listener = bind_main(config.listen, config.listen_backlog).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    #[tokio::test]
    async fn the_main_port_listens_with_the_configured_backlog() {
        let listener = bind_main("127.0.0.1:0".parse().expect("addr"), 77)
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // For a listening socket, `ss` shows the accept backlog in the Send-Q column.
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let send_q = text.split_whitespace().nth(2);
        assert_eq!(send_q, Some("77"), "ss -ltn says: {text}");
    }

    #[tokio::test]
    async fn the_hub_is_freed_after_the_server_stops() {
        let config = Config::for_tests();
        let listener = TcpListener::bind(config.listen).await.expect("bind");
        let admin = TcpListener::bind(config.admin_listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (hub_tx, hub_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(serve_observed(
            config,
            listener,
            admin,
            stop.clone().cancelled_owned(),
            move |hub| {
                let _ = hub_tx.send(hub);
            },
        ));
        let hub = hub_rx.await.expect("the server hands out its hub");

        // Use it: a client subscribes (a binding at the source) and leaves.
        let url = format!("ws://{addr}{}", eventrouter_contract::http::WS_PATH);
        let (mut client, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        client
            .send(Message::text(
                r#"{"op":"subscribe","id":1,"events":["order.*"]}"#,
            ))
            .await
            .expect("send");
        let ack = client.next().await.expect("a reply").expect("a frame");
        assert!(ack.to_text().expect("text").contains("subscribed"), "{ack}");
        assert!(hub.upgrade().is_some(), "the hub lives while serving");
        drop(client);

        stop.cancel();
        server.await.expect("join").expect("serve");
        // Connection clean-up tasks may hold it a moment longer; a cycle would hold it forever.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.upgrade().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hub is still alive 5 s after the server stopped: a reference cycle"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
