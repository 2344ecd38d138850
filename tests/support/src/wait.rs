//! Polling with a deadline: the one way tests wait for eventually-consistent state (a controller
//! reconciling, a binding appearing, a counter moving, a node coming back), so that every wait
//! has a timeout and a message saying what did not happen. Async for tokio tests, blocking for
//! the synchronous chart tests; both poll at the same pace.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often a probe runs; short enough to keep socket tests quick, long enough not to hammer
/// an API server.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn timed_out(what: &str, timeout: Duration, last: impl Display) -> ! {
    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
}

/// Runs `probe` until it returns `Ok`, and returns that value. After `timeout` it panics with
/// `what` and the probe's last error, so a failing test says what it was waiting for and what
/// it saw instead.
pub async fn wait_for<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => timed_out(what, timeout, last),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Runs `probe` until it returns `true`; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let checked = probe();
        async move {
            if checked.await {
                Ok(())
            } else {
                Err("condition still false")
            }
        }
    })
    .await;
}

/// [`wait_for`] for synchronous tests: the thread sleeps between probes.
pub fn wait_for_blocking<T, E: Display>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => timed_out(what, timeout, last),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_first_success() {
        let calls = AtomicU32::new(0);
        let value = wait_for("the third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 3 {
                Ok(n)
            } else {
                Err(format!("call {n}"))
            }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a miracle; last seen: still nothing")]
    async fn times_out_with_what_and_the_last_error() {
        wait_for("a miracle", Duration::from_millis(300), || async {
            Err::<(), _>("still nothing")
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for false to turn true")]
    async fn wait_until_times_out() {
        wait_until("false to turn true", Duration::from_millis(300), || async {
            false
        })
        .await;
    }

    #[test]
    fn blocking_returns_the_first_success() {
        let mut calls = 0;
        let value = wait_for_blocking("the second call", Duration::from_secs(5), || {
            calls += 1;
            if calls == 2 { Ok(calls) } else { Err("first") }
        });
        assert_eq!(value, 2);
    }

    #[test]
    #[should_panic(expected = "waiting for nothing; last seen: never")]
    fn blocking_times_out() {
        wait_for_blocking("nothing", Duration::from_millis(200), || {
            Err::<(), _>("never")
        });
    }
}
