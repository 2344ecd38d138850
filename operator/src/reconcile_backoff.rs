//! Per-object exponential backoff for failed reconciles (kube-rs has none built in).
//!
//! The delay policy is `backon`'s exponential builder: each EventRouter that fails waits `base`,
//! then twice as long per further failure, with jitter (up to as long again, so many routers
//! failing together do not retry in lockstep), never longer than `max`. What this module adds is
//! the map: one backoff per object, keyed by namespace and name, that one success resets.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Backoff state of every failing object.
#[derive(Debug)]
pub struct ReconcileBackoff {
    policy: ExponentialBuilder,
    max: Duration,
    failing: Mutex<HashMap<(String, String), ExponentialBackoff>>,
}

impl ReconcileBackoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            policy: ExponentialBuilder::default()
                .with_min_delay(base)
                .with_max_delay(max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
            max,
            failing: Mutex::new(HashMap::new()),
        }
    }

    /// Record a failure of `(namespace, name)` and return how long to wait before retrying.
    pub fn failed(&self, namespace: &str, name: &str) -> Duration {
        let mut map = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        let delays = map
            .entry((namespace.to_string(), name.to_string()))
            .or_insert_with(|| self.policy.build());
        // Without a limit on attempts the iterator never ends; `max` is the fallback all the same.
        delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Forget the failures of `(namespace, name)` after a successful reconcile.
    pub fn succeeded(&self, namespace: &str, name: &str) {
        let mut map = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(&(namespace.to_string(), name.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `delay` is `expected` plus at most as long again (the jitter), capped at `max`.
    fn within_jitter(delay: Duration, expected: Duration, max: Duration) -> bool {
        delay >= expected && delay <= (expected * 2).min(max)
    }

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let max = Duration::from_secs(30);
        let backoff = ReconcileBackoff::new(Duration::from_secs(1), max);
        let delays: Vec<_> = (0..7).map(|_| backoff.failed("ns", "a")).collect();
        for (delay, expected) in delays.iter().zip([1, 2, 4, 8, 16, 30, 30]) {
            let expected = Duration::from_secs(expected);
            assert!(
                within_jitter(*delay, expected, max),
                "{delay:?} vs {expected:?}"
            );
        }
        backoff.succeeded("ns", "a");
        assert!(backoff.failed("ns", "a") < Duration::from_secs(2));
    }

    #[test]
    fn objects_back_off_independently() {
        let backoff = ReconcileBackoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let noisy: Vec<_> = (0..4).map(|_| backoff.failed("ns", "noisy")).collect();
        assert!(noisy[3] >= Duration::from_secs(8), "{noisy:?}");
        assert!(backoff.failed("ns", "quiet") < Duration::from_secs(2));
        assert!(backoff.failed("other", "noisy") < Duration::from_secs(2));
    }

    #[test]
    fn many_failures_stay_at_the_cap() {
        let max = Duration::from_secs(300);
        let backoff = ReconcileBackoff::new(Duration::from_secs(1), max);
        let last = (0..200).map(|_| backoff.failed("ns", "a")).last();
        assert_eq!(last, Some(max));
    }

    #[test]
    fn jitter_spreads_routers_that_fail_together() {
        let backoff = ReconcileBackoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let delays: std::collections::BTreeSet<_> = (0..20)
            .map(|i| backoff.failed("ns", &format!("router-{i}")))
            .collect();
        assert!(
            delays.len() > 1,
            "all 20 first delays were equal: {delays:?}"
        );
    }
}
