//! `amqp_bench`: the event service on RabbitMQ against a bare consumer (see
//! [`eventrouter_loadgen::amqp_bench`] and `tests/loadgen/amqp-bench.sh`).

use clap::Parser;
use eventrouter_loadgen::amqp_bench::{Args, ProcessKind, run, run_minimal};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The minimal receiver process runs on its only thread, without an async runtime.
    if args.receive == Some(ProcessKind::Minimal) {
        return run_minimal(&args);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}
