//! A client connection's WebSocket: tungstenite's protocol state over the connection's socket,
//! driven by the connection's one task.
//!
//! tokio-tungstenite's `WebSocketStream` lets a reader and a writer on two tasks share one
//! socket, through two reference-counted waker proxies per connection that every wake-up goes
//! through. A session reads and writes from a single task, so this wrapper passes that task's
//! context straight to the socket instead: no proxies (~160 bytes of every idle connection's
//! memory), no extra indirection per wake-up. The protocol itself (framing, masking, control
//! frames, close handshake, UTF-8 and size limits) stays tungstenite's.

use std::{
    io::{self, Read, Write},
    os::fd::RawFd,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{
    Error as WsError, Message,
    protocol::{Role, WebSocketConfig, WebSocketContext},
};

use crate::direct::ConnStream;

/// The server side of one upgraded connection.
pub struct Ws {
    ctx: WebSocketContext,
    io: ConnStream,
    /// False once a write met a full socket: [`Ws::poll_ready`] flushes before more is queued.
    ready: bool,
    /// The read side ended (closed or failed): reads return `None` from here on.
    ended: bool,
}

impl Ws {
    /// Wraps an upgraded socket; `leftover` is what the client sent after its upgrade request.
    pub fn new(io: ConnStream, leftover: Vec<u8>, config: WebSocketConfig) -> Self {
        Self {
            ctx: WebSocketContext::from_partially_read(leftover, Role::Server, Some(config)),
            io,
            ready: true,
            ended: false,
        }
    }

    pub fn get_mut(&mut self) -> &mut ConnStream {
        &mut self.io
    }

    /// The socket's descriptor (for its queue samples and direct writes).
    pub fn fd(&self) -> RawFd {
        self.io.fd()
    }

    /// The next message: `None` once the peer closed (or the read side ended with an error,
    /// which was returned once). Answers pings and close frames as tungstenite does.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.ctx.read(&mut TaskIo::new(&mut self.io, cx)) {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Err(e) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    /// Ready to queue a message: flushes first when the last write met a full socket.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.ready {
            return Poll::Ready(Ok(()));
        }
        self.poll_flush(cx)
    }

    /// Queues a message; what the socket takes at once is written. A full socket is not an
    /// error (the message stays queued): the next [`Ws::poll_flush`] or [`Ws::poll_ready`],
    /// which the session always makes before it parks, writes the rest and registers for
    /// writability with the task's waker.
    pub fn start_send(&mut self, message: Message) -> Result<(), WsError> {
        let mut cx = Context::from_waker(Waker::noop());
        match self
            .ctx
            .write(&mut TaskIo::new(&mut self.io, &mut cx), message)
        {
            Ok(()) => Ok(()),
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.ready = false;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes everything queued; `Ready(Ok)` means nothing is left buffered.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.ctx.flush(&mut TaskIo::new(&mut self.io, cx)) {
            Ok(()) | Err(WsError::ConnectionClosed) => {
                self.ready = true;
                Poll::Ready(Ok(()))
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => {
                self.ready = true;
                Poll::Ready(Err(e))
            }
        }
    }
}

/// Blocking-style I/O for tungstenite over the non-blocking socket: `WouldBlock` when the socket
/// is not ready, the task's waker registered for when it is.
struct TaskIo<'a, 'b> {
    io: &'a mut ConnStream,
    cx: &'a mut Context<'b>,
}

impl<'a, 'b> TaskIo<'a, 'b> {
    fn new(io: &'a mut ConnStream, cx: &'a mut Context<'b>) -> Self {
        Self { io, cx }
    }
}

fn would_block<T>(poll: Poll<io::Result<T>>) -> io::Result<T> {
    match poll {
        Poll::Ready(result) => result,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for TaskIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        would_block(Pin::new(&mut *self.io).poll_read(self.cx, &mut buf))?;
        Ok(buf.filled().len())
    }
}

impl Write for TaskIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        would_block(Pin::new(&mut *self.io).poll_write(self.cx, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        would_block(Pin::new(&mut *self.io).poll_flush(self.cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt, future::poll_fn};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};

    async fn pair() -> (Ws, WebSocketStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        let config = WebSocketConfig::default().read_buffer_size(128);
        let ws = Ws::new(ConnStream::new(server), Vec::new(), config);
        let client =
            WebSocketStream::from_raw_socket(client.expect("connect"), Role::Client, None).await;
        (ws, client)
    }

    #[tokio::test]
    async fn messages_pass_both_ways_and_pings_are_answered() {
        let (mut ws, mut client) = pair().await;
        // Larger than the read buffer: read in pieces, whole in the end.
        let big = "x".repeat(5_000);
        client.send(Message::text(big.clone())).await.expect("send");
        client
            .send(Message::Ping(vec![7].into()))
            .await
            .expect("ping");
        let got = poll_fn(|cx| ws.poll_next(cx)).await;
        assert!(matches!(got, Some(Ok(Message::Text(t))) if t.as_str() == big));
        let got = poll_fn(|cx| ws.poll_next(cx)).await;
        assert!(matches!(got, Some(Ok(Message::Ping(_)))));
        ws.start_send(Message::text("hello")).expect("queued");
        poll_fn(|cx| ws.poll_flush(cx)).await.expect("flushed");
        // The pong tungstenite queued for the ping, and the text (in tungstenite's order).
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(client.next().await.expect("frame").expect("ok"));
        }
        assert!(got.contains(&Message::Pong(vec![7].into())), "{got:?}");
        assert!(got.contains(&Message::text("hello")), "{got:?}");
        client.close(None).await.expect("close");
        // The close frame, then the end.
        let got = poll_fn(|cx| ws.poll_next(cx)).await;
        assert!(matches!(got, Some(Ok(Message::Close(_)))));
        poll_fn(|cx| ws.poll_flush(cx)).await.expect("close reply");
        assert!(poll_fn(|cx| ws.poll_next(cx)).await.is_none());
    }

    #[tokio::test]
    async fn a_full_socket_queues_and_poll_ready_waits_for_room() {
        let (mut ws, mut client) = pair().await;
        let frame = "y".repeat(64 * 1024);
        // The client reads nothing: the socket fills, and writes stay queued, not failed.
        let mut queued = 0;
        while queued < 200 {
            match poll_fn(|cx| Poll::Ready(ws.poll_ready(cx))).await {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => panic!("write failed: {e}"),
                Poll::Pending => break,
            }
            ws.start_send(Message::text(frame.clone())).expect("queued");
            queued += 1;
        }
        assert!(queued < 200, "the socket never filled");
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while n < queued {
                match client.next().await {
                    Some(Ok(Message::Text(t))) => {
                        assert_eq!(t.len(), 64 * 1024);
                        n += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            n
        });
        poll_fn(|cx| ws.poll_flush(cx))
            .await
            .expect("flushed once read");
        assert_eq!(reader.await.expect("reader"), queued);
    }
}
