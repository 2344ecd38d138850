//! Watch events arrive: connects to an event service, subscribes to the given patterns, and
//! prints every event as one line (`time  event  data`).
//!
//! ```text
//! cargo run -p event-service --example watch -- 'demo.*' 'order.#'
//! cargo run -p event-service --example watch -- --url ws://127.0.0.1:8080/ws 'order.created'
//! ```
//!
//! Acks, errors and the close reason go to stderr, so stdout holds only events.

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Subscribe to event patterns on an event service and print each event as one line.
#[derive(Debug, Parser)]
struct Args {
    /// WebSocket URL of the event service.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,

    /// Patterns to subscribe to: `.`-separated words, `*` matches one word, `#` zero or more.
    #[arg(required = true)]
    patterns: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut ws, _) = tokio_tungstenite::connect_async(args.url.as_str())
        .await
        .with_context(|| format!("connecting to {} (is the event service running?)", args.url))?;
    let subscribe = json!({"op": "subscribe", "id": 1, "events": args.patterns});
    ws.send(Message::text(subscribe.to_string()))
        .await
        .context("sending the subscription")?;

    // Reading continuously is also what answers the server's pings.
    while let Some(message) = ws.next().await {
        match message.context("reading from the event service")? {
            Message::Text(text) => print_frame(&text)?,
            Message::Close(frame) => {
                match frame {
                    Some(f) => {
                        eprintln!("closed by the server: {} {}", u16::from(f.code), f.reason)
                    }
                    None => eprintln!("closed by the server"),
                }
                return Ok(());
            }
            _ => {}
        }
    }
    eprintln!("connection ended");
    Ok(())
}

/// Prints an event to stdout as one line; reports acks and errors on stderr.
fn print_frame(text: &str) -> anyhow::Result<()> {
    let frame: Value = serde_json::from_str(text).context("the server sent invalid JSON")?;
    let field = |name: &str| frame.get(name).and_then(Value::as_str).unwrap_or_default();
    match field("op") {
        "event" => {
            let data = frame.get("data").map(Value::to_string).unwrap_or_default();
            println!("{}  {}  {}", field("time"), field("event"), data);
        }
        "subscribed" => eprintln!("subscribed to {}", frame["events"]),
        "error" => bail!(
            "the server refused: {} ({})",
            field("message"),
            field("code")
        ),
        _ => {}
    }
    Ok(())
}
