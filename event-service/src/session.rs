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

use std::{
    collections::VecDeque,
    os::fd::RawFd,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures_util::{SinkExt, StreamExt, future::poll_fn};
use tokio::{
    net::TcpStream,
    task::JoinHandle,
    time::{Instant, Sleep},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Error as WsError, Message, Utf8Bytes,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use crate::{
    auth::{Auth, Verified},
    client_limits::TokenBucket,
    connection::{CloseRequest, ConnShared, Outgoing},
    hub::Hub,
    protocol::{self, ClientOp, ErrorCode, RequestId},
    service_metrics::{DisconnectReason, FrameKind, ServiceMetrics},
    sockq,
    topics::{self, PatternError},
    ws_close,
};
use eventrouter_contract::close;

/// Invalid frames in a row (bad JSON, unknown op, bad request) before the connection is closed
/// with 1008: one mistake gets an error op, a client stuck in a loop of them gets disconnected.
pub const MAX_INVALID_IN_ROW: u32 = 10;

/// Requests a connection may have waiting behind its in-flight subscribe/unsubscribe; more get
/// the `busy` error op.
pub const MAX_PENDING_REQUESTS: usize = 32;

/// How long the server waits for the client's close reply after sending a close frame.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Settings a session needs, copied out of `Config` once per server.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub socket_sample_interval: Duration,
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
}

/// Where a connection stands with authentication.
enum AuthState {
    /// Authentication is off: every valid pattern may be subscribed to.
    Open,
    /// On, and no token yet: the first message may be `auth`. With anonymous access off the
    /// client must send it before the deadline.
    Awaiting { deadline: Option<Instant> },
    /// On, and the client chose not to authenticate: the anonymous patterns apply.
    Anonymous,
    /// A verified token (boxed: most connections of a server without auth never hold one).
    Token(Box<TokenState>),
}

struct TokenState {
    verified: Verified,
    /// When the connection is closed with 4003 unless a `refresh` comes first.
    expires_at: Instant,
}

impl TokenState {
    fn new(verified: Verified) -> Box<Self> {
        let left = verified
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Box::new(Self {
            expires_at: Instant::now() + left,
            verified,
        })
    }
}

enum Step {
    Close(CloseRequest),
    OpDone,
    Incoming(Option<Result<Message, WsError>>),
    Timer,
    WriteFailed(WsError),
}

/// Drives one upgraded connection until it ends; returns why it ended. `token` is the token the
/// upgrade request's `Authorization` header carried, already verified.
pub async fn run(
    ws: WebSocketStream<TcpStream>,
    fd: RawFd,
    conn: Arc<ConnShared>,
    hub: Arc<Hub>,
    metrics: ServiceMetrics,
    settings: Arc<SessionSettings>,
    token: Option<Verified>,
) -> DisconnectReason {
    let now = Instant::now();
    let auth = match (&settings.auth, token) {
        (None, _) => AuthState::Open,
        (Some(_), Some(verified)) => AuthState::Token(TokenState::new(verified)),
        (Some(_), None) => AuthState::Awaiting {
            deadline: settings
                .anonymous
                .is_empty()
                .then(|| now + settings.auth_timeout),
        },
    };
    let mut session = Session {
        auth,
        frames: TokenBucket::full(settings.frame_burst, now.into_std()),
        rate_limited_in_row: 0,
        next_ping: now + settings.ping_interval,
        next_sample: now,
        last_rx: now,
        timer: Box::pin(tokio::time::sleep_until(now)),
        ws,
        fd,
        conn,
        hub,
        metrics,
        settings,
        batch: VecDeque::new(),
        unflushed: false,
        oldest_unflushed: None,
        inflight: None,
        pending: VecDeque::new(),
        invalid_in_row: 0,
        closing: None,
        peer_closed: false,
        sample_due: false,
        unsent_close: None,
    };
    let reason = session.drive().await;
    // Subscriptions are removed by a task of their own: it waits for an in-flight subscribe to
    // finish first, so nothing it binds is left behind.
    let Session {
        mut ws,
        inflight,
        conn,
        hub,
        unsent_close,
        ..
    } = session;
    conn.close_queue();
    let id = conn.id;
    tokio::spawn(async move {
        if let Some(op) = inflight {
            let _ = op.await;
        }
        hub.remove_connection(&conn).await;
    });
    // The client reads the close frame before the socket closes (no reset while it still
    // sends). The session is over: that bounded linger runs on its own and is not waited for.
    tokio::spawn(async move { ws_close::finish(&mut ws, unsent_close, id).await });
    reason
}

struct Session {
    auth: AuthState,
    /// The text-frame rate limit.
    frames: TokenBucket,
    rate_limited_in_row: u32,
    ws: WebSocketStream<TcpStream>,
    fd: RawFd,
    conn: Arc<ConnShared>,
    hub: Arc<Hub>,
    metrics: ServiceMetrics,
    settings: Arc<SessionSettings>,
    /// Frames taken from the queue and not yet handed to the WebSocket.
    batch: VecDeque<Outgoing>,
    unflushed: bool,
    oldest_unflushed: Option<SystemTime>,
    last_rx: Instant,
    next_ping: Instant,
    next_sample: Instant,
    timer: Pin<Box<Sleep>>,
    inflight: Option<JoinHandle<()>>,
    pending: VecDeque<ClientOp>,
    invalid_in_row: u32,
    /// Set once the server sent a close frame: the deadline for the client's reply and why.
    closing: Option<(Instant, DisconnectReason)>,
    peer_closed: bool,
    /// The sample interval elapsed; sample once the reader has drained the socket.
    sample_due: bool,
    /// A close frame the full write buffer refused; written to the socket at the end.
    unsent_close: Option<(u16, &'static str)>,
}

impl Session {
    async fn drive(&mut self) -> DisconnectReason {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
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
                Step::Timer => {
                    if let Some(reason) = self.on_timer() {
                        return reason;
                    }
                }
                Step::WriteFailed(error) => {
                    tracing::debug!(conn = self.conn.id, %error, "write failed");
                    return self.end_reason(DisconnectReason::Error);
                }
                Step::Incoming(None) => return self.end_reason(DisconnectReason::ClientClosed),
                Step::Incoming(Some(Err(error))) => {
                    if self.closing.is_some() {
                        return self.end_reason(DisconnectReason::Error);
                    }
                    if let WsError::ConnectionClosed | WsError::AlreadyClosed = error {
                        return self.end_reason(DisconnectReason::ClientClosed);
                    }
                    tracing::debug!(conn = self.conn.id, %error, "read failed");
                    // 1009 too big, 1007 not UTF-8, 1002 protocol violation; else nobody to tell.
                    match ws_close::for_read_error(&error) {
                        Some(c) => self.start_close(c.code, c.reason, c.why),
                        None => return self.end_reason(DisconnectReason::Error),
                    }
                }
                Step::Incoming(Some(Ok(message))) => {
                    self.last_rx = Instant::now();
                    self.on_message(message);
                }
            }
        }
    }

    /// Why the connection ended: the server's reason if it initiated the close, else `fallback`.
    fn end_reason(&self, fallback: DisconnectReason) -> DisconnectReason {
        match self.closing {
            Some((_, reason)) => reason,
            None if self.peer_closed => DisconnectReason::ClientClosed,
            None => fallback,
        }
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
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
        match self.ws.poll_next_unpin(cx) {
            Poll::Ready(incoming) => Poll::Ready(Step::Incoming(incoming)),
            Poll::Pending => {
                // Sampling right after the reader ran dry measures what the service is *not*
                // reading, not the frame that happened to arrive a moment before the timer.
                if self.sample_due {
                    self.sample_due = false;
                    self.sample_socket();
                }
                Poll::Pending
            }
        }
    }

    /// Takes everything queued, feeds it to the WebSocket and flushes once.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), WsError> {
        self.conn.register_waker(cx.waker());
        if self.closing.is_none() {
            if self.batch.is_empty() {
                self.conn.take_all(&mut self.batch);
            }
            let mut handed = 0usize;
            while !self.batch.is_empty() {
                match self.ws.poll_ready_unpin(cx) {
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
                self.ws.start_send_unpin(Message::Text(out.frame))?;
                self.unflushed = true;
            }
            if handed > 0 {
                self.conn.written(handed);
            }
            if self.batch.is_empty() && self.batch.capacity() > 256 {
                // A burst grew the batch; an idle connection should not keep that memory.
                self.batch = VecDeque::new();
            }
        }
        if self.unflushed {
            match self.ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    if let Some(t) = self.oldest_unflushed.take() {
                        let age = SystemTime::now().duration_since(t).unwrap_or_default();
                        self.metrics.delivery_latency.observe(age.as_secs_f64());
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
        match self.ws.start_send_unpin(message) {
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
        self.closing = Some((Instant::now() + CLOSE_GRACE, why));
        self.conn.close_queue();
        self.batch = VecDeque::new();
        self.pending.clear();
        let frame = Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        }));
        match self.ws.start_send_unpin(frame) {
            Ok(()) => self.unflushed = true,
            // Written straight to the socket once the buffer ahead of it is flushed (`run`).
            Err(WsError::WriteBufferFull(_)) => self.unsent_close = Some((code, reason)),
            Err(error) => tracing::debug!(conn = self.conn.id, %error, "close frame not sent"),
        }
        self.reset_timer();
    }

    /// Handles the timer; returns a reason when the connection must end now.
    fn on_timer(&mut self) -> Option<DisconnectReason> {
        let now = Instant::now();
        if let Some((deadline, why)) = self.closing {
            if now >= deadline {
                return Some(why);
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
        match self.closing {
            Some((deadline, _)) => next = next.min(deadline),
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

    /// When the connection must be closed for authentication: the `auth` deadline or the
    /// token's expiry.
    fn auth_deadline(&self) -> Option<Instant> {
        match &self.auth {
            AuthState::Awaiting { deadline } => *deadline,
            AuthState::Token(t) => Some(t.expires_at),
            AuthState::Open | AuthState::Anonymous => None,
        }
    }

    /// The patterns this connection may subscribe to now; `None` when anything goes.
    fn grant(&self) -> Option<Arc<[String]>> {
        match &self.auth {
            AuthState::Open => None,
            AuthState::Awaiting { .. } | AuthState::Anonymous => {
                Some(self.settings.anonymous.clone())
            }
            AuthState::Token(t) => Some(t.verified.grant.clone()),
        }
    }

    /// Takes a token of the frame rate; refuses the frame (an error op, then 1008 after
    /// [`MAX_INVALID_IN_ROW`] in a row) when there is none.
    fn take_frame_token(&mut self) -> bool {
        let rate = self.settings.frame_rate;
        if rate <= 0.0
            || self
                .frames
                .take(std::time::Instant::now(), rate, self.settings.frame_burst)
        {
            self.rate_limited_in_row = 0;
            return true;
        }
        self.metrics.frame(FrameKind::RateLimited);
        self.rate_limited_in_row += 1;
        if self.rate_limited_in_row >= MAX_INVALID_IN_ROW {
            self.start_close(
                close::POLICY,
                "frame rate limit exceeded",
                DisconnectReason::RateLimited,
            );
        } else {
            self.hub.reply(
                &self.conn,
                protocol::error(
                    None,
                    ErrorCode::RateLimited,
                    &format!(
                        "more than {rate} frames per second; this frame was ignored, slow down"
                    ),
                    &[],
                ),
            );
        }
        false
    }

    /// Sends an error op and a close frame at once (the queue is discarded by the close).
    fn refuse_and_close(
        &mut self,
        error: String,
        code: u16,
        reason: &'static str,
        why: DisconnectReason,
    ) {
        self.send_now(Message::Text(error.into()));
        self.start_close(code, reason, why);
    }

    /// The first message was `auth`: verify, then authenticated or closed with 4004.
    fn authenticate(&mut self, id: Option<RequestId>, token: &str) {
        let Some(auth) = self.settings.auth.clone() else {
            return;
        };
        match auth.verify(token) {
            Ok(verified) => {
                self.metrics.auth_checks.with_label_values(&["ok"]).inc();
                self.hub.reply(
                    &self.conn,
                    protocol::authenticated(id.as_ref(), verified.subject.as_deref(), verified.exp),
                );
                self.auth = AuthState::Token(TokenState::new(verified));
                self.reset_timer();
            }
            Err(error) => {
                self.metrics
                    .auth_checks
                    .with_label_values(&[error.label()])
                    .inc();
                let reply = protocol::error(
                    id.as_ref(),
                    ErrorCode::Unauthorized,
                    &error.to_string(),
                    &[],
                );
                self.refuse_and_close(
                    reply,
                    close::UNAUTHORIZED,
                    "unauthorized",
                    DisconnectReason::Unauthorized,
                );
            }
        }
    }

    /// `refresh`: a new token for the same subject. A failed one leaves the current token in
    /// place (it still expires when it would have). Subscriptions the new grant no longer covers
    /// are removed, and the reply lists them.
    fn refresh(&mut self, id: Option<RequestId>, token: &str) {
        let (Some(auth), AuthState::Token(current)) = (self.settings.auth.clone(), &self.auth)
        else {
            let message = match self.auth {
                AuthState::Open => "authentication is off on this server",
                _ => {
                    "no token to refresh: authenticate with {\"op\":\"auth\"} as the first message"
                }
            };
            self.hub.reply(
                &self.conn,
                protocol::error(id.as_ref(), ErrorCode::InvalidRequest, message, &[]),
            );
            return;
        };
        let verified = match auth.verify(token) {
            Ok(v) if v.subject == current.verified.subject => v,
            Ok(_) => {
                self.metrics
                    .auth_checks
                    .with_label_values(&["other_subject"])
                    .inc();
                self.hub.reply(
                    &self.conn,
                    protocol::error(
                        id.as_ref(),
                        ErrorCode::Unauthorized,
                        "the new token is for another subject; reconnect to change identity",
                        &[],
                    ),
                );
                return;
            }
            Err(error) => {
                self.metrics
                    .auth_checks
                    .with_label_values(&[error.label()])
                    .inc();
                self.hub.reply(
                    &self.conn,
                    protocol::error(
                        id.as_ref(),
                        ErrorCode::Unauthorized,
                        &error.to_string(),
                        &[],
                    ),
                );
                return;
            }
        };
        self.metrics.auth_checks.with_label_values(&["ok"]).inc();
        let removed: Vec<String> = crate::connection::lock(&self.conn.patterns)
            .iter()
            .filter(|p| !verified.allows(p))
            .map(|p| p.to_string())
            .collect();
        let exp = verified.exp;
        self.auth = AuthState::Token(TokenState::new(verified));
        self.reset_timer();
        if removed.is_empty() {
            self.hub
                .reply(&self.conn, protocol::refreshed(id.as_ref(), exp, &[]));
            return;
        }
        let (hub, conn) = (self.hub.clone(), self.conn.clone());
        self.inflight = Some(tokio::spawn(async move {
            for pattern in &removed {
                hub.unsubscribe(&conn, pattern).await;
            }
            hub.reply(&conn, protocol::refreshed(id.as_ref(), exp, &removed));
        }));
    }

    fn sample_socket(&self) {
        match sockq::sample(self.fd) {
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
                self.metrics.frame(FrameKind::Binary);
                self.start_close(
                    close::UNSUPPORTED_DATA,
                    "binary frames are not supported; send JSON text",
                    DisconnectReason::Binary,
                );
            }
            // tungstenite queues the pong itself; it goes out with the next read or write.
            Message::Ping(_) => self.metrics.frame(FrameKind::WsPing),
            Message::Pong(_) => self.metrics.frame(FrameKind::WsPong),
            Message::Close(_) => {
                self.metrics.frame(FrameKind::Close);
                self.peer_closed = true;
            }
            Message::Frame(_) => {}
        }
    }

    fn on_text(&mut self, text: &str) {
        match protocol::parse_client_frame(text, self.settings.max_subscriptions) {
            Ok(op) => {
                self.invalid_in_row = 0;
                self.metrics.frame(match op {
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
                self.metrics.frame(FrameKind::Invalid);
                self.invalid_in_row += 1;
                if self.invalid_in_row >= MAX_INVALID_IN_ROW {
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

    /// Applies the authentication rules to a request: answers `auth` (only as the first
    /// message), refuses anything else before it when a token is required, and makes a client
    /// that starts without `auth` anonymous. Returns the request when it goes on to the queue.
    fn auth_gate(&mut self, op: ClientOp) -> Option<ClientOp> {
        match (&self.auth, op) {
            (AuthState::Awaiting { .. }, ClientOp::Auth { id, token }) => {
                self.authenticate(id, &token);
                None
            }
            (state, ClientOp::Auth { id, .. }) => {
                let message = match state {
                    AuthState::Open => "authentication is off on this server",
                    _ => "auth must be the first message; send refresh to replace a token",
                };
                self.hub.reply(
                    &self.conn,
                    protocol::error(id.as_ref(), ErrorCode::InvalidRequest, message, &[]),
                );
                None
            }
            (AuthState::Awaiting { .. }, op) if self.settings.anonymous.is_empty() => {
                let reply = protocol::error(
                    op.id(),
                    ErrorCode::Unauthorized,
                    "authentication required: send {\"op\":\"auth\",\"token\":\"…\"} first",
                    &[],
                );
                self.metrics
                    .auth_checks
                    .with_label_values(&["missing"])
                    .inc();
                self.refuse_and_close(
                    reply,
                    close::UNAUTHORIZED,
                    "authentication required",
                    DisconnectReason::Unauthorized,
                );
                None
            }
            (state, op) => {
                if matches!(state, AuthState::Awaiting { .. }) {
                    self.auth = AuthState::Anonymous;
                }
                Some(op)
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
        self.pending.push_back(op);
        self.start_next_op();
    }

    /// Starts queued requests in order: pings are answered at once (in their turn), subscribe
    /// and unsubscribe run one at a time in a task.
    fn start_next_op(&mut self) {
        while self.inflight.is_none() {
            let Some(op) = self.pending.pop_front() else {
                return;
            };
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
}

/// Validates a request's patterns; returns `(as sent, canonical)` pairs or the error reply.
fn check_patterns(
    events: Vec<String>,
    max_len: usize,
) -> Result<Vec<(String, String)>, (ErrorCode, String)> {
    events
        .into_iter()
        .map(|p| match topics::validate_pattern(&p, max_len) {
            Ok(()) => {
                let canon = topics::canonical(&p);
                Ok((p, canon))
            }
            Err(e @ PatternError::TooLong { .. }) => {
                Err((ErrorCode::PatternTooLong, format!("{e}")))
            }
            // The pattern as the client sent it (the JSON encoder escapes what needs escaping),
            // not Rust's `Debug` rendering, which is no part of the protocol.
            Err(e) => Err((ErrorCode::InvalidPattern, format!("pattern '{p}': {e}"))),
        })
        .collect()
}

async fn run_op(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    settings: &SessionSettings,
    grant: Option<Arc<[String]>>,
    op: ClientOp,
) {
    let (id, events, subscribe) = match op {
        ClientOp::Subscribe { id, events } => (id, events, true),
        ClientOp::Unsubscribe { id, events } => (id, events, false),
        ClientOp::Ping { id } => {
            hub.reply(conn, protocol::pong(id.as_ref()));
            return;
        }
        ClientOp::Auth { .. } | ClientOp::Refresh { .. } => return,
    };
    let mut patterns = match check_patterns(events, settings.max_pattern_length) {
        Ok(p) => p,
        Err((code, message)) => {
            hub.reply(conn, protocol::error(id.as_ref(), code, &message, &[]));
            return;
        }
    };
    if subscribe && let Some(grant) = grant {
        let (allowed, forbidden): (Vec<_>, Vec<_>) = patterns
            .into_iter()
            .partition(|(_, canon)| crate::auth::containment::allowed(&grant, canon));
        if !forbidden.is_empty() {
            let sent: Vec<String> = forbidden.into_iter().map(|(p, _)| p).collect();
            let message = format!("not granted to this connection: {}", sent.join(", "));
            hub.reply(
                conn,
                protocol::error(id.as_ref(), ErrorCode::Forbidden, &message, &sent),
            );
        }
        if allowed.is_empty() {
            return;
        }
        patterns = allowed;
    }
    if subscribe {
        subscribe_all(hub, conn, settings, id.as_ref(), patterns).await;
    } else {
        for (_, canon) in &patterns {
            hub.unsubscribe(conn, canon).await;
        }
        let sent: Vec<String> = patterns.into_iter().map(|(p, _)| p).collect();
        hub.reply(conn, protocol::unsubscribed(id.as_ref(), &sent));
    }
}

async fn subscribe_all(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    settings: &SessionSettings,
    id: Option<&RequestId>,
    patterns: Vec<(String, String)>,
) {
    let new: usize = {
        let held = crate::connection::lock(&conn.patterns);
        let mut fresh: Vec<&str> = patterns
            .iter()
            .map(|(_, c)| c.as_str())
            .filter(|c| !held.iter().any(|h| &**h == *c))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if held.len() + fresh.len() > settings.max_subscriptions {
            let message = format!(
                "this connection holds {} patterns; {} more would exceed the limit of {}",
                held.len(),
                fresh.len(),
                settings.max_subscriptions
            );
            drop(held);
            hub.reply(
                conn,
                protocol::error(id, ErrorCode::TooManySubscriptions, &message, &[]),
            );
            return;
        }
        fresh.len()
    };
    tracing::trace!(conn = conn.id, new, "subscribing");
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    let mut last_error = None;
    for (sent, canon) in patterns {
        match hub.subscribe(conn, &canon).await {
            Ok(()) => ok.push(sent),
            Err(error) => {
                tracing::warn!(conn = conn.id, pattern = %canon, %error, "bind failed");
                last_error = Some(error);
                failed.push(sent);
            }
        }
    }
    if !ok.is_empty() {
        hub.reply(conn, protocol::subscribed(id, &ok));
    }
    if let Some(error) = last_error {
        hub.reply(
            conn,
            protocol::error(id, ErrorCode::Unavailable, &error.to_string(), &failed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_pattern_message_quotes_the_pattern_as_sent() {
        let Err((code, message)) = check_patterns(vec!["order*".to_owned()], 64) else {
            panic!("'order*' is not a valid pattern");
        };
        assert_eq!(code, ErrorCode::InvalidPattern);
        assert!(
            message.starts_with("pattern 'order*': "),
            "unexpected message: {message}"
        );
    }
}
