//! The kernel's floor for one small write per connection over loopback TCP: what any server
//! must spend per delivery on this machine when events arrive one at a time.
//!
//! `--senders` threads (1 by default) hold the server ends of `--sockets` loopback connections,
//! each its share, and `--rate` times a second write one `--bytes`-byte message into each with
//! one non-blocking `send` (the least any server can do: no protocol, no queue, no locks, no
//! scheduler). A receiver thread
//! reads the client ends on a single-threaded tokio runtime, as the load generator's subscribers
//! do. The senders' own CPU time (`CLOCK_THREAD_CPUTIME_ID`, which includes the kernel's work in
//! their context: the TCP send path and, on loopback, the receiving socket's TCP input and the
//! reader's wake-up) divided by the messages sent is the floor a server's "CPU per delivery" is
//! compared against.
//!
//! ```sh
//! cargo run --release -p eventrouter-loadgen --bin send_floor -- --sockets 2000 --rate 10
//! ```

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::AsyncReadExt;

#[derive(Parser, Debug)]
#[command(about = "Kernel cost of one small loopback TCP write per connection")]
struct Args {
    /// Connections written to on each round.
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Rounds per second (one message to every connection per round).
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// How long to send.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Bytes per message (227 is one 100-byte event's frame in the event service's protocol).
    #[arg(long, default_value_t = 227)]
    bytes: usize,
    /// Sender threads, each writing to its share of the connections every round.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    sockets: usize,
    senders: usize,
    rate: u32,
    bytes: usize,
    sends: u64,
    short_sends: u64,
    received_bytes: u64,
    expected_bytes: u64,
    sender_cpu_seconds: f64,
    sender_cpu_us_per_send: f64,
    receiver_cpu_seconds: f64,
    round_ms_p50: f64,
    round_ms_max: f64,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sockets == 0 || args.rate == 0 || args.bytes == 0 {
        bail!("--sockets, --rate and --bytes must be positive");
    }
    let _ = rlimit::increase_nofile_limit(2 * args.sockets as u64 + 64);
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let addr = listener.local_addr()?;

    let received = Arc::new(AtomicU64::new(0));
    let receiver_cpu = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = {
        let (received, receiver_cpu, n) = (received.clone(), receiver_cpu.clone(), args.sockets);
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let mut readers = Vec::with_capacity(n);
                for _ in 0..n {
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(mut s) => {
                            let received = received.clone();
                            readers.push(tokio::spawn(async move {
                                let mut buf = vec![0u8; 4096];
                                while let Ok(k) = s.read(&mut buf).await {
                                    if k == 0 {
                                        break;
                                    }
                                    received.fetch_add(k as u64, Ordering::Relaxed);
                                }
                            }));
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let cpu0 = thread_cpu();
                let _ = stop_rx.await;
                receiver_cpu.store((thread_cpu() - cpu0).as_nanos() as u64, Ordering::Relaxed);
                for r in readers {
                    r.abort();
                }
            });
        })
    };

    let mut conns: Vec<TcpStream> = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let (s, _) = listener.accept().context("accept")?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        conns.push(s);
    }
    ready_rx.recv().context("receiver thread ended")??;
    // Settle: the connections' handshakes and the receiver's first poll.
    std::thread::sleep(Duration::from_millis(500));

    let mut msg = vec![b'x'; args.bytes];
    msg[0] = 0x81;
    let period = Duration::from_secs(1) / args.rate;
    let fds: Vec<i32> = conns.iter().map(|c| c.as_raw_fd()).collect();
    let senders = args.senders.clamp(1, fds.len());
    let chunk = fds.len().div_ceil(senders);
    let start = Instant::now();
    let (duration, msg) = (args.duration, &msg);
    // Each sender thread: (sends, short sends, its CPU time, each round's duration in ms).
    let results: Vec<(u64, u64, Duration, Vec<f64>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = fds
            .chunks(chunk)
            .map(|fds| {
                scope.spawn(move || {
                    let (mut sends, mut short_sends) = (0u64, 0u64);
                    let mut rounds_ms = Vec::new();
                    let cpu0 = thread_cpu();
                    let mut next = start;
                    while start.elapsed() < duration {
                        let round = Instant::now();
                        for &fd in fds {
                            // SAFETY: `fd` is an open socket owned by `conns` (alive until the
                            // end of main); `msg` is valid for reads of its length.
                            let rc = unsafe {
                                libc::send(
                                    fd,
                                    msg.as_ptr().cast(),
                                    msg.len(),
                                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                                )
                            };
                            sends += 1;
                            if usize::try_from(rc).ok() != Some(msg.len()) {
                                short_sends += 1;
                            }
                        }
                        rounds_ms.push(round.elapsed().as_secs_f64() * 1e3);
                        next += period;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    (sends, short_sends, thread_cpu() - cpu0, rounds_ms)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect()
    });
    let sends: u64 = results.iter().map(|r| r.0).sum();
    let short_sends: u64 = results.iter().map(|r| r.1).sum();
    let sender_cpu: Duration = results.iter().map(|r| r.2).sum();
    let mut rounds_ms: Vec<f64> = results.into_iter().flat_map(|r| r.3).collect();
    // Let the receiver read the last round, then stop it.
    let expected = (sends - short_sends) * args.bytes as u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = stop_tx.send(());
    let _ = receiver.join();
    drop(conns);

    rounds_ms.sort_by(f64::total_cmp);
    let report = Report {
        sockets: args.sockets,
        senders,
        rate: args.rate,
        bytes: args.bytes,
        sends,
        short_sends,
        received_bytes: received.load(Ordering::Relaxed),
        expected_bytes: expected,
        sender_cpu_seconds: sender_cpu.as_secs_f64(),
        sender_cpu_us_per_send: sender_cpu.as_secs_f64() * 1e6 / sends.max(1) as f64,
        receiver_cpu_seconds: receiver_cpu.load(Ordering::Relaxed) as f64 / 1e9,
        round_ms_p50: rounds_ms.get(rounds_ms.len() / 2).copied().unwrap_or(0.0),
        round_ms_max: rounds_ms.last().copied().unwrap_or(0.0),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} sends of {} B to {} sockets by {} threads at {}/s: senders {:.2} us CPU per send \
             ({:.2} s), receiver {:.2} s, round p50 {:.2} ms max {:.2} ms, received {} of {} B, \
             short sends {}",
            report.sends,
            report.bytes,
            report.sockets,
            report.senders,
            report.rate,
            report.sender_cpu_us_per_send,
            report.sender_cpu_seconds,
            report.receiver_cpu_seconds,
            report.round_ms_p50,
            report.round_ms_max,
            report.received_bytes,
            report.expected_bytes,
            report.short_sends
        );
    }
    if report.received_bytes < expected {
        bail!(
            "the receiver got {} of {expected} bytes",
            report.received_bytes
        );
    }
    Ok(())
}
