//! `subscribe` with `since`: subscribe live and replay what the client missed, with no gap and no
//! duplicate across the switch (see `history` for the merge and why it is exact).
//!
//! The order of one recovery: wait for a turn (`--recovery-max-concurrent`), hold the
//! connection's live events, bind the patterns, read the history after `since`, answer
//! `subscribed` with `recovered`, queue the replayed events (paced by the client's reading, under
//! its outbound bound), then the held live events the history did not contain, and let live
//! events through again.

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
    history::{History, Kept, LATE_DUPLICATE_LOOKBACK, LATE_DUPLICATE_WINDOW, Lookup, id_hash},
    hub::Hub,
    protocol::{self, ErrorCode, RequestId},
    source::BACKLOG_STALL,
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
    let Some(_turn) = settings.recovery.turn(metrics).await else {
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
    let mut replayed = Vec::new();
    let mut late = Vec::new();
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
        hub.reply(
            conn,
            protocol::subscribed_since(id, &sent, events.is_some()),
        );
        if let Some(events) = events {
            // Only a stream's events can still be on their way through this instance's queue.
            let lookback = bound_wall
                .checked_sub(LATE_DUPLICATE_LOOKBACK)
                .unwrap_or(bound_wall);
            let stream = matches!(history, History::Stream(_));
            for event in &events {
                let h = id_hash(&event.id);
                replayed.push(h);
                if stream && event.time >= lookback {
                    late.push(h);
                }
            }
            let n = replay(hub, conn, &events).await;
            metrics.recovered_events.inc_by(n);
        }
    }
    let pushed = conn.finish_hold(
        &replayed,
        late,
        Instant::now() + LATE_DUPLICATE_WINDOW,
        hub.limits(),
    );
    hub.count_pushes(pushed);
    metrics
        .recovery_seconds
        .observe(started.elapsed().as_secs_f64());
    reply_bind_error(hub, conn, id, &bound);
}

/// Queues the replayed events in order, each once the connection's queue (plus what the
/// recovery holds) has room for it, so a long replay is paced by the client's reading instead of
/// overflowing its queue. A client that reads nothing for [`BACKLOG_STALL`] gets the rest pushed
/// at once: its outbound bound then decides (close 4000, or drop-oldest). Returns how many were
/// queued.
async fn replay(hub: &Hub, conn: &ConnShared, events: &[Arc<Kept>]) -> u64 {
    let max = hub.limits().max_bytes;
    let mut queued = 0u64;
    let mut stalled = false;
    for event in events {
        let len = event.frame.len();
        if !stalled {
            let mut last = usize::MAX;
            let mut progress_at = tokio::time::Instant::now();
            let mut polls = 0u32;
            loop {
                let used = conn.queued_and_held_bytes();
                if used == 0 || used + len <= max || conn.is_closing() {
                    break;
                }
                let now = tokio::time::Instant::now();
                if used < last {
                    last = used;
                    progress_at = now;
                } else if now.duration_since(progress_at) >= BACKLOG_STALL {
                    stalled = true;
                    break;
                }
                polls += 1;
                if polls <= 16 {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
        let pushed = conn.push(
            Outgoing {
                frame: event.frame.clone(),
                published: None,
            },
            hub.limits(),
        );
        if hub.count_pushes([pushed]) == 0 {
            break;
        }
        queued += 1;
    }
    queued
}
