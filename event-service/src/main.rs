use clap::Parser;
use event_service::config::Config;

fn main() -> anyhow::Result<()> {
    let _config = Config::parse();
    anyhow::bail!("the event service is not assembled yet")
}
