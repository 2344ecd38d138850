//! Fan-out: the index from pattern to connections, and the reference counts behind bindings.
//!
//! [`Hub::dispatch`] encodes an event once into a shared frame, finds the matching patterns in
//! the [`TopicTrie`] and pushes the frame (a refcount bump) onto every matching connection's
//! bounded queue. A connection holding several matching patterns gets the event once.
//!
//! Subscriptions are reference counted per (canonical) pattern. The first local subscriber makes
//! the hub call [`Source::bind`], the last one leaving calls [`Source::unbind`]. Each pattern has
//! its own async lock around "bind/unbind + index update", so a quick unsubscribe/subscribe pair
//! can never leave a pattern unbound while somebody holds it, and a slow bind of one pattern
//! does not hold up any other. Callers run these operations in spawned tasks, so a client that
//! disconnects mid-bind cannot cancel one half-way.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus::IntCounter;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::{
    connection::{ConnShared, Outgoing, Pushed, QueueLimits, lock},
    direct::Writers,
    event::Event,
    history::{History, Kept, id_hash},
    protocol,
    service_metrics::{DropReason, ServiceMetrics},
    source::{Backlog, Dispatched, Drainable, EventSink, Origin, Source, SourceError, Unavailable},
    topics::TopicTrie,
};

/// The local subscribers of one pattern, by connection id. Most patterns have a single
/// subscriber (a user's own topic), which is kept without a map: the index holds an entry per
/// pattern, and an idle connection's memory is mostly such entries.
enum Subscribers {
    One(Arc<ConnShared>),
    /// Boxed: the entry stays 16 bytes in every trie node, where most patterns have one.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<u64, Arc<ConnShared>>>),
}

impl Subscribers {
    fn insert(&mut self, conn: &Arc<ConnShared>) {
        match self {
            Self::One(first) if first.id == conn.id => *first = conn.clone(),
            Self::One(first) => {
                let map = [(first.id, first.clone()), (conn.id, conn.clone())];
                *self = Self::Many(Box::new(map.into_iter().collect()));
            }
            Self::Many(map) => {
                map.insert(conn.id, conn.clone());
            }
        }
    }

    /// Removes `id`; true when nobody is left (the caller then drops the pattern's entry).
    fn remove(&mut self, id: u64) -> bool {
        let map = match self {
            Self::One(only) => return only.id == id,
            Self::Many(map) => map,
        };
        map.remove(&id);
        match map.len() {
            0 => true,
            1 => {
                if let Some(last) = map.values().next().cloned() {
                    *self = Self::One(last);
                }
                false
            }
            _ => false,
        }
    }

    fn values(&self) -> impl Iterator<Item = &Arc<ConnShared>> {
        let (one, many) = match self {
            Self::One(conn) => (Some(conn), None),
            Self::Many(map) => (None, Some(map.values())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Group writers (see `direct`): enough that every worker thread finds some to run during a
/// large fan-out, few enough that each serves many connections per wake-up.
const WRITER_GROUPS: usize = 32;

/// The fan-out hub of one server.
pub struct Hub {
    index: RwLock<TopicTrie<Subscribers>>,
    /// One lock per pattern while a subscribe or unsubscribe of it runs: binding at the source
    /// takes a round trip, and those of one pattern must not overlap. A pattern is bound while
    /// it has an entry in `index` (it gets one right after its bind, loses it right before its
    /// unbind), so no state outlives the operations here.
    binds: Mutex<HashMap<Box<str>, Arc<tokio::sync::Mutex<()>>>>,
    source: OnceLock<Source>,
    history: OnceLock<History>,
    metrics: ServiceMetrics,
    limits: QueueLimits,
    received_memory: IntCounter,
    received_amqp: IntCounter,
    /// Publish time (ms since the epoch) of the last event dispatched; 0 before the first.
    dispatched_ms: AtomicU64,
    /// The group writers of parked connections (see `direct`).
    writers: Arc<Writers>,
}

impl Hub {
    pub fn new(metrics: ServiceMetrics, limits: QueueLimits) -> Self {
        let writers = Writers::new(WRITER_GROUPS, metrics.delivery_latency.clone());
        Self {
            index: RwLock::new(TopicTrie::new()),
            binds: Mutex::new(HashMap::new()),
            source: OnceLock::new(),
            history: OnceLock::new(),
            received_memory: metrics
                .events_received
                .with_label_values(&[Origin::Memory.as_str()]),
            received_amqp: metrics
                .events_received
                .with_label_values(&[Origin::Amqp.as_str()]),
            metrics,
            limits,
            dispatched_ms: AtomicU64::new(0),
            writers,
        }
    }

    /// The publish time of the last event dispatched to subscribers (how far the live path has
    /// got), `None` before the first.
    pub fn dispatched_up_to(&self) -> Option<SystemTime> {
        match self.dispatched_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)),
        }
    }

    /// Sets the source once it exists (the source needs the hub as its sink first).
    pub fn set_source(&self, source: Source) {
        let _ = self.source.set(source);
    }

    pub fn source(&self) -> Option<&Source> {
        self.source.get()
    }

    /// Sets the history recoveries read (once, at start).
    pub fn set_history(&self, history: History) {
        let _ = self.history.set(history);
    }

    /// The history recoveries read ([`History::Off`] until set).
    pub fn history(&self) -> &History {
        self.history.get().unwrap_or(&History::Off)
    }

    /// The outbound bound of every connection.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }

    /// Counts what pushes did (deliveries, drops); returns the deliveries.
    pub fn count_pushes(&self, pushed: impl IntoIterator<Item = Pushed>) -> u64 {
        pushed.into_iter().map(|p| self.count_push(p)).sum()
    }

    /// Queues a control reply (ack, pong, error) for one connection, under the same bound.
    pub fn reply(&self, conn: &ConnShared, text: String) {
        let pushed = conn.push(
            Outgoing {
                frame: Utf8Bytes::from(text),
                published: None,
            },
            self.limits,
        );
        self.count_push(pushed);
    }

    fn count_push(&self, pushed: Pushed) -> u64 {
        match pushed {
            Pushed::Queued { dropped_oldest } => {
                self.metrics.dropped(DropReason::DropOldest, dropped_oldest);
                1
            }
            Pushed::DroppedNew { dropped_oldest } => {
                self.metrics
                    .dropped(DropReason::DropOldest, dropped_oldest + 1);
                0
            }
            Pushed::Overflow { discarded } => {
                self.metrics.dropped(DropReason::SlowConsumer, discarded);
                0
            }
            Pushed::ForWriter => 1,
            Pushed::Closed | Pushed::Duplicate => 0,
        }
    }

    fn bind_entry(&self, pattern: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.binds).entry(pattern.into()).or_default().clone()
    }

    /// Drops the pattern's lock entry when nobody else holds or waits on it.
    fn release_entry(&self, pattern: &str, entry: Arc<tokio::sync::Mutex<()>>) {
        let mut binds = lock(&self.binds);
        // Two references: the map's and ours. Anyone else waiting cloned it under this lock.
        if Arc::strong_count(&entry) == 2 {
            binds.remove(pattern);
        }
    }

    fn is_bound(&self, pattern: &str) -> bool {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.contains(pattern)
    }

    /// Adds `conn` as a subscriber of the canonical `pattern`, binding it at the source first if
    /// it is the pattern's first local subscriber. Returns once events will flow.
    pub async fn subscribe(
        &self,
        conn: &Arc<ConnShared>,
        pattern: &str,
    ) -> Result<(), SourceError> {
        let entry = self.bind_entry(pattern);
        let result = {
            let _turn = entry.lock().await;
            let bound = if self.is_bound(pattern) {
                Ok(())
            } else {
                let r = match self.source.get() {
                    Some(source) => source.bind(pattern).await,
                    None => Err(SourceError::Unavailable(Unavailable::Starting)),
                };
                if r.is_ok() {
                    self.metrics.bindings.inc();
                }
                r
            };
            if bound.is_ok() {
                let mut held = lock(&conn.patterns);
                if !held.iter().any(|p| &**p == pattern) {
                    if held.len() == held.capacity() {
                        // Most connections hold one pattern: no room for four kept spare.
                        let more = held.len().max(1);
                        held.reserve_exact(more);
                    }
                    held.push(pattern.into());
                    drop(held);
                    let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
                    index
                        .get_or_insert_with(pattern, || Subscribers::One(conn.clone()))
                        .insert(conn);
                    self.metrics.subscriptions.inc();
                }
            }
            bound
        };
        self.release_entry(pattern, entry);
        result
    }

    /// Removes `conn` from the canonical `pattern`; unbinds it at the source after its last local
    /// subscriber left. An unbind failure is logged: the instance then receives events nobody
    /// here wants (harmless, dropped at the hub) until the broker drops the queue.
    pub async fn unsubscribe(&self, conn: &ConnShared, pattern: &str) {
        let entry = self.bind_entry(pattern);
        {
            let _turn = entry.lock().await;
            let removed = {
                let mut held = lock(&conn.patterns);
                let before = held.len();
                held.retain(|p| &**p != pattern);
                before != held.len()
            };
            let last_left = {
                let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
                let last = match index.get_mut(pattern) {
                    Some(subs) => removed && subs.remove(conn.id),
                    None => false,
                };
                if removed {
                    self.metrics.subscriptions.dec();
                }
                if last {
                    index.remove(pattern);
                }
                last
            };
            if last_left {
                if let Some(source) = self.source.get()
                    && let Err(error) = source.unbind(pattern).await
                {
                    tracing::warn!(%error, pattern, "unbind failed; the binding stays until the queue goes");
                }
                self.metrics.bindings.dec();
            }
        }
        self.release_entry(pattern, entry);
    }

    /// Removes every subscription of a closed connection (unbinding what it alone held).
    pub async fn remove_connection(&self, conn: &ConnShared) {
        let patterns: Vec<Box<str>> = lock(&conn.patterns).clone();
        for p in patterns {
            self.unsubscribe(conn, &p).await;
        }
    }

    /// True when no pattern has local subscribers.
    #[cfg(test)]
    fn has_no_patterns(&self) -> bool {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Queues `frame` for every connection subscribed to `name`; collects into `heavy` the ones
    /// left with more than half their queue bound.
    fn fan_out(
        &self,
        name: &str,
        id: u64,
        frame: &Utf8Bytes,
        published: SystemTime,
        alone: bool,
        heavy: &mut Vec<Arc<dyn Drainable>>,
    ) -> u64 {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let mut first: Option<&Subscribers> = None;
        let mut more: Vec<&Subscribers> = Vec::new();
        index.for_each_match(name, |subs| {
            if first.is_none() {
                first = Some(subs);
            } else {
                more.push(subs);
            }
        });
        let Some(first) = first else {
            return 0;
        };
        let mut delivered = 0u64;
        let high_water = (self.limits.max_bytes / 2) as u64;
        let mut push = |conn: &Arc<ConnShared>| {
            let pushed = conn.push_event_with(
                Outgoing {
                    frame: frame.clone(),
                    published: Some(published),
                },
                id,
                self.limits,
                alone,
            );
            if pushed == Pushed::ForWriter {
                self.writers.mark(conn);
            }
            delivered += self.count_push(pushed);
            if conn.pending_bytes() > high_water && !conn.is_stalled() {
                heavy.push(conn.clone());
            }
        };
        if more.is_empty() {
            // The common case: one matching pattern, no de-duplication needed.
            for conn in first.values() {
                push(conn);
            }
        } else {
            let mut conns: Vec<&Arc<ConnShared>> = first.values().collect();
            for subs in more {
                conns.extend(subs.values());
            }
            conns.sort_unstable_by_key(|c| c.id);
            conns.dedup_by_key(|c| c.id);
            for conn in conns {
                push(conn);
            }
        }
        delivered
    }
}

impl EventSink for Hub {
    fn flush(&self) {
        self.writers.kick();
    }

    fn dispatch(&self, event: Event, origin: Origin, alone: bool) -> Dispatched {
        match origin {
            Origin::Memory => self.received_memory.inc(),
            Origin::Amqp => self.received_amqp.inc(),
        }
        let frame = match Utf8Bytes::try_from(protocol::event_frame(&event)) {
            Ok(frame) => frame,
            Err(error) => {
                // Names are validated strings and data validated JSON, so this means a bug.
                tracing::error!(%error, event = %event.name, "event frame is not UTF-8; dropped");
                return Dispatched {
                    delivered: 0,
                    backlog: None,
                };
            }
        };
        let id = id_hash(&event.id);
        // Kept before the fan-out: a recovery that binds while this event is on its way finds
        // it either in the ring or among its held live events (see `history`).
        if origin == Origin::Memory
            && let Some(History::Ring(ring)) = self.history.get()
        {
            ring.append(Arc::new(Kept {
                name: event.name.as_str().into(),
                id: event.id.as_str().into(),
                time: event.time,
                frame: frame.clone(),
            }));
        }
        let mut heavy = Vec::new();
        let delivered = self.fan_out(&event.name, id, &frame, event.time, alone, &mut heavy);
        let ms = event
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            });
        self.dispatched_ms.store(ms, Ordering::Relaxed);
        self.metrics.deliveries.inc_by(delivered);
        Dispatched {
            delivered,
            backlog: (!heavy.is_empty()).then(|| Backlog {
                recipients: heavy,
                low_water: (self.limits.max_bytes / 4) as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::SlowConsumerPolicy, source::memory::MemorySource};
    use bytes::Bytes;
    use std::collections::VecDeque;

    fn hub() -> Arc<Hub> {
        let registry = prometheus::Registry::new();
        let metrics = ServiceMetrics::register(&registry).expect("metrics");
        let hub = Arc::new(Hub::new(
            metrics,
            QueueLimits {
                max_bytes: 1 << 20,
                policy: SlowConsumerPolicy::Disconnect,
            },
        ));
        let sink: std::sync::Weak<dyn EventSink> =
            Arc::downgrade(&hub) as std::sync::Weak<dyn EventSink>;
        hub.set_source(Source::Memory(MemorySource::new(sink)));
        hub
    }

    fn conn(id: u64) -> Arc<ConnShared> {
        Arc::new(ConnShared::new(id, "127.0.0.1:1".parse().expect("addr")))
    }

    #[test]
    fn subscribers_go_from_one_to_many_and_back() {
        let ids = |subs: &Subscribers| {
            let mut ids: Vec<u64> = subs.values().map(|c| c.id).collect();
            ids.sort_unstable();
            ids
        };
        let (a, b, c) = (conn(1), conn(2), conn(3));
        let mut subs = Subscribers::One(a.clone());
        subs.insert(&a);
        assert!(
            matches!(subs, Subscribers::One(_)),
            "the same id is kept once"
        );
        subs.insert(&b);
        subs.insert(&c);
        assert_eq!(ids(&subs), [1, 2, 3]);
        assert!(!subs.remove(2));
        assert!(!subs.remove(9), "an unknown id changes nothing");
        assert!(!subs.remove(1));
        assert!(
            matches!(subs, Subscribers::One(_)),
            "one left: the map is given back"
        );
        assert_eq!(ids(&subs), [3]);
        assert!(!subs.remove(1), "only the last subscriber empties it");
        assert!(subs.remove(3));
    }

    fn drain(c: &ConnShared) -> Vec<String> {
        let mut batch = VecDeque::new();
        c.take_all(&mut batch);
        batch
            .into_iter()
            .map(|o| o.frame.as_str().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn one_copy_per_connection_even_with_overlapping_patterns() {
        let hub = hub();
        let a = conn(1);
        let b = conn(2);
        hub.subscribe(&a, "order.*").await.expect("bind");
        hub.subscribe(&a, "order.created").await.expect("bind");
        hub.subscribe(&b, "#").await.expect("bind");
        hub.dispatch(
            Event::new("order.created", Bytes::from_static(b"1")),
            Origin::Memory,
            false,
        );
        assert_eq!(drain(&a).len(), 1);
        assert_eq!(drain(&b).len(), 1);
        hub.dispatch(
            Event::new("user.created", Bytes::from_static(b"2")),
            Origin::Memory,
            false,
        );
        assert!(drain(&a).is_empty());
        assert_eq!(drain(&b).len(), 1);
        assert_eq!(hub.metrics.deliveries.get(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_subscribe_and_unsubscribe_keep_counts_consistent() {
        let hub = hub();
        let mut tasks = Vec::new();
        for id in 0..40u64 {
            let hub = hub.clone();
            tasks.push(tokio::spawn(async move {
                let c = conn(id);
                for round in 0..50u64 {
                    hub.subscribe(&c, "busy.*").await.expect("bind");
                    if (id + round) % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                    hub.unsubscribe(&c, "busy.*").await;
                }
                // Half of them end up holding the pattern.
                if id % 2 == 0 {
                    hub.subscribe(&c, "busy.*").await.expect("bind");
                }
                c
            }));
        }
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(t.await.expect("task"));
        }
        assert_eq!(hub.metrics.subscriptions.get(), 20);
        assert_eq!(
            hub.metrics.bindings.get(),
            1,
            "bound exactly once while held"
        );
        hub.dispatch(
            Event::new("busy.x", Bytes::from_static(b"1")),
            Origin::Memory,
            false,
        );
        let got: usize = conns.iter().map(|c| drain(c).len()).sum();
        assert_eq!(got, 20);
        for c in &conns {
            hub.remove_connection(c).await;
        }
        assert_eq!(hub.metrics.bindings.get(), 0);
        assert!(hub.has_no_patterns());
        assert!(lock(&hub.binds).is_empty());
    }

    #[tokio::test]
    async fn refcounts_bindings_and_cleans_up_on_disconnect() {
        let hub = hub();
        let a = conn(1);
        let b = conn(2);
        hub.subscribe(&a, "x.#").await.expect("bind");
        hub.subscribe(&b, "x.#").await.expect("bind");
        assert_eq!(hub.metrics.bindings.get(), 1);
        assert_eq!(hub.metrics.subscriptions.get(), 2);
        hub.unsubscribe(&a, "x.#").await;
        assert_eq!(hub.metrics.bindings.get(), 1, "b still holds it");
        hub.remove_connection(&b).await;
        assert_eq!(hub.metrics.bindings.get(), 0);
        assert_eq!(hub.metrics.subscriptions.get(), 0);
        assert!(hub.has_no_patterns());
        assert!(lock(&hub.binds).is_empty(), "no lock entries left behind");
    }
}
