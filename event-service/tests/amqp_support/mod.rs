//! Helpers for the RabbitMQ tests: the broker the test command started, an independent lapin
//! publisher, reads of the broker's own view (management HTTP API), a collecting event sink, and
//! dedicated nodes (via `tests/infra/rabbitmq.sh`) for tests that stop or restart the broker.
//!
//! Every helper that needs a service panics with the variable to set and the command to run when
//! it is missing: these tests never pass by skipping.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use event_service::{
    event::Event,
    source::{EventSink, Origin},
};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use serde_json::Value;
use tokio::sync::Notify;

pub const AMQP_URL_VAR: &str = "EVENTROUTER_TEST_AMQP_URL";
pub const MGMT_URL_VAR: &str = "EVENTROUTER_TEST_RABBITMQ_MGMT_URL";
pub const WAIT: Duration = Duration::from_secs(15);

fn require(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: this test needs a running RabbitMQ node (with the management \
             plugin). Run it through `tests/run` (or `tests/run --services` and export the \
             variables it prints)."
        ),
    }
}

/// AMQP URL of the shared node.
pub fn amqp_url() -> String {
    require(AMQP_URL_VAR)
}

/// Management API of the shared node.
pub fn management() -> Management {
    Management::new(require(MGMT_URL_VAR))
}

/// A name no other test (or earlier run) uses: tests share one broker and run in parallel.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// An AMQP client that is not the service: a plain lapin connection with publisher confirms.
pub struct Publisher {
    _connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    /// Connects and declares `exchange` (durable topic, as the operator would).
    pub async fn connect(url: &str, exchange: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the test publisher connects to RabbitMQ");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the exchange");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self {
            _connection: connection,
            channel,
            exchange: exchange.into(),
        }
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker nacked a test message");
    }

    pub async fn publish_json(&self, routing_key: &str, body: &str) {
        self.publish(routing_key, body.as_bytes(), BasicProperties::default())
            .await;
    }
}

/// Reads the broker's own view through the management HTTP API (AMQP cannot list bindings).
#[derive(Clone)]
pub struct Management {
    base: String,
}

impl Management {
    pub fn new(base: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// GET `/api/<path>`; `None` on 404.
    pub async fn get(&self, path: &str) -> Option<Value> {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let url = format!("{}/api/{path}", self.base);
        let request = http::Request::get(&url)
            // guest:guest, the test nodes' management login (loopback only).
            .header("authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .body(Empty::new())
            .expect("a request");
        let response = tokio::time::timeout(WAIT, client.request(request))
            .await
            .unwrap_or_else(|_| panic!("GET {url} timed out"))
            .unwrap_or_else(|e| panic!("GET {url}: {e} (is the management plugin up?)"));
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        if status == http::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(
            status.is_success(),
            "GET {url}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Some(serde_json::from_slice(&body).expect("JSON from the management API"))
    }

    /// Routing keys binding `queue` to `exchange` in the default vhost, sorted.
    pub async fn bindings(&self, exchange: &str, queue: &str) -> Vec<String> {
        let path = format!("bindings/%2F/e/{}/q/{}", enc(exchange), enc(queue));
        let mut keys: Vec<String> = self
            .get(&path)
            .await
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|b| b["routing_key"].as_str().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    }

    /// The queue as the broker reports it (`None` when it does not exist).
    pub async fn queue(&self, queue: &str) -> Option<Value> {
        self.get(&format!("queues/%2F/{}", enc(queue))).await
    }
}

/// Percent-encodes a name for a management API path.
fn enc(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An [`EventSink`] that keeps everything it is given.
#[derive(Default)]
pub struct Collector {
    events: Mutex<Vec<Event>>,
    arrived: Notify,
}

impl EventSink for Collector {
    fn dispatch(&self, event: Event, origin: Origin) {
        assert_eq!(origin, Origin::Amqp);
        self.events.lock().expect("collector lock").push(event);
        self.arrived.notify_waiters();
    }
}

impl Collector {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn names(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("collector lock")
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("collector lock").clone()
    }

    pub fn len(&self) -> usize {
        self.events.lock().expect("collector lock").len()
    }

    /// Waits until at least `n` events arrived; panics after [`WAIT`].
    pub async fn wait_for(&self, n: usize) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            if self.len() >= n {
                return self.events();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "expected {n} events within {WAIT:?}, got {}: {:?}",
                    self.len(),
                    self.names()
                );
            }
        }
    }
}

/// Polls `check` every 50 ms until true; panics naming `what` after `within`.
pub async fn until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of an unlabelled or labelled series in a registry (0 when absent).
pub fn metric(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .find(|m| match label {
            None => true,
            Some((k, v)) => m
                .get_label()
                .iter()
                .any(|l| l.name() == k && l.value() == v),
        })
        .map(|m| {
            if m.get_counter().has_value() {
                m.get_counter().value()
            } else {
                m.get_gauge().value()
            }
        })
        .unwrap_or(0.0)
}

/// A RabbitMQ node of the test's own (`tests/infra/rabbitmq.sh`), for stopping and restarting
/// without disturbing the shared node. Stopped when dropped.
pub struct DedicatedNode {
    pub name: String,
    pub amqp_url: String,
    pub management: Management,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/infra/rabbitmq.sh")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn try_script(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(script())
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running tests/infra/rabbitmq.sh {args:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "tests/infra/rabbitmq.sh {args:?} failed (is rabbitmq-server installed? \
             tests/infra/install.sh installs it): {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

async fn run_script(args: &[&str]) -> String {
    try_script(args).await.unwrap_or_else(|e| panic!("{e}"))
}

impl DedicatedNode {
    /// Starts a fresh node on free ports. A port found free can be taken by someone else before
    /// the node binds it (the machine is busy with other tests), so a failed start is retried on
    /// new ports a few times.
    pub async fn start(prefix: &str) -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            let name = unique(prefix);
            let (amqp, mgmt) = (free_port(), free_port());
            match try_script(&["start", &name, &amqp.to_string(), &mgmt.to_string()]).await {
                Ok(out) => {
                    let value = |var: &str| {
                        out.lines()
                            .find_map(|l| l.strip_prefix(&format!("export {var}=")))
                            .map(|v| v.trim_matches('\'').to_owned())
                            .unwrap_or_else(|| panic!("rabbitmq.sh start printed no {var}: {out}"))
                    };
                    return Self {
                        amqp_url: value(AMQP_URL_VAR),
                        management: Management::new(value(MGMT_URL_VAR)),
                        name,
                    };
                }
                Err(error) => {
                    let _ = try_script(&["stop", &name]).await;
                    last_error = error;
                }
            }
        }
        panic!("could not start a dedicated RabbitMQ node in 3 attempts: {last_error}");
    }

    pub async fn stop_app(&self) {
        run_script(&["stop_app", &self.name]).await;
    }

    pub async fn start_app(&self) {
        run_script(&["start_app", &self.name]).await;
    }

    pub async fn restart(&self) {
        run_script(&["restart", &self.name]).await;
    }
}

impl Drop for DedicatedNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script())
            .args(["stop", &self.name])
            .output();
    }
}
