//! The `amqp_bench` benchmark: how fast one event-service instance consumes from RabbitMQ and
//! delivers to a WebSocket client, against what the same broker delivers to a bare lapin consumer, plus
//! publish → client latency at a moderate rate.
//!
//! All receivers get the identical workload: the same publisher, the same queue arguments
//! (exclusive, auto-delete, `x-max-length`, drop-head, TTL), the same prefetch and the same
//! batched acknowledgements. The bare consumer's rate is therefore what the broker can hand to
//! any client on this machine; the ratio says whether the service is ever the bottleneck.
//!
//! `--receivers` picks the receivers, run in turn in every round:
//! - `bare`: the bare lapin consumer inside this process, next to the publisher;
//! - `lapin-process`: the same consumer in a process of its own, so its CPU per event is known;
//! - `minimal-process`: a minimal AMQP consumer on a blocking socket, framing with the
//!   `amq-protocol` codec lapin uses and nothing else, in a process of its own: the CPU floor
//!   under any client built on that codec;
//! - `service`: the event service, with a WebSocket client of it in this process.
//!
//! `tests/loadgen/amqp-bench.sh` builds it, starts a dedicated RabbitMQ node and runs it with the
//! broker sharing the CPUs and with the broker pinned to a CPU of its own. By hand:
//!
//! ```text
//! cargo build --release -p event-service -p eventrouter-loadgen --bin event-service --bin amqp_bench
//! target/release/amqp_bench --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --receivers lapin-process,minimal-process,service
//! ```
//! The service binary is looked up next to this one unless `--service-bin` says otherwise.
//!
//! # Layout
//! - this module: the flags, the runs and the report;
//! - [`receivers`]: the publisher and the lapin receivers (bare lapin consumer, WebSocket client);
//! - [`minimal`]: the minimal consumer;
//! - [`process`]: receivers in a process of their own;
//! - [`service`]: the event-service process under test.

mod minimal;
mod process;
mod receivers;
pub(crate) mod service;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use eventrouter_test_support::{rabbitmq::declare_topic_exchange, unique_name};
use lapin::{Channel, Connection, ConnectionProperties, options::ExchangeDeleteOptions};

pub use process::{ProcessKind, run_minimal};
use process::{ReceiverProcess, run_lapin};
use receivers::{bare_consumer, publish, ws_receiver};
use service::{Service, own_cpu_time};

use crate::procfs;

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
    /// Throughput runs per receiver (the receivers take turns); the median is reported.
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
    /// The receivers, run in turn in every round (comma-separated): `bare` (lapin, in this
    /// process), `lapin-process` and `minimal-process` (each in a process of its own, CPU per
    /// event reported), `service`.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bare,service"
    )]
    receivers: Vec<Receiver>,
    /// Before the measured rounds, one extra `lapin-process` run under `perf record -g`, written
    /// to this file (not counted in the results).
    #[arg(long)]
    perf_record: Option<PathBuf>,
    /// Internal: be a receiver process of this kind (see `process`).
    #[arg(long, hide = true)]
    pub receive: Option<ProcessKind>,
    /// Internal: the receiver process's exchange.
    #[arg(long, hide = true)]
    exchange: Option<String>,
    /// Internal: the receiver process records latencies.
    #[arg(long, hide = true)]
    latency: bool,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Receiver {
    /// The bare lapin consumer in this process.
    Bare,
    /// The bare lapin consumer in a process of its own.
    LapinProcess,
    /// The minimal consumer in a process of its own.
    MinimalProcess,
    /// The event service and a WebSocket client of it.
    Service,
}

impl Receiver {
    fn process_kind(self) -> Option<ProcessKind> {
        match self {
            Receiver::LapinProcess => Some(ProcessKind::Lapin),
            Receiver::MinimalProcess => Some(ProcessKind::Minimal),
            Receiver::Bare | Receiver::Service => None,
        }
    }
}

/// The figures of one throughput run.
#[derive(Debug, Default, Clone)]
struct RunFigures {
    rate: f64,
    /// CPU µs per event of the receiver's own process (the service, or a receiver process).
    cpu_us: Option<f64>,
    /// Context switches (voluntary + involuntary, all threads) per event of that process.
    switches: Option<f64>,
}

/// What a run cost the receiver's own process.
#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    cpu_us: Option<f64>,
    switches: Option<f64>,
}

/// CPU time and context switches (voluntary + involuntary, summed over its threads) of a process.
fn usage(pid: Option<u32>) -> (Option<Duration>, Option<u64>) {
    let Some(pid) = pid else {
        return (None, None);
    };
    let cpu = procfs::cpu_seconds(pid).ok().map(Duration::from_secs_f64);
    let switches = i32::try_from(pid)
        .ok()
        .and_then(|pid| ::procfs::process::Process::new(pid).ok())
        .and_then(|process| process.tasks().ok())
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|task| task.status().ok())
                .map(|status| {
                    status.voluntary_ctxt_switches.unwrap_or(0)
                        + status.nonvoluntary_ctxt_switches.unwrap_or(0)
                })
                .sum()
        });
    (cpu, switches)
}

/// `min / median / max` of `v`, formatted with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(min), Some(max)) => format!(
            "{min:.digits$} / {:.digits$} / {max:.digits$}",
            median(v.clone())
        ),
        _ => "-".to_owned(),
    }
}

/// Runs the whole benchmark and prints its report on stdout.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.receive {
        Some(ProcessKind::Lapin) => return run_lapin(&args).await,
        Some(ProcessKind::Minimal) => return run_minimal(&args),
        None => {}
    }
    if args.receivers.is_empty() {
        bail!("--receivers names no receiver");
    }
    let own_bin = std::env::current_exe()?;
    let service_bin = match &args.service_bin {
        Some(bin) => bin.clone(),
        None => own_bin
            .parent()
            .context("the benchmark binary has no directory")?
            .join("event-service"),
    };
    let with_service = args.receivers.contains(&Receiver::Service);
    if with_service && !service_bin.is_file() {
        bail!(
            "no event-service binary at {} (build it, or pass --service-bin)",
            service_bin.display()
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
    let service = if with_service {
        Some(Service::start(&service_bin, &args, &exchange).await?)
    } else {
        None
    };
    let publish_conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let publish_channel = publish_conn.create_channel().await?;
    let bench = Bench {
        connection: &connection,
        service: service.as_ref(),
        own_bin: &own_bin,
        publish_channel: &publish_channel,
        exchange: &exchange,
        pad: &pad,
    };

    println!(
        "throughput: {} events of ~{} bytes per run, prefetch {}, {} runs per receiver",
        args.messages,
        body(0, &pad).len(),
        args.prefetch,
        args.runs
    );
    if let Some(perf_out) = &args.perf_record {
        let (got, _, cost) = bench
            .measure(Receiver::LapinProcess, &args, None, Some(perf_out))
            .await?;
        println!(
            "  extra LapinProcess run under perf record ({}): received {}, {:.0} events/s{} (not counted)",
            perf_out.display(),
            got.count,
            got.rate(),
            cost.cpu_us
                .map(|c| format!(", receiver process CPU {c:.1} µs/event"))
                .unwrap_or_default()
        );
    }
    let mut figures: Vec<Vec<RunFigures>> = vec![Vec::new(); args.receivers.len()];
    for run in 0..args.runs {
        for (i, &receiver) in args.receivers.iter().enumerate() {
            let own_cpu_before = own_cpu_time();
            let (got, published, cost) = bench.measure(receiver, &args, None, None).await?;
            let rate = got.rate();
            let cpu = match (receiver, cost.cpu_us) {
                (Receiver::Service, Some(c)) => format!(", service CPU {c:.1} µs/event"),
                (_, Some(c)) => format!(", receiver process CPU {c:.1} µs/event"),
                (_, None) => String::new(),
            };
            let cpu = match cost.switches {
                Some(s) => format!("{cpu} and {s:.3} context switches/event"),
                None => cpu,
            };
            // This process runs the publisher (the same work in every run) and, for `bare` and
            // `service`, the receiver: the bare consumer, or the WebSocket client of the service.
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
            figures[i].push(RunFigures {
                rate,
                cpu_us: cost.cpu_us,
                switches: cost.switches,
            });
        }
    }
    summarize(&args.receivers, &figures);

    let n = args.latency_rate * args.latency_duration.as_secs().max(1);
    println!(
        "latency: {} events/s for {:?} ({n} events), publish → receiver",
        args.latency_rate, args.latency_duration
    );
    let latency_args = Args {
        messages: n,
        ..args.clone()
    };
    for &receiver in &args.receivers {
        let (got, _, _) = bench
            .measure(receiver, &latency_args, Some(args.latency_rate), None)
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

/// Prints, per receiver, min / median / max of the rate and of its process's CPU per event, and
/// the ratio of its median rate to the bare lapin consumer's (the one in a process of its own
/// when it ran, else the one in this process).
fn summarize(receivers: &[Receiver], figures: &[Vec<RunFigures>]) {
    let median_rate = |r: Receiver| {
        receivers
            .iter()
            .position(|&x| x == r)
            .map(|i| median(figures[i].iter().map(|f| f.rate).collect()))
    };
    let reference = median_rate(Receiver::LapinProcess)
        .map(|m| ("LapinProcess", m))
        .or_else(|| median_rate(Receiver::Bare).map(|m| ("Bare", m)));
    println!("summary (min / median / max over the runs):");
    for (&receiver, runs) in receivers.iter().zip(figures) {
        let rates: Vec<f64> = runs.iter().map(|f| f.rate).collect();
        let cpus: Vec<f64> = runs.iter().filter_map(|f| f.cpu_us).collect();
        let switches: Vec<f64> = runs.iter().filter_map(|f| f.switches).collect();
        let ratio = match reference {
            Some((name, m)) if m > 0.0 => {
                format!(", median rate / {name}'s {:.3}", median(rates.clone()) / m)
            }
            _ => String::new(),
        };
        let cpu = if cpus.is_empty() {
            String::new()
        } else {
            format!(", CPU µs/event {}", spread(&cpus, 1))
        };
        let cpu = if switches.is_empty() {
            cpu
        } else {
            format!("{cpu}, context switches/event {}", spread(&switches, 3))
        };
        println!("  {receiver:?}: events/s {}{cpu}{ratio}", spread(&rates, 0));
    }
}

/// What every run shares.
struct Bench<'a> {
    connection: &'a Connection,
    service: Option<&'a Service>,
    own_bin: &'a Path,
    publish_channel: &'a Channel,
    exchange: &'a str,
    pad: &'a str,
}

impl Bench<'_> {
    /// One run of `receiver`: what it received, how long the publisher took, and the CPU µs per
    /// published event of the receiver's own process (the service, or a receiver process).
    async fn measure(
        &self,
        receiver: Receiver,
        args: &Args,
        rate: Option<u64>,
        perf_out: Option<&Path>,
    ) -> anyhow::Result<(Received, Duration, Cost)> {
        let latency = rate.is_some();
        let n = args.messages as f64;
        let per_event =
            |(cpu0, sw0): (Option<Duration>, Option<u64>),
             (cpu1, sw1): (Option<Duration>, Option<u64>)| Cost {
                cpu_us: cpu0
                    .zip(cpu1)
                    .map(|(b, a)| (a.saturating_sub(b)).as_secs_f64() * 1e6 / n),
                switches: sw0.zip(sw1).map(|(b, a)| a.saturating_sub(b) as f64 / n),
            };
        let publish_all = || {
            publish(
                self.publish_channel,
                self.exchange,
                args.messages,
                rate,
                self.pad,
            )
        };
        let (got, published, cpu) = if let Some(kind) = receiver.process_kind() {
            let mut process =
                ReceiverProcess::start(self.own_bin, kind, args, self.exchange, latency).await?;
            let perf = match (perf_out, process.pid()) {
                (Some(out), Some(pid)) => {
                    let perf = PerfRecord::start(out, pid)?;
                    // perf takes a moment to attach.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Some(perf)
                }
                _ => None,
            };
            let before = usage(process.pid());
            let published = publish_all().await?;
            let got = process.result().await?;
            let cpu = per_event(before, usage(process.pid()));
            if let Some(perf) = perf {
                perf.stop().await?;
            }
            process.finish().await?;
            (got, published, cpu)
        } else {
            let service = self.service;
            let service_pid = service.and_then(Service::pid);
            let before = usage(service_pid);
            let task = match (receiver, service) {
                (Receiver::Service, Some(service)) => ws_receiver(service, latency).await?,
                (Receiver::Service, None) => bail!("the service was not started"),
                _ => {
                    let (task, ready) =
                        bare_consumer(self.connection, self.exchange, args.prefetch, latency)
                            .await?;
                    let _ = ready.await;
                    task
                }
            };
            let published = publish_all().await?;
            let got = task.await.context("the receiver task")?;
            let cpu = match receiver {
                Receiver::Service => per_event(before, usage(service_pid)),
                _ => Cost::default(),
            };
            (got, published, cpu)
        };
        // Let the finished receiver's queue or binding go before the next run, so the broker
        // routes each run's events to one receiver only.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok((got, published, cpu))
    }
}

/// `perf record -g` attached to a receiver process.
struct PerfRecord {
    child: tokio::process::Child,
}

impl PerfRecord {
    fn start(out: &Path, pid: u32) -> anyhow::Result<Self> {
        let child = tokio::process::Command::new("perf")
            .args(["record", "-g", "-o"])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting perf record")?;
        Ok(Self { child })
    }

    /// Stops the recording (SIGINT, as perf expects) and waits for perf to write its file.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            tokio::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await
                .context("signalling perf record")?;
        }
        self.child.wait().await.context("waiting for perf record")?;
        Ok(())
    }
}

/// Removes the benchmark's exchange (its queues went with their consumers).
async fn delete_exchange(connection: &Connection, exchange: &str) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
