//! The `recovery_bench` benchmark: many clients of one event-service instance reconnecting at
//! once with `since` after a gap, recovering the events they missed from the router's RabbitMQ
//! stream, while live delivery goes on.
//!
//! One release event-service (`--source amqp`, `--history-stream <exchange>.history`) runs on a
//! dedicated RabbitMQ node. A publisher sends numbered events (`data` carries the sequence number
//! and the publish time in µs) straight to the exchange at `--rate` for the whole run, each with a
//! UUIDv7 `message_id` and a timestamp, so the stream can give them back. The events are spread
//! over `--topics` N: event `n` is published as `bench.<n % N>`. `--clients` recovering clients
//! and `--live` live subscribers subscribe to one topic each (client `i` to `bench.<i % N>`), so
//! the steady state is `rate × (clients + live) / N` deliveries/s (with every client on every
//! event it would be `rate × clients`, enough to saturate a small machine before any recovery
//! starts). After `--warmup` with everyone live, the recovering clients drop their connections at
//! once (each remembers the id and sequence number of its last event), wait `--gap`, and
//! reconnect at once with `since`.
//!
//! Measured: per client, the time from the reconnect to the `subscribed` reply, to *caught up*
//! (the first event published after the reconnect instant has arrived: the whole replay and
//! everything up to that instant is in) and to *live* (caught up, and an event arrived within
//! `--live-lag` of its publish time); the time until all are caught up and live; per client that
//! the sequence numbers of its topic run on exactly (in steps of N) from the last one before the
//! drop (0 gaps, 0 duplicates) up to the last event published on its topic; `recovered: false` and `busy` answers; the live subscribers'
//! publish → receive latency in each phase; CPU of the service, the broker (`--broker-pid`) and
//! this process per phase, and the kernel socket queues of the clients during the recovery (a
//! client Recv-Q near zero says the clients keep up and are not what limits the figure).
//!
//! `tests/loadgen/recovery-bench.sh` builds it, starts a dedicated RabbitMQ node and runs it. By
//! hand:
//!
//! ```text
//! cargo build --release -p event-service -p eventrouter-loadgen --bin event-service --bin recovery_bench
//! target/release/recovery_bench --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//!
//! # Layout
//! - this module: the flags and the run's phases;
//! - [`client`]: the recovering clients and the live subscribers;
//! - [`publisher`]: the paced, recoverable publisher;
//! - [`report`]: the figures and their summary;
//! - [`wire`]: the event body, UUIDv7 ids, and reading frames without a JSON parser.

mod client;
mod publisher;
mod report;
mod wire;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use eventrouter_contract::{http::WS_PATH, metrics as m};
use eventrouter_test_support::unique_name;
use lapin::{
    Connection, ConnectionProperties,
    options::{ExchangeDeleteOptions, QueueDeleteOptions},
};
use tokio::sync::{Semaphore, oneshot, watch};

use crate::{
    amqp_bench::service::Service,
    metrics::{self, Scrape},
    procfs,
    ws::Target,
};
use client::{ClientSettings, LiveReport, Mark, Phase, Progress, RecoveringReport};
use publisher::{PublishSettings, Published, Topic};
pub use report::Report;

#[derive(Clone, Debug, Parser)]
#[command(
    about = "Event service on RabbitMQ: many clients recovering missed events at once (subscribe with since) while live delivery goes on"
)]
pub struct Args {
    /// The RabbitMQ to measure against.
    #[arg(
        long,
        env = "EVENTROUTER_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The event-service binary (default: next to this one).
    #[arg(long)]
    pub service_bin: Option<PathBuf>,
    /// Process id of the broker (`beam.smp`), for its CPU time.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Clients that drop and reconnect with `since`.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Live subscribers that stay connected and sample latency.
    #[arg(long, default_value_t = 8)]
    pub live: usize,
    /// Events per second published for the whole run (over all the topics).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Topics the events are spread over (at least 1): event `n` is published as
    /// `bench.<n % topics>`, client `i` (and live subscriber `i`) subscribes to
    /// `bench.<i % topics>`. 1: every client receives every event.
    #[arg(long, default_value_t = 10)]
    pub topics: u64,
    /// Everyone live before the drop.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// From the drop to the reconnect.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub gap: Duration,
    /// After all are live, keep publishing this long (late duplicates would show here).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub tail: Duration,
    /// Bytes of padding in each event's body (the body is ~40 bytes plus this).
    #[arg(long, default_value_t = 64)]
    pub pad_bytes: usize,
    /// A caught-up client is live once an event reaches it within this of its publish time.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub live_lag: Duration,
    /// Wait before repeating a `subscribe` refused with `busy`.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub busy_retry: Duration,
    /// A recovering client whose connection the service closes (e.g. 4000, slow consumer)
    /// reconnects with `since` as a real client would, at most this many times; each close is
    /// counted in the report.
    #[arg(long, default_value_t = 20)]
    pub max_reconnects: u32,
    /// Give up waiting for every client to be live after this long.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub recovery_timeout: Duration,
    /// After the publisher stops, how long a client may take to receive the last event.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub finish_timeout: Duration,
    /// The service's `--recovery-max-events` (it counts the events matching a client's
    /// subscription). Its default (10,000) is exactly a 10 s gap at 1,000 events/s on one
    /// topic, and a reconnect also misses what is published while it connects, so with
    /// `--topics 1` the default would answer `recovered: false` to every client.
    #[arg(long, default_value_t = 100_000)]
    pub recovery_max_events: u32,
    /// Any other event-service flag (repeat for several), e.g. `--service-arg=--recovery-max-concurrent=128`.
    #[arg(long = "service-arg", allow_hyphen_values = true)]
    pub service_args: Vec<String>,
    /// Worker threads of the clients' runtime (the publisher and the live subscribers have a
    /// thread of their own).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Read buffer of each client, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub read_buffer: usize,
    /// Initial connections opened at once (the reconnect is all at once regardless).
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Time allowed for one connection's connect, upgrade and first reply.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// How often the clients' kernel socket queues are read during the recovery.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub queue_sample_interval: Duration,
    /// Print the report as one JSON object on stdout (the summary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// CPU seconds used so far by the service, the broker and this process, at one instant.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    at: Instant,
    /// Microseconds since the epoch at `at` (to place latency samples).
    at_us: u64,
    service: Option<f64>,
    broker: Option<f64>,
    loadgen: Option<f64>,
}

impl Cpu {
    fn now(service: &Service, broker: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            at_us: wire::now_micros(),
            service: service.cpu_time().map(|d| d.as_secs_f64()),
            broker: broker.and_then(|pid| procfs::cpu_seconds(pid).ok()),
            loadgen: procfs::cpu_seconds(std::process::id()).ok(),
        }
    }
}

/// The instants that delimit the phases.
#[derive(Debug)]
struct Marks {
    warmup: Cpu,
    drop: Cpu,
    reconnect: Cpu,
    all_caught_up: Option<Cpu>,
    all_live: Option<Cpu>,
    /// When the wait for all live ended (all live, or `--recovery-timeout`).
    watched: Cpu,
    end: Cpu,
}

/// The clients' and the service's kernel socket queues during the recovery, in bytes.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct QueueSamples {
    pub samples: u64,
    /// Largest total of unread bytes in the clients' sockets (Recv-Q).
    pub client_recv_q_max: u64,
    /// Mean over the samples of that total.
    pub client_recv_q_mean: f64,
    /// Largest total of the service's unsent bytes (Send-Q of its sockets to the clients).
    pub service_send_q_max: u64,
    /// The same two for the live subscribers' sockets alone: unread by them, unsent to them.
    pub live_recv_q_max: u64,
    pub live_send_q_max: u64,
}

impl QueueSamples {
    /// Adds one reading of the TCP table.
    fn sample(&mut self, port: u16, live_ports: &[u16]) -> std::io::Result<()> {
        let mut entries = ::procfs::net::tcp().map_err(std::io::Error::other)?;
        if let Ok(v6) = ::procfs::net::tcp6() {
            entries.extend(v6);
        }
        let sockets: Vec<procfs::SocketQueues> =
            entries.iter().map(procfs::SocketQueues::from).collect();
        let all = procfs::accumulate_port_queues(sockets.iter().copied(), port);
        let (mut live_recv, mut live_send) = (0, 0);
        for s in sockets.iter().filter(|s| s.established) {
            if s.remote_port == port && live_ports.contains(&s.local_port) {
                live_recv += s.rx_queue;
            } else if s.local_port == port && live_ports.contains(&s.remote_port) {
                live_send += s.tx_queue;
            }
        }
        self.samples += 1;
        self.client_recv_q_mean += all.client_side.recv_q as f64;
        self.client_recv_q_max = self.client_recv_q_max.max(all.client_side.recv_q);
        self.service_send_q_max = self.service_send_q_max.max(all.server_side.send_q);
        self.live_recv_q_max = self.live_recv_q_max.max(live_recv);
        self.live_send_q_max = self.live_send_q_max.max(live_send);
        Ok(())
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    if args.clients == 0 || args.rate == 0 {
        bail!("--clients and --rate must be at least 1");
    }
    if args.topics == 0 {
        bail!("--topics must be at least 1 (1: every client receives every event)");
    }
    let bin = service_bin(args)?;
    let exchange = unique_name("recovery-bench");
    let stream = eventrouter_contract::history::default_stream(&exchange);
    let mut extra = vec![
        "--history-stream".to_owned(),
        stream.clone(),
        "--recovery-max-events".to_owned(),
        args.recovery_max_events.to_string(),
    ];
    extra.extend(args.service_args.iter().cloned());
    let service = Service::spawn(&bin, &args.amqp_url, &exchange, &extra).await?;
    let outcome = measure(args, &service, &exchange).await;
    drop(service);
    if let Err(error) = delete(&args.amqp_url, &exchange, &stream).await {
        eprintln!("warning: deleting the exchange and stream: {error:#}");
    }
    outcome
}

async fn measure(args: &Args, service: &Service, exchange: &str) -> anyhow::Result<Report> {
    let settings = Arc::new(ClientSettings {
        target: Target {
            addr: service.addr,
            path: WS_PATH.to_owned(),
        },
        handshake_timeout: args.handshake_timeout,
        read_buffer: args.read_buffer,
        live_lag: args.live_lag,
        busy_retry: args.busy_retry,
        max_reconnects: args.max_reconnects,
        finish_timeout: args.finish_timeout,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Connect);
    let progress = Arc::new(Progress::default());
    let published = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = oneshot::channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let probe = spawn_probe(
        args,
        PublishSettings {
            amqp_url: args.amqp_url.clone(),
            exchange: exchange.to_owned(),
            rate: args.rate,
            topics: args.topics,
            pad: "x".repeat(args.pad_bytes),
        },
        Arc::clone(&settings),
        phase_rx.clone(),
        Arc::clone(&progress),
        Arc::clone(&published),
        stop_rx,
        stopped_tx,
    )?;
    let permits = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(client::recovering(
                Arc::clone(&settings),
                Topic::of(i as u64, args.topics),
                phase_rx.clone(),
                Arc::clone(&progress),
                Arc::clone(&permits),
            ))
        })
        .collect();
    drop(phase_rx);

    eprintln!(
        "recovery: {} recovering clients and {} live subscribers over {} topics on {} (service pid {:?}, admin {})",
        args.clients,
        args.live,
        args.topics,
        service.ws,
        service.pid(),
        service.admin
    );
    let everyone = args.clients + args.live;
    wait_for(
        || {
            progress.subscribed.load(Ordering::Relaxed) + progress.failed.load(Ordering::Relaxed)
                >= everyone
        },
        args.handshake_timeout * 2,
    )
    .await;
    let failed = progress.failed.load(Ordering::Relaxed);
    if failed > 0 || progress.subscribed.load(Ordering::Relaxed) < everyone {
        bail!(
            "only {} of {everyone} clients subscribed ({failed} failed)",
            progress.subscribed.load(Ordering::Relaxed)
        );
    }

    eprintln!(
        "  warm-up: everyone live for {:?} at {} events/s ({:.0} deliveries/s)",
        args.warmup,
        args.rate,
        report::steady_deliveries_per_s(args)
    );
    let warmup = Cpu::now(service, args.broker_pid);
    phase_tx.send_replace(Phase::Warmup);
    tokio::time::sleep(args.warmup).await;

    let drop_at = Cpu::now(service, args.broker_pid);
    phase_tx.send_replace(Phase::Drop);
    wait_for(
        || {
            progress.dropped.load(Ordering::Relaxed) + progress.failed.load(Ordering::Relaxed)
                >= args.clients
        },
        Duration::from_secs(10),
    )
    .await;
    eprintln!(
        "  dropped {} connections; reconnecting in {:?}",
        progress.dropped.load(Ordering::Relaxed),
        args.gap
    );
    let scrape_before = scrape(service).await;
    tokio::time::sleep_until((drop_at.at + args.gap).into()).await;

    let reconnect = Cpu::now(service, args.broker_pid);
    let mark = Mark {
        at: reconnect.at,
        published: published.load(Ordering::Acquire),
    };
    phase_tx.send_replace(Phase::Reconnect(mark));
    let (all_caught_up, all_live, watched, queues, timeline) =
        watch_recovery(args, service, &progress).await;

    tokio::time::sleep(args.tail).await;
    let end = Cpu::now(service, args.broker_pid);
    let scrape_after = scrape(service).await;
    let _ = stop_tx.send(());
    let total = stopped_rx
        .await
        .context("the publisher stopped before it was asked to")?;
    eprintln!(
        "  publisher stopped after {total} events; clients read up to the last one of their topic"
    );
    phase_tx.send_replace(Phase::Finish { published: total });

    let mut recovering: Vec<RecoveringReport> = Vec::with_capacity(clients.len());
    for handle in clients {
        recovering.push(handle.await.context("a recovering client panicked")?);
    }
    let (publish, live): (Published, Vec<LiveReport>) = tokio::task::spawn_blocking(move || {
        probe
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))?
    })
    .await
    .context("joining the publisher thread")??;

    let marks = Marks {
        warmup,
        drop: drop_at,
        reconnect,
        all_caught_up,
        all_live,
        watched,
        end,
    };
    Ok(report::build(
        args,
        &marks,
        mark,
        &publish,
        &recovering,
        &live,
        queues,
        timeline,
        (scrape_before, scrape_after),
    ))
}

/// Waits until every recovering client is caught up and live (or failed), or the timeout;
/// samples the socket queues meanwhile.
async fn watch_recovery(
    args: &Args,
    service: &Service,
    progress: &Progress,
) -> (Option<Cpu>, Option<Cpu>, Cpu, QueueSamples, Vec<Step>) {
    let deadline = Instant::now() + args.recovery_timeout;
    let port = service.addr.port();
    let mut queues = QueueSamples::default();
    let mut next_sample = Instant::now();
    let mut next_print = Instant::now() + Duration::from_secs(1);
    let mut all_caught_up = None;
    let mut all_live = None;
    let mut timeline = Vec::new();
    loop {
        let failed = progress.failed.load(Ordering::Relaxed);
        let caught_up = progress.caught_up.load(Ordering::Relaxed);
        let live = progress.live.load(Ordering::Relaxed);
        if all_caught_up.is_none() && caught_up + failed >= args.clients {
            all_caught_up = Some(Cpu::now(service, args.broker_pid));
        }
        if all_live.is_none() && live + failed >= args.clients {
            all_live = Some(Cpu::now(service, args.broker_pid));
        }
        if all_caught_up.is_some() && all_live.is_some() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            eprintln!("  gave up waiting after {:?}", args.recovery_timeout);
            break;
        }
        if now >= next_print {
            next_print += Duration::from_secs(1);
            let step = Step {
                t_s: now
                    .duration_since(deadline - args.recovery_timeout)
                    .as_secs_f64(),
                answered: progress.acked.load(Ordering::Relaxed),
                caught_up,
                live,
                failed,
            };
            eprintln!(
                "  +{:>5.1}s answered {:>5} caught up {:>5} live {:>5} failed {}",
                step.t_s, step.answered, step.caught_up, step.live, step.failed
            );
            timeline.push(step);
        }
        if now >= next_sample {
            next_sample = now + args.queue_sample_interval;
            let live_ports = progress
                .live_ports
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            if let Ok(Ok(q)) = tokio::task::spawn_blocking(move || {
                queues.sample(port, &live_ports).map(|()| queues)
            })
            .await
            {
                queues = q;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if queues.samples > 0 {
        queues.client_recv_q_mean /= queues.samples as f64;
    }
    let watched = Cpu::now(service, args.broker_pid);
    (all_caught_up, all_live, watched, queues, timeline)
}

/// The recovering clients' progress once a second after the reconnect.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Step {
    pub t_s: f64,
    pub answered: usize,
    pub caught_up: usize,
    pub live: usize,
    pub failed: usize,
}

/// The publisher thread: what the publisher did and what each live subscriber saw.
type Probe = std::thread::JoinHandle<anyhow::Result<(Published, Vec<LiveReport>)>>;

/// The publisher and the live subscribers, on a thread and runtime of their own so that the
/// recovering clients' work does not delay the publish schedule or the latency samples.
#[allow(clippy::too_many_arguments)]
fn spawn_probe(
    args: &Args,
    publish: PublishSettings,
    settings: Arc<ClientSettings>,
    phase: watch::Receiver<Phase>,
    progress: Arc<Progress>,
    published: Arc<AtomicU64>,
    stop: oneshot::Receiver<()>,
    stopped: oneshot::Sender<u64>,
) -> anyhow::Result<Probe> {
    let live = args.live;
    let topics = args.topics;
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the publisher's runtime")?;
            runtime.block_on(async move {
                let subscribers: Vec<_> = (0..live)
                    .map(|j| {
                        tokio::spawn(client::live(
                            Arc::clone(&settings),
                            Topic::of(j as u64, topics),
                            phase.clone(),
                            Arc::clone(&progress),
                        ))
                    })
                    .collect();
                let published =
                    publisher::publish(publish, phase, published, stop, stopped).await?;
                let mut reports = Vec::with_capacity(subscribers.len());
                for s in subscribers {
                    reports.push(s.await.context("a live subscriber panicked")?);
                }
                Ok((published, reports))
            })
        })
        .context("starting the publisher thread")
}

/// Polls `done` every 10 ms until it holds or `timeout` passes.
async fn wait_for(done: impl Fn() -> bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn scrape(service: &Service) -> Option<Scrape> {
    match metrics::scrape(service.admin).await {
        Ok(s) => Some(s),
        Err(error) => {
            eprintln!("  warning: scraping the service's metrics: {error}");
            None
        }
    }
}

/// What the service counted between two scrapes.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServiceCounters {
    /// Recoveries by result.
    pub recoveries: BTreeMap<String, f64>,
    /// Events replayed.
    pub replayed_events: f64,
    pub disconnects_by_reason: BTreeMap<String, f64>,
    pub drops_by_reason: BTreeMap<String, f64>,
    /// Gauges at the end.
    pub recoveries_active_at_end: f64,
    pub recoveries_waiting_at_end: f64,
    pub connections_at_end: f64,
}

fn service_counters(before: &Scrape, after: &Scrape) -> ServiceCounters {
    let delta = |name: &str, label: &str| {
        metrics::delta_by_label(&before.by_label(name, label), &after.by_label(name, label))
    };
    ServiceCounters {
        recoveries: delta(m::RECOVERIES, "result"),
        replayed_events: after.sum(m::RECOVERED_EVENTS) - before.sum(m::RECOVERED_EVENTS),
        disconnects_by_reason: delta(m::DISCONNECTS, "reason"),
        drops_by_reason: delta(m::DROPS, "reason"),
        recoveries_active_at_end: after.sum(m::RECOVERIES_ACTIVE),
        recoveries_waiting_at_end: after.sum(m::RECOVERIES_WAITING),
        connections_at_end: after.sum(m::CONNECTIONS),
    }
}

fn service_bin(args: &Args) -> anyhow::Result<PathBuf> {
    let bin = match &args.service_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("event-service"),
    };
    if !bin.is_file() {
        bail!(
            "no event-service binary at {} (build it, or pass --service-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Removes the benchmark's exchange and stream (the service's own queue expires by itself).
async fn delete(amqp_url: &str, exchange: &str, stream: &str) -> anyhow::Result<()> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(stream.into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
