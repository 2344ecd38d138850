//! Every setting of the event service: a clap flag with an `EVENTROUTER_*` env var and a default.
//!
//! The operator sets these env vars (names in `eventrouter_contract::env`); the doc comment on each
//! field is its `--help` line and the README's configuration table.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use eventrouter_contract::env;
pub use eventrouter_runtime::logging::LogFormat;

/// Where events come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The embedded in-process bus: `POST /publish` feeds this instance's clients. No broker needed.
    Memory,
    /// RabbitMQ: a queue per instance, bound to exactly the patterns its clients subscribed to.
    Amqp,
}

/// What happens to a client whose outbound queue reaches `--send-queue-bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Close the connection with code 4000 (the client reconnects and can catch up elsewhere).
    Disconnect,
    /// Drop the oldest queued events until the new one fits (counted as drops).
    DropOldest,
}

/// The event service's configuration.
#[derive(Clone, Debug, Parser)]
#[command(name = "event-service", version, about, long_about = None)]
pub struct Config {
    /// Address of the main port: WebSocket upgrades (`/ws`), `POST /publish`, `/healthz`, `/readyz`.
    #[arg(long, env = env::LISTEN, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin port: `/metrics` and `/debug/connections`. Keep it off the public Service.
    #[arg(long, env = env::ADMIN_LISTEN, default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Where events come from: the embedded bus (`memory`) or RabbitMQ (`amqp`).
    #[arg(long, env = env::SOURCE, value_enum, default_value = "memory")]
    pub source: SourceKind,

    /// RabbitMQ URL (`amqp://user:pass@host:5672/vhost`). Prefer `--amqp-url-file` for Secrets.
    #[arg(long, env = env::AMQP_URL, hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// File holding the RabbitMQ URL (a mounted Secret). Read at start; wins over `--amqp-url`.
    #[arg(long, env = env::AMQP_URL_FILE)]
    pub amqp_url_file: Option<PathBuf>,

    /// The durable topic exchange events are published to and consumed from.
    #[arg(long, env = env::EXCHANGE, default_value = "eventrouter")]
    pub exchange: String,

    /// Declare the exchange at start (locally handy; in a cluster the operator owns it).
    #[arg(long, env = env::DECLARE_EXCHANGE, default_value_t = false, action = clap::ArgAction::Set)]
    pub declare_exchange: bool,

    /// Maximum messages waiting in this instance's queue; beyond it RabbitMQ drops the oldest.
    #[arg(long, env = env::QUEUE_MAX_LENGTH, default_value_t = 100_000)]
    pub queue_max_length: u32,

    /// How long a message may wait in this instance's queue before RabbitMQ discards it.
    #[arg(long, env = env::QUEUE_MESSAGE_TTL, default_value = "60s", value_parser = humantime::parse_duration)]
    pub queue_message_ttl: Duration,

    /// How long this instance's queue survives unused (after the instance is gone) before deletion.
    #[arg(long, env = env::QUEUE_EXPIRES, default_value = "5m", value_parser = humantime::parse_duration)]
    pub queue_expires: Duration,

    /// Unacknowledged messages RabbitMQ may push to this instance at once (basic.qos prefetch).
    #[arg(long, env = env::PREFETCH, default_value_t = 256)]
    pub prefetch: u16,

    /// Name of this instance (the pod name); names its RabbitMQ queue. Random when unset.
    #[arg(long, env = env::POD_NAME)]
    pub pod_name: Option<String>,

    /// How often the server sends a WebSocket ping to each client.
    #[arg(long, env = env::PING_INTERVAL, default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Close a connection (code 4001) when nothing at all was received from it for this long.
    #[arg(long, env = env::IDLE_TIMEOUT, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Time a client has to complete the HTTP upgrade after connecting.
    #[arg(long, env = env::HANDSHAKE_TIMEOUT, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Bound on each connection's outbound queue, in bytes of encoded frames.
    #[arg(long, env = env::SEND_QUEUE_BYTES, default_value_t = 1024 * 1024)]
    pub send_queue_bytes: usize,

    /// What to do with a client whose outbound queue is full: `disconnect` (close 4000) or `drop-oldest`.
    #[arg(long, env = env::SLOW_CONSUMER_POLICY, value_enum, default_value = "disconnect")]
    pub slow_consumer_policy: SlowConsumerPolicy,

    /// Write events that arrive one at a time straight into the sockets of connections waiting for nothing else, from group writers, instead of waking each connection's task (`false`: always wake the task).
    #[arg(long, env = env::DIRECT_WRITES, default_value_t = true, action = clap::ArgAction::Set)]
    pub direct_writes: bool,

    /// Largest frame or message accepted from a client; larger closes with 1009.
    #[arg(long, env = env::MAX_FRAME_BYTES, default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Most subscription patterns one connection may hold.
    #[arg(long, env = env::MAX_SUBSCRIPTIONS, default_value_t = 100)]
    pub max_subscriptions: usize,

    /// Longest subscription pattern, in bytes (RabbitMQ's routing-key limit is 255).
    #[arg(long, env = env::MAX_PATTERN_LENGTH, default_value_t = 255)]
    pub max_pattern_length: usize,

    /// Longest event name `POST /publish` accepts, in bytes (RabbitMQ's routing-key limit is 255).
    #[arg(long, env = env::MAX_EVENT_NAME_LENGTH, default_value_t = 255)]
    pub max_event_name_length: usize,

    /// Most concurrent WebSocket connections; further upgrades get 503.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 10_000)]
    pub max_connections: usize,

    /// Largest `POST /publish` body; larger gets 413.
    #[arg(long, env = env::MAX_PUBLISH_BYTES, default_value_t = 1024 * 1024)]
    pub max_publish_bytes: usize,

    /// On SIGTERM, close clients (code 1001) spread over this long so they don't reconnect at once.
    #[arg(long, env = env::DRAIN_DURATION, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_duration: Duration,

    /// Accept backlog of the main port's listening socket: room for a burst of reconnects
    /// (after a drain, a rebalance or a scale-in). The kernel caps it at `net.core.somaxconn`.
    #[arg(long, env = env::LISTEN_BACKLOG, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub listen_backlog: u32,

    /// Rebalance after scale-out: while this instance holds more than its share of the fleet's
    /// connections, ask some clients to reconnect (close 4002). Needs the `amqp` source.
    #[arg(long, env = env::REBALANCE, default_value_t = true, action = clap::ArgAction::Set)]
    pub rebalance: bool,

    /// Exchange the instances publish their load heartbeats on (fanout). Default: `<exchange>.control`.
    #[arg(long, env = env::CONTROL_EXCHANGE)]
    pub control_exchange: Option<String>,

    /// How often this instance publishes its heartbeat; peers silent for 3 intervals are forgotten.
    #[arg(long, env = env::HEARTBEAT_INTERVAL, default_value = "5s", value_parser = heartbeat_interval)]
    pub heartbeat_interval: Duration,

    /// Fraction over the fleet mean (e.g. `0.15`) that still counts as balanced.
    #[arg(long, env = env::REBALANCE_TOLERANCE, default_value_t = 0.15, value_parser = fraction)]
    pub rebalance_tolerance: f64,

    /// Most connections this instance closes per second to rebalance.
    #[arg(long, env = env::REBALANCE_RATE, default_value_t = 10.0, value_parser = positive_rate)]
    pub rebalance_rate: f64,

    /// A connection younger than this is never closed to rebalance (no client moves twice in a row).
    #[arg(long, env = env::REBALANCE_MIN_AGE, default_value = "60s", value_parser = humantime::parse_duration)]
    pub rebalance_min_age: Duration,

    /// File with the shared secret for HS256/HS384/HS512 connection tokens (at least 32 bytes).
    /// Setting any of the three key files turns authentication on. Re-read when it changes.
    #[arg(long, env = env::AUTH_HMAC_SECRET_FILE, help_heading = "Authentication")]
    pub auth_hmac_secret_file: Option<PathBuf>,

    /// PEM file of public keys (RSA, EC P-256/P-384, Ed25519) for RS*/PS*/ES*/EdDSA tokens.
    #[arg(long, env = env::AUTH_PUBLIC_KEYS_FILE, help_heading = "Authentication")]
    pub auth_public_keys_file: Option<PathBuf>,

    /// JWKS file (JSON Web Key Set) of public keys, chosen by the token's `kid`.
    #[arg(long, env = env::AUTH_JWKS_FILE, help_heading = "Authentication")]
    pub auth_jwks_file: Option<PathBuf>,

    /// Required `iss` of connection tokens (unset: not checked).
    #[arg(long, env = env::AUTH_ISSUER, help_heading = "Authentication")]
    pub auth_issuer: Option<String>,

    /// Required `aud` of connection tokens (unset: not checked).
    #[arg(long, env = env::AUTH_AUDIENCE, help_heading = "Authentication")]
    pub auth_audience: Option<String>,

    /// Clock skew allowed on a token's `exp` and `nbf`.
    #[arg(long, env = env::AUTH_LEEWAY, default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Authentication")]
    pub auth_leeway: Duration,

    /// The token claim listing the patterns the client may subscribe to.
    #[arg(long, env = env::AUTH_SUBSCRIBE_CLAIM, default_value = "subscribe", help_heading = "Authentication")]
    pub auth_subscribe_claim: String,

    /// Patterns granted to every authenticated client, comma-separated; `{sub}` is the token's subject (e.g. `user.{sub}.#`).
    #[arg(long, env = env::AUTH_GRANT_TEMPLATES, value_delimiter = ',', help_heading = "Authentication")]
    pub auth_grant_templates: Vec<String>,

    /// Patterns clients without a token may subscribe to, comma-separated (empty: a token is required).
    #[arg(long, env = env::AUTH_ANONYMOUS_PATTERNS, value_delimiter = ',', help_heading = "Authentication")]
    pub auth_anonymous_patterns: Vec<String>,

    /// Largest token accepted, in bytes.
    #[arg(long, env = env::AUTH_MAX_TOKEN_BYTES, default_value_t = 8192, help_heading = "Authentication")]
    pub auth_max_token_bytes: usize,

    /// How often the key files and the publish-keys file are checked for changes.
    #[arg(long, env = env::AUTH_RELOAD_INTERVAL, default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Authentication")]
    pub auth_reload_interval: Duration,

    /// JSON file of publish keys (`[{"name","key","events"}]`); when set, `POST /publish` needs `Authorization: Bearer <key>`.
    #[arg(long, env = env::PUBLISH_KEYS_FILE, help_heading = "Authentication")]
    pub publish_keys_file: Option<PathBuf>,

    /// `Origin` values allowed to open WebSockets, comma-separated (e.g. `https://app.example.com`); others get 403. Empty: any.
    #[arg(long, env = env::ALLOWED_ORIGINS, value_delimiter = ',', help_heading = "Authentication")]
    pub allowed_origins: Vec<String>,

    /// Most open connections from one client address (IPv6: per /64); over it the upgrade gets 429. 0: no limit.
    #[arg(long, env = env::MAX_CONNECTIONS_PER_IP, default_value_t = 0, help_heading = "Per-client limits")]
    pub max_connections_per_ip: u32,

    /// New connections per second from one client address; over it the upgrade gets 429. 0: no limit.
    #[arg(long, env = env::CONNECT_RATE_PER_IP, default_value_t = 0.0, value_parser = non_negative_rate, help_heading = "Per-client limits")]
    pub connect_rate_per_ip: f64,

    /// Burst of new connections one client address may open above `--connect-rate-per-ip`.
    #[arg(long, env = env::CONNECT_BURST_PER_IP, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Per-client limits")]
    pub connect_burst_per_ip: u32,

    /// Header a trusted proxy puts the client address in (e.g. `X-Forwarded-For`; its last entry is used). Unset: the TCP peer address.
    #[arg(long, env = env::TRUSTED_PROXY_HEADER, help_heading = "Per-client limits")]
    pub trusted_proxy_header: Option<String>,

    /// Text frames per second one connection may send; over it a frame is refused (`rate_limited`), and 10 in a row close with 1008. 0: no limit.
    #[arg(long, env = env::CLIENT_FRAME_RATE, default_value_t = 50.0, value_parser = non_negative_rate, help_heading = "Per-client limits")]
    pub client_frame_rate: f64,

    /// Burst of text frames one connection may send above `--client-frame-rate`.
    #[arg(long, env = env::CLIENT_FRAME_BURST, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Per-client limits")]
    pub client_frame_burst: u32,

    /// Events the embedded bus keeps for missed-event recovery (`subscribe` with `since`); 0: none.
    #[arg(long, env = env::HISTORY_MAX_EVENTS, default_value_t = 10_000, help_heading = "Recovery")]
    pub history_max_events: usize,

    /// Bytes of events the embedded bus keeps; with RabbitMQ, the most one recovery window holds in memory.
    #[arg(long, env = env::HISTORY_MAX_BYTES, default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..), help_heading = "Recovery")]
    pub history_max_bytes: u64,

    /// How long the embedded bus keeps an event; with RabbitMQ, the in-memory window's (and the stream's `x-max-age` when the service declares it).
    #[arg(long, env = env::HISTORY_MAX_AGE, default_value = "5m", value_parser = humantime::parse_duration, help_heading = "Recovery")]
    pub history_max_age: Duration,

    /// The RabbitMQ stream recoveries read (`--source amqp`); declared with the exchange by `--declare-exchange`. Unset: no recovery.
    #[arg(long, env = env::HISTORY_STREAM, help_heading = "Recovery")]
    pub history_stream: Option<String>,

    /// Most events one `subscribe` with `since` replays; a longer gap answers `recovered: false`.
    #[arg(long, env = env::RECOVERY_MAX_EVENTS, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Recovery")]
    pub recovery_max_events: u32,

    /// Most recoveries one instance runs at once; up to 16 times as many wait, more get `busy`.
    #[arg(long, env = env::RECOVERY_MAX_CONCURRENT, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096), help_heading = "Recovery")]
    pub recovery_max_concurrent: u32,

    /// How often each connection samples its kernel socket queues (SIOCINQ/SIOCOUTQ).
    #[arg(long, env = env::SOCKET_SAMPLE_INTERVAL, default_value = "5s", value_parser = humantime::parse_duration)]
    pub socket_sample_interval: Duration,

    /// How often to check whether 256 or more connections opened or closed since the memory they freed was last returned to the system (glibc `malloc_trim`); `0s` never returns it.
    #[arg(long, env = env::HEAP_TRIM_INTERVAL, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heap_trim_interval: Duration,

    /// A connection whose Recv-Q, Send-Q or outbound queue exceeds this counts as "over threshold".
    #[arg(long, env = env::QUEUE_ALERT_THRESHOLD_BYTES, default_value_t = 64 * 1024)]
    pub queue_alert_threshold_bytes: u64,

    /// Log format: human-readable `text` or one JSON object per line (`json`).
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `event_service=debug`.
    #[arg(long, env = env::LOG, default_value = "info")]
    pub log: String,

    /// Demo mode: publish a sample event every second on the embedded bus (`demo.tick`).
    #[arg(long, env = env::DEMO, default_value_t = false)]
    pub demo: bool,

    /// Serve the console page at `/` and its `/console/*` files on the main port. On with `--demo`, off otherwise.
    #[arg(long, env = env::CONSOLE, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub console: Option<bool>,
}

/// `--rebalance-tolerance`: a fraction between 0 and 1.
fn fraction(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "expected a fraction of the mean between 0 and 1 (e.g. 0.15), got '{value}'"
        )),
    }
}

/// `--rebalance-rate`: a positive number of connections per second.
fn positive_rate(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "expected a positive number of connections per second, got '{value}'"
        )),
    }
}

/// A rate that may be 0 (no limit): a finite number ≥ 0.
fn non_negative_rate(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "expected a number per second, 0 or more (0: no limit), got '{value}'"
        )),
    }
}

/// `--heartbeat-interval`: a duration of at least 100 ms (the fleet view's TTL is three of them).
fn heartbeat_interval(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("must be at least 100ms, got '{value}'"));
    }
    Ok(d)
}

impl Config {
    /// The control exchange: `--control-exchange`, else `<exchange>.control`.
    pub fn control_exchange(&self) -> String {
        self.control_exchange
            .clone()
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| eventrouter_contract::control::default_exchange(&self.exchange))
    }

    /// Every default, read from the flags' declarations only: no environment variable is
    /// consulted (unlike [`Config::parse`]), so a `POD_NAME` or `EVENTROUTER_*` of the machine
    /// running the tests cannot leak in.
    pub fn defaults() -> Self {
        let matches = Self::command()
            .mut_args(|arg| arg.env(None::<&'static str>))
            .get_matches_from(["event-service"]);
        Self::from_arg_matches(&matches).expect("the defaults of every flag parse")
    }

    /// [`Config::defaults`] with both ports on `127.0.0.1:0` and a 1 s drain, for tests (a
    /// default 10 s drain would make every test's shutdown slow).
    pub fn for_tests() -> Self {
        let mut cfg = Self::defaults();
        cfg.listen = "127.0.0.1:0".parse().expect("literal address");
        cfg.admin_listen = "127.0.0.1:0".parse().expect("literal address");
        cfg.drain_duration = Duration::from_secs(1);
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Set in the child process a test re-runs itself in.
    const CHILD: &str = "EVENT_SERVICE_CONFIG_TEST_CHILD";

    /// Runs the test `name` of this binary again in a child process with `vars` set, so a test
    /// can read a real environment without `set_var` racing the other tests' threads. Returns
    /// true in the child (which then makes its assertions), false in the parent once the child
    /// passed.
    fn in_child_with_env(name: &str, vars: &[(&str, &str)]) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let output = Command::new(exe)
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .envs(vars.iter().copied())
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("1 passed"),
            "the child ran no test named {name}:\n{stdout}"
        );
        false
    }

    #[test]
    fn demo_is_a_flag() {
        assert!(Config::parse_from(["event-service", "--demo"]).demo);
        assert!(!Config::parse_from(["event-service"]).demo);
    }

    #[test]
    fn demo_is_an_env_var() {
        if in_child_with_env("config::tests::demo_is_an_env_var", &[(env::DEMO, "true")]) {
            assert!(Config::parse_from(["event-service"]).demo);
        }
    }

    #[test]
    fn test_defaults_ignore_the_environment() {
        let vars = [(env::POD_NAME, "leaked-pod"), (env::MAX_SUBSCRIPTIONS, "7")];
        if in_child_with_env("config::tests::test_defaults_ignore_the_environment", &vars) {
            // The environment is really there (the flags read it)...
            let parsed = Config::parse_from(["event-service"]);
            assert_eq!(parsed.pod_name.as_deref(), Some("leaked-pod"));
            assert_eq!(parsed.max_subscriptions, 7);
            // ...and the test configuration does not.
            let cfg = Config::for_tests();
            assert_eq!(cfg.pod_name, None);
            assert_eq!(cfg.max_subscriptions, 100);
        }
    }

    #[test]
    fn event_names_have_their_own_limit() {
        let c = Config::parse_from([
            "event-service",
            "--max-pattern-length",
            "40",
            "--max-event-name-length",
            "20",
        ]);
        assert_eq!((c.max_pattern_length, c.max_event_name_length), (40, 20));
        let d = Config::defaults();
        assert_eq!(d.max_event_name_length, d.max_pattern_length);
    }

    #[test]
    fn durations_and_policies_parse() {
        let c = Config::parse_from([
            "event-service",
            "--idle-timeout",
            "90s",
            "--slow-consumer-policy",
            "drop-oldest",
        ]);
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.slow_consumer_policy, SlowConsumerPolicy::DropOldest);
    }
}
