//! `subscribe` with `since`: subscribe live and replay what the client missed, with no gap and no
//! duplicate across the switch (see `history` for the merge and why it is exact).
//!
//! The order of one recovery: wait for a turn (`--recovery-max-concurrent`), hold the
//! connection's live events, bind the patterns, read the history after `since`, then at once:
//! queue `subscribed` with `recovered`, hand the writer the replayed events (taken from the shared
//! history a slice at a time, ahead of anything queued later), queue the held live events the
//! history did not contain, and let live events through again. The turn ends when the writer has
//! taken the last replayed event: at most `--recovery-max-concurrent` replays drain at once, so
//! each drains fast and keeps ahead of the live events queued behind it, while the clients still
//! waiting hold nothing (their hold starts with their turn).

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use super::{
    SessionSettings,
    ops::{bind_all, check_room, reply_bind_error},
};
use crate::{
    connection::{ConnShared, Outgoing},
    history::{Lookup, late_ids},
    hub::Hub,
    protocol::{self, ErrorCode, RequestId},
    topics,
};

pub(super) async fn subscribe_since(
    hub: &Hub,
    conn: &Arc<ConnShared>,
    settings: &SessionSettings,
    id: Option<&RequestId>,
    patterns: Vec<(String, String)>,
    since: String,
) {
    let metrics = hub.metrics();
    let started = Instant::now();
    if let Err(message) = check_room(conn, settings, &patterns) {
        hub.reply(
            conn,
            protocol::error(id, ErrorCode::TooManySubscriptions, &message, &[]),
        );
        return;
    }
    let Some(turn) = settings.recovery.turn(metrics).await else {
        metrics.recoveries.with_label_values(&["busy"]).inc();
        let sent: Vec<String> = patterns.into_iter().map(|(s, _)| s).collect();
        hub.reply(
            conn,
            protocol::error(
                id,
                ErrorCode::Busy,
                "too many recoveries are waiting on this instance; nothing was subscribed, \
                 retry with the same since",
                &sent,
            ),
        );
        return;
    };
    // The client left while waiting for its turn: nothing to do.
    if conn.is_closing() {
        return;
    }
    // Patterns the connection already holds are live already: only new ones are replayed.
    let fresh: Vec<String> = {
        let held = crate::connection::lock(&conn.patterns);
        patterns
            .iter()
            .map(|(_, c)| c.clone())
            .filter(|c| !held.iter().any(|h| **h == **c))
            .collect()
    };
    conn.start_hold();
    let bound = bind_all(hub, conn, patterns).await;
    let bound_at = Instant::now();
    let bound_wall = SystemTime::now();
    let replay_patterns: Vec<&str> = bound
        .ok
        .iter()
        .map(|(_, c)| c.as_str())
        .filter(|c| fresh.iter().any(|f| f == c))
        .collect();
    let history = hub.history();
    let lookup = if bound.ok.is_empty() {
        None
    } else if replay_patterns.is_empty() {
        Some(Lookup::Found(Vec::new()))
    } else {
        let wanted = |name: &str| replay_patterns.iter().any(|p| topics::matches(p, name));
        Some(
            history
                .read_after(&since, &wanted, settings.recovery.limits, bound_at)
                .await,
        )
    };
    let mut reply = None;
    let mut replay = Vec::new();
    let mut late = Vec::new();
    let mut late_until = Instant::now();
    if let Some(lookup) = lookup {
        metrics
            .recoveries
            .with_label_values(&[lookup.label()])
            .inc();
        if let Lookup::Unavailable(why) = &lookup {
            tracing::warn!(conn = conn.id, %why, "history unavailable; recovered: false");
        }
        let sent: Vec<String> = bound.ok.iter().map(|(s, _)| s.clone()).collect();
        let events = match lookup {
            Lookup::Found(events) => Some(events),
            _ => None,
        };
        reply = Some(Outgoing {
            frame: protocol::subscribed_since(id, &sent, events.is_some()).into(),
            published: None,
        });
        if let Some(events) = events {
            // A replayed event may still be on its way to this connection live: through this
            // instance's queue (RabbitMQ), or between the ring and the fan-out (embedded).
            (late, late_until) =
                late_ids(&events, bound_wall, hub.dispatched_up_to(), Instant::now());
            metrics.recovered_events.inc_by(events.len() as u64);
            replay = events;
        }
    }
    let pushed = conn.finish_hold(reply, replay, late, late_until, hub.limits(), Some(turn));
    hub.count_pushes(pushed);
    metrics
        .recovery_seconds
        .observe(started.elapsed().as_secs_f64());
    reply_bind_error(hub, conn, id, &bound);
}
