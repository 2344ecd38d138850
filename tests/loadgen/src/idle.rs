//! The `idle` scenario: memory per idle subscribed connection.
//!
//! Opens N connections, subscribes each to one pattern, then holds them open while READING
//! (a client that never reads would fill the service's send queue, the mirror image of the
//! origin failure). Measures the service's RSS before and after, and the kernel's side: the
//! Recv-Q/Send-Q of every socket on the port (`/proc/net/tcp`) and the TCP stack's memory
//! (`/proc/net/sockstat`), which RSS does not include.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use eventrouter_contract::metrics as m;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};

use crate::{
    cli::{IdleArgs, Peer},
    metrics,
    open::open_subscribed,
    procfs::{self, PortQueues, ProcMemory, TcpSockstat},
    ws::{Subscribed, Tally},
};

/// What each holder task counts.
#[derive(Default)]
struct HoldStats {
    pings: AtomicU64,
    pongs_sent: AtomicU64,
    unexpected_messages: AtomicU64,
    closed_by_server: AtomicU64,
    read_errors: AtomicU64,
}

/// One measurement point.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub label: &'static str,
    pub service_memory: Option<ProcMemory>,
    pub sockstat: Option<TcpSockstat>,
    /// System-wide unreclaimable kernel slab (`SUnreclaim`), KiB.
    pub slab_unreclaimable_kib: Option<u64>,
    pub queues: Option<PortQueues>,
    /// The service's own gauges, when `--admin` is given.
    pub service_connections: Option<f64>,
    pub service_kernel_buffered_bytes: Option<f64>,
    pub service_recv_queue_bytes: Option<f64>,
}

/// The idle scenario's report.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    /// The server under test.
    pub peer: Peer,
    pub requested: usize,
    pub established: usize,
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    pub open_seconds: f64,
    /// When opening started and ended, in seconds since the Unix epoch: the connect rate of
    /// several load generators running at once is their total over the span of all of them.
    pub open_started_unix_s: f64,
    pub open_finished_unix_s: f64,
    pub snapshots: Vec<Snapshot>,
    /// (RSS after − RSS before) / established, from VmRSS.
    pub rss_per_connection_bytes: Option<f64>,
    /// The same from RssAnon (heap and stacks only, no file-backed pages).
    pub rss_anon_per_connection_bytes: Option<f64>,
    /// Growth of the kernel's unreclaimable slab / established: socket objects of both ends of
    /// each loopback connection, outside any RSS (system-wide, so approximate).
    pub kernel_slab_per_connection_pair_bytes: Option<f64>,
    pub pings_received: u64,
    pub pongs_sent: u64,
    pub unexpected_messages: u64,
    pub closed_by_server: u64,
    pub read_errors: u64,
}

async fn snapshot(args: &IdleArgs, label: &'static str) -> Snapshot {
    let common = &args.common;
    let scrape = match common.admin {
        Some(admin) => match metrics::scrape(admin).await {
            Ok(s) => Some(s),
            Err(error) => {
                eprintln!("  warning: scraping {admin}: {error}");
                None
            }
        },
        None => None,
    };
    let gauge = |name: &str| scrape.as_ref().filter(|s| s.has(name)).map(|s| s.sum(name));
    Snapshot {
        label,
        service_memory: common
            .service_pid
            .and_then(|pid| procfs::process_memory(pid).ok()),
        sockstat: procfs::tcp_sockstat().ok(),
        slab_unreclaimable_kib: procfs::unreclaimable_slab_kib().ok(),
        queues: procfs::port_queues(common.addr.port()).ok(),
        service_connections: gauge(m::CONNECTIONS),
        service_kernel_buffered_bytes: gauge(m::KERNEL_BUFFERED_BYTES),
        service_recv_queue_bytes: gauge(m::SOCKET_RECV_QUEUE_BYTES),
    }
}

/// Runs the scenario.
pub async fn run(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    if let Some(pid) = args.common.service_pid {
        procfs::process_memory(pid).with_context(|| format!("reading the RSS of pid {pid}"))?;
    }
    // Listening from the start, so a signal sent once "holding" is printed is never missed.
    let mut release = if args.hold_until_signal {
        Some(signal(SignalKind::user_defined1()).context("listening for SIGUSR1")?)
    } else {
        None
    };
    let mut snapshots = vec![snapshot(args, "before").await];
    eprintln!(
        "idle: opening {} connections to {} ({} at a time)",
        args.connections, args.common.addr, args.common.connect_concurrency
    );
    let pattern = args.pattern.clone();
    let open_started = unix_seconds();
    let opened = open_subscribed(&args.common, args.connections, |i| {
        vec![pattern.replace("{i}", &i.to_string())]
    })
    .await;
    let open_finished = unix_seconds();
    if let Some(first) = &opened.first_failure {
        eprintln!("  first failure: {first}");
    }
    let established = opened.connections.len();

    let stats = Arc::new(HoldStats::default());
    let mut holders = JoinSet::new();
    for (_, sub) in opened.connections {
        holders.spawn(hold(sub, args.answer_pings, Arc::clone(&stats)));
    }

    tokio::time::sleep(args.settle).await;
    snapshots.push(snapshot(args, "established").await);
    if let Some(release) = release.as_mut() {
        eprintln!("  holding {established} connections until SIGUSR1");
        let limit = async {
            if args.hold.is_zero() {
                std::future::pending().await
            } else {
                tokio::time::sleep(args.hold).await;
            }
        };
        tokio::select! {
            _ = release.recv() => {}
            () = limit => eprintln!("  no SIGUSR1 within {:?}; releasing", args.hold),
        }
        snapshots.push(snapshot(args, "after hold").await);
    } else if !args.hold.is_zero() {
        eprintln!("  holding {established} connections for {:?}", args.hold);
        tokio::time::sleep(args.hold).await;
        snapshots.push(snapshot(args, "after hold").await);
    }

    holders.abort_all();
    while holders.join_next().await.is_some() {}
    if args.common.service_pid.is_some() && !args.after_close.is_zero() {
        tokio::time::sleep(args.after_close).await;
        snapshots.push(snapshot(args, "after close").await);
    }

    let per_conn = |f: &dyn Fn(&Snapshot) -> Option<u64>| -> Option<f64> {
        let before = f(&snapshots[0])?;
        let after = f(&snapshots[1])?;
        (established > 0).then(|| (after as f64 - before as f64) / established as f64)
    };
    Ok(IdleReport {
        peer: args.common.peer,
        requested: args.connections,
        established,
        failures: opened.failures,
        first_failure: opened.first_failure,
        open_seconds: opened.elapsed.as_secs_f64(),
        open_started_unix_s: open_started,
        open_finished_unix_s: open_finished,
        rss_per_connection_bytes: per_conn(&|s| s.service_memory.map(|m| m.vm_rss_kib * 1024)),
        rss_anon_per_connection_bytes: per_conn(&|s| {
            s.service_memory.map(|m| m.rss_anon_kib * 1024)
        }),
        kernel_slab_per_connection_pair_bytes: per_conn(&|s| {
            s.slab_unreclaimable_kib.map(|k| k * 1024)
        }),
        snapshots,
        pings_received: stats.pings.load(Ordering::Relaxed),
        pongs_sent: stats.pongs_sent.load(Ordering::Relaxed),
        unexpected_messages: stats.unexpected_messages.load(Ordering::Relaxed),
        closed_by_server: stats.closed_by_server.load(Ordering::Relaxed),
        read_errors: stats.read_errors.load(Ordering::Relaxed),
    })
}

/// Now, in seconds since the Unix epoch.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Holds one connection: reads everything, answers pings (if asked), nothing else.
async fn hold(sub: Subscribed, answer_pings: bool, stats: Arc<HoldStats>) {
    let Subscribed {
        mut stream,
        mut scanner,
        mut protocol,
        messages_after_ack,
    } = sub;
    stats
        .unexpected_messages
        .fetch_add(messages_after_ack, Ordering::Relaxed);
    // Idle connections receive only pings and the odd close: a small buffer is enough.
    let mut buf = vec![0u8; 512];
    let mut replies = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => {
                stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                stats.read_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut tally = Tally::default();
        let fed = scanner.feed(&buf[..n], |header, payload| {
            protocol.on_frame(header, payload, &mut tally, &mut replies, |_| {});
        });
        stats.pings.fetch_add(tally.pings, Ordering::Relaxed);
        stats
            .unexpected_messages
            .fetch_add(tally.events, Ordering::Relaxed);
        if fed.is_err() {
            stats.read_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !answer_pings {
            replies.clear();
        }
        if !replies.is_empty() {
            if stream.write_all(&replies).await.is_err() {
                stats.read_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            stats.pongs_sent.fetch_add(tally.pings, Ordering::Relaxed);
            replies.clear();
        }
        if tally.close.is_some() {
            stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}
