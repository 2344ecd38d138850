//! The `fanout` scenario: deliveries per second of one event to many subscribers.
//!
//! S subscribers subscribe to one event; publishers post batches to `/publish` over keep-alive
//! HTTP/1.1, at a target rate or as fast as accepted, for a duration. Subscribers count frames by
//! parsing headers only (see [`crate::frame`]) so that, on a machine shared with the service, the
//! client is not the bottleneck. A few subscribers also read each event's publish timestamp to
//! sample latency. The service's `/metrics` is scraped before and after as a cross-check.
//!
//! With `--peer centrifugo` the same events (same `data`, same timestamps) go to Centrifugo's
//! HTTP API, and subscribers read each message to count the publications packed into it (see
//! [`crate::ws::Protocol`]).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use eventrouter_contract::{http::PUBLISH_PATH, metrics as m};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
};

use crate::{
    centrifugo,
    cli::{FanoutArgs, Peer},
    frame,
    http::HttpClient,
    metrics::{self, Scrape},
    open::open_subscribed,
    procfs,
    ws::{Subscribed, Tally},
};

mod tasks;
use tasks::{progress, publish, subscriber};

/// Counters of one subscriber, on their own cache line: each is written by one task only.
#[derive(Default)]
#[repr(align(64))]
struct SubStats {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Nanoseconds since the run's epoch of the last read that brought a message.
    last_message_ns: AtomicU64,
    /// Close code + 1 once the server closed the connection (0: open).
    closed: AtomicU64,
}

/// Latency samples of the subscribers that read timestamps, in microseconds.
type Samples = Arc<Mutex<Vec<u32>>>;

/// The fan-out report.
#[derive(Debug, Serialize)]
pub struct FanoutReport {
    /// The server under test.
    pub peer: Peer,
    pub subscribers_requested: usize,
    pub subscribers: usize,
    pub connect_failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    pub payload_bytes: usize,
    pub target_rate: u64,
    pub batch: usize,
    pub publishers: usize,
    pub publish_seconds: f64,
    pub published_accepted: u64,
    pub publish_errors: BTreeMap<String, u64>,
    pub publish_rate: f64,
    /// Messages received by all subscribers.
    pub received: u64,
    pub expected: u64,
    pub missing: i64,
    /// Seconds from the first publish to the last message received.
    pub delivery_seconds: f64,
    /// received / delivery_seconds.
    pub deliveries_per_second: f64,
    /// Median of the per-second delivery rates while publishing (first and last second excluded).
    pub steady_deliveries_per_second: Option<f64>,
    pub per_second: Vec<f64>,
    pub mean_frame_bytes: f64,
    pub per_subscriber_min: u64,
    pub per_subscriber_max: u64,
    pub subscribers_missing_some: usize,
    pub subscribers_closed: BTreeMap<String, u64>,
    pub latency_samples: usize,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub service: Option<ServiceCounters>,
    pub service_cpu_seconds: Option<f64>,
    /// The server process's CPU time (user + system, from `/proc/<pid>/stat`) per delivery
    /// received, in microseconds: service_cpu_seconds / received.
    pub service_cpu_us_per_delivery: Option<f64>,
    pub loadgen_cpu_seconds: Option<f64>,
}

/// What the service counted during the run (`/metrics` after − before).
#[derive(Debug, Serialize)]
pub struct ServiceCounters {
    pub events_received: f64,
    pub deliveries: f64,
    pub drops: f64,
    pub drops_by_reason: BTreeMap<String, f64>,
    pub disconnects_by_reason: BTreeMap<String, f64>,
    pub connections_at_end: f64,
    /// The service's own publish→written latency (`eventrouter_delivery_latency_seconds`, one
    /// observation per socket write for its oldest event), p50 and p99 interpolated within the
    /// histogram's buckets as Prometheus' `histogram_quantile` does, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// `histogram_quantile(q, ...)` over cumulative bucket counts keyed by their `le` label.
pub fn histogram_quantile(q: f64, buckets: &BTreeMap<String, f64>) -> Option<f64> {
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, count)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *count))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in bounds {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            return Some(if inside > 0.0 {
                lower + (le - lower) * (rank - below) / inside
            } else {
                le
            });
        }
        (lower, below) = (le, count);
    }
    None
}

/// One event's `data`: `{"t":<t_ns>,"seq":<seq>,"pad":"xx…"}`, exactly `payload_bytes` long
/// when that is at least the unpadded size.
pub fn event_data(payload_bytes: usize, seq: u64, t_ns: u64) -> String {
    let head = format!(r#"{{"t":{t_ns},"seq":{seq},"pad":""#);
    let pad = payload_bytes.saturating_sub(head.len() + 2);
    let mut data = String::with_capacity(head.len() + pad + 2);
    data.push_str(&head);
    data.extend(std::iter::repeat_n('x', pad));
    data.push_str("\"}");
    data
}

/// Builds one `/publish` body: a JSON array of `batch` events whose `data` is exactly
/// `payload_bytes` long (when that is at least the unpadded size), stamped with `t_ns`.
pub fn batch_body(event: &str, batch: usize, payload_bytes: usize, seq: u64, t_ns: u64) -> String {
    let event_json = serde_json::to_string(event).unwrap_or_else(|_| "\"\"".to_owned());
    let mut body = String::with_capacity(batch * (payload_bytes + event_json.len() + 24) + 2);
    body.push('[');
    for k in 0..batch as u64 {
        if k > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"event":{event_json},"data":{}}}"#,
            event_data(payload_bytes, seq + k, t_ns)
        );
    }
    body.push(']');
    body
}

/// The path and body of one publish request of `batch` events to `peer`: the event service's
/// (and the Bun peer's) `POST /publish` with an array of events; Centrifugo's `/api/publish` for
/// one event and `/api/batch` for more. Every peer gets the same `data`.
pub fn publish_request(
    peer: Peer,
    event: &str,
    batch: usize,
    payload_bytes: usize,
    seq: u64,
    t_ns: u64,
) -> (&'static str, String) {
    match peer {
        Peer::Eventrouter | Peer::Bun => (
            PUBLISH_PATH,
            batch_body(event, batch, payload_bytes, seq, t_ns),
        ),
        Peer::Centrifugo if batch == 1 => (
            centrifugo::PUBLISH_PATH,
            centrifugo::publish_body(event, &event_data(payload_bytes, seq, t_ns)),
        ),
        Peer::Centrifugo => {
            let data: Vec<String> = (0..batch as u64)
                .map(|k| event_data(payload_bytes, seq + k, t_ns))
                .collect();
            (
                centrifugo::BATCH_PATH,
                centrifugo::batch_body(event, data.iter().map(String::as_str)),
            )
        }
    }
}

/// How many events of a publish request of `batch` the server accepted, from its answer, and the
/// errors by kind for those it did not: 202 `{"accepted":n}` from the event service and the Bun
/// peer; 200 with results or errors from Centrifugo (see [`centrifugo::api_outcome`]).
pub fn publish_outcome(
    peer: Peer,
    status: u16,
    body: &[u8],
    batch: usize,
) -> (u64, BTreeMap<String, u64>) {
    let failed = |kind: String| (0, BTreeMap::from([(kind, 1)]));
    match (peer, status) {
        (Peer::Eventrouter | Peer::Bun, 202) => {
            let n = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("accepted").and_then(serde_json::Value::as_u64))
                .unwrap_or(batch as u64);
            (n, BTreeMap::new())
        }
        (Peer::Centrifugo, 200) => match centrifugo::api_outcome(body) {
            Ok(outcome) => (outcome.accepted, outcome.errors),
            Err(error) => {
                tracing::warn!(%error, "unreadable Centrifugo API answer");
                failed("bad_answer".into())
            }
        },
        (_, status) => failed(format!("http_{status}")),
    }
}

/// Finds the publish timestamp in an event frame's payload (`"data":{"t":<ns>,`).
pub fn timestamp_of(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"data\":{\"t\":";
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    payload[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .try_fold(None, |acc: Option<u64>, b| {
            Some(Some(
                acc.unwrap_or(0).checked_mul(10)? + u64::from(b - b'0'),
            ))
        })
        .flatten()
}

/// Runs the scenario: connect and subscribe, measure while publishing, drain, report.
pub async fn run(args: &FanoutArgs) -> anyhow::Result<FanoutReport> {
    if args.batch == 0 || args.publishers == 0 {
        bail!("--batch and --publishers must be at least 1");
    }
    let epoch = Instant::now();
    let mut subs = subscribe(args, epoch).await?;
    let before = Snapshot::before(args).await;
    let received_before = total(&subs.stats);
    let published = measure(args, &subs.stats, received_before, epoch).await?;
    // Drain: until every subscriber has everything, nothing moved for `drain_quiet`, or timeout.
    let expected = published.accepted * subs.stats.len() as u64;
    drain(&subs.stats, received_before, expected, args).await;
    let after = Snapshot::after(args).await;
    subs.readers.abort_all();
    subs.latency_thread.stop();
    Ok(report(
        args,
        subs,
        published,
        received_before,
        expected,
        (before, after),
    ))
}

/// The subscribed connections, each read by its own task.
struct Subscribers {
    stats: Arc<Vec<SubStats>>,
    samples: Samples,
    readers: JoinSet<()>,
    latency_thread: LatencyThread,
    failures: BTreeMap<String, u64>,
    first_failure: Option<String>,
}

/// Connect phase: opens and subscribes `--subscribers` connections and starts their readers.
async fn subscribe(args: &FanoutArgs, epoch: Instant) -> anyhow::Result<Subscribers> {
    let common = &args.common;
    eprintln!(
        "fanout: opening {} subscribers of {:?} on {}",
        args.subscribers, args.event, common.addr
    );
    let event = args.event.clone();
    let opened = open_subscribed(common, args.subscribers, |_| vec![event.clone()]).await;
    if let Some(first) = &opened.first_failure {
        eprintln!("  first failure: {first}");
    }
    if opened.connections.is_empty() {
        bail!(
            "no subscriber could connect; is the service running on {}?",
            common.addr
        );
    }
    let stats: Arc<Vec<SubStats>> = Arc::new(
        (0..opened.connections.len())
            .map(|_| SubStats::default())
            .collect(),
    );
    let samples: Samples = Arc::new(Mutex::new(Vec::new()));
    let mut readers = JoinSet::new();
    let mut latency_readers = Vec::new();
    for (slot, (_, sub)) in opened.connections.into_iter().enumerate() {
        if slot < args.latency_subscribers {
            latency_readers.push((slot, sub));
            continue;
        }
        readers.spawn(subscriber(
            sub,
            slot,
            Arc::clone(&stats),
            None,
            epoch,
            args.read_buffer,
        ));
    }
    let latency_thread = LatencyThread::start(
        latency_readers,
        Arc::clone(&stats),
        Arc::clone(&samples),
        epoch,
        args.read_buffer,
    )?;
    Ok(Subscribers {
        stats,
        samples,
        readers,
        latency_thread,
        failures: opened.failures,
        first_failure: opened.first_failure,
    })
}

/// The subscribers that timestamp arrivals, on a thread of their own: the other subscribers
/// share the load generator's workers, and a sample taken when one of those threads gets round
/// to a socket among thousands would measure the load generator, not the service.
struct LatencyThread {
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LatencyThread {
    fn start(
        subs: Vec<(usize, Subscribed)>,
        stats: Arc<Vec<SubStats>>,
        samples: Samples,
        epoch: Instant,
        read_buffer: usize,
    ) -> anyhow::Result<Self> {
        // Sockets move between runtimes as std sockets and register with the new one there.
        let mut moved = Vec::with_capacity(subs.len());
        for (slot, sub) in subs {
            let std = sub
                .stream
                .into_std()
                .context("detaching a latency subscriber")?;
            moved.push((slot, std, sub.scanner, sub.protocol, sub.messages_after_ack));
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("latency-subscribers".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let mut tasks = JoinSet::new();
                    for (slot, std, scanner, protocol, messages_after_ack) in moved {
                        let Ok(stream) = tokio::net::TcpStream::from_std(std) else {
                            continue;
                        };
                        let sub = Subscribed {
                            stream,
                            scanner,
                            protocol,
                            messages_after_ack,
                        };
                        tasks.spawn(subscriber(
                            sub,
                            slot,
                            Arc::clone(&stats),
                            Some(Arc::clone(&samples)),
                            epoch,
                            read_buffer,
                        ));
                    }
                    stop2.notified().await;
                    tasks.abort_all();
                });
            })
            .context("starting the latency-subscriber thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The service's counters and both processes' CPU time at one instant.
struct Snapshot {
    scrape: Option<Scrape>,
    service_cpu: Option<f64>,
    loadgen_cpu: Option<f64>,
}

impl Snapshot {
    /// Before the window: scrape first, so the scrape's own CPU stays outside the window.
    async fn before(args: &FanoutArgs) -> Self {
        let scrape = scrape_opt(args.common.admin).await;
        let (service_cpu, loadgen_cpu) = cpu_now(args);
        Snapshot {
            scrape,
            service_cpu,
            loadgen_cpu,
        }
    }

    /// After the window: CPU first, for the same reason.
    async fn after(args: &FanoutArgs) -> Self {
        let (service_cpu, loadgen_cpu) = cpu_now(args);
        let scrape = scrape_opt(args.common.admin).await;
        Snapshot {
            scrape,
            service_cpu,
            loadgen_cpu,
        }
    }
}

/// CPU seconds used so far by the service (when its pid is known) and by this process.
fn cpu_now(args: &FanoutArgs) -> (Option<f64>, Option<f64>) {
    let service = args
        .common
        .service_pid
        .and_then(|pid| procfs::cpu_seconds(pid).ok());
    (service, procfs::cpu_seconds(std::process::id()).ok())
}

/// What the publishers did during the measured window.
struct Published {
    accepted: u64,
    errors: BTreeMap<String, u64>,
    seconds: f64,
    /// Nanoseconds since the epoch when publishing started.
    start_ns: u64,
    per_second: Vec<f64>,
}

/// Measure phase: publishes for `--duration` over `--publishers` connections while sampling the
/// delivery rate each second.
async fn measure(
    args: &FanoutArgs,
    stats: &[SubStats],
    received_before: u64,
    epoch: Instant,
) -> anyhow::Result<Published> {
    eprintln!(
        "  publishing {} events/s ({}) in batches of {} over {} connection(s) for {:?}",
        args.rate,
        if args.rate == 0 {
            "full speed"
        } else {
            "target"
        },
        args.batch,
        args.publishers,
        args.duration
    );
    let publish_start = Instant::now();
    let start_ns = nanos_since(epoch);
    let deadline = publish_start + args.duration;
    let accepted = Arc::new(AtomicU64::new(0));
    let mut publishers = JoinSet::new();
    for p in 0..args.publishers {
        let client = connect_publisher(args)
            .await
            .context("connecting a publisher")?;
        publishers.spawn(publish(
            p,
            client,
            args.clone(),
            Arc::clone(&accepted),
            epoch,
            publish_start,
            deadline,
        ));
    }
    let per_second = progress(stats, &accepted, received_before, publish_start, deadline).await;
    let mut errors = BTreeMap::new();
    while let Some(joined) = publishers.join_next().await {
        for (k, v) in joined.context("a publisher panicked")? {
            *errors.entry(k).or_insert(0) += v;
        }
    }
    Ok(Published {
        seconds: publish_start.elapsed().as_secs_f64(),
        accepted: accepted.load(Ordering::Relaxed),
        errors,
        start_ns,
        per_second,
    })
}

/// A publisher's keep-alive connection, carrying the publish key the way the peer expects it.
async fn connect_publisher(args: &FanoutArgs) -> Result<HttpClient, crate::http::HttpError> {
    let mut client = HttpClient::connect(args.common.addr).await?;
    if let Some(key) = &args.common.publish_key {
        match args.common.peer {
            Peer::Eventrouter | Peer::Bun => client.set_bearer(key)?,
            Peer::Centrifugo => client.set_api_key(key)?,
        }
    }
    Ok(client)
}

/// Report phase: turns the counters, samples and snapshots into the report.
fn report(
    args: &FanoutArgs,
    subs: Subscribers,
    published: Published,
    received_before: u64,
    expected: u64,
    (before, after): (Snapshot, Snapshot),
) -> FanoutReport {
    let stats = &subs.stats;
    let counts: Vec<u64> = stats
        .iter()
        .map(|s| s.messages.load(Ordering::Relaxed))
        .collect();
    let received: u64 = counts.iter().sum::<u64>() - received_before;
    let bytes: u64 = stats.iter().map(|s| s.bytes.load(Ordering::Relaxed)).sum();
    let last_ns = stats
        .iter()
        .map(|s| s.last_message_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(published.start_ns);
    let delivery_seconds = (last_ns.saturating_sub(published.start_ns)) as f64 / 1e9;
    let lat = sorted_samples(&subs.samples);
    let pct = |p: f64| -> Option<f64> {
        (!lat.is_empty()).then(|| {
            let idx = ((lat.len() as f64 - 1.0) * p).round() as usize;
            f64::from(lat[idx]) / 1000.0
        })
    };
    let accepted = published.accepted;
    let service_cpu_seconds = before
        .service_cpu
        .zip(after.service_cpu)
        .map(|(b, a)| a - b);
    FanoutReport {
        peer: args.common.peer,
        subscribers_requested: args.subscribers,
        subscribers: stats.len(),
        connect_failures: subs.failures,
        first_failure: subs.first_failure,
        payload_bytes: args.payload_bytes,
        target_rate: args.rate,
        batch: args.batch,
        publishers: args.publishers,
        publish_seconds: published.seconds,
        published_accepted: accepted,
        publish_errors: published.errors,
        publish_rate: accepted as f64 / published.seconds,
        received,
        expected,
        missing: expected as i64 - received as i64,
        delivery_seconds,
        deliveries_per_second: if delivery_seconds > 0.0 {
            received as f64 / delivery_seconds
        } else {
            0.0
        },
        steady_deliveries_per_second: steady_median(&published.per_second),
        per_second: published.per_second,
        mean_frame_bytes: if received > 0 {
            bytes as f64 / received as f64
        } else {
            0.0
        },
        per_subscriber_min: counts.iter().copied().min().unwrap_or(0),
        per_subscriber_max: counts.iter().copied().max().unwrap_or(0),
        subscribers_missing_some: counts.iter().filter(|c| **c < accepted).count(),
        subscribers_closed: closed_by_code(stats),
        latency_samples: lat.len(),
        latency_p50_ms: pct(0.50),
        latency_p99_ms: pct(0.99),
        latency_max_ms: lat.last().map(|v| f64::from(*v) / 1000.0),
        service: match (before.scrape, after.scrape) {
            (Some(b), Some(a)) => Some(service_counters(&b, &a)),
            _ => None,
        },
        service_cpu_seconds,
        service_cpu_us_per_delivery: service_cpu_seconds
            .filter(|_| received > 0)
            .map(|cpu| cpu * 1e6 / received as f64),
        loadgen_cpu_seconds: before
            .loadgen_cpu
            .zip(after.loadgen_cpu)
            .map(|(b, a)| a - b),
    }
}

/// Subscribers the server closed, by close code (`no_close_frame` when it just hung up).
fn closed_by_code(stats: &[SubStats]) -> BTreeMap<String, u64> {
    let mut closed = BTreeMap::new();
    for s in stats {
        let c = s.closed.load(Ordering::Relaxed);
        if c > 0 {
            let key = match c - 1 {
                0 => "no_close_frame".to_owned(),
                code => code.to_string(),
            };
            *closed.entry(key).or_insert(0) += 1;
        }
    }
    closed
}

/// Median of the per-second rates, the first and last (partial) seconds excluded.
fn steady_median(per_second: &[f64]) -> Option<f64> {
    let mut steady: Vec<f64> = per_second
        .iter()
        .copied()
        .skip(1)
        .take(per_second.len().saturating_sub(2))
        .collect();
    steady.sort_by(f64::total_cmp);
    steady.get(steady.len() / 2).copied()
}

fn sorted_samples(samples: &Samples) -> Vec<u32> {
    let mut lat = samples.lock().map(|v| v.clone()).unwrap_or_default();
    lat.sort_unstable();
    lat
}

/// Waits until the subscribers received `expected` events since `received_before`, nothing moved
/// for `--drain-quiet`, or `--drain-timeout` passed.
async fn drain(stats: &[SubStats], received_before: u64, expected: u64, args: &FanoutArgs) {
    let drain_deadline = Instant::now() + args.drain_timeout;
    let mut last_change = Instant::now();
    let mut seen = total(stats);
    while Instant::now() < drain_deadline {
        let now_total = total(stats);
        if now_total - received_before >= expected {
            break;
        }
        if now_total != seen {
            seen = now_total;
            last_change = Instant::now();
        } else if last_change.elapsed() >= args.drain_quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn service_counters(before: &Scrape, after: &Scrape) -> ServiceCounters {
    let d = |name: &str| after.sum(name) - before.sum(name);
    let drops_by_reason = metrics::delta_by_label(
        &before.by_label(m::DROPS, "reason"),
        &after.by_label(m::DROPS, "reason"),
    );
    ServiceCounters {
        events_received: d(m::EVENTS_RECEIVED),
        deliveries: d(m::DELIVERIES),
        drops: d(m::DROPS),
        drops_by_reason,
        disconnects_by_reason: metrics::delta_by_label(
            &before.by_label(m::DISCONNECTS, "reason"),
            &after.by_label(m::DISCONNECTS, "reason"),
        ),
        connections_at_end: after.sum(m::CONNECTIONS),
        latency_p50_ms: latency_quantile(before, after, 0.50),
        latency_p99_ms: latency_quantile(before, after, 0.99),
    }
}

/// A quantile of the service's delivery-latency histogram over the run, in milliseconds.
fn latency_quantile(before: &Scrape, after: &Scrape, q: f64) -> Option<f64> {
    let name = format!("{}_bucket", m::DELIVERY_LATENCY);
    let (b, a) = (before.by_label(&name, "le"), after.by_label(&name, "le"));
    let run: BTreeMap<String, f64> = a
        .iter()
        .map(|(le, v)| (le.clone(), v - b.get(le).copied().unwrap_or(0.0)))
        .collect();
    histogram_quantile(q, &run).map(|s| s * 1000.0)
}

async fn scrape_opt(admin: Option<std::net::SocketAddr>) -> Option<Scrape> {
    let admin = admin?;
    match metrics::scrape(admin).await {
        Ok(s) => Some(s),
        Err(error) => {
            eprintln!("  warning: scraping {admin}: {error}");
            None
        }
    }
}

fn total(stats: &[SubStats]) -> u64 {
    stats
        .iter()
        .map(|s| s.messages.load(Ordering::Relaxed))
        .sum()
}

fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_the_bucket_like_prometheus() {
        let buckets: BTreeMap<String, f64> = [
            ("0.01", 50.0),
            ("0.02", 90.0),
            ("0.05", 100.0),
            ("+Inf", 100.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // Rank 50 is the top of the first bucket; rank 70 halfway through the second.
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.01));
        let p70 = histogram_quantile(0.7, &buckets).expect("p70");
        assert!((p70 - 0.015).abs() < 1e-12, "{p70}");
        let p99 = histogram_quantile(0.99, &buckets).expect("p99");
        assert!((p99 - 0.047).abs() < 1e-12, "{p99}");
        assert_eq!(histogram_quantile(0.5, &BTreeMap::new()), None);
    }

    #[test]
    fn batch_body_pads_data_to_size() {
        let body = batch_body("bench.x", 3, 100, 7, 123_456_789);
        let events: Vec<serde_json::Value> = serde_json::from_str(&body).expect("valid JSON array");
        assert_eq!(events.len(), 3);
        for (k, e) in events.iter().enumerate() {
            assert_eq!(e["event"], "bench.x");
            assert_eq!(e["data"]["seq"], 7 + k as u64);
            assert_eq!(e["data"]["t"], 123_456_789u64);
            assert_eq!(
                serde_json::to_string(&e["data"]).expect("serializes").len(),
                100
            );
        }
    }

    #[test]
    fn every_peer_gets_the_same_data() {
        let data = event_data(100, 7, 123);
        assert_eq!(data.len(), 100);
        assert!(data.starts_with(r#"{"t":123,"seq":7,"pad":"xx"#), "{data}");
        let (path, body) = publish_request(Peer::Eventrouter, "bench.x", 2, 100, 7, 123);
        assert_eq!(path, "/publish");
        assert_eq!(body, batch_body("bench.x", 2, 100, 7, 123));
        assert_eq!(
            publish_request(Peer::Bun, "bench.x", 2, 100, 7, 123),
            (path, body)
        );

        let (path, body) = publish_request(Peer::Centrifugo, "bench.x", 1, 100, 7, 123);
        assert_eq!(path, "/api/publish");
        let one: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(one["channel"], "bench.x");
        assert_eq!(
            one["data"],
            serde_json::from_str::<serde_json::Value>(&data).expect("JSON")
        );

        let (path, body) = publish_request(Peer::Centrifugo, "bench.x", 3, 100, 7, 123);
        assert_eq!(path, "/api/batch");
        let batch: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let commands = batch["commands"].as_array().expect("commands");
        assert_eq!(commands.len(), 3);
        for (k, c) in commands.iter().enumerate() {
            assert_eq!(c["publish"]["channel"], "bench.x");
            assert_eq!(c["publish"]["data"]["seq"], 7 + k as u64);
            assert_eq!(c["publish"]["data"]["t"], 123);
        }
    }

    #[test]
    fn publish_answers_per_peer() {
        let none = BTreeMap::new();
        assert_eq!(
            publish_outcome(Peer::Eventrouter, 202, br#"{"accepted":25}"#, 25),
            (25, none.clone())
        );
        assert_eq!(
            publish_outcome(Peer::Bun, 202, br#"{"accepted":3}"#, 25),
            (3, none.clone())
        );
        assert_eq!(
            publish_outcome(Peer::Bun, 400, br#"{"error":"x"}"#, 25),
            (0, BTreeMap::from([("http_400".to_owned(), 1)]))
        );
        assert_eq!(
            publish_outcome(Peer::Centrifugo, 200, br#"{"result":{}}"#, 1),
            (1, none.clone())
        );
        assert_eq!(
            publish_outcome(
                Peer::Centrifugo,
                200,
                br#"{"replies":[{"publish":{}},{"error":{"code":102,"message":"unknown channel"}}]}"#,
                2
            ),
            (1, BTreeMap::from([("api_102".to_owned(), 1)]))
        );
        assert_eq!(
            publish_outcome(Peer::Centrifugo, 401, b"Unauthorized", 1),
            (0, BTreeMap::from([("http_401".to_owned(), 1)]))
        );
        assert_eq!(
            publish_outcome(Peer::Centrifugo, 200, b"nonsense", 1),
            (0, BTreeMap::from([("bad_answer".to_owned(), 1)]))
        );
    }

    #[test]
    fn timestamp_found_in_an_event_frame() {
        let frame = br#"{"op":"event","event":"bench.x","id":"a","time":"2026-01-01T00:00:00Z","data":{"t":98765,"seq":1,"pad":"xx"}}"#;
        assert_eq!(timestamp_of(frame), Some(98765));
        assert_eq!(timestamp_of(br#"{"op":"event","data":{"seq":1}}"#), None);
    }
}
