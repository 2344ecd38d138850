//! The `amqp_bench` benchmark: how fast one event-service instance consumes from RabbitMQ and
//! delivers to a WebSocket client, against what the same broker delivers to a bare lapin consumer, plus
//! publish → client latency at a moderate rate.
//!
//! Both receivers get the identical workload: the same publisher, the same queue arguments
//! (exclusive, auto-delete, `x-max-length`, drop-head, TTL), the same prefetch and the same
//! batched acknowledgements. The bare consumer's rate is therefore what the broker can hand to
//! any client on this machine; the ratio says whether the service is ever the bottleneck.
//!
//! `tests/loadgen/amqp-bench.sh` builds it, starts a dedicated RabbitMQ node and runs it with the
//! broker sharing the CPUs and with the broker pinned to a CPU of its own. By hand:
//!
//! ```text
//! cargo build --release -p event-service -p eventrouter-loadgen --bin event-service --bin amqp_bench
//! target/release/amqp_bench --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f
//! ```
//! The service binary is looked up next to this one unless `--service-bin` says otherwise.
//!
//! # Layout
//! - this module: the flags, the runs and the report;
//! - [`receivers`]: the publisher and the two receivers (bare lapin consumer, WebSocket client);
//! - [`service`]: the event-service process under test.

mod receivers;
pub(crate) mod service;

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::Parser;
use eventrouter_test_support::{rabbitmq::declare_topic_exchange, unique_name};
use lapin::{Channel, Connection, ConnectionProperties, options::ExchangeDeleteOptions};

use receivers::{bare_consumer, publish, ws_receiver};
use service::{Service, own_cpu_time};

#[derive(Clone, Debug, Parser)]
#[command(
    about = "Event service on RabbitMQ: consume-and-deliver rate vs a bare consumer, and latency"
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

/// Runs the whole benchmark and prints its report on stdout.
pub async fn run(args: Args) -> anyhow::Result<()> {
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
    let exchange = unique_name("amqp-bench");
    declare_topic_exchange(&publisher, &exchange).await?;

    // The service is started once and reused: its queue and binding stay; between runs only the
    // WebSocket client is replaced.
    let service = Service::start(&bin, &args, &exchange).await?;
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
            let cpu_before = service.cpu_time();
            let own_cpu_before = own_cpu_time();
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
            let cpu = match (cpu_before, service.cpu_time()) {
                (Some(before), Some(after)) if receiver == Receiver::Service => format!(
                    ", service CPU {:.1} µs/event",
                    (after - before).as_secs_f64() * 1e6 / args.messages as f64
                ),
                _ => String::new(),
            };
            // This process runs the publisher (the same work in every run) and the receiver: the
            // bare consumer, or the WebSocket client of the service.
            let own_cpu = match (own_cpu_before, own_cpu_time()) {
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

/// Removes the benchmark's exchange (its queues went with their consumers).
async fn delete_exchange(connection: &Connection, exchange: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
