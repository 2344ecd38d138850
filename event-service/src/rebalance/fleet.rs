//! The fleet view: the latest heartbeat of every instance heard recently, this one included.
//!
//! Expiry uses the time a heartbeat was *received* (the local monotonic clock), never the time a
//! peer says it sent it, so clock skew between nodes changes nothing. Ordering uses the
//! heartbeat's own `(started_ms, seq)`, so a heartbeat delivered late is ignored instead of
//! rolling a peer's count back.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::heartbeat::Heartbeat;

/// How long a silent instance stays in the view, and how many instances the view holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSettings {
    /// An instance not heard from for longer than this is gone (a crashed pod publishes nothing
    /// on its way out). Three heartbeat intervals: one lost heartbeat does not drop a peer.
    pub ttl: Duration,
    /// Most instances tracked, this one included. A router this size is far past what one
    /// RabbitMQ queue per instance suits; the cap only keeps a flood of made-up names from
    /// growing memory.
    pub max_instances: usize,
}

/// The default heartbeat interval; the defaults of [`FleetSettings`] and of the warm-up are
/// multiples of it.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_HEARTBEAT_INTERVAL * 3,
            max_instances: 1024,
        }
    }
}

/// What [`FleetView::observe`] did with a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The first heartbeat heard from this instance (or the first since it expired).
    Added,
    /// A newer heartbeat from a known instance replaced the older one.
    Updated,
    /// Not newer than the one held (a duplicate or a late delivery): ignored.
    Stale,
    /// A new instance while the view is full: ignored, and the view counts as overflowing for one
    /// TTL (the rebalancer holds meanwhile: its mean would be computed on part of the fleet).
    Refused,
}

impl Observed {
    /// A bounded label for a "heartbeats received" counter.
    pub fn metric_label(self) -> &'static str {
        match self {
            Observed::Added => "added",
            Observed::Updated => "updated",
            Observed::Stale => "stale",
            Observed::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    heartbeat: Heartbeat,
    received: Instant,
}

/// The latest heartbeat per instance. Owned by one task; every heartbeat read from the control
/// exchange goes through [`FleetView::observe`], this instance's own included (it hears itself
/// like any other, which also proves the control channel works end to end).
#[derive(Debug, Clone)]
pub struct FleetView {
    me: String,
    settings: FleetSettings,
    created: Instant,
    entries: HashMap<String, Entry>,
    refused_at: Option<Instant>,
}

impl FleetView {
    /// An empty view for the instance named `me`, created at `now` (the warm-up counts from here).
    pub fn new(me: impl Into<String>, settings: FleetSettings, now: Instant) -> Self {
        Self {
            me: me.into(),
            settings,
            created: now,
            entries: HashMap::new(),
            refused_at: None,
        }
    }

    /// The name of the instance that owns this view.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// When the view was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Records `heartbeat`, received at `now`.
    pub fn observe(&mut self, heartbeat: Heartbeat, now: Instant) -> Observed {
        let ttl = self.settings.ttl;
        if let Some(entry) = self.entries.get_mut(&heartbeat.instance) {
            let expired = is_expired(entry.received, now, ttl);
            // An expired entry is replaced whatever its order: a restarted process whose clock
            // went backwards is heard again after one TTL instead of never.
            if !expired && heartbeat.order() <= entry.heartbeat.order() {
                return Observed::Stale;
            }
            *entry = Entry {
                heartbeat,
                received: now,
            };
            return if expired {
                Observed::Added
            } else {
                Observed::Updated
            };
        }
        // This instance always has a place: its own heartbeat is what proves the view current.
        let is_me = heartbeat.instance == self.me;
        let reserved = usize::from(!self.entries.contains_key(&self.me) && !is_me);
        if self.entries.len() + reserved >= self.settings.max_instances {
            self.expire(now);
        }
        if self.entries.len() + reserved >= self.settings.max_instances && !is_me {
            self.refused_at = Some(now);
            return Observed::Refused;
        }
        self.entries.insert(
            heartbeat.instance.clone(),
            Entry {
                heartbeat,
                received: now,
            },
        );
        Observed::Added
    }

    /// Forgets instances silent for longer than the TTL; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.settings.ttl;
        let before = self.entries.len();
        self.entries
            .retain(|_, entry| !is_expired(entry.received, now, ttl));
        before - self.entries.len()
    }

    /// The heartbeats of instances heard within the TTL (whether or not [`FleetView::expire`]
    /// ran), in no particular order.
    pub fn live(&self, now: Instant) -> impl Iterator<Item = &Heartbeat> {
        let ttl = self.settings.ttl;
        self.entries
            .values()
            .filter(move |entry| !is_expired(entry.received, now, ttl))
            .map(|entry| &entry.heartbeat)
    }

    /// This instance's own latest heartbeat, if heard within the TTL.
    pub fn own(&self, now: Instant) -> Option<&Heartbeat> {
        self.entries
            .get(&self.me)
            .filter(|entry| !is_expired(entry.received, now, self.settings.ttl))
            .map(|entry| &entry.heartbeat)
    }

    /// True while a new instance was refused within the last TTL.
    pub fn overflowing(&self, now: Instant) -> bool {
        self.refused_at
            .is_some_and(|at| !is_expired(at, now, self.settings.ttl))
    }

    /// Instances held, expired ones included until the next [`FleetView::expire`].
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The fleet's figures at `now`: what the rebalancer decides on and the metrics show.
    pub fn summary(&self, now: Instant) -> FleetSummary {
        let mut summary = FleetSummary::default();
        for hb in self.live(now) {
            summary.seen += 1;
            if hb.draining {
                continue;
            }
            summary.active += 1;
            summary.active_connections += hb.connections;
            if hb.instance != self.me {
                summary.lowest_peer = Some(
                    summary
                        .lowest_peer
                        .map_or(hb.connections, |low| low.min(hb.connections)),
                );
                summary.peer_headroom += hb.max_connections.saturating_sub(hb.connections);
            }
        }
        summary
    }
}

fn is_expired(received: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(received) > ttl
}

/// The live part of a [`FleetView`], added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetSummary {
    /// Instances heard within the TTL, this one and draining ones included.
    pub seen: usize,
    /// Of those, the ones not draining: the instances that share the load.
    pub active: usize,
    /// Connections on the active instances, as their latest heartbeats say.
    pub active_connections: u64,
    /// The fewest connections on an active instance other than this one.
    pub lowest_peer: Option<u64>,
    /// Free places (`max_connections - connections`) on the active instances other than this
    /// one: where shed clients can go.
    pub peer_headroom: u64,
}

impl FleetSummary {
    /// Connections per active instance, or `None` with no active instance.
    pub fn mean(&self) -> Option<f64> {
        (self.active > 0).then(|| self.active_connections as f64 / self.active as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(instance: &str, seq: u64, connections: u64) -> Heartbeat {
        Heartbeat {
            instance: instance.into(),
            started_ms: 1_000,
            seq,
            connections,
            max_connections: 1_000,
            draining: false,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn keeps_the_latest_heartbeat_and_ignores_stale_ones() {
        let t0 = Instant::now();
        let mut view = FleetView::new("me", FleetSettings::default(), t0);
        assert_eq!(view.observe(hb("a", 5, 100), t0), Observed::Added);
        assert_eq!(
            view.observe(hb("a", 7, 120), t0 + secs(1)),
            Observed::Updated
        );
        // Delivered late: seq 6 after seq 7, and a duplicate of 7.
        assert_eq!(view.observe(hb("a", 6, 999), t0 + secs(2)), Observed::Stale);
        assert_eq!(view.observe(hb("a", 7, 999), t0 + secs(2)), Observed::Stale);
        let counts: Vec<u64> = view.live(t0 + secs(2)).map(|h| h.connections).collect();
        assert_eq!(counts, [120]);
    }

    #[test]
    fn a_restarted_instance_replaces_its_previous_incarnation() {
        let t0 = Instant::now();
        let mut view = FleetView::new("me", FleetSettings::default(), t0);
        view.observe(hb("a", 900, 100), t0);
        let restarted = Heartbeat {
            started_ms: 2_000,
            ..hb("a", 0, 0)
        };
        assert_eq!(view.observe(restarted, t0 + secs(1)), Observed::Updated);
        // Clock went backwards on restart: refused as stale until the old entry expires.
        let backwards = Heartbeat {
            started_ms: 500,
            ..hb("a", 0, 7)
        };
        assert_eq!(
            view.observe(backwards.clone(), t0 + secs(2)),
            Observed::Stale
        );
        assert_eq!(view.observe(backwards, t0 + secs(17)), Observed::Added);
    }

    #[test]
    fn silent_instances_expire_after_the_ttl() {
        let t0 = Instant::now();
        let settings = FleetSettings {
            ttl: secs(15),
            max_instances: 16,
        };
        let mut view = FleetView::new("me", settings, t0);
        view.observe(hb("me", 1, 10), t0);
        view.observe(hb("a", 1, 10), t0);
        view.observe(hb("me", 2, 10), t0 + secs(10));
        assert_eq!(view.live(t0 + secs(15)).count(), 2, "exactly at the TTL");
        assert_eq!(view.live(t0 + secs(16)).count(), 1, "a is gone");
        assert_eq!(view.summary(t0 + secs(16)).seen, 1);
        assert!(view.own(t0 + secs(16)).is_some());
        assert_eq!(view.len(), 2, "held until expire() runs");
        assert_eq!(view.expire(t0 + secs(16)), 1);
        assert_eq!(view.len(), 1);
        assert!(view.own(t0 + secs(26)).is_none());
    }

    #[test]
    fn the_mean_leaves_draining_instances_out() {
        let t0 = Instant::now();
        let mut view = FleetView::new("me", FleetSettings::default(), t0);
        view.observe(hb("me", 1, 300), t0);
        view.observe(hb("a", 1, 100), t0);
        view.observe(
            Heartbeat {
                draining: true,
                ..hb("b", 1, 900)
            },
            t0,
        );
        let s = view.summary(t0);
        assert_eq!((s.seen, s.active, s.active_connections), (3, 2, 400));
        assert_eq!(s.mean(), Some(200.0));
        assert_eq!(s.lowest_peer, Some(100));
        assert_eq!(s.peer_headroom, 900, "only a's free places count");
    }

    #[test]
    fn a_full_view_refuses_new_instances_but_always_admits_itself() {
        let t0 = Instant::now();
        let settings = FleetSettings {
            ttl: secs(15),
            max_instances: 3,
        };
        let mut view = FleetView::new("me", settings, t0);
        assert_eq!(view.observe(hb("a", 1, 1), t0), Observed::Added);
        assert_eq!(view.observe(hb("b", 1, 1), t0), Observed::Added);
        // One place is kept for this instance's own heartbeat.
        assert_eq!(view.observe(hb("c", 1, 1), t0), Observed::Refused);
        assert!(view.overflowing(t0));
        assert_eq!(view.observe(hb("me", 1, 1), t0), Observed::Added);
        assert_eq!(view.observe(hb("a", 2, 5), t0), Observed::Updated);
        assert_eq!(view.len(), 3);
        // Once b falls silent, c finds a place; the overflow is forgotten a TTL after the refusal.
        view.observe(hb("me", 2, 1), t0 + secs(10));
        view.observe(hb("a", 3, 1), t0 + secs(10));
        assert_eq!(view.observe(hb("c", 2, 1), t0 + secs(16)), Observed::Added);
        assert!(!view.overflowing(t0 + secs(16)));
    }
}
