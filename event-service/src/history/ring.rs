//! The embedded bus's history: the last events published on this instance, bounded by count,
//! bytes and age. Appended to by the hub before each fan-out (see the parent module for why the
//! order matters).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{Kept, Lookup, ReadLimits, id_hash};
use crate::connection::lock;

/// The ring's bounds.
#[derive(Clone, Copy, Debug)]
pub struct RingLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// A bounded, time-ordered history of this instance's events.
pub struct Ring {
    limits: RingLimits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<Arc<Kept>>,
    /// Sequence number of `events[0]`.
    first_seq: u64,
    /// Id hash -> sequence number of the newest event with that id.
    by_id: HashMap<u64, u64>,
    bytes: usize,
}

impl Inner {
    fn pop_oldest(&mut self) {
        if let Some(old) = self.events.pop_front() {
            self.bytes -= old.size();
            let h = id_hash(&old.id);
            if self.by_id.get(&h) == Some(&self.first_seq) {
                self.by_id.remove(&h);
            }
            self.first_seq += 1;
        }
    }

    fn expire(&mut self, max_age: Duration, now: SystemTime) {
        while let Some(first) = self.events.front() {
            let age = now.duration_since(first.time).unwrap_or_default();
            if age <= max_age {
                break;
            }
            self.pop_oldest();
        }
    }
}

impl Ring {
    pub fn new(limits: RingLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Keeps `event`, dropping the oldest events beyond the bounds.
    pub fn append(&self, event: Arc<Kept>) {
        let mut inner = lock(&self.inner);
        let seq = inner.first_seq + inner.events.len() as u64;
        inner.bytes += event.size();
        inner.by_id.insert(id_hash(&event.id), seq);
        inner.events.push_back(event);
        while inner.events.len() > self.limits.max_events
            || (inner.bytes > self.limits.max_bytes && inner.events.len() > 1)
        {
            inner.pop_oldest();
        }
    }

    /// Events kept right now.
    pub fn len(&self) -> usize {
        lock(&self.inner).events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every kept event after `since` whose name `wanted` accepts, oldest first.
    pub fn read_after(
        &self,
        since: &str,
        wanted: &(dyn Fn(&str) -> bool + Sync),
        limits: ReadLimits,
    ) -> Lookup {
        let mut inner = lock(&self.inner);
        inner.expire(self.limits.max_age, SystemTime::now());
        let Some(&seq) = inner.by_id.get(&id_hash(since)) else {
            return Lookup::Unknown;
        };
        let Some(at) = seq
            .checked_sub(inner.first_seq)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return Lookup::Unknown;
        };
        // A hash collision with another id is not the event asked for.
        if inner.events.get(at).is_none_or(|e| &*e.id != since) {
            return Lookup::Unknown;
        }
        super::collect(inner.events.range(at + 1..), wanted, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(name: &str, id: &str, time: SystemTime) -> Arc<Kept> {
        Arc::new(Kept {
            name: name.into(),
            id: id.into(),
            time,
            frame: format!("{{\"id\":\"{id}\"}}").into(),
        })
    }

    fn ring(max_events: usize) -> Ring {
        Ring::new(RingLimits {
            max_events,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        })
    }

    const ALL: ReadLimits = ReadLimits {
        max_events: 100,
        max_bytes: 1 << 20,
    };

    fn ids(lookup: Lookup) -> Vec<String> {
        match lookup {
            Lookup::Found(events) => events.iter().map(|e| e.id.to_string()).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn reads_what_follows_since_matching_the_filter() {
        let r = ring(10);
        let now = SystemTime::now();
        for (i, name) in ["a.x", "b.x", "a.y", "a.z"].iter().enumerate() {
            r.append(kept(name, &format!("e{i}"), now));
        }
        let only_a = |n: &str| n.starts_with("a.");
        assert_eq!(ids(r.read_after("e0", &only_a, ALL)), ["e2", "e3"]);
        assert_eq!(ids(r.read_after("e3", &only_a, ALL)), Vec::<String>::new());
        assert!(matches!(
            r.read_after("nope", &only_a, ALL),
            Lookup::Unknown
        ));
    }

    #[test]
    fn evicted_events_are_unknown_and_the_count_bound_holds() {
        let r = ring(3);
        let now = SystemTime::now();
        for i in 0..5 {
            r.append(kept("a", &format!("e{i}"), now));
        }
        assert_eq!(r.len(), 3);
        assert!(matches!(
            r.read_after("e1", &|_| true, ALL),
            Lookup::Unknown
        ));
        // The oldest kept event is a valid `since`: everything after it is still there.
        assert_eq!(ids(r.read_after("e2", &|_| true, ALL)), ["e3", "e4"]);
    }

    #[test]
    fn expired_events_are_unknown() {
        let r = ring(10);
        let old = SystemTime::now() - Duration::from_secs(120);
        r.append(kept("a", "old", old));
        r.append(kept("a", "new", SystemTime::now()));
        assert!(matches!(
            r.read_after("old", &|_| true, ALL),
            Lookup::Unknown
        ));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_byte_bound_evicts_oldest_but_keeps_the_newest() {
        let r = Ring::new(RingLimits {
            max_events: 100,
            max_bytes: 200,
            max_age: Duration::from_secs(60),
        });
        let now = SystemTime::now();
        for i in 0..10 {
            r.append(kept("a", &format!("e{i}"), now));
        }
        assert!(r.len() < 10 && !r.is_empty(), "{} kept", r.len());
        assert!(matches!(
            r.read_after("e0", &|_| true, ALL),
            Lookup::Unknown
        ));
    }

    #[test]
    fn too_many_matching_events_is_reported_not_truncated() {
        let r = ring(100);
        let now = SystemTime::now();
        for i in 0..20 {
            r.append(kept("a", &format!("e{i}"), now));
        }
        let limits = ReadLimits {
            max_events: 5,
            max_bytes: 1 << 20,
        };
        assert!(matches!(
            r.read_after("e0", &|_| true, limits),
            Lookup::TooMany
        ));
        assert_eq!(ids(r.read_after("e14", &|_| true, limits)).len(), 5);
    }

    #[test]
    fn a_reused_id_points_at_its_newest_event() {
        let r = ring(10);
        let now = SystemTime::now();
        r.append(kept("a", "dup", now));
        r.append(kept("a", "x", now));
        r.append(kept("a", "dup", now));
        r.append(kept("a", "y", now));
        assert_eq!(ids(r.read_after("dup", &|_| true, ALL)), ["y"]);
    }
}
