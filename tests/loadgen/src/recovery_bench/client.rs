//! The benchmark's WebSocket clients: the recovering clients (live, then dropped, then back with
//! `since`) and the live subscribers that sample latency throughout.
//!
//! Every client keeps the bare socket after the upgrade and captures each frame's payload with
//! the load generator's frame scanner (`crate::frame`), then reads only what it needs from it
//! (`super::wire`): the sequence number and publish time from the tail, the id from the head.
//! Each client subscribes to one topic (`super::publisher::Topic`) and so receives every
//! `topics`-th sequence number; it checks them: a number that skips more than one of its topic's
//! events is a gap, one at or below the last is a duplicate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Semaphore, watch},
};

use super::{
    publisher::Topic,
    wire::{self, MAX_ID_LEN, Message},
};
use crate::{
    frame::{self, Scanner, opcode},
    ws::{self, Target},
};

/// Where the run is; every client follows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Phase {
    /// Clients connect and subscribe.
    Connect,
    /// The publisher runs and every client is live.
    Warmup,
    /// The recovering clients drop their connections.
    Drop,
    /// The recovering clients reconnect with `since`.
    Reconnect(Mark),
    /// The publisher stopped after `published` events: read up to the last one of your topic
    /// and end.
    Finish { published: u64 },
}

/// The reconnect instant and how many events had been published by then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Mark {
    pub at: Instant,
    pub published: u64,
}

/// Counters the clients bump as they pass each step, for the orchestrator to wait on.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub subscribed: AtomicUsize,
    pub dropped: AtomicUsize,
    pub acked: AtomicUsize,
    pub caught_up: AtomicUsize,
    pub live: AtomicUsize,
    pub failed: AtomicUsize,
    /// Local ports of the live subscribers' connections (to find their sockets' queues).
    pub live_ports: std::sync::Mutex<Vec<u16>>,
}

/// What every client needs to know.
#[derive(Clone, Debug)]
pub(super) struct ClientSettings {
    pub target: Target,
    pub handshake_timeout: Duration,
    pub read_buffer: usize,
    /// A caught-up client is live once an event reaches it within this of its publish time.
    pub live_lag: Duration,
    /// Wait before repeating a `subscribe` refused with `busy`, or reconnecting after a close.
    pub busy_retry: Duration,
    /// Reconnects (with `since`) after the service closed a recovering client's connection.
    pub max_reconnects: u32,
    /// After `Finish`, how long a client may take to receive up to the last event.
    pub finish_timeout: Duration,
}

/// Sequence-number accounting of one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Order {
    /// Events in order.
    pub received: u64,
    /// Times the sequence skipped ahead (past the next event of the client's topic).
    pub gaps: u64,
    /// Events of the client's topic skipped.
    pub missing: u64,
    /// Events at or below the last sequence number already received.
    pub duplicates: u64,
}

impl Order {
    pub(super) fn add(&mut self, other: &Order) {
        self.received += other.received;
        self.gaps += other.gaps;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
    }
}

/// The last event a client received and its ordering counters.
#[derive(Debug)]
struct Tracker {
    /// The distance between two events of the client's topic (the number of topics).
    stride: u64,
    last: Option<u64>,
    id: [u8; MAX_ID_LEN],
    id_len: usize,
    order: Order,
    /// The next event sets a new baseline (after `recovered: false`): what it skips is counted
    /// in `skipped`, not as a gap.
    resync: bool,
    skipped: u64,
    /// Which connection of the client this is, and events received on it so far.
    connection: u32,
    on_conn: u64,
    anomalies: Vec<Anomaly>,
}

/// Gaps and duplicates kept per client, with where they happened.
const MAX_ANOMALIES: usize = 64;

/// One gap or duplicate, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Anomaly {
    pub kind: &'static str,
    /// The sequence number received, and the last one before it (on a client's topic they
    /// follow each other at a distance of the number of topics).
    pub seq: u64,
    pub last: u64,
    /// The client's connection it arrived on (0: before the drop, 1: the reconnect, 2 and on:
    /// reconnects after the service closed the connection), and events received on that
    /// connection before it (the replay comes first).
    pub connection: u32,
    pub on_connection: u64,
}

impl Anomaly {
    const DUPLICATE: &'static str = "duplicate";
    const GAP: &'static str = "gap";
}

impl Default for Tracker {
    /// A tracker for one topic carrying every event.
    fn default() -> Self {
        Self::new(1)
    }
}

impl Tracker {
    /// A tracker for a topic carrying every `stride`-th event (at least 1).
    fn new(stride: u64) -> Self {
        Self {
            stride: stride.max(1),
            last: None,
            id: [0; MAX_ID_LEN],
            id_len: 0,
            order: Order::default(),
            resync: false,
            skipped: 0,
            connection: 0,
            on_conn: 0,
            anomalies: Vec::new(),
        }
    }

    fn on_event(&mut self, seq: u64, id: &[u8]) {
        let before = self.on_conn;
        self.on_conn += 1;
        if let Some(last) = self.last {
            if seq <= last {
                self.order.duplicates += 1;
                self.note(Anomaly::DUPLICATE, seq, last, before);
                return;
            }
            if seq > last.saturating_add(self.stride) {
                let skipped = (seq - last) / self.stride - 1;
                if self.resync {
                    self.skipped += skipped;
                } else {
                    self.order.gaps += 1;
                    self.order.missing += skipped;
                    self.note(Anomaly::GAP, seq, last, before);
                }
            }
        }
        self.resync = false;
        self.last = Some(seq);
        self.order.received += 1;
        self.id_len = id.len().min(MAX_ID_LEN);
        self.id[..self.id_len].copy_from_slice(&id[..self.id_len]);
    }

    fn note(&mut self, kind: &'static str, seq: u64, last: u64, on_connection: u64) {
        if self.anomalies.len() < MAX_ANOMALIES {
            self.anomalies.push(Anomaly {
                kind,
                seq,
                last,
                connection: self.connection,
                on_connection,
            });
        }
    }

    /// A new connection starts (0: the first one, 1: the first after the drop, ...).
    fn new_connection(&mut self) {
        self.connection += 1;
        self.on_conn = 0;
    }

    fn last_id(&self) -> Option<String> {
        (self.id_len > 0).then(|| String::from_utf8_lossy(&self.id[..self.id_len]).into_owned())
    }
}

/// What one recovering client saw.
#[derive(Debug, Default)]
pub(super) struct RecoveringReport {
    /// The topic the client subscribed to.
    pub topic: Topic,
    /// Sequence number of the last event before the drop.
    pub last_before_drop: Option<u64>,
    /// The `recovered` field of the reply to the `subscribe` with `since`.
    pub recovered: Option<bool>,
    /// `subscribe` requests refused with `busy` and repeated.
    pub busy_retries: u32,
    /// `subscribed` answers with `recovered` other than true (a client that reconnects again
    /// may get several).
    pub not_recovered_answers: u32,
    /// Connections the service closed after the reconnect, each followed by another reconnect
    /// with `since`; their close codes (`None`: no close frame).
    pub reconnects: u32,
    pub closes: Vec<Option<u16>>,
    /// From the reconnect instant to the first `subscribed` reply.
    pub ack: Option<Duration>,
    /// From the reconnect instant to the first event published after it.
    pub caught_up: Option<Duration>,
    /// From the reconnect instant to the first event, once caught up, that arrived within
    /// `live_lag` of its publish time.
    pub live: Option<Duration>,
    /// Events received after the reconnect that were published before it (the replay).
    pub replayed: u64,
    /// The first sequence number received after the reconnect (recovered exactly: the last one
    /// before the drop plus the number of topics).
    pub first_after: Option<u64>,
    /// Ordering before the drop and after the reconnect.
    pub before: Order,
    pub after: Order,
    /// Events of the client's topic skipped after `recovered: false` (expected: nothing was
    /// replayed).
    pub unrecovered_skipped: u64,
    /// The last sequence number received by the end.
    pub last_seq: Option<u64>,
    /// Event frames whose tail or id was not the benchmark's.
    pub unreadable: u64,
    /// The first gaps and duplicates, with where they happened.
    pub anomalies: Vec<Anomaly>,
    pub error: Option<String>,
}

/// What one live subscriber saw.
#[derive(Debug, Default)]
pub(super) struct LiveReport {
    /// The topic the subscriber subscribed to.
    pub topic: Topic,
    pub order: Order,
    pub last_seq: Option<u64>,
    /// (receive time, publish → receive latency), both in µs.
    pub samples: Vec<(u64, u32)>,
    pub unreadable: u64,
    pub error: Option<String>,
}

/// Why a client stopped.
#[derive(Debug)]
enum Failure {
    /// The service closed the connection (with this close code) or the socket ended.
    Closed(Option<u16>),
    /// Anything else.
    Other(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::Other(message.to_owned())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Closed(Some(code)) => {
                write!(f, "the service closed the connection with {code}")
            }
            Failure::Closed(None) => f.write_str("the connection ended without a close frame"),
            Failure::Other(message) => f.write_str(message),
        }
    }
}

/// One WebSocket connection: the socket, its scanner and the pongs it owes.
struct Conn {
    stream: TcpStream,
    scanner: Scanner,
    buf: Vec<u8>,
    /// Bytes that followed the upgrade response, not yet scanned.
    pending: Vec<u8>,
    replies: Vec<u8>,
}

/// What stopped a [`Conn::pump`].
enum Wake {
    /// The message handler asked to stop.
    Done,
    /// The run moved to this phase.
    Phase(Phase),
}

impl Conn {
    /// Connects, upgrades and sends `op`.
    async fn open(settings: &ClientSettings, op: &str) -> Result<Self, Failure> {
        let (mut stream, pending) = tokio::time::timeout(
            settings.handshake_timeout,
            ws::connect(&settings.target, None),
        )
        .await
        .map_err(|_| "connect: timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(&frame::encode_client_frame(
                opcode::TEXT,
                op.as_bytes(),
                ws::mask(),
            ))
            .await
            .map_err(|e| format!("sending subscribe: {e}"))?;
        Ok(Self {
            stream,
            scanner: Scanner::capturing(),
            buf: vec![0; settings.read_buffer.max(frame::MAX_HEADER_LEN)],
            pending,
            replies: Vec::new(),
        })
    }

    async fn send_text(&mut self, op: &str) -> Result<(), Failure> {
        self.stream
            .write_all(&frame::encode_client_frame(
                opcode::TEXT,
                op.as_bytes(),
                ws::mask(),
            ))
            .await
            .map_err(|e| Failure::Other(format!("sending: {e}")))
    }

    /// Reads and hands every text message to `on_message(message, now, now_us)` until a read in
    /// which it returned true, or until `phase` changes. Every message of a read is handed over,
    /// whatever an earlier one returned.
    async fn pump<F>(
        &mut self,
        phase: &mut watch::Receiver<Phase>,
        mut on_message: F,
    ) -> Result<Wake, Failure>
    where
        F: FnMut(Message<'_>, Instant, u64) -> bool,
    {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let done = self.scan(&pending, &mut on_message)?;
            self.flush().await?;
            if done {
                return Ok(Wake::Done);
            }
        }
        loop {
            let n = tokio::select! {
                changed = phase.changed() => {
                    changed.map_err(|_| "the run ended".to_owned())?;
                    return Ok(Wake::Phase(*phase.borrow_and_update()));
                }
                read = self.stream.read(&mut self.buf) => read.map_err(|_| Failure::Closed(None))?,
            };
            if n == 0 {
                return Err(Failure::Closed(None));
            }
            let Self {
                scanner,
                buf,
                replies,
                ..
            } = &mut *self;
            let done = scan(scanner, replies, &buf[..n], &mut on_message)?;
            self.flush().await?;
            if done {
                return Ok(Wake::Done);
            }
        }
    }

    fn scan<F>(&mut self, bytes: &[u8], on_message: &mut F) -> Result<bool, Failure>
    where
        F: FnMut(Message<'_>, Instant, u64) -> bool,
    {
        scan(&mut self.scanner, &mut self.replies, bytes, on_message)
    }

    async fn flush(&mut self) -> Result<(), Failure> {
        if !self.replies.is_empty() {
            self.stream
                .write_all(&self.replies)
                .await
                .map_err(|e| format!("pong: {e}"))?;
            self.replies.clear();
        }
        Ok(())
    }
}

/// Scans `bytes`: pongs for pings, a failure for a close, text messages to `on_message`.
fn scan<F>(
    scanner: &mut Scanner,
    replies: &mut Vec<u8>,
    bytes: &[u8],
    on_message: &mut F,
) -> Result<bool, Failure>
where
    F: FnMut(Message<'_>, Instant, u64) -> bool,
{
    let now = Instant::now();
    let now_us = wire::now_micros();
    let mut done = false;
    let mut close = None;
    scanner
        .feed(bytes, |header, payload| {
            if header.ends_message() {
                if header.opcode == opcode::TEXT {
                    done |= on_message(wire::classify(payload), now, now_us);
                }
                return;
            }
            match header.opcode {
                opcode::PING => replies.extend(ws::pong(payload)),
                opcode::CLOSE => close = Some(frame::close_code(payload)),
                _ => {}
            }
        })
        .map_err(|e| format!("bad frame: {e}"))?;
    if let Some(code) = close {
        return Err(Failure::Closed(code));
    }
    Ok(done)
}

/// The `subscribe` op, with `since` when given.
fn subscribe_op(pattern: &str, since: Option<&str>) -> String {
    let events = serde_json::to_string(&[pattern]).unwrap_or_else(|_| "[]".to_owned());
    match since {
        Some(since) => {
            let since = serde_json::to_string(since).unwrap_or_else(|_| "\"\"".to_owned());
            format!(r#"{{"op":"subscribe","id":1,"events":{events},"since":{since}}}"#)
        }
        None => format!(r#"{{"op":"subscribe","id":1,"events":{events}}}"#),
    }
}

/// Opens a connection and waits for the reply to a plain `subscribe` to `pattern`, tracking any
/// event that follows it in the same read.
async fn subscribe(
    settings: &ClientSettings,
    pattern: &str,
    phase: &mut watch::Receiver<Phase>,
    tracker: &mut Tracker,
) -> Result<Conn, Failure> {
    let mut conn = Conn::open(settings, &subscribe_op(pattern, None)).await?;
    let mut acked = false;
    let mut refused = false;
    let subscribed = async {
        loop {
            let wake = conn
                .pump(phase, |message, _, _| match message {
                    Message::Subscribed { .. } => {
                        acked = true;
                        true
                    }
                    Message::Event { seq, id, .. } if acked => {
                        tracker.on_event(seq, id);
                        false
                    }
                    Message::Busy | Message::Error => {
                        refused = true;
                        true
                    }
                    _ => false,
                })
                .await?;
            if refused {
                return Err(Failure::from("the subscription was refused"));
            }
            if matches!(wake, Wake::Done) && acked {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(settings.handshake_timeout, subscribed)
        .await
        .map_err(|_| "no reply to subscribe".to_owned())??;
    Ok(conn)
}

/// One recovering client on `topic`: live through the warm-up, drops its connection at `Drop`,
/// reconnects with `since` at `Reconnect`, reads until its topic's last event at `Finish`.
pub(super) async fn recovering(
    settings: Arc<ClientSettings>,
    topic: Topic,
    mut phase: watch::Receiver<Phase>,
    progress: Arc<Progress>,
    connect_permits: Arc<Semaphore>,
) -> RecoveringReport {
    let mut report = RecoveringReport {
        topic,
        ..RecoveringReport::default()
    };
    let mut tracker = Tracker::new(topic.count);
    let outcome = run_recovering(
        &settings,
        topic,
        &mut phase,
        &progress,
        &connect_permits,
        &mut report,
        &mut tracker,
    )
    .await;
    report.after = tracker.order;
    report.unrecovered_skipped = tracker.skipped;
    report.anomalies = std::mem::take(&mut tracker.anomalies);
    report.last_seq = tracker.last;
    if let Err(error) = outcome {
        report.error = Some(error.to_string());
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
    report
}

async fn run_recovering(
    settings: &ClientSettings,
    topic: Topic,
    phase: &mut watch::Receiver<Phase>,
    progress: &Progress,
    connect_permits: &Semaphore,
    report: &mut RecoveringReport,
    tracker: &mut Tracker,
) -> Result<(), Failure> {
    let permit = connect_permits
        .acquire()
        .await
        .map_err(|_| "the run ended".to_owned())?;
    let pattern = topic.pattern();
    let mut conn = subscribe(settings, &pattern, phase, tracker).await?;
    drop(permit);
    progress.subscribed.fetch_add(1, Ordering::Relaxed);

    // Live until the drop.
    loop {
        let wake = conn
            .pump(phase, |message, _, _| {
                match message {
                    Message::Event { seq, id, .. } => tracker.on_event(seq, id),
                    Message::Unreadable => report.unreadable += 1,
                    _ => {}
                }
                false
            })
            .await?;
        match wake {
            Wake::Phase(Phase::Drop) => break,
            Wake::Phase(Phase::Finish { .. }) => return Err("finished before the drop".into()),
            _ => {}
        }
    }
    drop(conn);
    report.last_before_drop = tracker.last;
    report.before = std::mem::take(&mut tracker.order);
    progress.dropped.fetch_add(1, Ordering::Relaxed);

    let mark = loop {
        phase
            .changed()
            .await
            .map_err(|_| "the run ended".to_owned())?;
        match *phase.borrow_and_update() {
            Phase::Reconnect(mark) => break mark,
            Phase::Finish { .. } => return Err("finished before the reconnect".into()),
            _ => {}
        }
    };
    let mut finish: Option<(u64, tokio::time::Instant)> = None;
    loop {
        let outcome = reconnected(
            settings,
            topic,
            &pattern,
            phase,
            progress,
            report,
            tracker,
            mark,
            &mut finish,
        )
        .await;
        match outcome {
            Err(Failure::Closed(code)) if report.reconnects < settings.max_reconnects => {
                // As a client would: come back with the last event it got.
                report.reconnects += 1;
                report.closes.push(code);
                tokio::time::sleep(settings.busy_retry).await;
            }
            other => return other,
        }
    }
}

/// One connection after the reconnect: `subscribe` to `pattern` with `since` (repeated after
/// `busy`), then the replay and live events, until the topic's last event after `Finish`.
#[allow(clippy::too_many_arguments)]
async fn reconnected(
    settings: &ClientSettings,
    topic: Topic,
    pattern: &str,
    phase: &mut watch::Receiver<Phase>,
    progress: &Progress,
    report: &mut RecoveringReport,
    tracker: &mut Tracker,
    mark: Mark,
    finish: &mut Option<(u64, tokio::time::Instant)>,
) -> Result<(), Failure> {
    let since = tracker.last_id();
    let op = subscribe_op(pattern, since.as_deref());
    tracker.new_connection();
    let mut conn = Conn::open(settings, &op).await?;
    let live_lag_us = u64::try_from(settings.live_lag.as_micros()).unwrap_or(u64::MAX);
    let first_answer = report.ack.is_none();
    loop {
        let mut busy = false;
        let mut refused = false;
        let until = *finish;
        let pumped = conn.pump(phase, |message, now, now_us| match message {
            Message::Subscribed { recovered } => {
                if recovered != Some(true) {
                    report.not_recovered_answers += 1;
                }
                if first_answer {
                    report.recovered = recovered;
                    report.ack = Some(now - mark.at);
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
                tracker.resync = recovered != Some(true);
                false
            }
            Message::Busy => {
                busy = true;
                true
            }
            Message::Error => {
                refused = true;
                true
            }
            Message::Event { seq, t_us, id } => {
                report.first_after.get_or_insert(seq);
                tracker.on_event(seq, id);
                if seq < mark.published {
                    report.replayed += 1;
                } else if report.caught_up.is_none() {
                    report.caught_up = Some(now - mark.at);
                    progress.caught_up.fetch_add(1, Ordering::Relaxed);
                }
                if report.caught_up.is_some()
                    && report.live.is_none()
                    && now_us.saturating_sub(t_us) <= live_lag_us
                {
                    report.live = Some(now - mark.at);
                    progress.live.fetch_add(1, Ordering::Relaxed);
                }
                until.is_some_and(|(last, _)| seq >= last)
            }
            Message::Unreadable => {
                report.unreadable += 1;
                false
            }
            Message::Other => false,
        });
        let wake = match until {
            Some((_, deadline)) => tokio::time::timeout_at(deadline, pumped)
                .await
                .map_err(|_| "did not receive the last event in time".to_owned())??,
            None => pumped.await?,
        };
        if refused {
            return Err("the subscribe with since was refused".into());
        }
        if busy {
            report.busy_retries += 1;
            tokio::time::sleep(settings.busy_retry).await;
            conn.send_text(&op).await?;
            continue;
        }
        match wake {
            Wake::Done => return Ok(()),
            Wake::Phase(Phase::Finish { published }) => {
                match finish_at(topic, published, tracker, settings.finish_timeout) {
                    Some(until) => *finish = Some(until),
                    None => return Ok(()),
                }
            }
            Wake::Phase(_) => {}
        }
    }
}

/// After `Finish` with `published` events in all: the last event of `topic` the client still
/// waits for and until when, or `None` when it has it already (or none was published on it).
fn finish_at(
    topic: Topic,
    published: u64,
    tracker: &Tracker,
    timeout: Duration,
) -> Option<(u64, tokio::time::Instant)> {
    let last = topic.last_of(published)?;
    if tracker.last.is_some_and(|l| l >= last) {
        return None;
    }
    Some((last, tokio::time::Instant::now() + timeout))
}

/// One live subscriber on `topic`: subscribed throughout, sampling the latency of every event.
pub(super) async fn live(
    settings: Arc<ClientSettings>,
    topic: Topic,
    mut phase: watch::Receiver<Phase>,
    progress: Arc<Progress>,
) -> LiveReport {
    let mut report = LiveReport {
        topic,
        ..LiveReport::default()
    };
    let mut tracker = Tracker::new(topic.count);
    let outcome = run_live(
        &settings,
        topic,
        &mut phase,
        &progress,
        &mut report,
        &mut tracker,
    )
    .await;
    report.order = tracker.order;
    report.last_seq = tracker.last;
    if let Err(error) = outcome {
        report.error = Some(error.to_string());
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
    report
}

async fn run_live(
    settings: &ClientSettings,
    topic: Topic,
    phase: &mut watch::Receiver<Phase>,
    progress: &Progress,
    report: &mut LiveReport,
    tracker: &mut Tracker,
) -> Result<(), Failure> {
    let mut conn = subscribe(settings, &topic.pattern(), phase, tracker).await?;
    if let (Ok(addr), Ok(mut ports)) = (conn.stream.local_addr(), progress.live_ports.lock()) {
        ports.push(addr.port());
    }
    progress.subscribed.fetch_add(1, Ordering::Relaxed);
    let mut finish: Option<(u64, tokio::time::Instant)> = None;
    loop {
        let pumped = conn.pump(phase, |message, _, now_us| match message {
            Message::Event { seq, t_us, id } => {
                tracker.on_event(seq, id);
                let lag = u32::try_from(now_us.saturating_sub(t_us)).unwrap_or(u32::MAX);
                report.samples.push((now_us, lag));
                finish.is_some_and(|(last, _)| seq >= last)
            }
            Message::Unreadable => {
                report.unreadable += 1;
                false
            }
            _ => false,
        });
        let wake = match finish {
            Some((_, deadline)) => tokio::time::timeout_at(deadline, pumped)
                .await
                .map_err(|_| "did not receive the last event in time".to_owned())??,
            None => pumped.await?,
        };
        match wake {
            Wake::Done => return Ok(()),
            Wake::Phase(Phase::Finish { published }) => {
                match finish_at(topic, published, tracker, settings.finish_timeout) {
                    Some(until) => finish = Some(until),
                    None => return Ok(()),
                }
            }
            Wake::Phase(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_counts_gaps_and_duplicates() {
        let mut t = Tracker::default();
        for seq in [5, 6, 7, 7, 9, 8, 12] {
            t.on_event(seq, b"id");
        }
        assert_eq!(
            t.order,
            Order {
                received: 5,
                gaps: 2,
                missing: 3,
                duplicates: 2
            }
        );
        assert_eq!(t.last, Some(12));
        let kinds: Vec<(&str, u64, u64, u64)> = t
            .anomalies
            .iter()
            .map(|a| (a.kind, a.seq, a.last, a.on_connection))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("duplicate", 7, 7, 3),
                ("gap", 9, 7, 4),
                ("duplicate", 8, 9, 5),
                ("gap", 12, 9, 6)
            ]
        );
    }

    #[test]
    fn after_an_unrecovered_reconnect_the_skip_is_not_a_gap() {
        let mut t = Tracker::default();
        t.on_event(1, b"a");
        t.resync = true;
        t.on_event(100, b"b");
        t.on_event(101, b"c");
        assert_eq!(t.skipped, 98);
        assert_eq!(t.order.gaps, 0);
        assert_eq!(t.last_id().as_deref(), Some("c"));
    }

    #[test]
    fn on_a_topic_of_every_nth_event_in_order_is_no_gap() {
        let mut t = Tracker::new(10);
        for seq in [3, 13, 23, 33] {
            t.on_event(seq, b"id");
        }
        assert_eq!(
            t.order,
            Order {
                received: 4,
                ..Order::default()
            }
        );
        assert!(t.anomalies.is_empty());
        assert_eq!(t.last, Some(33));
    }

    #[test]
    fn on_a_topic_of_every_nth_event_gaps_count_the_topics_events() {
        let mut t = Tracker::new(10);
        // 23 and 33 are missing, then 53.
        for seq in [3, 13, 43, 63] {
            t.on_event(seq, b"id");
        }
        assert_eq!(
            t.order,
            Order {
                received: 4,
                gaps: 2,
                missing: 3,
                duplicates: 0
            }
        );
        let gaps: Vec<(&str, u64, u64)> = t
            .anomalies
            .iter()
            .map(|a| (a.kind, a.seq, a.last))
            .collect();
        assert_eq!(gaps, vec![("gap", 43, 13), ("gap", 63, 43)]);
    }

    #[test]
    fn on_a_topic_of_every_nth_event_a_repeat_or_an_older_event_is_a_duplicate() {
        let mut t = Tracker::new(4);
        for seq in [1, 5, 5, 1, 9] {
            t.on_event(seq, b"id");
        }
        assert_eq!(
            t.order,
            Order {
                received: 3,
                gaps: 0,
                missing: 0,
                duplicates: 2
            }
        );
        assert_eq!(t.last, Some(9));
    }

    #[test]
    fn on_a_topic_of_every_nth_event_an_unrecovered_skip_counts_the_topics_events() {
        let mut t = Tracker::new(5);
        t.on_event(2, b"a");
        t.resync = true;
        // 7, 12, ..., 97 skipped: 19 events of the topic.
        t.on_event(102, b"b");
        t.on_event(107, b"c");
        assert_eq!(t.skipped, 19);
        assert_eq!(t.order.gaps, 0);
        assert_eq!(t.order.received, 3);
    }

    #[test]
    fn finishing_waits_for_the_last_event_of_the_clients_topic() {
        let timeout = Duration::from_secs(1);
        let topic = Topic { index: 2, count: 5 };
        let mut t = Tracker::new(5);
        // 23 events published: the topic's last is 22.
        assert_eq!(finish_at(topic, 23, &t, timeout).map(|(l, _)| l), Some(22));
        t.on_event(17, b"a");
        assert_eq!(finish_at(topic, 23, &t, timeout).map(|(l, _)| l), Some(22));
        // 22 published: the topic's last is 17, already received.
        assert!(finish_at(topic, 22, &t, timeout).is_none());
        t.on_event(22, b"b");
        assert!(finish_at(topic, 23, &t, timeout).is_none());
        // Nothing published on the topic: nothing to wait for.
        assert!(finish_at(topic, 2, &Tracker::new(5), timeout).is_none());
        assert!(finish_at(topic, 0, &Tracker::new(5), timeout).is_none());
    }

    #[test]
    fn subscribe_ops() {
        assert_eq!(
            subscribe_op("bench.#", Some("0190-x")),
            r##"{"op":"subscribe","id":1,"events":["bench.#"],"since":"0190-x"}"##
        );
        assert_eq!(
            subscribe_op("bench.#", None),
            r##"{"op":"subscribe","id":1,"events":["bench.#"]}"##
        );
    }
}
