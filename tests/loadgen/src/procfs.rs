//! What the kernel says about the service, read from `/proc` with the `procfs` crate: its resident
//! memory (`/proc/<pid>/status`), its CPU time (`/proc/<pid>/stat`), the receive and send queues
//! of its TCP sockets (`/proc/net/tcp{,6}`, the same numbers as `ss`'s Recv-Q and Send-Q), the
//! kernel's unreclaimable slab (`/proc/meminfo`) and the TCP stack's own memory
//! (`/proc/net/sockstat`).
//!
//! `/proc/net/sockstat` is parsed here by hand: the `procfs` crate does not read it. The queue
//! totals are a pure function over the crate's entries, so they are tested without a kernel.

use std::{fs, io};

use procfs::net::{TcpNetEntry, TcpState};
use procfs::prelude::*;
use procfs::process::Process;

fn to_io(error: procfs::ProcError) -> io::Error {
    io::Error::other(error)
}

/// Memory figures of one process, in KiB as the kernel reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcMemory {
    pub vm_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub vm_hwm_kib: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn process_memory(pid: u32) -> io::Result<ProcMemory> {
    let status = process(pid)?.status().map_err(to_io)?;
    let vm_rss_kib = status.vmrss.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS in /proc/{pid}/status"),
        )
    })?;
    Ok(ProcMemory {
        vm_rss_kib,
        rss_anon_kib: status.rssanon.unwrap_or(0),
        vm_hwm_kib: status.vmhwm.unwrap_or(0),
    })
}

fn process(pid: u32) -> io::Result<Process> {
    let pid =
        i32::try_from(pid).map_err(|_| io::Error::other(format!("pid {pid} out of range")))?;
    Process::new(pid).map_err(to_io)
}

/// CPU time a process has used so far (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = process(pid)?.stat().map_err(to_io)?;
    Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// Sum of kernel queues over a set of established TCP sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueTotals {
    pub sockets: u64,
    /// Bytes received and not yet read by the application (Recv-Q).
    pub recv_q: u64,
    /// Bytes sent and not yet acknowledged by the peer (Send-Q).
    pub send_q: u64,
    pub max_recv_q: u64,
    pub max_send_q: u64,
}

impl QueueTotals {
    fn add(&mut self, tx: u64, rx: u64) {
        self.sockets += 1;
        self.recv_q += rx;
        self.send_q += tx;
        self.max_recv_q = self.max_recv_q.max(rx);
        self.max_send_q = self.max_send_q.max(tx);
    }
}

/// Queues of the established connections of one server port, seen from both ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PortQueues {
    /// Sockets whose local port is the server port: the service's side.
    pub server_side: QueueTotals,
    /// Sockets whose remote port is the server port: the clients' side.
    pub client_side: QueueTotals,
}

/// One socket of the TCP table, as far as the queue totals care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketQueues {
    pub local_port: u16,
    pub remote_port: u16,
    pub established: bool,
    pub tx_queue: u64,
    pub rx_queue: u64,
}

impl From<&TcpNetEntry> for SocketQueues {
    fn from(entry: &TcpNetEntry) -> Self {
        Self {
            local_port: entry.local_address.port(),
            remote_port: entry.remote_address.port(),
            established: entry.state == TcpState::Established,
            tx_queue: u64::from(entry.tx_queue),
            rx_queue: u64::from(entry.rx_queue),
        }
    }
}

/// Reads `/proc/net/tcp` and `/proc/net/tcp6` and sums the queues of established connections to
/// or from `port`.
pub fn port_queues(port: u16) -> io::Result<PortQueues> {
    let mut entries = procfs::net::tcp().map_err(to_io)?;
    // tcp6 is absent on kernels without IPv6.
    if let Ok(v6) = procfs::net::tcp6() {
        entries.extend(v6);
    }
    Ok(accumulate_port_queues(
        entries.iter().map(SocketQueues::from),
        port,
    ))
}

/// Sums the established sockets that touch `port`: the server's side when the local port is
/// `port`, the clients' side when the remote port is.
pub fn accumulate_port_queues(
    sockets: impl IntoIterator<Item = SocketQueues>,
    port: u16,
) -> PortQueues {
    let mut totals = PortQueues::default();
    for socket in sockets.into_iter().filter(|s| s.established) {
        if socket.local_port == port {
            totals.server_side.add(socket.tx_queue, socket.rx_queue);
        } else if socket.remote_port == port {
            totals.client_side.add(socket.tx_queue, socket.rx_queue);
        }
    }
    totals
}

/// Reads `SUnreclaim` from `/proc/meminfo`, in KiB: the kernel's unreclaimable slab, where
/// socket objects live (system-wide, so other activity on the machine shows up as noise).
pub fn unreclaimable_slab_kib() -> io::Result<u64> {
    let meminfo = procfs::Meminfo::current().map_err(to_io)?;
    meminfo
        .s_unreclaim
        .map(|bytes| bytes / 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no SUnreclaim in /proc/meminfo"))
}

/// The TCP line of `/proc/net/sockstat`: sockets in use and the stack's memory, in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TcpSockstat {
    pub inuse: u64,
    pub mem_pages: u64,
}

/// Reads `/proc/net/sockstat`.
pub fn tcp_sockstat() -> io::Result<TcpSockstat> {
    let text = fs::read_to_string("/proc/net/sockstat")?;
    parse_sockstat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no TCP line in /proc/net/sockstat",
        )
    })
}

/// Parses `TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1` out of a sockstat text.
pub fn parse_sockstat(text: &str) -> Option<TcpSockstat> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| {
        words
            .windows(2)
            .find(|w| w[0] == key)
            .and_then(|w| w[1].parse::<u64>().ok())
    };
    Some(TcpSockstat {
        inuse: value("inuse")?,
        mem_pages: value("mem")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_and_cpu_time() {
        let memory = process_memory(std::process::id()).expect("own /proc/self/status");
        assert!(memory.vm_rss_kib > 0, "{memory:?}");
        assert!(memory.vm_hwm_kib >= memory.vm_rss_kib, "{memory:?}");
        // Burn a little CPU so the figure cannot be a constant zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(std::process::id()).expect("own /proc/self/stat") > 0.0);
    }

    fn socket(
        local_port: u16,
        remote_port: u16,
        established: bool,
        tx: u64,
        rx: u64,
    ) -> SocketQueues {
        SocketQueues {
            local_port,
            remote_port,
            established,
            tx_queue: tx,
            rx_queue: rx,
        }
    }

    #[test]
    fn queues_of_established_sockets_on_the_port() {
        // A listener (not established, ignored), a server-side socket with Recv-Q 100, a
        // client-side socket with Send-Q 16, an unrelated socket.
        let totals = accumulate_port_queues(
            [
                socket(8080, 0, false, 0, 5),
                socket(8080, 50000, true, 0, 100),
                socket(50000, 8080, true, 16, 0),
                socket(22, 50001, true, 256, 256),
            ],
            8080,
        );
        assert_eq!(
            totals.server_side,
            QueueTotals {
                sockets: 1,
                recv_q: 100,
                send_q: 0,
                max_recv_q: 100,
                max_send_q: 0
            }
        );
        assert_eq!(
            totals.client_side,
            QueueTotals {
                sockets: 1,
                recv_q: 0,
                send_q: 16,
                max_recv_q: 0,
                max_send_q: 16
            }
        );
    }

    #[test]
    fn unread_bytes_show_in_the_kernel_table() {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        client.write_all(&[7; 300]).expect("write");
        // Loopback delivers at once, but poll briefly rather than trust the timing.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let totals = port_queues(port).expect("/proc/net/tcp");
            if totals.server_side.recv_q == 300 {
                assert_eq!(totals.server_side.sockets, 1);
                assert_eq!(totals.client_side.sockets, 1);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{totals:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn slab_is_read() {
        assert!(unreclaimable_slab_kib().expect("/proc/meminfo") > 0);
    }

    #[test]
    fn sockstat_tcp_line() {
        let text = "sockets: used 200\nTCP: inuse 20004 orphan 0 tw 3 alloc 20010 mem 2500\nUDP: inuse 1 mem 0\n";
        assert_eq!(
            parse_sockstat(text),
            Some(TcpSockstat {
                inuse: 20004,
                mem_pages: 2500
            })
        );
        assert_eq!(parse_sockstat("UDP: inuse 1\n"), None);
        assert!(tcp_sockstat().is_ok());
    }
}
