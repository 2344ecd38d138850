//! Receivers in a process of their own, so that their CPU time can be read from
//! `/proc/<pid>/stat` apart from the publisher's: the bench binary runs itself again with the
//! hidden `--receive <kind>` flag.
//!
//! The child sets up its queue and consumer, prints `ready`, counts until nothing arrived for
//! [`IDLE_END`](super::IDLE_END), prints `result <json>` and then waits for its stdin to close
//! before it tears anything down, so the parent reads the child's CPU time between `ready` and
//! `result`: consuming only, without start-up or shutdown.

use std::{
    io::{BufRead as _, Write as _},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::ValueEnum;
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

use super::{Args, Received, minimal::MinimalConsumer, receivers::bare_consumer};

/// What runs in a receiver process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProcessKind {
    /// The bare lapin consumer (the same code as the in-process one).
    Lapin,
    /// The minimal consumer on a blocking socket (`minimal`).
    Minimal,
}

/// How long a receiver process may take to connect and start consuming.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the publisher finished a receiver process may take to report.
const RESULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a receiver process reports.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    count: u64,
    /// Seconds between the first and the last message.
    span_s: f64,
    latencies_us: Vec<u64>,
}

impl Report {
    fn of(got: &Received) -> Self {
        Self {
            count: got.count,
            span_s: match (got.first, got.last) {
                (Some(f), Some(l)) => (l - f).as_secs_f64(),
                _ => 0.0,
            },
            latencies_us: got.latencies_us.clone(),
        }
    }

    fn into_received(self) -> Received {
        let last = Instant::now();
        let first = if self.count > 0 {
            last.checked_sub(Duration::from_secs_f64(self.span_s.max(0.0)))
        } else {
            None
        };
        Received {
            count: self.count,
            first,
            last: first.map(|_| last),
            latencies_us: self.latencies_us,
        }
    }
}

/// Prints one line for the parent and flushes it.
fn tell(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn report(got: &Received) -> anyhow::Result<()> {
    tell(&format!(
        "result {}",
        serde_json::to_string(&Report::of(got))?
    ))?;
    // Nothing is torn down before the parent has read this process's CPU time and closed stdin.
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(())
}

fn exchange(args: &Args) -> anyhow::Result<&str> {
    args.exchange
        .as_deref()
        .context("--receive needs --exchange")
}

/// The child side of the minimal consumer (no async runtime at all).
pub fn run_minimal(args: &Args) -> anyhow::Result<()> {
    let consumer =
        MinimalConsumer::connect(&args.amqp_url, exchange(args)?, args.prefetch, args.latency)?;
    tell("ready")?;
    let got = consumer.run()?;
    report(&got)
}

/// The child side of the bare lapin consumer, on the same multi-threaded tokio runtime as the
/// event service.
pub(super) async fn run_lapin(args: &Args) -> anyhow::Result<()> {
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let (task, ready) =
        bare_consumer(&connection, exchange(args)?, args.prefetch, args.latency).await?;
    let _ = ready.await;
    tell("ready")?;
    let got = task.await.context("the consumer task")?;
    report(&got)?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A receiver process started by the parent.
pub(super) struct ReceiverProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ReceiverProcess {
    /// Starts `bin --receive kind` on `exchange` and waits until it consumes.
    pub(super) async fn start(
        bin: &Path,
        kind: ProcessKind,
        args: &Args,
        exchange: &str,
        latency: bool,
    ) -> anyhow::Result<Self> {
        let kind_name = kind
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .context("an unnamed receiver kind")?;
        let mut command = tokio::process::Command::new(bin);
        command
            .args(["--receive", &kind_name, "--exchange", exchange])
            .args(["--amqp-url", &args.amqp_url])
            .args(["--prefetch", &args.prefetch.to_string()]);
        if latency {
            command.arg("--latency");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("the receiver process has no stdout")?;
        let mut process = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        let line = process.line(READY_TIMEOUT, "ready").await?;
        if line != "ready" {
            bail!("the {kind:?} receiver process said {line:?} instead of ready");
        }
        Ok(process)
    }

    async fn line(&mut self, timeout: Duration, what: &str) -> anyhow::Result<String> {
        match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the receiver process exited before {what}"),
            Ok(Err(e)) => Err(e).context("reading the receiver process's output"),
            Err(_) => bail!("no {what} from the receiver process within {timeout:?}"),
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the receiver's report (it comes [`IDLE_END`](super::IDLE_END) after its last
    /// message).
    pub(super) async fn result(&mut self) -> anyhow::Result<Received> {
        let line = self.line(RESULT_TIMEOUT, "a result").await?;
        let json = line
            .strip_prefix("result ")
            .with_context(|| format!("the receiver process said {line:?} instead of a result"))?;
        let report: Report =
            serde_json::from_str(json).context("parsing the receiver process's result")?;
        Ok(report.into_received())
    }

    /// Lets the process close its connection and exit.
    pub(super) async fn finish(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the receiver process exited with {status}");
                }
            }
            Err(_) => {
                let _ = self.child.start_kill();
            }
        }
        Ok(())
    }
}
