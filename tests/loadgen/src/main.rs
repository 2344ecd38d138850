//! `loadgen`: parses the command line, builds a small runtime, runs one scenario, prints its report.

use anyhow::Context;
use clap::Parser;
use eventrouter_loadgen::{
    cli::{Cli, Scenario},
    fanout, idle, report, sys,
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let nofile = sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    match &cli.scenario {
        Scenario::Idle(args) => {
            if (nofile as usize) < args.connections + 64 {
                eprintln!(
                    "warning: open-file limit {nofile} is below {} connections; raise `ulimit -Hn`",
                    args.connections
                );
            }
            let result = runtime.block_on(idle::run(args))?;
            eprint!("{}", report::idle(&result));
            if cli.json {
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        Scenario::Fanout(args) => {
            let result = runtime.block_on(fanout::run(args))?;
            eprint!("{}", report::fanout(&result));
            if cli.json {
                println!("{}", serde_json::to_string(&result)?);
            }
        }
    }
    // Aborted connection tasks are dropped with the runtime; don't wait for their sockets.
    runtime.shutdown_background();
    Ok(())
}
