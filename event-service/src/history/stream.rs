//! RabbitMQ's history: the router's stream (queue type `stream`), bound to the events exchange.
//!
//! Recoveries on one instance share one reader and one in-memory *window*: a contiguous piece of
//! the stream, every event in it (not only the ones some client wanted), bounded by
//! `--history-max-bytes` and `--history-max-age`. A recovery whose `since` is in the window and
//! whose bindings took effect before the window's last end marker is answered from memory, side
//! by side with others (a shared lock; the scan asks about each distinct event name once).
//! Otherwise, under the exclusive lock, the reader extends the window to the stream's current
//! end, or, when `since` is not in it, starts a new window a few seconds before `since`'s time
//! (event ids are UUIDv7: their first 48 bits are the publish time in milliseconds). So a
//! thousand clients reconnecting after the same outage cost one read of the stream, not a
//! thousand.
//!
//! The end of the stream is found with a marker: the reader publishes a message of its own to the
//! stream (through the default exchange) after attaching, then reads until that message. Every
//! event routed before the marker was published precedes it in the stream, which is what makes
//! the hand-over exact (see the parent module). Markers carry the header [`MARKER_HEADER`] and are
//! skipped by every reader.
//!
//! The reader has a connection of its own (opened on the first recovery, kept while recoveries
//! come, closed after [`IDLE_CLOSE`] without any), so a long read never delays the live consumer.
//! A read leaves its consumer attached where the window ends: the next read publishes its marker
//! and takes what arrived since, without attaching again. Between reads the broker sends that
//! consumer at most its prefetch, so an idle reader holds a bounded amount.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::sync::RwLock;

use super::{Kept, Lookup, ReadLimits, id_hash};
use crate::source::amqp::{AmqpSource, message};

/// Header marking the reader's end-of-stream markers.
pub const MARKER_HEADER: &str = "x-eventrouter-marker";

/// How far before `since`'s time a new window starts: covers clock differences between the
/// publisher and the broker, and chunk boundaries (a stream is attached to at chunk granularity).
pub const START_SKEW: Duration = Duration::from_secs(5);

/// Longest one read of the stream may take before the recoveries waiting on it give up
/// (`recovered: false`).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages the broker may push to the reader before acknowledgements (the stream consumer's
/// credit).
const READ_PREFETCH: u16 = 2000;

/// The reader's connection is closed after this long without a recovery.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// The time a UUIDv7 event id was made at; `None` for any other id.
pub fn uuid_v7_time(id: &str) -> Option<SystemTime> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// The history read from the router's stream.
pub struct StreamHistory {
    source: Arc<AmqpSource>,
    stream: String,
    max_bytes: usize,
    max_age: Duration,
    /// Shared by recoveries answered from the window as it is; exclusive to one that extends,
    /// restarts or expires it.
    reader: RwLock<Reader>,
}

#[derive(Default)]
struct Reader {
    link: Option<(Connection, Instant)>,
    /// The consumer the last read left attached where the window ends.
    follower: Option<Follower>,
    window: Window,
}

/// A contiguous piece of the stream, oldest first.
#[derive(Default)]
struct Window {
    /// Offset, the event's name (interned: one allocation per distinct name, so a scan can tell
    /// names apart by pointer), the event.
    events: VecDeque<(u64, Arc<str>, Arc<Kept>)>,
    /// The distinct names in `events` (and some that left it, pruned as the set grows).
    names: HashSet<Arc<str>>,
    /// `names`' size after its last pruning.
    names_pruned_at: usize,
    /// Id hash -> offset of the newest event with that id.
    by_id: HashMap<u64, u64>,
    bytes: usize,
    /// Where the next extension starts (one past the last offset read, markers included).
    next_offset: Option<u64>,
    /// The window holds every event routed to the stream before this instant (when its last
    /// marker was published), from `complete_from` on.
    covered_until: Option<Instant>,
    /// The window holds every event the stream kept with a publish time from here on (the time
    /// it was started at, later when the byte bound dropped its oldest events).
    complete_from: Option<SystemTime>,
    /// The byte bound dropped events from the front since the window started.
    trimmed: bool,
    /// The largest event pushed, in bytes.
    largest: usize,
}

impl Window {
    fn clear(&mut self) {
        *self = Window::default();
    }

    fn push(&mut self, offset: u64, kept: Arc<Kept>, max_bytes: usize) {
        self.bytes += kept.size();
        self.largest = self.largest.max(kept.size());
        self.by_id.insert(id_hash(&kept.id), offset);
        let name = self.intern(&kept.name);
        self.events.push_back((offset, name, kept));
        while self.bytes > max_bytes && self.events.len() > 1 {
            if let Some((old_offset, _, old)) = self.events.pop_front() {
                self.bytes -= old.size();
                let h = id_hash(&old.id);
                if self.by_id.get(&h) == Some(&old_offset) {
                    self.by_id.remove(&h);
                }
                // Only what follows the dropped event is complete now.
                self.complete_from = Some(old.time);
                self.trimmed = true;
            }
        }
    }

    /// Drops events published more than `max_age` ago: older ones are read from the stream
    /// again (which may no longer keep them), so the window never outlives the stream's own
    /// retention by more than `max_age`.
    fn expire(&mut self, max_age: Duration, now: SystemTime) {
        while let Some((offset, _, first)) = self.events.front() {
            if now.duration_since(first.time).unwrap_or_default() <= max_age {
                break;
            }
            let (offset, time, h) = (*offset, first.time, id_hash(&first.id));
            if let Some((_, _, old)) = self.events.pop_front() {
                self.bytes -= old.size();
            }
            if self.by_id.get(&h) == Some(&offset) {
                self.by_id.remove(&h);
            }
            self.complete_from = Some(time);
        }
    }

    /// The byte bound dropped events, and not one more of the largest event seen fits.
    fn is_full(&self, max_bytes: usize) -> bool {
        self.trimmed && self.bytes + self.largest > max_bytes
    }

    /// True when [`Window::expire`] would drop events.
    fn expires(&self, max_age: Duration, now: SystemTime) -> bool {
        self.events.front().is_some_and(|(_, _, first)| {
            now.duration_since(first.time).unwrap_or_default() > max_age
        })
    }

    /// The shared copy of `name`. Names no event holds any more are pruned whenever the set
    /// has doubled since the last pruning.
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        if self.names.len() >= 2 * self.names_pruned_at.max(64) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.names_pruned_at = self.names.len();
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&shared));
        shared
    }

    /// The events after index `at` whose name `wanted` accepts. `wanted` is asked once per
    /// distinct name, not once per event: a herd of recoveries scans the same window many
    /// times, and the scan then reads only the window's own entries.
    fn matching<'a>(
        &'a self,
        at: usize,
        wanted: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> impl Iterator<Item = &'a Arc<Kept>> + 'a {
        let mut memo: HashMap<usize, bool> = HashMap::new();
        let mut last: Option<(usize, bool)> = None;
        self.events
            .range(at + 1..)
            .filter_map(move |(_, name, kept)| {
                // The pointer identifies the name while the entry holds it.
                let key = Arc::as_ptr(name).cast::<u8>() as usize;
                let ok = match last {
                    Some((k, ok)) if k == key => ok,
                    _ => {
                        let ok = *memo.entry(key).or_insert_with(|| wanted(name));
                        last = Some((key, ok));
                        ok
                    }
                };
                ok.then_some(kept)
            })
    }

    /// Index in `events` of the event `since`, when the window has it.
    fn position(&self, since: &str) -> Option<usize> {
        let offset = *self.by_id.get(&id_hash(since))?;
        let first = self.events.front()?.0;
        let at = usize::try_from(offset.checked_sub(first)?).ok()?;
        // Offsets are contiguous except for skipped markers and malformed messages: search
        // back from the estimate.
        let mut i = at.min(self.events.len().saturating_sub(1));
        loop {
            let (o, _, e) = &self.events[i];
            if *o == offset {
                return (&*e.id == since).then_some(i);
            }
            if *o < offset || i == 0 {
                return None;
            }
            i -= 1;
        }
    }
}

/// Why a read of the stream stopped before its marker.
enum ReadError {
    /// The broker failed or refused; the message says what.
    Failed(String),
    /// A new window stopped early: `seen`, the events after `since` outgrew
    /// `--history-max-bytes`; else the read went well past `since`'s time without meeting it.
    GapTooLong { seen: bool },
}

/// Where a read attaches to the stream.
#[derive(Clone, Copy, Debug)]
enum Start {
    Timestamp(SystemTime),
    Offset(u64),
}

impl StreamHistory {
    pub fn new(
        source: Arc<AmqpSource>,
        stream: String,
        max_bytes: usize,
        max_age: Duration,
    ) -> Self {
        Self {
            source,
            stream,
            max_bytes,
            max_age,
            reader: RwLock::new(Reader::default()),
        }
    }

    /// Closes the reader's consumer and connection once no recovery used them for
    /// [`IDLE_CLOSE`] (checked every [`IDLE_CLOSE`] / 2), until `shutdown`.
    pub fn spawn_idle_close(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let history = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(IDLE_CLOSE / 2) => {}
                }
                let Some(history) = history.upgrade() else {
                    return;
                };
                // A reader busy with a recovery is not idle.
                let Ok(mut reader) = history.reader.try_write() else {
                    continue;
                };
                let idle = reader
                    .link
                    .as_ref()
                    .is_some_and(|(_, used)| used.elapsed() > IDLE_CLOSE)
                    && reader
                        .follower
                        .as_ref()
                        .is_none_or(|f| f.used.elapsed() > IDLE_CLOSE);
                if idle {
                    reader.drop_follower();
                    if let Some((connection, _)) = reader.link.take() {
                        let _ = connection.close(200, "idle".into()).await;
                    }
                }
            }
        });
    }

    /// Every event after `since` for which `wanted(name)` holds, from the stream (see the
    /// module documentation for when the stream is actually read).
    pub async fn read_after(
        &self,
        since: &str,
        wanted: &(dyn Fn(&str) -> bool + Sync),
        limits: ReadLimits,
        bound_at: Instant,
    ) -> Lookup {
        // Waiting behind other reads counts against the same deadline as a read: a recovery
        // holds its connection's live events meanwhile.
        let asked = Instant::now();
        let waited_too_long = || {
            Lookup::Unavailable(format!(
                "waited longer than {READ_TIMEOUT:?} for other reads of the stream '{}'",
                self.stream
            ))
        };
        // Most recoveries of a herd are answered from the window as it is, side by side.
        {
            let Ok(reader) = tokio::time::timeout(READ_TIMEOUT, self.reader.read()).await else {
                return waited_too_long();
            };
            let window = &reader.window;
            let current = window.covered_until.is_some_and(|c| c > bound_at)
                && !window.expires(self.max_age, SystemTime::now());
            if current && let Some(at) = window.position(since) {
                let found = super::collect(window.matching(at, wanted), &|_| true, limits);
                tracing::debug!(
                    wait_ms = (asked.elapsed()).as_millis() as u64,
                    window = window.events.len(),
                    "recovery answered from the window"
                );
                return found;
            }
        }
        let Ok(mut reader) = tokio::time::timeout(READ_TIMEOUT, self.reader.write()).await else {
            return waited_too_long();
        };
        reader.window.expire(self.max_age, SystemTime::now());
        let window = &reader.window;
        let since_time = uuid_v7_time(since);
        let read = if window.position(since).is_some() {
            // In the window: extend it unless its last marker already covers the binding.
            match window.covered_until {
                Some(covered) if covered > bound_at => None,
                _ => window.next_offset.map(Start::Offset),
            }
        } else {
            let Some(time) = since_time else {
                // Not a UUIDv7 id: there is no position to start from.
                return Lookup::Unknown;
            };
            let searched = window.covered_until.is_some_and(|c| c > bound_at)
                && window.complete_from.is_some_and(|from| from <= time);
            if searched {
                // The window holds everything from before `since` up to after the binding, and
                // `since` is not in it: the stream never had it.
                return Lookup::Unknown;
            }
            if window.is_full(self.max_bytes) && window.complete_from.is_some_and(|f| time < f) {
                // What followed `since` already fills a window: a new one from `since` would
                // overflow too. Answered at once, without dropping the window other recoveries
                // are served from.
                return Lookup::TooMany;
            }
            reader.reset();
            Some(Start::Timestamp(
                time.checked_sub(START_SKEW)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            ))
        };
        let locked = Instant::now();
        let read_kind = match read {
            None => "none",
            Some(Start::Offset(_)) => "extend",
            Some(Start::Timestamp(_)) => "new window",
        };
        if let Some(start) = read {
            let outcome =
                tokio::time::timeout(READ_TIMEOUT, self.read(&mut reader, start, since)).await;
            let failed = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(ReadError::GapTooLong { seen })) => {
                    // Stopped early: the window is not complete up to a marker.
                    reader.reset();
                    return if seen {
                        Lookup::TooMany
                    } else {
                        Lookup::Unknown
                    };
                }
                Ok(Err(ReadError::Failed(why))) => Some(why),
                Err(_) => Some(format!(
                    "reading the stream '{}' took longer than {READ_TIMEOUT:?}",
                    self.stream
                )),
            };
            if let Some(why) = failed {
                // The window may be half-extended and the link broken: start over next time.
                reader.reset();
                reader.link = None;
                return Lookup::Unavailable(why);
            }
        }
        let read_done = Instant::now();
        let window = &reader.window;
        let Some(at) = window.position(since) else {
            // Read from before `since`'s time to the end and not found: unknown, or older than
            // the stream keeps. Found once but pushed out by the byte bound: too long a gap.
            let evicted = window.trimmed
                && window
                    .complete_from
                    .zip(since_time)
                    .is_some_and(|(from, t)| t <= from);
            return if evicted {
                Lookup::TooMany
            } else {
                Lookup::Unknown
            };
        };
        let found = super::collect(window.matching(at, wanted), &|_| true, limits);
        tracing::debug!(
            wait_ms = (locked - asked).as_millis() as u64,
            read_ms = (read_done - locked).as_millis() as u64,
            collect_ms = read_done.elapsed().as_millis() as u64,
            read = read_kind,
            window = window.events.len(),
            "recovery read the stream"
        );
        found
    }

    /// Reads the stream from `start` up to a marker, into the window. A read that continues
    /// where the window ends reuses the consumer the last read left attached (it has stayed
    /// where the window ends: the broker stops after `READ_PREFETCH` unacknowledged messages
    /// between reads); any other read attaches a new one.
    async fn read(&self, reader: &mut Reader, start: Start, since: &str) -> Result<(), ReadError> {
        let reuse = matches!(start, Start::Offset(_))
            && reader
                .follower
                .as_ref()
                .is_some_and(|f| f.used.elapsed() < IDLE_CLOSE && f.channel.status().connected());
        if !reuse {
            reader.drop_follower();
            let follower = self.attach(reader, start).await?;
            reader.follower = Some(follower);
            if let Start::Timestamp(t) = start {
                reader.window.complete_from = Some(t + START_SKEW);
            }
        }
        let Reader {
            follower, window, ..
        } = reader;
        let Some(follower) = follower.as_mut() else {
            return Err(ReadError::Failed("no reader attached to the stream".into()));
        };
        follower.used = Instant::now();
        let result = self.read_to_marker(follower, window, !reuse, since).await;
        if result.is_err() {
            reader.drop_follower();
        }
        result
    }

    /// Opens (or reuses) the reader's connection and attaches a consumer at `start`.
    async fn attach(&self, reader: &mut Reader, start: Start) -> Result<Follower, ReadError> {
        let stale = reader
            .link
            .as_ref()
            .is_none_or(|(c, used)| !c.status().connected() || used.elapsed() > IDLE_CLOSE);
        if stale {
            if let Some((old, _)) = reader.link.take() {
                let _ = old.close(200, "idle".into()).await;
            }
            let connection = self.source.connect_side("history").await.map_err(|e| {
                ReadError::Failed(format!("connecting to read the history stream: {e}"))
            })?;
            reader.link = Some((connection, Instant::now()));
        }
        let Some((connection, used)) = reader.link.as_mut() else {
            return Err(ReadError::Failed(
                "no connection to read the history stream".into(),
            ));
        };
        *used = Instant::now();
        let stream = self.stream.as_str();
        let fail = |what: &str, e: lapin::Error| {
            ReadError::Failed(format!("{what} on the stream '{stream}': {e}"))
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| fail("opening a channel", e))?;
        channel
            .basic_qos(READ_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(|e| fail("setting the prefetch", e))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            match start {
                Start::Timestamp(t) => AMQPValue::Timestamp(
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs(),
                ),
                Start::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
            },
        );
        let consumer = channel
            .basic_consume(
                stream.into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| fail("attaching a reader", e))?;
        Ok(Follower {
            channel,
            consumer,
            used: Instant::now(),
            unacked: None,
            unacked_count: 0,
        })
    }

    /// Publishes a marker and takes every message up to it into the window. `fresh`: the window
    /// was started by this read (it may stop early, see [`ReadError::GapTooLong`]).
    async fn read_to_marker(
        &self,
        follower: &mut Follower,
        window: &mut Window,
        fresh: bool,
        since: &str,
    ) -> Result<(), ReadError> {
        let stream = self.stream.as_str();
        let fail = |what: &str, e: lapin::Error| {
            ReadError::Failed(format!("{what} on the stream '{stream}': {e}"))
        };
        let since_time = uuid_v7_time(since);
        let mut seen = false;
        let marker = format!("eventrouter-marker-{}", uuid::Uuid::now_v7());
        let mut headers = FieldTable::default();
        headers.insert(MARKER_HEADER.into(), AMQPValue::Boolean(true));
        let marked_at = Instant::now();
        follower
            .channel
            .basic_publish(
                ShortString::from(""),
                stream.into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default()
                    .with_message_id(marker.as_str().into())
                    .with_headers(headers),
            )
            .await
            .map_err(|e| fail("publishing the end marker", e))?;
        let max_body = self.source.max_message_bytes();
        loop {
            let delivery = match follower.consumer.next().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(fail("reading", e)),
                None => {
                    return Err(ReadError::Failed(format!(
                        "the broker cancelled the reader of '{stream}'"
                    )));
                }
            };
            let headers = delivery.properties.headers().as_ref();
            let offset = headers
                .and_then(|h| h.inner().get("x-stream-offset"))
                .and_then(message::integer);
            let is_marker = headers.is_some_and(|h| h.inner().contains_key(MARKER_HEADER));
            let ours = delivery
                .properties
                .message_id()
                .as_ref()
                .is_some_and(|id| id.as_str() == marker);
            if let Some(o) = offset {
                window.next_offset = Some(o + 1);
            }
            let acker = delivery.acker.clone();
            follower.unacked = Some(acker);
            follower.unacked_count += 1;
            if ours || follower.unacked_count >= u32::from(READ_PREFETCH / 2) {
                follower.ack().await.map_err(|e| fail("acknowledging", e))?;
            }
            if ours {
                window.covered_until = Some(marked_at);
                return Ok(());
            }
            if is_marker {
                continue;
            }
            let (Some(offset), routing_key) = (offset, delivery.routing_key.as_str().to_owned())
            else {
                continue;
            };
            // Malformed messages are skipped here as the live consumer drops them.
            let Ok(event) =
                message::decode(&routing_key, &delivery.properties, delivery.data, max_body)
            else {
                continue;
            };
            let frame = crate::protocol::event_frame(&event);
            let Ok(frame) = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(frame) else {
                continue;
            };
            seen |= event.id == since;
            let event_time = event.time;
            window.push(
                offset,
                Arc::new(Kept {
                    name: event.name.into_boxed_str(),
                    id: event.id.into_boxed_str(),
                    time: event.time,
                    frame,
                }),
                self.max_bytes,
            );
            if fresh {
                // `since` itself pushed out by the bound: more missed than one window holds.
                if seen && window.position(since).is_none() {
                    return Err(ReadError::GapTooLong { seen: true });
                }
                // Well past `since`'s time without meeting it: the stream does not have it.
                if !seen && since_time.is_some_and(|t| event_time > t + 2 * START_SKEW) {
                    return Err(ReadError::GapTooLong { seen: false });
                }
            }
        }
    }
}

/// The consumer a read leaves attached where the window ends, for the next read to continue.
struct Follower {
    channel: Channel,
    consumer: lapin::Consumer,
    used: Instant,
    /// The last delivery not acknowledged yet (acknowledged with `multiple`).
    unacked: Option<lapin::Acker>,
    unacked_count: u32,
}

impl Follower {
    async fn ack(&mut self) -> lapin::Result<()> {
        self.unacked_count = 0;
        match self.unacked.take() {
            Some(acker) => acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Reader {
    /// Detaches the kept consumer (closing its channel in the background).
    fn drop_follower(&mut self) {
        if let Some(follower) = self.follower.take() {
            tokio::spawn(async move {
                let _ = follower.channel.close(200, "reader done".into()).await;
            });
        }
    }

    /// Forgets the window and the consumer that follows it.
    fn reset(&mut self) {
        self.window.clear();
        self.drop_follower();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_v7_ids_give_their_time_and_others_none() {
        let id = uuid::Uuid::now_v7().to_string();
        let t = uuid_v7_time(&id).expect("a v7 id has a time");
        let age = SystemTime::now().duration_since(t).expect("in the past");
        assert!(age < Duration::from_secs(5), "{age:?}");
        assert_eq!(uuid_v7_time("9b2d3c1e-8f4a-4c2b-9d3e-1a2b3c4d5e6f"), None);
        assert_eq!(uuid_v7_time("order-17"), None);
    }

    fn kept(id: &str, secs: u64) -> Arc<Kept> {
        Arc::new(Kept {
            name: "a".into(),
            id: id.into(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            frame: format!("{{\"id\":\"{id}\"}}").into(),
        })
    }

    #[test]
    fn the_window_finds_ids_across_gaps_in_offsets() {
        let mut w = Window::default();
        w.push(10, kept("a", 1), 1 << 20);
        w.push(12, kept("b", 2), 1 << 20); // 11 was a marker
        w.push(13, kept("c", 3), 1 << 20);
        assert_eq!(w.position("a"), Some(0));
        assert_eq!(w.position("b"), Some(1));
        assert_eq!(w.position("c"), Some(2));
        assert_eq!(w.position("d"), None);
    }

    fn named(id: &str, name: &str) -> Arc<Kept> {
        Arc::new(Kept {
            name: name.into(),
            id: id.into(),
            time: SystemTime::UNIX_EPOCH,
            frame: "{}".into(),
        })
    }

    #[test]
    fn a_scan_asks_about_each_distinct_name_once() {
        let mut w = Window::default();
        for i in 0..100u64 {
            let name = ["order.a", "order.b", "user.c"][(i % 3) as usize];
            w.push(i, named(&format!("e{i}"), name), 1 << 20);
        }
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let wanted = |name: &str| {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            name.starts_with("order.")
        };
        let at = w.position("e9").expect("kept");
        let ids: Vec<&str> = w.matching(at, &wanted).map(|e| &*e.id).collect();
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 3);
        let expected: Vec<String> = (10..100u64)
            .filter(|i| i % 3 != 2)
            .map(|i| format!("e{i}"))
            .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn names_no_event_holds_are_pruned() {
        let mut w = Window::default();
        for i in 0..10_000u64 {
            let id = format!("e{i}");
            w.push(i, named(&id, &id), 2_000);
        }
        assert!(w.events.len() < 100, "{}", w.events.len());
        assert!(
            w.names.len() <= 2 * 64 + w.events.len(),
            "{}",
            w.names.len()
        );
        let at = w.position(&format!("e{}", 10_000 - 3)).expect("kept");
        assert_eq!(w.matching(at, &|_| true).count(), 2);
    }

    #[test]
    fn old_events_expire_from_the_window() {
        let mut w = Window::default();
        for i in 0..5u64 {
            w.push(i, kept(&format!("e{i}"), 100 + i), 1 << 20);
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(110);
        w.expire(Duration::from_secs(8), now);
        assert_eq!(w.position("e1"), None);
        assert_eq!(w.position("e2"), Some(0));
        assert_eq!(
            w.complete_from,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(101))
        );
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_and_moves_completeness() {
        let mut w = Window {
            complete_from: Some(SystemTime::UNIX_EPOCH),
            ..Window::default()
        };
        for i in 0..10u64 {
            w.push(i, kept(&format!("e{i}"), i), 300);
        }
        assert!(w.events.len() < 10);
        assert_eq!(w.position("e0"), None);
        assert_eq!(w.position("e9"), Some(w.events.len() - 1));
        let from = w.complete_from.expect("set");
        assert!(from > SystemTime::UNIX_EPOCH);
        assert!(w.is_full(300), "{} bytes of 300", w.bytes);
        // Events expiring by age make room again.
        w.expire(
            Duration::from_secs(1),
            SystemTime::UNIX_EPOCH + Duration::from_secs(9),
        );
        assert!(!w.is_full(300), "{} bytes of 300", w.bytes);
        let mut fresh = Window::default();
        fresh.push(0, kept("a", 1), 300);
        assert!(!fresh.is_full(300));
    }
}
