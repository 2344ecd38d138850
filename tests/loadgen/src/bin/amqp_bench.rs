//! `amqp_bench`: the event service on RabbitMQ against a bare consumer (see
//! [`eventrouter_loadgen::amqp_bench`] and `tests/loadgen/amqp-bench.sh`).

use clap::Parser;
use eventrouter_loadgen::amqp_bench::{Args, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run(Args::parse()).await
}
