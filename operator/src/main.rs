//! The `operator` binary: `operator crd` prints the CRD, `operator run` runs the operator.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use eventrouter_contract::operator_env;
use eventrouter_runtime::{logging, logging::LogFormat, signal::shutdown_signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The EventRouter operator.
#[derive(Debug, Parser)]
#[command(name = "operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the EventRouter CustomResourceDefinition as YAML (what `crds/` holds).
    Crd,
    /// Run the operator against the cluster of `KUBECONFIG` (or the in-cluster service account).
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch EventRouters in this namespace only (default: all namespaces).
    #[arg(long, env = operator_env::NAMESPACE)]
    namespace: Option<String>,

    /// Address of the admin port: `/healthz`, `/readyz`, `/metrics`.
    #[arg(
        long,
        env = operator_env::ADMIN_LISTEN,
        default_value = "0.0.0.0:8080"
    )]
    admin_listen: SocketAddr,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = operator_env::LEASE_NAME,
        default_value = "eventrouter-operator"
    )]
    lease_name: String,

    /// Namespace of the leader-election Lease (usually the operator's own namespace).
    #[arg(
        long,
        env = operator_env::LEASE_NAMESPACE,
        default_value = "default"
    )]
    lease_namespace: String,

    /// How long the Lease stays valid without renewal; a crashed leader is replaced after this.
    #[arg(long, env = operator_env::LEASE_DURATION, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,

    /// This replica's identity in the Lease and in Events (default: the pod name, else host + pid).
    #[arg(long, env = operator_env::POD_NAME)]
    identity: Option<String>,

    /// Re-reconcile every router this often, to repair drift on the broker side.
    #[arg(long, env = operator_env::RESYNC_INTERVAL, default_value = "5m", value_parser = humantime::parse_duration)]
    resync_interval: Duration,

    /// First retry delay after a failed reconcile; it doubles per consecutive failure.
    #[arg(long, env = operator_env::BACKOFF_BASE, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_base: Duration,

    /// Longest retry delay after failed reconciles.
    #[arg(long, env = operator_env::BACKOFF_MAX, default_value = "5m", value_parser = humantime::parse_duration)]
    backoff_max: Duration,

    /// A deleted router whose broker topology still cannot be removed after this long is released
    /// anyway (with a Warning event), so deletion never hangs forever.
    #[arg(long, env = operator_env::CLEANUP_TIMEOUT, default_value = "10m", value_parser = humantime::parse_duration)]
    cleanup_timeout: Duration,

    /// Routers reconciled at the same time.
    #[arg(long, env = operator_env::CONCURRENCY, default_value_t = 8)]
    concurrency: u16,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(
        long,
        env = operator_env::LOG,
        default_value = "info,kube=warn"
    )]
    log: String,

    /// Log format.
    #[arg(
        long,
        env = operator_env::LOG_FORMAT,
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// Host name and process id: unique per replica even when two share a host (no `POD_NAME`).
fn default_identity() -> String {
    let host = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_owned();
    format!(
        "{}-{}",
        if host.is_empty() { "operator" } else { &host },
        std::process::id()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Crd => {
            print!(
                "{}",
                operator::crd::crd_yaml().context("serializing the CRD")?
            );
            return Ok(());
        }
        Command::Run(args) => *args,
    };
    logging::init(&args.log, args.log_format).context("setting up logging (--log)")?;

    let client = kube::Client::try_default()
        .await
        .context("loading kubeconfig (KUBECONFIG or in-cluster)")?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let settings = operator::ControllerSettings {
        namespace: args.namespace.clone(),
        resync: args.resync_interval,
        backoff_base: args.backoff_base,
        backoff_max: args.backoff_max,
        cleanup_timeout: args.cleanup_timeout,
        concurrency: args.concurrency,
        identity: identity.clone(),
    };
    let lease = operator::LeaseSettings::new(
        &args.lease_name,
        &args.lease_namespace,
        &identity,
        args.lease_duration,
    );
    let metrics = operator::Metrics::new();
    let readiness = operator::Readiness::default();
    let shutdown = CancellationToken::new();

    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", args.admin_listen))?;
    info!(admin = %listener.local_addr()?, namespace = ?args.namespace, identity = %identity, "operator starting");
    let admin = tokio::spawn(operator::admin::serve(
        listener,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));

    let signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });

    operator::run(
        client,
        settings,
        lease,
        metrics,
        readiness,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let _ = admin.await;
    Ok(())
}
