//! `recovery_bench`: many clients of the event service recovering missed events from the
//! router's RabbitMQ stream at once (see [`eventrouter_loadgen::recovery_bench`] and
//! `tests/loadgen/recovery-bench.sh`).

use anyhow::Context;
use clap::Parser;
use eventrouter_loadgen::{recovery_bench, sys};

fn main() -> anyhow::Result<()> {
    let args = recovery_bench::Args::parse();
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let report = runtime.block_on(recovery_bench::run(&args))?;
    eprint!("{report}");
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    runtime.shutdown_background();
    Ok(())
}
