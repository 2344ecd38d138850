//! Command-line interface: global options, the options every scenario shares, and one
//! subcommand per scenario. Every knob is a flag with a default; its doc comment is its help.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

/// Load generator for the event service: idle-connection memory and fan-out throughput.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
pub struct Cli {
    /// Worker threads of the load generator's runtime (the machine is shared with the service).
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,

    /// Print the final report as one JSON object on stdout (the human summary goes to stderr).
    #[arg(long, global = true, default_value_t = false)]
    pub json: bool,

    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open N WebSocket connections, subscribe each to one pattern, hold them open reading, and
    /// report the service's RSS per connection and the kernel socket queues.
    Idle(IdleArgs),
    /// S subscribers of one event, publishers posting batches to `/publish`; report
    /// deliveries/s, per-subscriber counts, latency samples, and the service's own counters.
    Fanout(FanoutArgs),
}

/// The server under test and so the protocol spoken to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// The event service: `{"op":"subscribe"}` on `/ws`, events posted to `/publish`.
    #[default]
    Eventrouter,
    /// `tests/loadgen/peers/bun-pubsub.js`: Bun's WebSocket server speaking the event service's
    /// protocol (same frames, same `/ws` and `/publish`).
    Bun,
    /// Centrifugo's JSON client protocol on `/connection/websocket` (`connect`, `subscribe`,
    /// publications as `push` replies, `{}` pings answered with `{}`), events posted to its HTTP
    /// server API (`/api/publish`, `/api/batch` for batches) with `--publish-key` as `X-API-Key`.
    Centrifugo,
}

impl Peer {
    /// The WebSocket endpoint's default path.
    pub fn default_ws_path(self) -> &'static str {
        match self {
            Peer::Eventrouter | Peer::Bun => eventrouter_contract::http::WS_PATH,
            Peer::Centrifugo => crate::centrifugo::WS_PATH,
        }
    }

    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Eventrouter => "eventrouter",
            Peer::Bun => "bun",
            Peer::Centrifugo => "centrifugo",
        }
    }
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The service's main port (WebSocket upgrades and `/publish`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// The server under test: the event service, the Bun peer (same protocol) or Centrifugo.
    #[arg(long, value_enum, default_value_t = Peer::Eventrouter)]
    pub peer: Peer,

    /// Path of the WebSocket endpoint [default: /ws; /connection/websocket with --peer centrifugo].
    #[arg(long)]
    pub ws_path: Option<String>,

    /// The service's admin port; when given, `/metrics` is scraped before and after to cross-check.
    #[arg(long)]
    pub admin: Option<SocketAddr>,

    /// PID of the service; when given, its RSS and CPU time are read from `/proc` before and after.
    #[arg(long)]
    pub service_pid: Option<u32>,

    /// Spread client connections over this many loopback source addresses (127.0.0.1, .2, ...),
    /// each with its own ephemeral-port range. 1 lets the kernel choose.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,

    /// Connections being opened at once (keeps the service's accept backlog from overflowing).
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,

    /// With authentication on: a file holding the service's HMAC secret. Every connection then
    /// sends `{"op":"auth"}` with an HS256 token minted from it (subject `loadgen`, granting `#`,
    /// valid for a day) before subscribing, as a browser client does.
    #[arg(long)]
    pub auth_secret_file: Option<std::path::PathBuf>,

    /// With publish keys on: the key sent as `Authorization: Bearer` on every `POST /publish`
    /// (with `--peer centrifugo`: Centrifugo's HTTP API key, sent as `X-API-Key`).
    #[arg(long)]
    pub publish_key: Option<String>,

    /// Time allowed for one connection's connect, upgrade and subscription ack.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
}

impl Common {
    /// The WebSocket endpoint's path: `--ws-path`, or the peer's default.
    pub fn ws_path(&self) -> String {
        self.ws_path
            .clone()
            .unwrap_or_else(|| self.peer.default_ws_path().to_owned())
    }
}

/// The `idle` scenario.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,

    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,

    /// The pattern each connection subscribes to; `{i}` becomes the connection's index, so the
    /// default gives every connection its own pattern (the index holds N entries).
    #[arg(long, default_value = "bench.idle.{i}")]
    pub pattern: String,

    /// Wait this long after the last subscription before measuring (lets allocations settle).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub settle: Duration,

    /// Then keep the connections open this long, reading, and measure again (spans server pings
    /// when longer than `--ping-interval` of the service).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Hold until the process receives SIGUSR1 (`--hold`, when not 0, ends the hold at the
    /// latest). Several load generators started together can then be measured while all of
    /// them hold, and released together.
    #[arg(long, default_value_t = false)]
    pub hold_until_signal: bool,

    /// Answer server pings with pongs, as browsers do. Off: the client reads and answers nothing.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub answer_pings: bool,

    /// After closing every connection, wait this long and read the service's RSS once more.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub after_close: Duration,
}

/// The `fanout` scenario.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,

    /// Subscriber connections, all subscribed to `--event`.
    #[arg(long, short = 's', default_value_t = 2_000)]
    pub subscribers: usize,

    /// The event name published and subscribed to.
    #[arg(long, default_value = "bench.fanout")]
    pub event: String,

    /// Size in bytes of each event's `data` JSON (padded to exactly this size).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,

    /// Events per `POST /publish` request (Centrifugo: 1 posts each to `/api/publish`, more posts
    /// that many publish commands to `/api/batch`).
    #[arg(long, default_value_t = 10)]
    pub batch: usize,

    /// Publisher connections posting concurrently (each keep-alive, one request at a time).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,

    /// Target publish rate in events/s over all publishers; 0 publishes as fast as accepted.
    /// Deliveries/s is this times the subscriber count.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,

    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// After publishing stops, wait at most this long for subscribers to receive everything.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Stop waiting early when nothing was received for this long.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain_quiet: Duration,

    /// How many subscribers read each event's timestamp to sample publish→receive latency
    /// (the rest only count frame headers).
    #[arg(long, default_value_t = 8)]
    pub latency_subscribers: usize,

    /// Read buffer of each subscriber, in bytes (one `read()` drains up to this much).
    #[arg(long, default_value_t = 64 * 1024)]
    pub read_buffer: usize,
}
