//! The `event-service` binary: parse the configuration, set up logging, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use event_service::{config::Config, server};
use eventrouter_runtime::{limits::raise_open_files_limit, logging, signal::shutdown_signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    logging::init(&config.log, config.log_format).context("setting up logging (--log)")?;
    // Every connection is a file descriptor: raise the soft limit to the hard limit.
    match raise_open_files_limit() {
        Ok(limit) => tracing::debug!(open_files = limit, "open-files limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-files limit"),
    }

    let listener = server::bind_main(config.listen, config.listen_backlog)
        .await
        .context("could not open the main port")?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("could not listen on {}", config.admin_listen))?;
    server::serve(config, listener, admin, shutdown_signal()).await?;
    Ok(())
}
