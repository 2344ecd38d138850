//! Per-object exponential backoff for failed reconciles (kube-rs has none built in).
//!
//! Each EventRouter that fails waits `base * 2^(failures-1)` (capped, with up to 10% jitter so
//! many routers failing together do not retry in lockstep) before the next attempt; one success
//! resets it. Objects are keyed by namespace and name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Backoff state of every failing object.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<(String, String), u32>>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The un-jittered delay after `failures` consecutive failures.
    pub fn delay_for(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << exponent).min(self.max)
    }

    /// Record a failure of `(namespace, name)` and return how long to wait before retrying.
    pub fn failed(&self, namespace: &str, name: &str) -> Duration {
        let failures = {
            let mut map = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = map
                .entry((namespace.to_string(), name.to_string()))
                .or_insert(0);
            *entry = entry.saturating_add(1);
            *entry
        };
        let delay = self.delay_for(failures);
        let jitter = delay.mul_f64(rand::random::<f64>() * 0.1);
        delay + jitter
    }

    /// Forget the failures of `(namespace, name)` after a successful reconcile.
    pub fn succeeded(&self, namespace: &str, name: &str) {
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(&(namespace.to_string(), name.to_string()));
    }

    /// Consecutive failures of `(namespace, name)`.
    pub fn failures(&self, namespace: &str, name: &str) -> u32 {
        let map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&(namespace.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let delays: Vec<_> = (0..7).map(|_| backoff.failed("ns", "a")).collect();
        for (delay, expected) in delays.iter().zip([1, 2, 4, 8, 16, 30, 30]) {
            let expected = Duration::from_secs(expected);
            assert!(
                *delay >= expected && *delay <= expected.mul_f64(1.1),
                "{delay:?} vs {expected:?}"
            );
        }
        assert_eq!(backoff.failures("ns", "a"), 7);
        backoff.succeeded("ns", "a");
        assert_eq!(backoff.failures("ns", "a"), 0);
        assert!(backoff.failed("ns", "a") < Duration::from_millis(1100));
    }

    #[test]
    fn objects_back_off_independently() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..4 {
            backoff.failed("ns", "noisy");
        }
        assert!(backoff.failed("ns", "quiet") < Duration::from_millis(1100));
        assert_eq!(backoff.failures("ns", "noisy"), 4);
        assert_eq!(backoff.failures("other", "noisy"), 0);
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(backoff.delay_for(u32::MAX), Duration::from_secs(300));
    }
}
