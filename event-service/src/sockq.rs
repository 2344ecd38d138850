//! Kernel socket queue depths of one TCP connection (with `direct`'s `sendmsg`, the crate's only
//! `unsafe`).
//!
//! `ioctl(SIOCINQ)` returns the bytes received but not yet read by the application (netstat's
//! Recv-Q) and `ioctl(SIOCOUTQ)` the bytes sent but not yet acknowledged by the peer (Send-Q).
//! This memory lives in the kernel, outside the process RSS: it is exactly what the origin
//! failure could not see. Each call costs well under a microsecond, so every connection samples
//! its own socket from its own task.

use std::os::fd::RawFd;

/// One sample of a socket's kernel queues, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub recv_q: u32,
    pub send_q: u32,
}

// On Linux SIOCINQ is FIONREAD and SIOCOUTQ is TIOCOUTQ (include/uapi/linux/sockios.h).
#[cfg(target_os = "linux")]
const SIOCINQ: libc::Ioctl = libc::FIONREAD;
#[cfg(target_os = "linux")]
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;

#[cfg(target_os = "linux")]
fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> std::io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests write one `int` through the pointer, which points at a live local.
    // A stale or foreign fd makes the kernel return EBADF/ENOTTY, never write elsewhere; the
    // caller keeps the socket open for as long as it samples it.
    let rc = unsafe { libc::ioctl(fd, request, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::try_from(value).unwrap_or(0))
}

/// Samples Recv-Q and Send-Q of the TCP socket `fd`.
#[cfg(target_os = "linux")]
pub fn sample(fd: RawFd) -> std::io::Result<QueueDepth> {
    Ok(QueueDepth {
        recv_q: ioctl_int(fd, SIOCINQ)?,
        send_q: ioctl_int(fd, SIOCOUTQ)?,
    })
}

/// Other systems: no sample (the gauges stay at zero).
#[cfg(not(target_os = "linux"))]
pub fn sample(_fd: RawFd) -> std::io::Result<QueueDepth> {
    Ok(QueueDepth::default())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn unread_bytes_show_up_in_recv_q() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        assert_eq!(sample(server.as_raw_fd()).expect("sample").recv_q, 0);
        client.write_all(&[7u8; 1000]).expect("write");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let depth = sample(server.as_raw_fd()).expect("sample");
            if depth.recv_q == 1000 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Recv-Q never reached 1000: {depth:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_closed_fd_is_an_error_not_a_crash() {
        assert!(sample(-1).is_err());
    }
}
