//! What the kernel says about a test's own sockets and memory, read from `/proc` with the
//! `procfs` crate (the same tables `ss`, netstat and `ps` read).

use anyhow::Context;
use procfs::net::TcpState;

/// Kernel queues of one TCP socket, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpQueues {
    /// Received and not yet read by the application (`ss`'s Recv-Q).
    pub rx: u64,
    /// Sent and not yet acknowledged by the peer (`ss`'s Send-Q).
    pub tx: u64,
}

/// Queues of the established TCP socket `local_port → remote_port` (IPv4 or IPv6), or `None`
/// when no such socket is listed.
pub fn tcp_queues(local_port: u16, remote_port: u16) -> anyhow::Result<Option<TcpQueues>> {
    let mut entries = procfs::net::tcp().context("reading /proc/net/tcp")?;
    // tcp6 is absent on kernels without IPv6.
    if let Ok(v6) = procfs::net::tcp6() {
        entries.extend(v6);
    }
    Ok(entries
        .iter()
        .find(|e| {
            e.state == TcpState::Established
                && e.local_address.port() == local_port
                && e.remote_address.port() == remote_port
        })
        .map(|e| TcpQueues {
            rx: u64::from(e.rx_queue),
            tx: u64::from(e.tx_queue),
        }))
}

/// Resident memory of this process (`VmRSS` of `/proc/self/status`), in bytes.
pub fn own_rss_bytes() -> anyhow::Result<u64> {
    let status = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .context("reading /proc/self/status")?;
    let kib = status.vmrss.context("no VmRSS in /proc/self/status")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn unread_bytes_show_in_the_receivers_rx_queue() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        client.write_all(&[7u8; 1000]).expect("write");
        let (server_port, client_port) = (
            listener.local_addr().expect("addr").port(),
            client.local_addr().expect("addr").port(),
        );
        crate::wait::wait_for_blocking(
            "1000 unread bytes in the server socket's Recv-Q",
            std::time::Duration::from_secs(5),
            || match tcp_queues(server_port, client_port).expect("read /proc/net/tcp") {
                Some(q) if q.rx == 1000 => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    #[test]
    fn own_rss_is_positive() {
        assert!(own_rss_bytes().expect("own rss") > 0);
    }
}
