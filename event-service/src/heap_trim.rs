//! Returns freed heap memory to the operating system after connection churn.
//!
//! Every handshake briefly holds kilobytes (hyper's HTTP buffers, the upgrade's state) that are
//! freed once the connection is up, and every closed connection frees its own. The C allocator
//! keeps freed memory in its arenas, interleaved with the long-lived allocations of the
//! connections that stay, so the process's RSS keeps what a burst of connects or disconnects
//! once needed. After enough churn this task asks the allocator (glibc's `malloc_trim`) to give
//! whole free pages back: at 10,000 idle connections that is ~10 % of the service's RSS
//! (BENCHMARKS.md). It runs on the blocking pool: a trim locks each arena while it walks it
//! (measured at 0.2–4 ms on a 40 MiB heap), which must not hold up a runtime worker.

use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;

/// Connections opened or closed since the last trim before another is worth its cost.
const CHURN_BEFORE_TRIM: u64 = 256;

/// Checks every `interval` (0: never) whether at least [`CHURN_BEFORE_TRIM`] connections were
/// opened or closed since the last trim (from the accepted counter and the open-connections
/// gauge), and trims if so.
pub(crate) fn spawn(
    interval: Duration,
    accepted: IntCounter,
    open: IntGauge,
    stop: CancellationToken,
) {
    if interval.is_zero() || !supported() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut churn_at_last = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let opened = accepted.get();
            let closed = opened.saturating_sub(u64::try_from(open.get()).unwrap_or(0));
            let churn = opened + closed;
            if churn.saturating_sub(churn_at_last) < CHURN_BEFORE_TRIM {
                continue;
            }
            churn_at_last = churn;
            let started = std::time::Instant::now();
            if tokio::task::spawn_blocking(trim).await.is_ok() {
                tracing::debug!(took = ?started.elapsed(), "freed heap returned to the system");
            }
        }
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn supported() -> bool {
    true
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn supported() -> bool {
    false
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and only releases memory the allocator holds free;
    // it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trim after freeing many small blocks leaves the heap usable and returns memory
    /// (RSS does not grow from it).
    #[test]
    fn trimming_after_churn_keeps_the_heap_usable() {
        let blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 2_000]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter().step_by(50).cloned().collect();
        drop(blocks);
        let before = rss_kib();
        trim();
        let after = rss_kib();
        assert!(supported(), "the service is built for glibc Linux");
        assert!(after <= before, "trim grew RSS: {before} -> {after} KiB");
        // ~39 MB freed between kept blocks; other tests may allocate meanwhile.
        assert!(
            before - after > 5_000,
            "trim returned little: {before} -> {after} KiB"
        );
        assert!(kept.iter().enumerate().all(|(i, b)| b[0] == (i * 50) as u8));
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmRSS")
    }
}
