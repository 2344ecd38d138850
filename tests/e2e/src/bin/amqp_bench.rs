//! `amqp_bench`: how fast one event-service instance consumes from RabbitMQ and delivers to a
//! WebSocket client, against what the same broker delivers to a bare lapin consumer, plus
//! publish → client latency at a moderate rate.
//!
//! Both receivers get the identical workload: the same publisher, the same queue arguments
//! (exclusive, auto-delete, `x-max-length`, drop-head, TTL), the same prefetch and the same
//! batched acknowledgements. The bare consumer's rate is therefore what the broker can hand to
//! any client on this machine; the ratio says whether the service is ever the bottleneck.
//!
//! `tests/e2e/amqp-bench.sh` builds it, starts a dedicated RabbitMQ node and runs it with the
//! broker sharing the CPUs and with the broker pinned to a CPU of its own. By hand:
//!
//! ```text
//! cargo build --release -p event-service -p eventrouter-e2e --bin event-service --bin amqp_bench
//! target/release/amqp_bench --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//! The service binary is looked up next to this one unless `--service-bin` says otherwise.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Debug, Parser)]
#[command(
    about = "Event service on RabbitMQ: consume-and-deliver rate vs a bare consumer, and latency"
)]
struct Args {
    /// The RabbitMQ to measure against.
    #[arg(
        long,
        env = "EVENTROUTER_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The event-service binary (default: next to this one).
    #[arg(long)]
    service_bin: Option<PathBuf>,
    /// Messages per throughput run (at most the queue bound, so nothing is dropped).
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Throughput runs per receiver (alternating bare / service); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bytes of padding in each event's JSON body (the body is ~60 bytes plus this).
    #[arg(long, default_value_t = 64)]
    pad_bytes: usize,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 2_000)]
    latency_rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// basic.qos prefetch, for the service and the bare consumer alike.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
}

const QUEUE_MAX_LENGTH: u64 = 100_000;
const QUEUE_TTL_MS: i64 = 60_000;
/// The service's partial-batch ack delay (`ACK_IDLE` in its consumer).
const ACK_IDLE: Duration = Duration::from_millis(5);
/// A receiver that got nothing for this long is done (and reports what it got).
const IDLE_END: Duration = Duration::from_secs(5);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn body(seq: u64, pad: &str) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"t":{},"pad":"{pad}"}}"#, now_micros()).into_bytes()
}

/// What one receiver saw.
#[derive(Debug, Default, Clone)]
struct Received {
    count: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    latencies_us: Vec<u64>,
}

impl Received {
    fn note(&mut self, at: Instant) {
        self.count += 1;
        self.first.get_or_insert(at);
        self.last = Some(at);
    }

    /// Messages per second between the first and the last arrival.
    fn rate(&self) -> f64 {
        match (self.first, self.last) {
            (Some(f), Some(l)) if l > f && self.count > 1 => {
                (self.count - 1) as f64 / (l - f).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Pulls the `"t"` field (publish time, µs) out of an event body or frame without a full parse.
fn sent_micros(text: &str) -> Option<u64> {
    let start = text.find("\"t\":")? + 4;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::try_from(QUEUE_MAX_LENGTH).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(QUEUE_TTL_MS));
    args
}

async fn declare_exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the benchmark exchange")
}

/// Publishes `n` events to `exchange` as fast as the broker takes them (no confirms: the broker's
/// own flow control paces the publisher), or at `rate` per second when given.
async fn publish(
    channel: &Channel,
    exchange: &str,
    n: u64,
    rate: Option<u64>,
    pad: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let tick = Duration::from_millis(5);
    let per_tick = rate.map(|r| (r * 5 / 1000).max(1));
    let mut interval = tokio::time::interval(tick);
    let mut seq = 0;
    while seq < n {
        if let Some(per_tick) = per_tick {
            interval.tick().await;
            for _ in 0..per_tick.min(n - seq) {
                publish_one(channel, exchange, seq, pad).await?;
                seq += 1;
            }
        } else {
            publish_one(channel, exchange, seq, pad).await?;
            seq += 1;
        }
    }
    Ok(started.elapsed())
}

async fn publish_one(channel: &Channel, exchange: &str, seq: u64, pad: &str) -> anyhow::Result<()> {
    let key = if seq.is_multiple_of(2) {
        "bench.even"
    } else {
        "bench.odd"
    };
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            &body(seq, pad),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .context("publishing")?;
    Ok(())
}

/// The bare consumer: a lapin consumer with the service's queue arguments, prefetch and batched
/// `multiple` acks, doing nothing with the messages but counting them.
async fn bare_consumer(
    connection: &Connection,
    exchange: &str,
    prefetch: u16,
    latency: bool,
) -> anyhow::Result<(
    tokio::task::JoinHandle<Received>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            queue_args(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let ack_every = u64::from(prefetch / 4).max(1);
    let task = tokio::spawn(async move {
        let _ = ready_tx.send(());
        let mut got = Received::default();
        let mut pending = 0;
        let mut last_acker: Option<lapin::Acker> = None;
        loop {
            // The service's ack policy: every quarter prefetch, and after ACK_IDLE with nothing
            // ready.
            // A pending acker taken here is superseded by the next delivery's.
            let ready = match last_acker.take() {
                None => None,
                Some(acker) => match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
                    Ok(next) => Some(next),
                    Err(_) => {
                        pending = 0;
                        let _ = acker.ack(BasicAckOptions { multiple: true }).await;
                        None
                    }
                },
            };
            let next = match ready {
                Some(next) => next,
                None => match tokio::time::timeout(IDLE_END, consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some(Ok(delivery)) = next else { break };
            let at = Instant::now();
            got.note(at);
            if latency
                && let Some(sent) = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(sent_micros)
            {
                got.latencies_us.push(now_micros().saturating_sub(sent));
            }
            last_acker = Some(delivery.acker);
            pending += 1;
            if pending >= ack_every
                && let Some(acker) = last_acker.take()
            {
                pending = 0;
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            }
        }
        let _ = channel.close(200, "done".into()).await;
        got
    });
    Ok((task, ready_rx))
}

/// One event-service process on free loopback ports, stopped on drop.
struct Service {
    child: tokio::process::Child,
    http: String,
    ws: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at "state".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports in USER_HZ, which is 100 on every Linux architecture's ABI.
    Some(Duration::from_millis(ticks * 10))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_service(bin: &PathBuf, args: &Args, exchange: &str) -> anyhow::Result<Service> {
    let (port, admin) = (free_port()?, free_port()?);
    let child = tokio::process::Command::new(bin)
        .args(["--source", "amqp", "--declare-exchange", "true"])
        .args(["--amqp-url", &args.amqp_url, "--exchange", exchange])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--prefetch", &args.prefetch.to_string()])
        .args(["--queue-max-length", &QUEUE_MAX_LENGTH.to_string()])
        .args(["--send-queue-bytes", &(64 * 1024 * 1024).to_string()])
        .args(["--drain-duration", "0s", "--log", "warn"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let service = Service {
        child,
        http: format!("127.0.0.1:{port}"),
        ws: format!("ws://127.0.0.1:{port}/ws"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if readyz(&service.http).await {
            return Ok(service);
        }
        if Instant::now() > deadline {
            bail!("the event service did not become ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /readyz` over a raw socket (keeps this tool free of an HTTP client).
async fn readyz(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// A WebSocket client on the service subscribed to `bench.#`, counting event frames.
async fn ws_receiver(
    service: &Service,
    latency: bool,
) -> anyhow::Result<tokio::task::JoinHandle<Received>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(service.ws.as_str())
        .await
        .context("connecting the WebSocket client")?;
    ws.send(Message::text(
        r#"{"op":"subscribe","id":1,"events":["bench.#"]}"#,
    ))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => break,
            Some(Ok(Message::Text(t))) => bail!("unexpected answer to subscribe: {t}"),
            Some(Ok(_)) => continue,
            other => bail!("the WebSocket closed before subscribing: {other:?}"),
        }
    }
    Ok(tokio::spawn(async move {
        let mut got = Received::default();
        loop {
            match tokio::time::timeout(IDLE_END, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    got.note(Instant::now());
                    if latency && let Some(sent) = sent_micros(t.as_str()) {
                        got.latencies_us.push(now_micros().saturating_sub(sent));
                    }
                }
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
        }
        let _ = ws.close(None).await;
        got
    }))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Receiver {
    Bare,
    Service,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    if args.messages > QUEUE_MAX_LENGTH {
        bail!(
            "--messages must be at most the queue bound ({QUEUE_MAX_LENGTH}) so nothing is dropped"
        );
    }
    let pad = "x".repeat(args.pad_bytes);
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let publisher = connection.create_channel().await?;
    let exchange = format!("amqp-bench-{:08x}", rand_suffix());
    declare_exchange(&publisher, &exchange).await?;

    // The service is started once and reused: its queue and binding stay; between runs only the
    // WebSocket client is replaced.
    let service = start_service(&bin, &args, &exchange).await?;
    let publish_conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let publish_channel = publish_conn.create_channel().await?;

    println!(
        "throughput: {} events of ~{} bytes per run, prefetch {}, {} runs per receiver",
        args.messages,
        body(0, &pad).len(),
        args.prefetch,
        args.runs
    );
    let mut rates = [Vec::new(), Vec::new()];
    for run in 0..args.runs {
        for receiver in [Receiver::Bare, Receiver::Service] {
            let cpu_before = service.child.id().and_then(cpu_time);
            let own_cpu_before = cpu_time(std::process::id());
            let (got, published) = measure(
                receiver,
                &connection,
                &service,
                &publish_channel,
                &exchange,
                &args,
                &pad,
                None,
            )
            .await?;
            let rate = got.rate();
            let cpu = match (cpu_before, service.child.id().and_then(cpu_time)) {
                (Some(before), Some(after)) if receiver == Receiver::Service => format!(
                    ", service CPU {:.1} µs/event",
                    (after - before).as_secs_f64() * 1e6 / args.messages as f64
                ),
                _ => String::new(),
            };
            // This process runs the publisher (the same work in every run) and the receiver: the
            // bare consumer, or the WebSocket client of the service.
            let own_cpu = match (own_cpu_before, cpu_time(std::process::id())) {
                (Some(before), Some(after)) => format!(
                    ", bench process CPU {:.1} µs/event",
                    (after - before).as_secs_f64() * 1e6 / args.messages as f64
                ),
                _ => String::new(),
            };
            println!(
                "  run {run} {receiver:?}: received {}/{} in {:.2} s = {rate:.0} events/s (publisher took {:.2} s){cpu}{own_cpu}",
                got.count,
                args.messages,
                match (got.first, got.last) {
                    (Some(f), Some(l)) => (l - f).as_secs_f64(),
                    _ => 0.0,
                },
                published.as_secs_f64()
            );
            if got.count != args.messages {
                bail!(
                    "{receiver:?} received {} of {} events",
                    got.count,
                    args.messages
                );
            }
            rates[usize::from(receiver == Receiver::Service)].push(rate);
        }
    }
    let bare = median(rates[0].clone());
    let svc = median(rates[1].clone());
    println!(
        "median: bare consumer {bare:.0} events/s, event service {svc:.0} events/s, ratio {:.3}",
        svc / bare
    );

    let n = args.latency_rate * args.latency_duration.as_secs().max(1);
    println!(
        "latency: {} events/s for {:?} ({n} events), publish → receiver",
        args.latency_rate, args.latency_duration
    );
    for receiver in [Receiver::Bare, Receiver::Service] {
        let latency_args = Args {
            messages: n,
            ..args.clone()
        };
        let (got, _) = measure(
            receiver,
            &connection,
            &service,
            &publish_channel,
            &exchange,
            &latency_args,
            &pad,
            Some(args.latency_rate),
        )
        .await?;
        let mut l = got.latencies_us.clone();
        l.sort_unstable();
        println!(
            "  {receiver:?}: {} events, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.len(),
            percentile(&l, 50.0),
            percentile(&l, 99.0),
            percentile(&l, 100.0)
        );
    }

    drop(service);
    delete_exchange(&connection, &exchange).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    receiver: Receiver,
    connection: &Connection,
    service: &Service,
    publish_channel: &Channel,
    exchange: &str,
    args: &Args,
    pad: &str,
    rate: Option<u64>,
) -> anyhow::Result<(Received, Duration)> {
    let latency = rate.is_some();
    let task = match receiver {
        Receiver::Bare => {
            let (task, ready) = bare_consumer(connection, exchange, args.prefetch, latency).await?;
            let _ = ready.await;
            task
        }
        Receiver::Service => ws_receiver(service, latency).await?,
    };
    let published = publish(publish_channel, exchange, args.messages, rate, pad).await?;
    let got = task.await.context("the receiver task")?;
    // Let the finished receiver's queue or binding go before the next run, so the broker routes
    // each run's events to one receiver only.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((got, published))
}

fn rand_suffix() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id()
}

/// Removes the benchmark's exchange (its queues went with their consumers).
async fn delete_exchange(connection: &Connection, exchange: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
