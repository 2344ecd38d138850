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

/// How long after a recovery from RabbitMQ replayed ids are dropped when they arrive live (the
/// instance's own queue can deliver an event the stream already gave).
pub const LATE_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// How far before the binding a replayed event may have been published and still arrive live.
pub const LATE_DUPLICATE_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(2);

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
}
