//! Writing event frames straight into parked connections' sockets, and the socket wrapper that
//! keeps the byte stream whole when such a write was cut short.
//!
//! Most of the time a subscribed connection has nothing queued and its socket has room. Waking
//! the connection's own task for each event would then cost a task wake-up and poll, a copy into
//! the WebSocket layer's buffer and a `send`, per recipient per event. Instead, while a
//! connection's task is parked with nothing buffered anywhere (see `session`), its event frames
//! are written by a [`Writers`] group writer that serves many connections: it encodes each
//! frame header itself and `sendmsg`s headers and the shared payloads with `MSG_DONTWAIT`, one
//! syscall per connection per run. When the socket takes only part, the rest goes into
//! [`ConnStream`]'s prefix, which the connection's task (woken for it) writes before anything
//! else; when it takes nothing, the frames stay queued and the task is woken to write them as
//! usual. Server frames are never masked, so the bytes on the wire are exactly what the
//! WebSocket layer would have written.
//!
//! The connection's task is the only other writer. Direct writes happen only under the
//! connection's queue lock while the task has declared itself parked (it takes the lock to
//! declare it and to end it before touching the socket), so two writers never interleave and
//! the descriptor is open for every direct write.

use std::{
    io,
    os::fd::RawFd,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::connection::ConnShared;

/// The header of an unmasked, final text frame carrying `len` payload bytes (RFC 6455 5.2):
/// the buffer and how many of its bytes are used.
pub(crate) fn text_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x81; // FIN + text
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// What a direct write did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// This many whole frames are in the socket, and nothing else.
    Frames(usize),
    /// This many whole frames, then part of the next: these bytes of it (header included) must
    /// follow before anything else.
    Partial(usize, Vec<u8>),
}

/// Bytes of several frames copied together for one `send` (a copy is far cheaper than the
/// kernel's per-segment work on many small iovecs).
const COALESCE_BYTES: usize = 128 * 1024;

/// Writes text frames with the payloads `payload(0..n)`, in order, to the socket `fd` without
/// blocking, as far as the socket takes them: one frame as header and payload straight from
/// the shared buffer, several copied into `scratch` and sent together. A failed socket takes
/// nothing: its task finds out when it writes.
#[cfg(target_os = "linux")]
pub(crate) fn send_texts<'a>(
    fd: RawFd,
    n: usize,
    payload: impl Fn(usize) -> &'a [u8],
    scratch: &mut Vec<u8>,
) -> Sent {
    if n == 1 {
        let p = payload(0);
        let (h, hl) = text_header(p.len());
        let written = send_parts(fd, &h[..hl], p);
        return if written >= hl + p.len() {
            Sent::Frames(1)
        } else {
            cut(0, written, &h[..hl], p)
        };
    }
    let mut first = 0;
    while first < n {
        scratch.clear();
        let mut end = first;
        while end < n && (end == first || scratch.len() + payload(end).len() + 10 <= COALESCE_BYTES)
        {
            let p = payload(end);
            let (h, hl) = text_header(p.len());
            scratch.extend_from_slice(&h[..hl]);
            scratch.extend_from_slice(p);
            end += 1;
        }
        let mut written = send_parts(fd, scratch, &[]);
        if written >= scratch.len() {
            first = end;
            continue;
        }
        for i in first..end {
            let p = payload(i);
            let (h, hl) = text_header(p.len());
            if written >= hl + p.len() {
                written -= hl + p.len();
                continue;
            }
            return cut(i, written, &h[..hl], p);
        }
    }
    if scratch.capacity() > COALESCE_BYTES {
        *scratch = Vec::new();
    }
    Sent::Frames(n)
}

/// Frame `i` was cut after `written` of its bytes (header `h`, payload `p`).
fn cut(i: usize, written: usize, h: &[u8], p: &[u8]) -> Sent {
    if written == 0 {
        return Sent::Frames(i);
    }
    let mut rest = Vec::with_capacity(h.len() + p.len() - written);
    if written < h.len() {
        rest.extend_from_slice(&h[written..]);
        rest.extend_from_slice(p);
    } else {
        rest.extend_from_slice(&p[written - h.len()..]);
    }
    Sent::Partial(i, rest)
}

/// Frames up to this size are copied into one buffer on the stack and sent with `send`: the
/// kernel then imports no iovec array and copies one segment.
const SMALL_SEND_BYTES: usize = 512;

/// One non-blocking send of `a` then `b`; the bytes written (0 on any error).
#[cfg(target_os = "linux")]
fn send_parts(fd: RawFd, a: &[u8], b: &[u8]) -> usize {
    if b.is_empty() {
        return send_one(fd, a);
    }
    let n = a.len() + b.len();
    if n <= SMALL_SEND_BYTES {
        let mut small = [0u8; SMALL_SEND_BYTES];
        small[..a.len()].copy_from_slice(a);
        small[a.len()..n].copy_from_slice(b);
        return send_one(fd, &small[..n]);
    }
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: a zeroed msghdr is valid (no name, no control data); its iovecs point at `a` and
    // `b`, alive for the call and only read by the kernel. The caller holds the connection's
    // queue lock while its task is parked, so `fd` is that connection's open socket.
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    usize::try_from(rc).unwrap_or(0)
}

/// One non-blocking `send` of `bytes`; the bytes written (0 on any error).
#[cfg(target_os = "linux")]
fn send_one(fd: RawFd, bytes: &[u8]) -> usize {
    // SAFETY: `bytes` is valid for reads of its length for the call. The caller holds the
    // connection's queue lock while its task is parked, so `fd` is that connection's open socket.
    let rc = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(rc).unwrap_or(0)
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn send_texts<'a>(
    _fd: RawFd,
    _n: usize,
    _payload: impl Fn(usize) -> &'a [u8],
    _scratch: &mut Vec<u8>,
) -> Sent {
    Sent::Frames(0)
}

/// The writers that deliver frames queued for parked connections, one per group of
/// connections (by connection id). A fan-out queues a frame and, the first time for that
/// connection since its group last ran, puts the connection on its group's list; the group's
/// writer then writes everything those connections have queued with one `sendmsg` each. A
/// fan-out thus never writes to sockets itself (it stays short, whatever the recipient count),
/// the groups' writers run on every worker thread, and a connection that receives several
/// events before its group runs gets them in one write.
pub(crate) struct Writers {
    groups: Box<[Group]>,
    /// Groups marked since the last kick, one bit each.
    pending: AtomicU64,
    latency: prometheus::Histogram,
}

#[derive(Default)]
struct Group {
    /// Connections with frames for this group's writer, and whether a writer task is scheduled.
    marked: std::sync::Mutex<(Vec<Arc<ConnShared>>, bool)>,
}

impl Writers {
    pub(crate) fn new(groups: usize, latency: prometheus::Histogram) -> Arc<Self> {
        Arc::new(Self {
            groups: (0..groups.clamp(1, 64)).map(|_| Group::default()).collect(),
            pending: AtomicU64::new(0),
            latency,
        })
    }

    /// `conn` has frames for its group's writer, which starts at the next [`Writers::kick`].
    pub(crate) fn mark(&self, conn: &Arc<ConnShared>) {
        let g = (conn.id % self.groups.len() as u64) as usize;
        crate::connection::lock(&self.groups[g].marked)
            .0
            .push(conn.clone());
        self.pending.fetch_or(1 << g, Ordering::AcqRel);
    }

    /// Starts the writers of the groups marked since the last kick. Sources kick after each
    /// dispatch of a lone event and once per slice of a batch, so a writer carries everything
    /// a batch queued for a connection in one write instead of chasing the fan-out.
    pub(crate) fn kick(self: &Arc<Self>) {
        let mut pending = self.pending.swap(0, Ordering::AcqRel);
        while pending != 0 {
            let g = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            {
                let mut marked = crate::connection::lock(&self.groups[g].marked);
                if marked.1 || marked.0.is_empty() {
                    // Running: it takes these before it ends.
                    continue;
                }
                marked.1 = true;
            }
            self.start(g);
        }
    }

    fn start(self: &Arc<Self>, g: usize) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // Unreachable in practice: only a parked session (inside the runtime) is marked,
            // and sources kick from their tasks.
            tracing::error!(group = g, "group writer kicked outside the runtime");
            crate::connection::lock(&self.groups[g].marked).1 = false;
            return;
        };
        let writers = self.clone();
        rt.spawn(async move {
            // A slice of connections per poll: the writer must not keep a worker thread from the
            // tasks that publish (nor from other groups' writers) for long.
            let mut batch = Vec::new();
            while writers.take(g, &mut batch) {
                let latency = writers.latency.local();
                while !batch.is_empty() {
                    let at = batch.len().saturating_sub(CONNS_PER_POLL);
                    for conn in batch.drain(at..) {
                        conn.write_direct(&latency);
                    }
                    if !batch.is_empty() {
                        latency.flush();
                        tokio::task::yield_now().await;
                    }
                }
                drop(latency);
                tokio::task::yield_now().await;
            }
        });
    }

    /// Moves the group's marked connections into `batch`; false (and the writer ends) when
    /// there are none.
    fn take(&self, g: usize, batch: &mut Vec<Arc<ConnShared>>) -> bool {
        let mut marked = crate::connection::lock(&self.groups[g].marked);
        if marked.0.is_empty() {
            marked.1 = false;
            return false;
        }
        std::mem::swap(&mut marked.0, batch);
        true
    }
}

/// Connections a group writer serves per poll.
const CONNS_PER_POLL: usize = 32;

/// A client connection's socket as the WebSocket layer sees it: writes first finish the bytes
/// of a frame a direct write left unfinished.
pub struct ConnStream {
    tcp: TcpStream,
    /// The unwritten tail of a direct write and how much of it is written (boxed: rare).
    prefix: Option<Box<(Vec<u8>, usize)>>,
}

impl ConnStream {
    pub fn new(tcp: TcpStream) -> Self {
        Self { tcp, prefix: None }
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    pub fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.tcp.as_raw_fd()
    }

    /// Bytes to write before anything else.
    pub(crate) fn set_prefix(&mut self, rest: Vec<u8>) {
        debug_assert!(self.prefix.is_none());
        if !rest.is_empty() {
            self.prefix = Some(Box::new((rest, 0)));
        }
    }

    fn poll_prefix(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(prefix) = self.prefix.as_mut() {
            let (bytes, done) = &mut **prefix;
            match Pin::new(&mut self.tcp).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    if *done >= bytes.len() {
                        self.prefix = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_prefix(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.tcp).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_prefix(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.tcp).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_prefix(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.tcp).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        assert_eq!(text_header(0).0[..2], [0x81, 0]);
        assert_eq!(text_header(125).0[..2], [0x81, 125]);
        let (h, n) = text_header(126);
        assert_eq!((n, &h[..4]), (4, &[0x81, 126, 0, 126][..]));
        let (h, n) = text_header(65_535);
        assert_eq!((n, &h[..4]), (4, &[0x81, 126, 0xff, 0xff][..]));
        let (h, n) = text_header(65_536);
        assert_eq!(n, 10);
        assert_eq!(h[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    /// A connected pair of sockets on loopback: (the server end as a std stream, the client end).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (server, client)
    }

    /// Parses unmasked text frames off `bytes`.
    fn frames(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0x81);
            let (len, skip) = match bytes[1] {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => (
                    usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().expect("8")))
                        .expect("len"),
                    10,
                ),
                n => (usize::from(n), 2),
            };
            out.push(bytes[skip..skip + len].to_vec());
            bytes = &bytes[skip + len..];
        }
        out
    }

    #[test]
    fn frames_written_in_part_continue_from_the_exact_byte() {
        use std::{io::Read, os::fd::AsRawFd};
        let (server, mut client) = pair();
        server.set_nonblocking(true).expect("nonblocking");
        // Far more than the socket buffers take: the kernel cuts the write somewhere.
        let payloads: Vec<Vec<u8>> = (0..200u32)
            .map(|i| {
                let len = [5usize, 130, 70_000][i as usize % 3];
                vec![b'a' + (i % 26) as u8; len]
            })
            .collect();
        let sent = send_texts(
            server.as_raw_fd(),
            payloads.len(),
            |i| &payloads[i],
            &mut Vec::new(),
        );
        let (whole, rest) = match sent {
            Sent::Partial(whole, rest) => (whole, rest),
            // Cut exactly between two frames: the next one starts the rest.
            Sent::Frames(whole) => {
                let (h, hl) = text_header(payloads[whole].len());
                let mut rest = h[..hl].to_vec();
                rest.extend_from_slice(&payloads[whole]);
                (whole, rest)
            }
        };
        assert!(whole < payloads.len());
        // What the socket took, then the rest of the cut frame, then the frames after it, is
        // exactly the frames in order.
        let mut wire = Vec::new();
        let reader = std::thread::spawn(move || {
            let _ = client.read_to_end(&mut wire);
            wire
        });
        let mut tail = rest;
        for p in &payloads[whole + 1..] {
            let (h, hl) = text_header(p.len());
            tail.extend_from_slice(&h[..hl]);
            tail.extend_from_slice(p);
        }
        server.set_nonblocking(false).expect("blocking");
        std::io::Write::write_all(&mut &server, &tail).expect("write the rest");
        drop(server);
        let wire = reader.join().expect("reader");
        assert_eq!(frames(&wire), payloads);
    }

    #[test]
    fn single_frames_small_and_large_arrive_whole() {
        use std::{io::Read, os::fd::AsRawFd};
        let (server, mut client) = pair();
        // Copied into one buffer (header + payload within SMALL_SEND_BYTES), then sent as two
        // parts; one at each edge.
        let payloads = [
            vec![b's'; SMALL_SEND_BYTES - 4],
            vec![b'l'; SMALL_SEND_BYTES - 3],
            vec![b'L'; 5000],
        ];
        for p in &payloads {
            assert_eq!(
                send_texts(server.as_raw_fd(), 1, |_| p, &mut Vec::new()),
                Sent::Frames(1)
            );
        }
        drop(server);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).expect("read");
        assert_eq!(frames(&wire), payloads);
    }

    #[test]
    fn a_socket_with_room_takes_every_frame_in_one_call() {
        use std::{io::Read, os::fd::AsRawFd};
        let (server, mut client) = pair();
        let payloads = [b"one".to_vec(), vec![b'x'; 300], b"three".to_vec()];
        assert_eq!(
            send_texts(server.as_raw_fd(), 3, |i| &payloads[i], &mut Vec::new()),
            Sent::Frames(3)
        );
        drop(server);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).expect("read");
        assert_eq!(frames(&wire), payloads);
    }
}
