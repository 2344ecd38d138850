//! One client connection's task: it reads the socket for the connection's whole life, writes
//! queued frames in batches, pings, times out idle peers and samples its socket queues.
//!
//! A single task drives the WebSocket full duplex: each wake-up polls, in order, close requests,
//! the in-flight subscribe/unsubscribe, the writer (take everything queued, feed every frame,
//! flush once), the timer and the reader. Reading never waits for writing and vice versa, so a
//! client that stops reading still has everything it sends consumed (the origin failure was a
//! server that never read), and a client that floods requests cannot starve its own deliveries.
//!
//! Subscribe and unsubscribe run in spawned tasks, one at a time per connection and in order:
//! a bind at the broker can take a round trip, and the connection keeps reading meanwhile. A
//! spawned operation also cannot be cancelled half-way by the client leaving.

mod auth;
mod ops;
mod recover;

use auth::{AuthState, TokenState};
use ops::run_op;

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::{
    task::JoinHandle,
    time::{Instant, Sleep},
};
use tokio_tungstenite::tungstenite::{
    Error as WsError, Message, Utf8Bytes,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::{
    auth::{Auth, Verified},
    client_limits::TokenBucket,
    connection::{CloseRequest, ConnShared, Outgoing},
    hub::Hub,
    protocol::{self, ClientOp, ErrorCode},
    service_metrics::{DisconnectReason, FrameKind, ServiceMetrics},
    sockq,
    ws::Ws,
    ws_close,
};
use eventrouter_contract::close;

/// Invalid frames in a row (bad JSON, unknown op, bad request) before the connection is closed
/// with 1008: one mistake gets an error op, a client stuck in a loop of them gets disconnected.
pub const MAX_INVALID_IN_ROW: u32 = 10;

/// Requests a connection may have waiting behind its in-flight subscribe/unsubscribe; more get
/// the `busy` error op.
pub const MAX_PENDING_REQUESTS: usize = 32;

/// Replay slices the writer takes in one wake-up before yielding to the reader.
const REPLAY_ROUNDS_PER_WAKE: usize = 8;

/// How long the server waits for the client's close reply after sending a close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Settings a session needs, copied out of `Config` once per server.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub socket_sample_interval: Duration,
    /// Event frames may be written by group writers while the task is parked (see `direct`).
    pub direct_writes: bool,
    pub max_subscriptions: usize,
    pub max_pattern_length: usize,
    /// Connection tokens; `None` when authentication is off.
    pub auth: Option<Arc<Auth>>,
    /// Canonical patterns clients without a token may subscribe to.
    pub anonymous: Arc<[String]>,
    /// How long a client has to send `auth` when a token is required.
    pub auth_timeout: Duration,
    /// Text frames per second per connection (0: no limit) and the burst above it.
    pub frame_rate: f64,
    pub frame_burst: u32,
    /// Missed-event recovery: its bounds and the instance's concurrency gate.
    pub recovery: Arc<crate::history::Recovery>,
}

enum Step {
    Close(CloseRequest),
    OpDone,
    Incoming(Option<Result<Message, WsError>>),
    Timer,
    WriteFailed(WsError),
}

/// Drives one upgraded connection until it ends; resolves to why it ended. `token` is the token
/// the upgrade request's `Authorization` header carried, already verified (boxed: most
/// connections have none).
///
/// A hand-written future rather than an `async fn`: every handler is synchronous, and an async
/// state machine would keep its arguments beside the session it moved them into (the task's
/// memory is a large share of an idle connection's).
pub fn run(
    ws: Ws,
    conn: Arc<ConnShared>,
    hub: Arc<Hub>,
    settings: Arc<SessionSettings>,
    token: Option<Box<Verified>>,
) -> SessionTask {
    let now = Instant::now();
    let auth = match (&settings.auth, token) {
        (None, _) => AuthState::Open,
        (Some(_), Some(verified)) => AuthState::Token(TokenState::new(*verified)),
        (Some(_), None) => AuthState::Awaiting {
            deadline: settings
                .anonymous
                .is_empty()
                .then(|| now + settings.auth_timeout),
        },
    };
    SessionTask(Some(Session {
        direct_on: false,
        auth,
        frames: TokenBucket::full(settings.frame_burst, now.into_std()),
        rate_limited_in_row: 0,
        next_ping: now + settings.ping_interval,
        next_sample: now,
        last_rx: now,
        timer: Box::pin(tokio::time::sleep_until(now)),
        ws,
        conn,
        hub,
        settings,
        batch: VecDeque::new(),
        unflushed: false,
        replay_more: false,
        oldest_unflushed: None,
        inflight: None,
        pending: Vec::new(),
        invalid_in_row: 0,
        closing: None,
        peer_closed: false,
        sample_due: false,
    }))
}

/// The future [`run`] returns; it resolves to why the connection ended, and the connection.
/// `None` once it has resolved.
pub struct SessionTask(Option<Session>);

impl Future for SessionTask {
    type Output = (DisconnectReason, Arc<ConnShared>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(session) = self.0.as_mut() else {
            // Polled after it resolved: it never resolves again.
            return Poll::Pending;
        };
        loop {
            let step = std::task::ready!(session.poll_step(cx));
            if let Some(reason) = session.on_step(step) {
                let Some(session) = self.0.take() else {
                    return Poll::Pending;
                };
                let conn = session.conn.clone();
                session.finish();
                return Poll::Ready((reason, conn));
            }
        }
    }
}

impl Drop for SessionTask {
    /// Dropped unfinished (the runtime shutting down): direct writes into the socket end before
    /// the socket closes.
    fn drop(&mut self) {
        if let Some(session) = &self.0 {
            session.conn.stop_direct_for_good();
        }
    }
}

struct Session {
    /// Direct writes may be on (see `direct`): the task last parked with nothing buffered.
    direct_on: bool,
    auth: AuthState,
    /// The text-frame rate limit.
    frames: TokenBucket,
    rate_limited_in_row: u8,
    ws: Ws,
    conn: Arc<ConnShared>,
    hub: Arc<Hub>,
    settings: Arc<SessionSettings>,
    /// Frames taken from the queue and not yet handed to the WebSocket.
    batch: VecDeque<Outgoing>,
    unflushed: bool,
    /// The last take left part of a replay to take.
    replay_more: bool,
    oldest_unflushed: Option<SystemTime>,
    last_rx: Instant,
    next_ping: Instant,
    next_sample: Instant,
    timer: Pin<Box<Sleep>>,
    inflight: Option<JoinHandle<()>>,
    /// Requests waiting behind the in-flight one (at most [`MAX_PENDING_REQUESTS`]).
    pending: Vec<ClientOp>,
    invalid_in_row: u8,
    /// Set once the server sent a close frame: the deadline for the client's reply and why.
    closing: Option<Box<Closing>>,
    peer_closed: bool,
    /// The sample interval elapsed; sample once the reader has drained the socket.
    sample_due: bool,
}

/// A close the server started (boxed: a session spends almost all its life without one).
struct Closing {
    /// When the client's close reply is no longer waited for.
    deadline: Instant,
    why: DisconnectReason,
    /// A close frame the full write buffer refused; written to the socket at the end.
    unsent: Option<(u16, &'static str)>,
}

impl Session {
    /// Handles what [`Session::poll_step`] found; returns a reason when the connection ends.
    fn on_step(&mut self, step: Step) -> Option<DisconnectReason> {
        match step {
            Step::Close(CloseRequest::Drain) => self.start_close(
                close::GOING_AWAY,
                "server draining",
                DisconnectReason::Drain,
            ),
            Step::Close(CloseRequest::SlowConsumer) => self.start_close(
                close::SLOW_CONSUMER,
                "slow consumer: outbound queue full",
                DisconnectReason::SlowConsumer,
            ),
            Step::Close(CloseRequest::Rebalance) => self.start_close(
                close::REBALANCE,
                "rebalancing: reconnect now",
                DisconnectReason::Rebalance,
            ),
            Step::OpDone => self.start_next_op(),
            Step::Timer => return self.on_timer(),
            Step::WriteFailed(error) => {
                tracing::debug!(conn = self.conn.id, %error, "write failed");
                return Some(self.end_reason(DisconnectReason::Error));
            }
            Step::Incoming(None) => return Some(self.end_reason(DisconnectReason::ClientClosed)),
            Step::Incoming(Some(Err(error))) => {
                if self.closing.is_some() {
                    return Some(self.end_reason(DisconnectReason::Error));
                }
                if let WsError::ConnectionClosed | WsError::AlreadyClosed = error {
                    return Some(self.end_reason(DisconnectReason::ClientClosed));
                }
                tracing::debug!(conn = self.conn.id, %error, "read failed");
                // 1009 too big, 1007 not UTF-8, 1002 protocol violation; else nobody to tell.
                match ws_close::for_read_error(&error) {
                    Some(c) => self.start_close(c.code, c.reason, c.why),
                    None => return Some(self.end_reason(DisconnectReason::Error)),
                }
            }
            Step::Incoming(Some(Ok(message))) => {
                self.last_rx = Instant::now();
                self.on_message(message);
            }
        }
        None
    }

    /// The connection ended: subscriptions are removed by a task of their own (it waits for an
    /// in-flight subscribe to finish first, so nothing it binds is left behind), and the close
    /// handshake's bounded linger runs on its own too (the client reads the close frame before
    /// the socket closes: no reset while it still sends).
    fn finish(self) {
        let Session {
            mut ws,
            inflight,
            conn,
            hub,
            closing,
            ..
        } = self;
        // No direct write may touch the socket once the linger below owns it.
        conn.stop_direct_for_good();
        let unsent_close = closing.and_then(|c| c.unsent);
        conn.close_queue();
        let id = conn.id;
        tokio::spawn(async move {
            if let Some(op) = inflight {
                let _ = op.await;
            }
            hub.remove_connection(&conn).await;
        });
        tokio::spawn(async move { ws_close::finish(&mut ws, unsent_close, id).await });
    }

    /// Why the connection ended: the server's reason if it initiated the close, else `fallback`.
    fn end_reason(&self, fallback: DisconnectReason) -> DisconnectReason {
        match &self.closing {
            Some(c) => c.why,
            None if self.peer_closed => DisconnectReason::ClientClosed,
            None => fallback,
        }
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if self.direct_on {
            // A group writer may have written into the socket; from here on only this task does.
            self.conn.register_waker(cx.waker());
            match self.conn.stop_direct() {
                Ok(rest) => {
                    self.direct_on = false;
                    if let Some(rest) = rest {
                        self.ws.get_mut().set_prefix(rest);
                    }
                }
                // A writer is mid-write; it wakes this task when done.
                Err(()) => return Poll::Pending,
            }
        }
        if self.closing.is_none()
            && let Some(request) = self.conn.close_requested()
        {
            return Poll::Ready(Step::Close(request));
        }
        if let Some(op) = self.inflight.as_mut()
            && Pin::new(op).poll(cx).is_ready()
        {
            self.inflight = None;
            return Poll::Ready(Step::OpDone);
        }
        if let Err(error) = self.poll_write(cx) {
            return Poll::Ready(Step::WriteFailed(error));
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Step::Timer);
        }
        match self.ws.poll_next(cx) {
            Poll::Ready(incoming) => Poll::Ready(Step::Incoming(incoming)),
            Poll::Pending => {
                // Sampling right after the reader ran dry measures what the service is *not*
                // reading, not the frame that happened to arrive a moment before the timer.
                if self.sample_due {
                    self.sample_due = false;
                    self.sample_socket();
                }
                self.park_direct(cx);
                Poll::Pending
            }
        }
    }

    /// About to park: when nothing is buffered anywhere (queue, batch, the WebSocket layer, the
    /// socket wrapper), group writers may write frames straight into the socket until this task
    /// runs again (see `direct`).
    fn park_direct(&mut self, cx: &mut Context<'_>) {
        if !self.settings.direct_writes
            || self.closing.is_some()
            || self.peer_closed
            || self.unflushed
            || self.replay_more
            || !self.batch.is_empty()
        {
            return;
        }
        // Also writes out a pong the reader queued; Ready(Ok) means nothing is left buffered.
        if let Poll::Ready(Ok(())) = self.ws.poll_flush(cx) {
            self.direct_on = self.conn.start_direct(self.ws.fd());
        }
    }

    /// Takes everything queued, feeds it to the WebSocket and flushes once.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), WsError> {
        self.conn.register_waker(cx.waker());
        if self.closing.is_none() {
            let mut handed = 0usize;
            // A replay is taken a slice at a time: take again while the socket takes the bytes
            // (a bounded number of times, then yield so the reader gets its turn).
            for round in 0..REPLAY_ROUNDS_PER_WAKE {
                if self.batch.is_empty() {
                    self.replay_more = self.conn.take_all(&mut self.batch);
                }
                while !self.batch.is_empty() {
                    match self.ws.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => break,
                    }
                    let Some(out) = self.batch.pop_front() else {
                        break;
                    };
                    handed += out.frame.len();
                    if let Some(t) = out.published {
                        self.oldest_unflushed = Some(self.oldest_unflushed.map_or(t, |o| o.min(t)));
                    }
                    self.ws.start_send(Message::Text(out.frame))?;
                    self.unflushed = true;
                }
                // Socket full (woken when writable), or nothing left to take.
                if !self.replay_more || !self.batch.is_empty() {
                    break;
                }
                if round + 1 == REPLAY_ROUNDS_PER_WAKE {
                    cx.waker().wake_by_ref();
                }
            }
            if handed > 0 {
                self.conn.written(handed);
            }
            if self.batch.is_empty() && self.batch.capacity() > 0 {
                // An idle connection keeps no batch allocation (the next take brings the
                // queue's): it would be a large share of its memory.
                self.batch = VecDeque::new();
            }
        }
        if self.unflushed {
            match self.ws.poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    if let Some(t) = self.oldest_unflushed.take() {
                        let age = SystemTime::now().duration_since(t).unwrap_or_default();
                        self.metrics().delivery_latency.observe(age.as_secs_f64());
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Queues a frame straight into the WebSocket (pings, close); the next write pass flushes it.
    fn send_now(&mut self, message: Message) {
        match self.ws.start_send(message) {
            Ok(()) => self.unflushed = true,
            // The write buffer is full (a peer that does not read): the idle/slow-consumer rules
            // deal with that peer; a missed ping or close frame changes nothing.
            Err(error) => tracing::debug!(conn = self.conn.id, %error, "control frame not sent"),
        }
    }

    fn start_close(&mut self, code: u16, reason: &'static str, why: DisconnectReason) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(Box::new(Closing {
            deadline: Instant::now() + CLOSE_GRACE,
            why,
            unsent: None,
        }));
        self.conn.close_queue();
        self.batch = VecDeque::new();
        self.pending.clear();
        let frame = Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        }));
        match self.ws.start_send(frame) {
            Ok(()) => self.unflushed = true,
            // Written straight to the socket once the buffer ahead of it is flushed (`run`).
            Err(WsError::WriteBufferFull(_)) => {
                if let Some(c) = self.closing.as_mut() {
                    c.unsent = Some((code, reason));
                }
            }
            Err(error) => tracing::debug!(conn = self.conn.id, %error, "close frame not sent"),
        }
        self.reset_timer();
    }

    /// Handles the timer; returns a reason when the connection must end now.
    fn metrics(&self) -> &ServiceMetrics {
        self.hub.metrics()
    }

    fn on_timer(&mut self) -> Option<DisconnectReason> {
        let now = Instant::now();
        if let Some(c) = &self.closing {
            if now >= c.deadline {
                return Some(c.why);
            }
        } else if self.auth_deadline().is_some_and(|d| now >= d) {
            if matches!(self.auth, AuthState::Token(_)) {
                self.start_close(
                    close::TOKEN_EXPIRED,
                    "token expired",
                    DisconnectReason::TokenExpired,
                );
            } else {
                self.start_close(
                    close::AUTH_TIMEOUT,
                    "authentication timeout: send {\"op\":\"auth\"} first",
                    DisconnectReason::AuthTimeout,
                );
            }
        } else if now >= self.last_rx + self.settings.idle_timeout {
            self.start_close(
                close::IDLE_TIMEOUT,
                "idle timeout",
                DisconnectReason::IdleTimeout,
            );
        } else if now >= self.next_ping {
            self.send_now(Message::Ping(Default::default()));
            self.next_ping = now + self.settings.ping_interval;
        }
        if now >= self.next_sample {
            self.sample_due = true;
            self.next_sample = now + self.settings.socket_sample_interval;
        }
        self.reset_timer();
        None
    }

    fn reset_timer(&mut self) {
        let mut next = self.next_sample;
        match &self.closing {
            Some(c) => next = next.min(c.deadline),
            None => {
                next = next
                    .min(self.next_ping)
                    .min(self.last_rx + self.settings.idle_timeout);
                if let Some(d) = self.auth_deadline() {
                    next = next.min(d);
                }
            }
        }
        self.timer.as_mut().reset(next);
    }

    fn sample_socket(&self) {
        match sockq::sample(self.ws.fd()) {
            Ok(depth) => self.conn.store_socket_sample(depth.recv_q, depth.send_q),
            Err(error) => {
                tracing::debug!(conn = self.conn.id, %error, "socket queue sample failed")
            }
        }
    }

    fn on_message(&mut self, message: Message) {
        if self.closing.is_some() {
            // Everything is still read (and discarded) until the close handshake finishes.
            return;
        }
        match message {
            Message::Text(text) => {
                if self.take_frame_token() {
                    self.on_text(text.as_str());
                }
            }
            Message::Binary(_) => {
                self.metrics().frame(FrameKind::Binary);
                self.start_close(
                    close::UNSUPPORTED_DATA,
                    "binary frames are not supported; send JSON text",
                    DisconnectReason::Binary,
                );
            }
            // tungstenite queues the pong itself; it goes out with the next read or write.
            Message::Ping(_) => self.metrics().frame(FrameKind::WsPing),
            Message::Pong(_) => self.metrics().frame(FrameKind::WsPong),
            Message::Close(_) => {
                self.metrics().frame(FrameKind::Close);
                self.peer_closed = true;
            }
            Message::Frame(_) => {}
        }
    }

    fn on_text(&mut self, text: &str) {
        match protocol::parse_client_frame(text, self.settings.max_subscriptions) {
            Ok(op) => {
                self.invalid_in_row = 0;
                self.metrics().frame(match op {
                    ClientOp::Subscribe { .. } => FrameKind::Subscribe,
                    ClientOp::Unsubscribe { .. } => FrameKind::Unsubscribe,
                    ClientOp::Ping { .. } => FrameKind::Ping,
                    ClientOp::Auth { .. } => FrameKind::Auth,
                    ClientOp::Refresh { .. } => FrameKind::Refresh,
                });
                if let Some(op) = self.auth_gate(op) {
                    self.queue_op(op);
                }
            }
            Err(error) => {
                self.metrics().frame(FrameKind::Invalid);
                self.invalid_in_row = self.invalid_in_row.saturating_add(1);
                if u32::from(self.invalid_in_row) >= MAX_INVALID_IN_ROW {
                    self.start_close(
                        close::POLICY,
                        "too many invalid frames",
                        DisconnectReason::Abuse,
                    );
                    return;
                }
                self.hub.reply(
                    &self.conn,
                    protocol::error(error.id.as_ref(), error.code, &error.message, &[]),
                );
            }
        }
    }

    fn queue_op(&mut self, op: ClientOp) {
        if self.pending.len() >= MAX_PENDING_REQUESTS {
            self.hub.reply(
                &self.conn,
                protocol::error(
                    op.id(),
                    ErrorCode::Busy,
                    "too many requests in progress on this connection; wait for replies",
                    &[],
                ),
            );
            return;
        }
        if self.inflight.is_none() && self.pending.is_empty() {
            // Nothing ahead of it: no queue (and no queue allocation kept afterwards).
            self.start_op(op);
        } else {
            self.pending.push(op);
        }
    }

    /// Starts queued requests in order: pings are answered at once (in their turn), subscribe
    /// and unsubscribe run one at a time in a task.
    fn start_next_op(&mut self) {
        while self.inflight.is_none() {
            if self.pending.is_empty() {
                if self.pending.capacity() > 0 {
                    self.pending = Vec::new();
                }
                return;
            }
            // At most MAX_PENDING_REQUESTS: shifting them is cheaper than a deque's 8 bytes
            // more in every connection.
            let op = self.pending.remove(0);
            self.start_op(op);
        }
    }

    /// Answers a ping or refresh at once; starts a subscribe or unsubscribe task.
    fn start_op(&mut self, op: ClientOp) {
        match op {
            ClientOp::Ping { id } => self.hub.reply(&self.conn, protocol::pong(id.as_ref())),
            ClientOp::Refresh { id, token } => self.refresh(id, &token),
            // Answered as it arrives (see `on_text`), never queued.
            ClientOp::Auth { .. } => {}
            op => {
                let (hub, conn, settings) =
                    (self.hub.clone(), self.conn.clone(), self.settings.clone());
                let grant = self.grant();
                self.inflight = Some(tokio::spawn(async move {
                    run_op(&hub, &conn, &settings, grant, op).await;
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session is most of an idle connection's task, which is most of its memory
    /// (BENCHMARKS.md, memory per idle connection): growing it is a decision, not an accident.
    /// tokio allocates a task in steps of 128 bytes (cache-line aligned) with ~104 bytes of its
    /// own; the connection's task adds 16 to the session: a release build's 520 bytes keep the
    /// task at 640, 17 more would make it 768. Debug builds lay it out 8 bytes larger.
    #[test]
    fn the_session_stays_within_its_memory_budget() {
        let size = std::mem::size_of::<SessionTask>();
        let budget = if cfg!(debug_assertions) { 528 } else { 520 };
        assert!(
            size <= budget,
            "SessionTask is {size} bytes; the budget is {budget}"
        );
    }
}
