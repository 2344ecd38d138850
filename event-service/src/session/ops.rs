//! The subscribe and unsubscribe requests, run in a task of their own per connection: pattern
//! checks, the grant check, the source's bindings and the replies.

use std::sync::Arc;

use super::SessionSettings;
use crate::{
    connection::ConnShared,
    hub::Hub,
    protocol::{self, ClientOp, ErrorCode, RequestId},
    topics::{self, PatternError},
};

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

pub(super) async fn run_op(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    settings: &SessionSettings,
    grant: Option<Arc<[String]>>,
    op: ClientOp,
) {
    let (id, events, subscribe, since) = match op {
        ClientOp::Subscribe { id, events, since } => (id, events, true, since),
        ClientOp::Unsubscribe { id, events } => (id, events, false, None),
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
    if let Some(since) = since {
        super::recover::subscribe_since(hub, conn, settings, id.as_ref(), patterns, since).await;
    } else if subscribe {
        subscribe_all(hub, conn, settings, id.as_ref(), patterns).await;
    } else {
        for (_, canon) in &patterns {
            hub.unsubscribe(conn, canon).await;
        }
        let sent: Vec<String> = patterns.into_iter().map(|(p, _)| p).collect();
        hub.reply(conn, protocol::unsubscribed(id.as_ref(), &sent));
    }
}

/// Checks that `patterns` fit the connection's subscription limit; the error reply otherwise.
pub(super) fn check_room(
    conn: &ConnShared,
    settings: &SessionSettings,
    patterns: &[(String, String)],
) -> Result<(), String> {
    let held = crate::connection::lock(&conn.patterns);
    let mut fresh: Vec<&str> = patterns
        .iter()
        .map(|(_, c)| c.as_str())
        .filter(|c| !held.iter().any(|h| &**h == *c))
        .collect();
    fresh.sort_unstable();
    fresh.dedup();
    if held.len() + fresh.len() > settings.max_subscriptions {
        return Err(format!(
            "this connection holds {} patterns; {} more would exceed the limit of {}",
            held.len(),
            fresh.len(),
            settings.max_subscriptions
        ));
    }
    Ok(())
}

/// What binding a request's patterns did.
pub(super) struct Bound {
    /// The patterns as sent, then canonical, that are subscribed now.
    pub ok: Vec<(String, String)>,
    pub failed: Vec<String>,
    pub last_error: Option<crate::source::SourceError>,
}

/// Subscribes `conn` to every pattern (binding at the source where needed).
pub(super) async fn bind_all(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    patterns: Vec<(String, String)>,
) -> Bound {
    let mut bound = Bound {
        ok: Vec::new(),
        failed: Vec::new(),
        last_error: None,
    };
    for (sent, canon) in patterns {
        match hub.subscribe(conn, &canon).await {
            Ok(()) => bound.ok.push((sent, canon)),
            Err(error) => {
                tracing::warn!(conn = conn.id, pattern = %canon, %error, "bind failed");
                bound.last_error = Some(error);
                bound.failed.push(sent);
            }
        }
    }
    bound
}

/// Replies the error for patterns that could not be bound.
pub(super) fn reply_bind_error(
    hub: &Hub,
    conn: &ConnShared,
    id: Option<&RequestId>,
    bound: &Bound,
) {
    if let Some(error) = &bound.last_error {
        hub.reply(
            conn,
            protocol::error(
                id,
                ErrorCode::Unavailable,
                &error.to_string(),
                &bound.failed,
            ),
        );
    }
}

async fn subscribe_all(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    settings: &SessionSettings,
    id: Option<&RequestId>,
    patterns: Vec<(String, String)>,
) {
    if let Err(message) = check_room(conn, settings, &patterns) {
        hub.reply(
            conn,
            protocol::error(id, ErrorCode::TooManySubscriptions, &message, &[]),
        );
        return;
    }
    tracing::trace!(conn = conn.id, "subscribing");
    let bound = bind_all(hub, conn, patterns).await;
    if !bound.ok.is_empty() {
        let sent: Vec<String> = bound.ok.iter().map(|(s, _)| s.clone()).collect();
        hub.reply(conn, protocol::subscribed(id, &sent));
    }
    reply_bind_error(hub, conn, id, &bound);
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
