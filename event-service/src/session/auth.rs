//! A connection's authentication: its state (open, awaiting `auth`, anonymous, holding a
//! token), the `auth` and `refresh` requests, what it may subscribe to, the token's expiry and the
//! text-frame rate limit.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{MAX_INVALID_IN_ROW, Session};
use crate::{
    auth::Verified,
    protocol::{self, ClientOp, ErrorCode, RequestId},
    service_metrics::{DisconnectReason, FrameKind},
};
use eventrouter_contract::close;

/// Where a connection stands with authentication.
pub(super) enum AuthState {
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

pub(super) struct TokenState {
    pub(super) verified: Verified,
    /// When the connection is closed with 4003 unless a `refresh` comes first.
    pub(super) expires_at: Instant,
}

impl TokenState {
    pub(super) fn new(verified: Verified) -> Box<Self> {
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

impl Session {
    /// When the connection must be closed for authentication: the `auth` deadline or the
    /// token's expiry.
    pub(super) fn auth_deadline(&self) -> Option<Instant> {
        match &self.auth {
            AuthState::Awaiting { deadline } => *deadline,
            AuthState::Token(t) => Some(t.expires_at),
            AuthState::Open | AuthState::Anonymous => None,
        }
    }

    /// The patterns this connection may subscribe to now; `None` when anything goes.
    pub(super) fn grant(&self) -> Option<Arc<[String]>> {
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
    pub(super) fn take_frame_token(&mut self) -> bool {
        let rate = self.settings.frame_rate;
        if rate <= 0.0
            || self
                .frames
                .take(std::time::Instant::now(), rate, self.settings.frame_burst)
        {
            self.rate_limited_in_row = 0;
            return true;
        }
        self.metrics().frame(FrameKind::RateLimited);
        self.rate_limited_in_row = self.rate_limited_in_row.saturating_add(1);
        if u32::from(self.rate_limited_in_row) >= MAX_INVALID_IN_ROW {
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
    pub(super) fn refuse_and_close(
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
    pub(super) fn authenticate(&mut self, id: Option<RequestId>, token: &str) {
        let Some(auth) = self.settings.auth.clone() else {
            return;
        };
        match auth.verify(token) {
            Ok(verified) => {
                self.metrics().auth_checks.with_label_values(&["ok"]).inc();
                self.hub.reply(
                    &self.conn,
                    protocol::authenticated(id.as_ref(), verified.subject.as_deref(), verified.exp),
                );
                self.auth = AuthState::Token(TokenState::new(verified));
                self.reset_timer();
            }
            Err(error) => {
                self.metrics()
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

    /// A refused `refresh`: counted under `label`, answered `unauthorized`; the connection and
    /// its current token stay.
    fn refuse_refresh(&mut self, id: Option<&RequestId>, label: &str, message: &str) {
        self.metrics().auth_checks.with_label_values(&[label]).inc();
        self.hub.reply(
            &self.conn,
            protocol::error(id, ErrorCode::Unauthorized, message, &[]),
        );
    }

    /// `refresh`: a new token for the same subject. A failed one leaves the current token in
    /// place (it still expires when it would have). Subscriptions the new grant no longer covers
    /// are removed, and the reply lists them.
    pub(super) fn refresh(&mut self, id: Option<RequestId>, token: &str) {
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
                return self.refuse_refresh(
                    id.as_ref(),
                    "other_subject",
                    "the new token is for another subject; reconnect to change identity",
                );
            }
            Err(error) => {
                return self.refuse_refresh(id.as_ref(), error.label(), &error.to_string());
            }
        };
        self.metrics().auth_checks.with_label_values(&["ok"]).inc();
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

    /// Applies the authentication rules to a request: answers `auth` (only as the first
    /// message), refuses anything else before it when a token is required, and makes a client
    /// that starts without `auth` anonymous. Returns the request when it goes on to the queue.
    pub(super) fn auth_gate(&mut self, op: ClientOp) -> Option<ClientOp> {
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
                self.metrics()
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
}
