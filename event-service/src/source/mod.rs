//! Where events come from, and where a subscription is made real.
//!
//! A [`Source`] does three things for the rest of the service:
//! - delivers every event this instance should see to an [`EventSink`] (the hub);
//! - `bind`s / `unbind`s patterns: called by the hub when a pattern gets its first local
//!   subscriber or loses its last one (the hub keeps the reference counts). `bind` returns only
//!   once events matching the pattern will reach this instance, so the client's `subscribed` ack
//!   can mean "from now on you get these";
//! - `publish`es what `POST /publish` accepted, returning only once the source has taken it.
//!
//! Two implementations: [`memory`] (the embedded bus, the default) and [`amqp`] (RabbitMQ).
//! The set is closed, so it is an enum rather than a trait object. Events flow the other way
//! through the [`EventSink`] trait object (the hub), which a source holds weakly: the hub owns the
//! source, so a strong reference back would be a cycle that is never freed.

pub mod amqp;
pub mod memory;

use std::{sync::Arc, time::Duration};

use crate::event::Event;

/// Which source produced an event (the `source` label of `eventrouter_events_received_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub enum Origin {
    Memory,
    Amqp,
}

impl Origin {
    /// The label value (the variant in snake_case).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A recipient's outbound queue, as a publisher waiting for it to drain sees it.
pub trait Drainable: Send + Sync {
    /// Bytes queued for the recipient and not yet written to its socket.
    fn pending_bytes(&self) -> u64;
    /// True once the recipient is gone or closing (nothing to wait for).
    fn is_closed(&self) -> bool;
    /// Marks the recipient as not reading: publishers stop waiting for it until it has drained
    /// its whole queue again.
    fn mark_stalled(&self);
}

/// How long a backlog may go without any of its recipients draining before the publisher stops
/// waiting for them: those recipients are not reading, and the queue bound decides about them.
pub const BACKLOG_STALL: Duration = Duration::from_millis(500);

/// How often a waiting publisher looks at the recipients' queues (after yielding a few times).
const BACKLOG_POLL: Duration = Duration::from_millis(1);

/// Times a waiting publisher yields before it sleeps between looks.
const YIELDS_BEFORE_SLEEP: u32 = 16;

/// Recipients whose queues a dispatch left more than half full: a publisher with more events to
/// deliver waits for them to drain ([`Backlog::drained`]) to a quarter before going on, so a
/// burst is paced by how fast clients read instead of overflowing every queue at once. A
/// recipient that makes no progress for [`BACKLOG_STALL`] is marked stalled and not waited for
/// again (the queue bound then decides about it), so one client that stopped reading delays a
/// publisher once, not on every event.
pub struct Backlog {
    pub(crate) recipients: Vec<Arc<dyn Drainable>>,
    /// Drained when every recipient is at or below this many bytes.
    pub(crate) low_water: u64,
}

impl Backlog {
    /// Waits until every recipient drained to the low-water mark or closed, or until none of
    /// them made progress for [`BACKLOG_STALL`]. Never fails: a recipient that does not read is
    /// left to the queue bound (close 4000 or drop-oldest) when the next events arrive.
    pub async fn drained(mut self) {
        let mut last_total = u64::MAX;
        let mut last_progress = tokio::time::Instant::now();
        let mut polls = 0u32;
        loop {
            let low = self.low_water;
            self.recipients
                .retain(|r| !r.is_closed() && r.pending_bytes() > low);
            if self.recipients.is_empty() {
                return;
            }
            let total: u64 = self.recipients.iter().map(|r| r.pending_bytes()).sum();
            let now = tokio::time::Instant::now();
            if total < last_total {
                last_total = total;
                last_progress = now;
            } else if now.duration_since(last_progress) >= BACKLOG_STALL {
                for r in &self.recipients {
                    r.mark_stalled();
                }
                return;
            }
            // The writers usually catch up within a few scheduler rounds: yield first, and only
            // then fall back to a timer.
            polls += 1;
            if polls <= YIELDS_BEFORE_SLEEP {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(BACKLOG_POLL).await;
            }
        }
    }
}

/// What one dispatch did: deliveries queued, and the recipients it left with a large backlog
/// (for a source with more to deliver to wait on; `None`: nobody is behind).
pub struct Dispatched {
    pub delivered: u64,
    pub backlog: Option<Backlog>,
}

/// Receives events from a source. Implemented by the hub; must not block (fan-out only enqueues).
pub trait EventSink: Send + Sync + 'static {
    /// `alone`: the event arrived on its own, not in a batch (a RabbitMQ delivery, a publish of
    /// one event). Connections waiting for nothing else then get it from a group writer, one
    /// `send` each without a task wake-up; a batch is left to the connections' own tasks, which
    /// write everything it queued at once (see `direct`).
    fn dispatch(&self, event: Event, origin: Origin, alone: bool) -> Dispatched;

    /// Starts writing what the dispatches since the last call queued for connections that wait
    /// for nothing else (see `direct`). A source calls it after a lone event, and before it
    /// waits or yields in a batch.
    fn flush(&self) {}
}

/// Why a source could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker is not reachable right now; the caller should answer 503 / an error op and retry.
    #[error("the event broker is unavailable: {0}")]
    Unavailable(Unavailable),
    /// The broker refused the operation (e.g. a nack on publish, a channel error on bind).
    #[error("the event broker refused the request: {0}")]
    Rejected(Rejected),
    /// The operation did not complete within its deadline.
    #[error("the event broker did not answer in time")]
    Timeout,
}

/// Why the source cannot take requests right now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The server is still assembling itself: the hub has no source yet.
    #[error("the event source is starting")]
    Starting,
    /// Between two broker connections.
    #[error("not connected to RabbitMQ; reconnecting")]
    NotConnected,
    /// A resource alarm on the broker blocks this connection's publishers.
    #[error("RabbitMQ is blocking publishers (memory or disk alarm); retry later")]
    Blocked,
    /// The connection failed under the operation.
    #[error("{0}")]
    Connection(lapin::Error),
}

/// Why the broker (or the source on its behalf) refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// Longer than an AMQP routing key can be.
    #[error("a pattern may be at most 255 bytes (an AMQP routing key)")]
    PatternTooLong,
    /// The event cannot be written as an AMQP message.
    #[error("{0}")]
    Unencodable(amqp::EncodeError),
    /// Negative publisher confirms.
    #[error("the broker refused {nacked} of {total} events (negative publisher confirm)")]
    Nacked { nacked: usize, total: usize },
    /// A channel-level AMQP error.
    #[error("{0}")]
    Channel(lapin::Error),
}

/// The configured event source.
#[derive(Clone)]
pub enum Source {
    Memory(memory::MemorySource),
    Amqp(Arc<amqp::AmqpSource>),
}

impl Source {
    /// Make events matching `pattern` reach this instance; returns once they will.
    pub async fn bind(&self, pattern: &str) -> Result<(), SourceError> {
        match self {
            Source::Memory(_) => Ok(()),
            Source::Amqp(s) => s.bind(pattern).await,
        }
    }

    /// Stop events matching `pattern` from reaching this instance.
    pub async fn unbind(&self, pattern: &str) -> Result<(), SourceError> {
        match self {
            Source::Memory(_) => Ok(()),
            Source::Amqp(s) => s.unbind(pattern).await,
        }
    }

    /// Hand events to the source; returns once the source has taken all of them (for AMQP: once
    /// the broker confirmed every one).
    pub async fn publish(&self, events: Vec<Event>) -> Result<usize, SourceError> {
        match self {
            Source::Memory(s) => Ok(s.publish(events).await),
            Source::Amqp(s) => s.publish(events).await,
        }
    }

    /// True while the source can deliver and accept events (readiness follows this).
    pub fn is_ready(&self) -> bool {
        match self {
            Source::Memory(_) => true,
            Source::Amqp(s) => s.is_up(),
        }
    }

    pub fn origin(&self) -> Origin {
        match self {
            Source::Memory(_) => Origin::Memory,
            Source::Amqp(_) => Origin::Amqp,
        }
    }
}
