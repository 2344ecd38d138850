//! The autoscaling loop's clients: WebSocket clients that connect only to the Ready endpoints of
//! the router's Service, read from its EndpointSlices and picked at random as a Service would,
//! subscribe, count every event, and reconnect on any close (right away after 4002, after a
//! jittered pause otherwise, with growing backoff after failed attempts). A reconnect subscribes
//! with `since`, the id of the last event received, so the events published meanwhile are
//! replayed from the router's history stream.
//!
//! What they record is what the scenario asserts: every connection's first and last event and
//! any gap or repeat inside it, every close by code, every reconnect's time and how long the
//! client was without a subscription.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

/// The routing key the publisher uses and every client subscribes to.
pub const EVENT: &str = "loop.tick";
/// Connect and subscribe must finish within this.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ended {
    /// 4002: the instance held more than its share.
    Rebalance,
    /// 1001: the instance drained (SIGTERM).
    Drain,
    /// The client itself closed (the load went down).
    Client,
    /// Any other close code.
    Other(u16),
    /// No close frame: the connection broke (a killed process, a reset).
    Broken,
}

/// One finished (or, at the end, still open) connection.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client: usize,
    pub subscribed_at: Instant,
    pub ended_at: Instant,
    pub ended: Ended,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub received: u64,
    /// Sequence numbers skipped inside this connection (after its first event).
    pub skipped: u64,
    /// Events at or below a sequence number this client had already received.
    pub repeated: u64,
}

/// A reconnect: when the new subscription was live, after what kind of close, and how long the
/// client had no subscription.
#[derive(Clone, Copy, Debug)]
pub struct Reconnect {
    pub at: Instant,
    pub after: Ended,
    pub gap: Duration,
    /// From sending the subscribe (with `since`) to its `subscribed` reply.
    pub subscribe_took: Duration,
}

/// State shared by the clients, the endpoint reader and the scenario.
#[derive(Default)]
pub struct Shared {
    endpoints: RwLock<Vec<SocketAddr>>,
    /// Client → the endpoint of its live subscription.
    open: Mutex<HashMap<usize, SocketAddr>>,
    connections: Mutex<Vec<Connection>>,
    reconnects: Mutex<Vec<Reconnect>>,
    failed_attempts: AtomicU64,
    /// Reconnects that sent `since` and were answered `recovered: true` / anything else.
    recovered: AtomicU64,
    not_recovered: AtomicU64,
}

impl Shared {
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Live subscriptions per pod IP.
    pub fn open_by_ip(&self) -> BTreeMap<IpAddr, usize> {
        let mut counts = BTreeMap::new();
        if let Ok(open) = self.open.lock() {
            for endpoint in open.values() {
                *counts.entry(endpoint.ip()).or_insert(0) += 1;
            }
        }
        counts
    }

    pub fn open_count(&self) -> usize {
        self.open.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.connections
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    pub fn reconnects(&self) -> Vec<Reconnect> {
        self.reconnects
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Ordering::Relaxed)
    }

    /// Reconnects with `since`: (answered `recovered: true`, answered otherwise).
    pub fn recoveries(&self) -> (u64, u64) {
        (
            self.recovered.load(Ordering::Relaxed),
            self.not_recovered.load(Ordering::Relaxed),
        )
    }

    fn set_open(&self, client: usize, endpoint: Option<SocketAddr>) {
        if let Ok(mut open) = self.open.lock() {
            match endpoint {
                Some(endpoint) => open.insert(client, endpoint),
                None => open.remove(&client),
            };
        }
    }
}

/// Keeps `shared`'s endpoint list equal to the Ready addresses (with the `http` port) of the
/// Service's EndpointSlices, re-read every 250 ms, until `stop`.
pub async fn read_endpoints(
    slices: Api<EndpointSlice>,
    service: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    while !stop.is_cancelled() {
        if let Ok(list) = slices.list(&params).await {
            let mut ready = Vec::new();
            for slice in list.items {
                let Some(port) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some("http"))
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for endpoint in slice.endpoints {
                    let is_ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(false);
                    if !is_ready {
                        continue;
                    }
                    for address in endpoint.addresses {
                        if let Ok(ip) = address.parse::<IpAddr>() {
                            ready.push(SocketAddr::new(ip, port));
                        }
                    }
                }
            }
            ready.sort();
            if let Ok(mut endpoints) = shared.endpoints.write() {
                *endpoints = ready;
            }
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The clients, grown and shrunk by the scenario.
pub struct Fleet {
    shared: Arc<Shared>,
    clients: Vec<(CancellationToken, JoinHandle<()>)>,
    next_id: usize,
}

impl Fleet {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            clients: Vec::new(),
            next_id: 0,
        }
    }

    /// Starts clients until there are `n`, `per_second` at a time.
    pub async fn grow_to(&mut self, n: usize, per_second: usize) {
        let pause = Duration::from_secs(1) / u32::try_from(per_second.max(1)).unwrap_or(1);
        while self.clients.len() < n {
            let stop = CancellationToken::new();
            let id = self.next_id;
            self.next_id += 1;
            let task = tokio::spawn(client(id, self.shared.clone(), stop.clone()));
            self.clients.push((stop, task));
            tokio::time::sleep(pause).await;
        }
    }

    /// Closes clients (close code 1000) until `n` remain, `per_second` at a time.
    pub async fn shrink_to(&mut self, n: usize, per_second: usize) {
        let pause = Duration::from_secs(1) / u32::try_from(per_second.max(1)).unwrap_or(1);
        let mut stopping = Vec::new();
        while self.clients.len() > n {
            if let Some((stop, task)) = self.clients.pop() {
                stop.cancel();
                stopping.push(task);
            }
            tokio::time::sleep(pause).await;
        }
        for task in stopping {
            task.await.ok();
        }
    }
}

fn end_of(frame: Option<&CloseFrame>) -> Ended {
    match frame.map(|f| u16::from(f.code)) {
        Some(4002) => Ended::Rebalance,
        Some(1001) => Ended::Drain,
        Some(code) => Ended::Other(code),
        None => Ended::Other(1005),
    }
}

/// The `seq` and id of an event frame; `None` for anything else (a pong, an error op).
fn event_seq(text: &str) -> Option<(u64, String)> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value["op"] != "event" {
        return None;
    }
    Some((
        value["data"]["seq"].as_u64()?,
        value["id"].as_str()?.to_owned(),
    ))
}

/// One client: connect, subscribe, read until the connection ends, record, go again.
async fn client(id: usize, shared: Arc<Shared>, stop: CancellationToken) {
    let mut rng = SmallRng::seed_from_u64(id as u64);
    let mut last_seq: Option<u64> = None;
    // The id of the last event received: the next subscription's `since`, so what is published
    // while the client reconnects is replayed rather than lost.
    let mut last_id: Option<String> = None;
    let mut without_since: Option<(Instant, Ended)> = None;
    let mut failures: u32 = 0;
    while !stop.is_cancelled() {
        let endpoints = shared.endpoints();
        if endpoints.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let endpoint = endpoints[rng.random_range(0..endpoints.len())];
        let url = format!("ws://{endpoint}{}", eventrouter_contract::http::WS_PATH);
        let attempt = tokio::time::timeout(HANDSHAKE, async {
            let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
            let subscribe = match &last_id {
                Some(since) => {
                    serde_json::json!({"op":"subscribe","id":1,"events":[EVENT],"since":since})
                }
                None => serde_json::json!({"op":"subscribe","id":1,"events":[EVENT]}),
            };
            let sent_at = Instant::now();
            socket
                .send(Message::text(subscribe.to_string()))
                .await
                .ok()?;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message
                    && text.contains(r#""op":"subscribed""#)
                {
                    let recovered = text.contains(r#""recovered":true"#);
                    return Some((socket, recovered, sent_at.elapsed()));
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some((mut socket, recovered, subscribe_took)) = attempt else {
            failures += 1;
            shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
            let base = Duration::from_millis(100) * 2u32.pow(failures.min(5));
            tokio::time::sleep(base.mul_f64(rng.random_range(0.5..1.5))).await;
            continue;
        };
        failures = 0;
        let subscribed_at = Instant::now();
        if last_id.is_some() {
            let counter = if recovered {
                &shared.recovered
            } else {
                &shared.not_recovered
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((since, after)) = without_since.take()
            && let Ok(mut reconnects) = shared.reconnects.lock()
        {
            reconnects.push(Reconnect {
                at: subscribed_at,
                after,
                gap: subscribed_at - since,
                subscribe_took,
            });
        }
        shared.set_open(id, Some(endpoint));
        let mut conn = Connection {
            client: id,
            subscribed_at,
            ended_at: subscribed_at,
            ended: Ended::Broken,
            first_seq: None,
            last_seq: None,
            received: 0,
            skipped: 0,
            repeated: 0,
        };
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => {
                    socket.close(None).await.ok();
                    conn.ended = Ended::Client;
                    break;
                }
                message = socket.next() => message,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    let Some((seq, id)) = event_seq(text.as_str()) else {
                        continue;
                    };
                    conn.received += 1;
                    if last_seq.is_some_and(|last| seq <= last) {
                        conn.repeated += 1;
                        continue;
                    }
                    last_id = Some(id);
                    if let Some(previous) = conn.last_seq {
                        conn.skipped += seq - previous - 1;
                    }
                    conn.first_seq.get_or_insert(seq);
                    conn.last_seq = Some(seq);
                    last_seq = Some(seq);
                }
                Some(Ok(Message::Close(frame))) => {
                    conn.ended = end_of(frame.as_ref());
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    conn.ended = Ended::Broken;
                    break;
                }
            }
        }
        conn.ended_at = Instant::now();
        shared.set_open(id, None);
        let ended = conn.ended;
        if let Ok(mut connections) = shared.connections.lock() {
            connections.push(conn);
        }
        if ended == Ended::Client {
            break;
        }
        without_since = Some((Instant::now(), ended));
        // 4002 asks for an immediate reconnect; anything else gets a short jittered pause, so
        // the clients of a draining pod do not all come back in the same millisecond.
        if ended != Ended::Rebalance {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        }
    }
}
