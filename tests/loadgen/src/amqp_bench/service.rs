//! The event-service process a RabbitMQ benchmark measures: started on free loopback ports with
//! the benchmark's flags, ready when `/readyz` answers 200, killed on drop. Shared by `amqp_bench`
//! and `recovery_bench`.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventrouter_test_support::free_ports;

use super::{Args, QUEUE_MAX_LENGTH};
use crate::{http::HttpClient, procfs};

/// Starts tried before giving up: a port found free can be taken by another process before the
/// service binds it, and a service that cannot bind exits at once, so it is retried on new ports.
const START_ATTEMPTS: usize = 3;
/// How long a starting service may take to connect to the broker and answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One event-service process on free loopback ports, stopped on drop.
pub(crate) struct Service {
    child: tokio::process::Child,
    /// The WebSocket URL clients subscribe on.
    pub(crate) ws: String,
    /// The main port (WebSocket upgrades).
    pub(crate) addr: SocketAddr,
    /// The admin port (`/metrics`).
    pub(crate) admin: SocketAddr,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Service {
    /// `amqp_bench`'s service: its prefetch, queue bound and a large send queue.
    pub(super) async fn start(bin: &Path, args: &Args, exchange: &str) -> anyhow::Result<Self> {
        let extra = [
            "--prefetch".to_owned(),
            args.prefetch.to_string(),
            "--queue-max-length".to_owned(),
            QUEUE_MAX_LENGTH.to_string(),
            "--send-queue-bytes".to_owned(),
            (64 * 1024 * 1024).to_string(),
        ];
        Self::spawn(bin, &args.amqp_url, exchange, &extra).await
    }

    /// Starts `bin --source amqp --declare-exchange true` on `exchange` with `extra` flags and
    /// waits until it is ready.
    pub(crate) async fn spawn(
        bin: &Path,
        amqp_url: &str,
        exchange: &str,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        for attempt in 1..=START_ATTEMPTS {
            let [port, admin] = free_ports::<2>().context("finding free ports")?;
            let child = tokio::process::Command::new(bin)
                .args(["--source", "amqp", "--declare-exchange", "true"])
                .args(["--amqp-url", amqp_url, "--exchange", exchange])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--drain-duration", "0s", "--log", "warn"])
                .args(extra)
                .stdin(Stdio::null())
                // Its log goes to stderr, so stdout stays the benchmark's report.
                .stdout(stderr()?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let mut service = Self {
                child,
                ws: format!("ws://127.0.0.1:{port}/ws"),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            };
            let http = service.addr;
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                if readyz(http).await {
                    return Ok(service);
                }
                if let Some(status) = service.child.try_wait()? {
                    eprintln!("the event service exited ({status}) on attempt {attempt}");
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the event service did not become ready within {READY_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        bail!("the event service did not start in {START_ATTEMPTS} attempts")
    }

    /// The service's process id (while it runs).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// CPU time (user + system) the service has used so far.
    pub(crate) fn cpu_time(&self) -> Option<Duration> {
        let pid = self.child.id()?;
        procfs::cpu_seconds(pid).ok().map(Duration::from_secs_f64)
    }
}

/// A handle on this process's stderr for a child's output.
fn stderr() -> anyhow::Result<Stdio> {
    use std::os::fd::AsFd as _;
    let fd = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stderr")?;
    Ok(Stdio::from(fd))
}

/// CPU time (user + system) this benchmark process has used so far.
pub(crate) fn own_cpu_time() -> Option<Duration> {
    procfs::cpu_seconds(std::process::id())
        .ok()
        .map(Duration::from_secs_f64)
}

/// Whether `GET /readyz` answers 200.
async fn readyz(addr: SocketAddr) -> bool {
    match HttpClient::connect(addr).await {
        Ok(mut client) => matches!(client.get("/readyz").await, Ok((200, _))),
        Err(_) => false,
    }
}
