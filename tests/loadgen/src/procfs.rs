//! What the kernel says about the service, read from `/proc`: its resident memory
//! (`/proc/<pid>/status`), the receive and send queues of its TCP sockets (`/proc/net/tcp`, the
//! same numbers as `ss`'s Recv-Q and Send-Q), and the TCP stack's own memory (`/proc/net/sockstat`).
//!
//! The parsers are pure functions over the file text so they are tested without a kernel.

use std::{fs, io};

/// Memory figures of one process, in KiB as the kernel reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcMemory {
    pub vm_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub vm_hwm_kib: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn process_memory(pid: u32) -> io::Result<ProcMemory> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no VmRSS in /proc/{pid}/status"),
        )
    })
}

/// Extracts VmRSS, RssAnon and VmHWM from a `/proc/<pid>/status` text.
pub fn parse_status(text: &str) -> Option<ProcMemory> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    Some(ProcMemory {
        vm_rss_kib: field("VmRSS")?,
        rss_anon_kib: field("RssAnon").unwrap_or(0),
        vm_hwm_kib: field("VmHWM").unwrap_or(0),
    })
}

/// CPU time a process has used so far (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })?;
    Ok(ticks as f64 / crate::sys::clock_ticks_per_second() as f64)
}

/// utime + stime, in clock ticks, from a `/proc/<pid>/stat` line. The command name in
/// parentheses may hold spaces, so fields are counted from the last `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is index 0, so utime (field 14) is index 11 and stime index 12.
    let utime = fields.get(11)?.parse::<u64>().ok()?;
    let stime = fields.get(12)?.parse::<u64>().ok()?;
    Some(utime + stime)
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

const TCP_ESTABLISHED: u8 = 0x01;

/// Reads `/proc/net/tcp` and `/proc/net/tcp6` and sums the queues of established connections to
/// or from `port`.
pub fn port_queues(port: u16) -> io::Result<PortQueues> {
    let mut totals = PortQueues::default();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match fs::read_to_string(path) {
            Ok(text) => accumulate_port_queues(&text, port, &mut totals),
            // tcp6 is absent on kernels without IPv6.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(totals)
}

/// Adds the established sockets of a `/proc/net/tcp{,6}` text that touch `port`.
///
/// A line looks like
/// `0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000 ...`:
/// local address:port, remote address:port, state, `tx_queue:rx_queue`, all hexadecimal.
pub fn accumulate_port_queues(text: &str, port: u16, totals: &mut PortQueues) {
    for line in text.lines().skip(1) {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(remote), Some(state), Some(queues)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if u8::from_str_radix(state, 16).ok() != Some(TCP_ESTABLISHED) {
            continue;
        }
        let port_of = |addr: &str| {
            addr.rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        let Some((tx, rx)) = queues.split_once(':').and_then(|(tx, rx)| {
            Some((
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            ))
        }) else {
            continue;
        };
        if port_of(local) == Some(port) {
            totals.server_side.add(tx, rx);
        } else if port_of(remote) == Some(port) {
            totals.client_side.add(tx, rx);
        }
    }
}

/// Reads `SUnreclaim` from `/proc/meminfo`, in KiB: the kernel's unreclaimable slab, where
/// socket objects live (system-wide, so other activity on the machine shows up as noise).
pub fn unreclaimable_slab_kib() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_field(&text, "SUnreclaim")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no SUnreclaim in /proc/meminfo"))
}

/// One `Name:   123 kB` field of a `/proc/meminfo` text, in KiB.
pub fn parse_meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
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
    fn status_fields() {
        let text = "Name:\tevent-service\nVmHWM:\t   20480 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    9000 kB\n";
        assert_eq!(
            parse_status(text),
            Some(ProcMemory {
                vm_rss_kib: 12345,
                rss_anon_kib: 9000,
                vm_hwm_kib: 20480
            })
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn stat_cpu_ticks_skip_the_command_name() {
        let text = "4242 (event service) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 25 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(text), Some(175));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn queues_of_established_sockets_on_the_port() {
        // Port 0x1F90 = 8080. Lines: listener (state 0A, ignored), a server-side socket with
        // Recv-Q 0x64 = 100, a client-side socket with Send-Q 0x10 = 16, an unrelated socket.
        let text = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000064 00:00000000 00000000     0        0 2 1
   2: 0100007F:C350 0100007F:1F90 01 00000010:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:0016 0100007F:C351 01 00000100:00000100 00:00000000 00000000     0        0 4 1
";
        let mut totals = PortQueues::default();
        accumulate_port_queues(text, 8080, &mut totals);
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
    fn ipv6_lines_parse_too() {
        let text = "header\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 00000002:00000003 00:00000000 00000000 0 0 5 1\n";
        let mut totals = PortQueues::default();
        accumulate_port_queues(text, 8080, &mut totals);
        assert_eq!(
            (totals.server_side.send_q, totals.server_side.recv_q),
            (2, 3)
        );
    }

    #[test]
    fn meminfo_field() {
        let text = "MemTotal:       24000000 kB\nSlab:            1056704 kB\nSUnreclaim:       113264 kB\n";
        assert_eq!(parse_meminfo_field(text, "SUnreclaim"), Some(113_264));
        assert_eq!(parse_meminfo_field(text, "Slab"), Some(1_056_704));
        assert_eq!(parse_meminfo_field(text, "Sl"), None);
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
    }
}
