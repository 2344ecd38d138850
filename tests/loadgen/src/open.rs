//! Opening many subscribed connections at a bounded concurrency, spread over loopback source
//! addresses, with progress and failures counted by kind.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    cli::Common,
    ws::{self, Subscribed, Target},
};

/// The outcome of opening a set of connections.
pub struct Opened {
    /// Subscribed connections with their index.
    pub connections: Vec<(usize, Subscribed)>,
    /// Failures by kind.
    pub failures: BTreeMap<String, u64>,
    /// The first failure's full message, to show why.
    pub first_failure: Option<String>,
    pub elapsed: Duration,
}

/// The source address of connection `i`: `None` (kernel's choice) with one source, else
/// 127.0.0.1 … 127.0.0.N in turn.
pub fn source_ip(common: &Common, i: usize) -> Option<IpAddr> {
    (common.source_ips > 1 && common.addr.ip().is_loopback() && common.addr.is_ipv4()).then(|| {
        let last = 1 + (i % usize::from(common.source_ips)) as u8;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    })
}

/// Opens `count` connections, subscribing connection `i` to `patterns(i)`.
pub async fn open_subscribed(
    common: &Common,
    count: usize,
    patterns: impl Fn(usize) -> Vec<String>,
) -> Opened {
    let started = Instant::now();
    let target = Target {
        addr: common.addr,
        path: common.ws_path(),
    };
    let peer = common.peer;
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let token: Option<Arc<str>> = match &common.auth_secret_file {
        None => None,
        Some(path) => match crate::auth::mint_token(path) {
            Ok(token) => Some(token.into()),
            Err(error) => panic!("cannot mint a token from {}: {error}", path.display()),
        },
    };
    let mut tasks = JoinSet::new();
    let mut opened = Opened {
        connections: Vec::with_capacity(count),
        failures: BTreeMap::new(),
        first_failure: None,
        elapsed: Duration::ZERO,
    };
    let mut progress = Progress {
        count,
        done: 0,
        started,
    };
    for i in 0..count {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        // Collect finished ones as we go so progress shows while connections are opening.
        while let Some(joined) = tasks.try_join_next() {
            record(&mut opened, &mut progress, joined);
        }
        let target = target.clone();
        let source = source_ip(common, i);
        let patterns = patterns(i);
        let timeout = common.handshake_timeout;
        let token = token.clone();
        tasks.spawn(async move {
            let result = async {
                let (stream, leftover) =
                    tokio::time::timeout(timeout, ws::connect(&target, source))
                        .await
                        .map_err(|_| ws::WsError::Timeout)??;
                ws::subscribe(stream, leftover, peer, &patterns, token.as_deref(), timeout).await
            }
            .await;
            drop(permit);
            (i, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        record(&mut opened, &mut progress, joined);
    }
    opened.connections.sort_by_key(|(i, _)| *i);
    opened.elapsed = started.elapsed();
    opened
}

struct Progress {
    count: usize,
    done: usize,
    started: Instant,
}

fn record(
    opened: &mut Opened,
    progress: &mut Progress,
    joined: Result<(usize, Result<Subscribed, ws::WsError>), tokio::task::JoinError>,
) {
    progress.done += 1;
    match joined {
        Ok((i, Ok(sub))) => opened.connections.push((i, sub)),
        Ok((i, Err(error))) => {
            *opened.failures.entry(error.kind()).or_insert(0) += 1;
            opened
                .first_failure
                .get_or_insert_with(|| format!("connection {i}: {error}"));
        }
        Err(join_error) => {
            *opened.failures.entry("task_panicked".into()).or_insert(0) += 1;
            opened
                .first_failure
                .get_or_insert_with(|| join_error.to_string());
        }
    }
    if progress.done.is_multiple_of(1000) || progress.done == progress.count {
        eprintln!(
            "  opened {}/{} ({} failed) in {:.1}s",
            opened.connections.len(),
            progress.count,
            progress.done - opened.connections.len(),
            progress.started.elapsed().as_secs_f64()
        );
    }
}
