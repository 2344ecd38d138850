//! Missed-event recovery: the history a reconnecting client's `since` is looked up in, and the
//! merge that hands it over to live delivery with no gap and no duplicate.
//!
//! | module | what |
//! |---|---|
//! | this one | [`History`] (which history this instance has), [`Kept`] (one kept event), [`Lookup`] |
//! | `ring` | the embedded bus's history: a bounded in-memory ring (events, bytes, age) |
//! | `stream` | RabbitMQ's: the router's stream, read from near `since` up to an end marker |
//! | `merge` | the pure hand-over from history to live: held live events, replayed ids, dedupe |
//!
//! A recovery (`session::recover`) starts holding the connection's live events, binds the
//! patterns, then reads the history after `since`. Every event published after the binding took
//! effect is then in the held live events, and every event published before it is in what the
//! history read returns (the ring is appended to before fan-out; the stream is read up to a marker
//! published after the binding). The merge delivers the history, then the held events the history
//! did not already contain, then lets live events through again, dropping for a while any that
//! the history already delivered.

pub mod merge;
pub mod ring;
pub mod stream;

use std::{
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// One event kept for recovery, with its frame encoded once.
#[derive(Debug)]
pub struct Kept {
    pub name: Box<str>,
    pub id: Box<str>,
    pub time: SystemTime,
    /// The `event` frame, as live delivery sends it.
    pub frame: Utf8Bytes,
}

impl Kept {
    /// Bytes this entry holds (for the history's byte bound).
    pub fn size(&self) -> usize {
        self.frame.len() + self.name.len() + self.id.len() + 64
    }
}

/// The hash an event id is compared by (ids are strings up to 255 bytes; a 64-bit hash keeps
/// the per-connection dedupe sets small). Deterministic, so every part of the instance agrees.
pub fn id_hash(id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

/// Bounds of one recovery's read.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    /// Most matching events replayed (`--recovery-max-events`).
    pub max_events: usize,
    /// Most bytes of matching events replayed.
    pub max_bytes: usize,
}

/// The events of `after` (the history following `since`, oldest first) that `wanted` accepts,
/// or [`Lookup::TooMany`] once they exceed `limits`.
fn collect<'a>(
    after: impl Iterator<Item = &'a Arc<Kept>>,
    wanted: &(dyn Fn(&str) -> bool + Sync),
    limits: ReadLimits,
) -> Lookup {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for event in after.filter(|e| wanted(&e.name)) {
        bytes += event.frame.len();
        if out.len() == limits.max_events || bytes > limits.max_bytes {
            return Lookup::TooMany;
        }
        out.push(event.clone());
    }
    Lookup::Found(out)
}

/// What a history read found after `since`.
#[derive(Debug)]
pub enum Lookup {
    /// Every event after `since` matching the filter, oldest first (possibly none).
    Found(Vec<Arc<Kept>>),
    /// `since` is not in the history: unknown, or older than what is kept.
    Unknown,
    /// More matching events than one recovery may replay.
    TooMany,
    /// The history could not be read (the broker is down, a timeout); the message says why.
    Unavailable(String),
    /// This instance keeps no history.
    Off,
}

impl Lookup {
    /// The `result` label of `eventrouter_recoveries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Lookup::Found(_) => "recovered",
            Lookup::Unknown => "unknown",
            Lookup::TooMany => "too_many",
            Lookup::Unavailable(_) => "unavailable",
            Lookup::Off => "off",
        }
    }
}

/// The history of this instance.
#[derive(Clone)]
pub enum History {
    Off,
    Ring(Arc<ring::Ring>),
    Stream(Arc<stream::StreamHistory>),
}

impl History {
    /// Every kept event after `since` for which `wanted(name)` holds. `bound_at` is when the
    /// caller's bindings took effect: the read covers at least every event published before it.
    pub async fn read_after(
        &self,
        since: &str,
        wanted: &(dyn Fn(&str) -> bool + Sync),
        limits: ReadLimits,
        bound_at: Instant,
    ) -> Lookup {
        match self {
            History::Off => Lookup::Off,
            History::Ring(ring) => ring.read_after(since, wanted, limits),
            History::Stream(stream) => stream.read_after(since, wanted, limits, bound_at).await,
        }
    }
}

/// Waiting recoveries allowed per running one; beyond that a recovery is refused with `busy`.
pub const WAITING_PER_SLOT: usize = 16;

/// How long after a recovery replayed ids are dropped when they arrive live (the instance's own
/// queue can deliver an event the stream already gave), on top of the live path's lag.
pub const LATE_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Clock difference allowed between publishers: how much older than the newest event the live
/// path dispatched a replayed event may be and still arrive live.
pub const LATE_DUPLICATE_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(2);

/// Most replayed ids one connection keeps to drop late live copies of (8 bytes each).
pub const LATE_DUPLICATE_MAX_IDS: usize = 8192;

/// Longest live-path lag the late-duplicate window stretches by.
const LATE_DUPLICATE_MAX_LAG: std::time::Duration = std::time::Duration::from_secs(60);

/// The replayed events that may still arrive live, and until when to watch for them.
///
/// The live path delivers events in queue order (per publisher, publish order), so a replayed
/// event can still come live only if it is no older than what the live path has reached: the
/// publish time of the last event it dispatched (`dispatched`), or the binding when that is
/// later, less [`LATE_DUPLICATE_LOOKBACK`] for clocks. When the live path lags, that reaches
/// further back, and the watch lasts [`LATE_DUPLICATE_WINDOW`] plus the lag. At most
/// [`LATE_DUPLICATE_MAX_IDS`] of the newest are kept.
pub fn late_ids(
    replay: &[Arc<Kept>],
    bound_wall: SystemTime,
    dispatched: Option<SystemTime>,
    now: Instant,
) -> (Vec<u64>, Instant) {
    let reached = dispatched.map_or(SystemTime::UNIX_EPOCH, |d| d.min(bound_wall));
    let from = reached
        .checked_sub(LATE_DUPLICATE_LOOKBACK)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // Nothing dispatched yet: every replayed event may still come, but there is no lag to add.
    let lag = dispatched.map_or(std::time::Duration::ZERO, |_| {
        bound_wall
            .duration_since(reached)
            .unwrap_or_default()
            .min(LATE_DUPLICATE_MAX_LAG)
    });
    let ids = replay
        .iter()
        .rev()
        .filter(|e| e.time >= from)
        .take(LATE_DUPLICATE_MAX_IDS)
        .map(|e| id_hash(&e.id))
        .collect();
    (ids, now + LATE_DUPLICATE_WINDOW + lag)
}

/// The recovery settings and the instance-wide bound on concurrent recoveries.
#[derive(Debug)]
pub struct Recovery {
    pub limits: ReadLimits,
    permits: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

/// A running recovery's turn; released on drop.
pub struct Turn {
    _permit: tokio::sync::OwnedSemaphorePermit,
    active: prometheus::IntGauge,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Recovery {
    pub fn new(limits: ReadLimits, max_concurrent: usize) -> Self {
        Self {
            limits,
            permits: Arc::new(tokio::sync::Semaphore::new(max_concurrent)),
            waiting: Default::default(),
            max_waiting: max_concurrent.saturating_mul(WAITING_PER_SLOT),
        }
    }

    /// Waits for a turn; `None` when too many recoveries already wait (answer `busy`).
    pub async fn turn(&self, metrics: &crate::service_metrics::ServiceMetrics) -> Option<Turn> {
        use std::sync::atomic::Ordering;
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
                metrics.recoveries_waiting.inc();
                let p = Arc::clone(&self.permits).acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                metrics.recoveries_waiting.dec();
                p.ok()?
            }
        };
        metrics.recoveries_active.inc();
        Some(Turn {
            _permit: permit,
            active: metrics.recoveries_active.clone(),
        })
    }

    /// Turns free now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod late_tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::*;

    fn at(secs: u64) -> Arc<Kept> {
        Arc::new(Kept {
            name: "a".into(),
            id: format!("e{secs}").into(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            frame: "e".into(),
        })
    }

    #[test]
    fn late_ids_reach_back_as_far_as_the_live_path_lags() {
        let replay: Vec<Arc<Kept>> = (100..=120).map(at).collect();
        let bound = SystemTime::UNIX_EPOCH + Duration::from_secs(121);
        let now = Instant::now();
        // Live path caught up: the lookback before the binding only, the plain window.
        let (ids, until) = late_ids(&replay, bound, Some(bound), now);
        assert_eq!(ids.len(), 2, "events at 119 and 120");
        assert_eq!(until, now + LATE_DUPLICATE_WINDOW);
        // The live path is 10 s behind: everything from 109 on may still come, for longer.
        let behind = SystemTime::UNIX_EPOCH + Duration::from_secs(111);
        let (ids, until) = late_ids(&replay, bound, Some(behind), now);
        assert_eq!(ids.len(), 12);
        assert!(ids.contains(&id_hash("e109")) && !ids.contains(&id_hash("e108")));
        assert_eq!(until, now + LATE_DUPLICATE_WINDOW + Duration::from_secs(10));
        // Nothing dispatched yet: all of them, no lag added.
        let (ids, until) = late_ids(&replay, bound, None, now);
        assert_eq!(ids.len(), replay.len());
        assert_eq!(until, now + LATE_DUPLICATE_WINDOW);
        // Bounded, keeping the newest.
        let many: Vec<Arc<Kept>> = (0..LATE_DUPLICATE_MAX_IDS as u64 + 10).map(at).collect();
        let (ids, _) = late_ids(&many, bound, None, now);
        assert_eq!(ids.len(), LATE_DUPLICATE_MAX_IDS);
        assert_eq!(ids[0], id_hash(&many[many.len() - 1].id));
    }
}

#[cfg(test)]
mod tests {
    //! The whole hand-over under every interleaving: events published one after another, each
    //! arriving live some time later (in publish order, as from one RabbitMQ queue), and a
    //! recovery's steps (hold, bind, read, finish) falling anywhere in between. Whatever the
    //! order, the client gets every event after `since` exactly once, in publish order.

    use std::{
        collections::VecDeque,
        sync::Arc,
        time::{Duration, Instant, SystemTime},
    };

    use proptest::prelude::*;

    use super::{
        Kept, Lookup, ReadLimits,
        ring::{Ring, RingLimits},
    };
    use crate::{
        config::SlowConsumerPolicy,
        connection::{ConnShared, Outgoing, QueueLimits},
    };

    const LIMITS: QueueLimits = QueueLimits {
        max_bytes: 1 << 20,
        policy: SlowConsumerPolicy::Disconnect,
    };

    fn kept(n: usize) -> Arc<Kept> {
        Arc::new(Kept {
            name: "e".into(),
            id: format!("id{n}").into(),
            time: SystemTime::now(),
            frame: n.to_string().into(),
        })
    }

    /// Runs one interleaving; returns the event numbers the client received after `since`.
    fn run(
        total: usize,
        since: usize,
        already_bound: bool,
        embedded: bool,
        choices: &[u8],
    ) -> Vec<usize> {
        let ring = Ring::new(RingLimits {
            max_events: 1000,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        });
        let conn = ConnShared::new(1, "127.0.0.1:1".parse().expect("addr"));
        // Events 0..=since happened before: published, arrived, and the client saw them.
        for n in 0..=since {
            ring.append(kept(n));
        }
        let mut published = since + 1;
        // Live arrivals still on their way (in publish order).
        let mut in_flight: VecDeque<usize> = VecDeque::new();
        // 0: nothing yet, 1: holding, 2: bound (index has the connection), 3: read, 4: finished.
        let mut step = 0;
        let mut read: Option<Vec<Arc<Kept>>> = None;
        // What the connection's writer took so far (it takes whenever it runs).
        let mut frames: Vec<String> = Vec::new();
        let mut choices = choices
            .iter()
            .copied()
            .cycle()
            .take(choices.len() + 4 * total + 8);
        loop {
            let can_publish = published < total;
            let can_arrive = !in_flight.is_empty();
            let can_step = step < 4;
            if !can_publish && !can_arrive && !can_step {
                break;
            }
            let pick = choices.next().unwrap_or(0) % 4;
            if pick == 3 {
                let mut batch = VecDeque::new();
                conn.take_all(&mut batch);
                frames.extend(batch.iter().map(|o| o.frame.to_string()));
                continue;
            }
            if pick == 0 && can_publish || (!can_arrive && !can_step) {
                // Kept in the history first, then on its way to the fan-out. On the embedded
                // bus every event reaches the fan-out; through RabbitMQ only when the pattern
                // was bound here when it was published (by this client, or by another).
                ring.append(kept(published));
                if embedded || step >= 2 || already_bound {
                    in_flight.push_back(published);
                }
                published += 1;
            } else if pick == 1 && can_arrive || !can_step {
                let Some(n) = in_flight.pop_front() else {
                    continue;
                };
                // The fan-out reaches this connection once its subscription is in the index.
                if step >= 2 {
                    conn.push_event(
                        Outgoing {
                            frame: n.to_string().into(),
                            published: None,
                        },
                        super::id_hash(&format!("id{n}")),
                        LIMITS,
                    );
                }
            } else {
                match step {
                    0 => conn.start_hold(),
                    1 => {} // bind: from here the index has the connection
                    2 => {
                        let found = ring.read_after(
                            &format!("id{since}"),
                            &|_| true,
                            ReadLimits {
                                max_events: 1000,
                                max_bytes: 1 << 20,
                            },
                        );
                        let Lookup::Found(events) = found else {
                            panic!("since is kept: {found:?}");
                        };
                        read = Some(events);
                    }
                    _ => {
                        let events = read.take().unwrap_or_default();
                        let ids: Vec<u64> = events.iter().map(|e| super::id_hash(&e.id)).collect();
                        conn.finish_hold(
                            Some(Outgoing {
                                frame: "subscribed".into(),
                                published: None,
                            }),
                            events,
                            ids,
                            Instant::now() + Duration::from_secs(60),
                            LIMITS,
                            None,
                        );
                    }
                }
                step += 1;
            }
        }
        // The writer's view: take until nothing is left (a replay comes a slice at a time).
        loop {
            let mut batch = VecDeque::new();
            let more = conn.take_all(&mut batch);
            frames.extend(batch.iter().map(|o| o.frame.to_string()));
            if !more {
                break;
            }
        }
        let after = frames
            .iter()
            .position(|f| f == "subscribed")
            .expect("the reply is queued");
        frames[after + 1..]
            .iter()
            .map(|f| f.parse().expect("an event number"))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn every_missed_event_once_in_order_under_any_interleaving(
            total in 2usize..40,
            since_frac in 0.0f64..1.0,
            already_bound: bool,
            embedded: bool,
            choices in proptest::collection::vec(any::<u8>(), 1..200),
        ) {
            let since = ((total - 1) as f64 * since_frac) as usize;
            let got = run(total, since, already_bound, embedded, &choices);
            let want: Vec<usize> = (since + 1..total).collect();
            prop_assert_eq!(got, want);
        }
    }
}
