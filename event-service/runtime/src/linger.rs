//! Closing a connection so the peer reads the last answer before any reset.
//!
//! When a server closes a TCP socket whose receive queue still holds unread bytes, the kernel
//! sends a reset instead of a FIN. A client still busy sending (a frame over the size limit, a
//! request body over the limit) then sees its write fail with "connection reset" and never reads
//! the close frame or error status the server sent just before. So after a final answer the
//! server shuts down its write side (the peer gets the answer, then end-of-stream) and keeps
//! reading and discarding what the peer still sends, for a bounded time and a bounded number of
//! bytes, before it closes the socket.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Buf;
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::Instant,
};

/// Longest the server keeps reading and discarding after its final answer (a close frame, an
/// error status) before it closes the connection anyway.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Most bytes the server reads and discards after its final answer. A client may still be
/// sending up to this much (the rest of an oversized frame or body) and read the answer; beyond
/// it the server closes and the client may see a reset.
pub const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// Size of the buffer discarded bytes are read into.
const DISCARD_CHUNK: usize = 16 * 1024;

/// How a discard ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discarded {
    /// The peer finished (end of stream or end of body) after this many bytes.
    Complete(usize),
    /// The byte bound or the deadline was reached first (the peer is still sending).
    Bounded(usize),
    /// The read failed (the peer reset the connection).
    Failed(usize),
}

impl Discarded {
    /// Bytes read and thrown away.
    pub fn bytes(self) -> usize {
        match self {
            Self::Complete(n) | Self::Bounded(n) | Self::Failed(n) => n,
        }
    }
}

/// Reads and discards from `stream` until end of stream, an error, `max_bytes` or `deadline`.
pub async fn discard<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Instant,
    max_bytes: usize,
) -> Discarded {
    let mut buf = vec![0u8; DISCARD_CHUNK];
    let mut total = 0usize;
    while total < max_bytes {
        let want = DISCARD_CHUNK.min(max_bytes - total);
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[..want])).await {
            Err(_) => return Discarded::Bounded(total),
            Ok(Ok(0)) => return Discarded::Complete(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(_)) => return Discarded::Failed(total),
        }
    }
    Discarded::Bounded(total)
}

/// Shuts down the write side of `stream` (the peer reads everything sent so far, then end of
/// stream), then discards what the peer still sends until it closes its side too, at most
/// `max_bytes` (usually [`LINGER_MAX_BYTES`]) and until `deadline`. The caller then drops the
/// stream.
pub async fn shutdown_and_discard<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    deadline: Instant,
    max_bytes: usize,
) -> Discarded {
    if tokio::time::timeout_at(deadline, stream.shutdown())
        .await
        .is_err()
    {
        return Discarded::Bounded(0);
    }
    discard(stream, deadline, max_bytes).await
}

/// Discards what is readable on `stream` right now, without waiting (at most `max_bytes`).
pub fn poll_discard_ready<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut Context<'_>,
    max_bytes: usize,
) -> Discarded {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    while total < max_bytes {
        let want = buf.len().min(max_bytes - total);
        let mut read = ReadBuf::new(&mut buf[..want]);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Discarded::Complete(total),
            Poll::Ready(Ok(())) => total += read.filled().len(),
            Poll::Ready(Err(_)) => return Discarded::Failed(total),
            Poll::Pending => return Discarded::Bounded(total),
        }
    }
    Discarded::Bounded(total)
}

/// Why [`read_body_limited`] returned no body.
#[derive(Debug, thiserror::Error)]
pub enum BodyLimitError<E> {
    /// The body is over the limit. `drained` tells whether the rest of it was read and discarded
    /// (so answering and closing sends no reset); see [`LINGER_MAX_BYTES`].
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize, drained: bool },
    /// Reading the body failed.
    #[error("could not read the body: {0}")]
    Read(E),
}

/// Collects `body` up to `limit` bytes. A body over the limit is read on and discarded, at most
/// [`LINGER_MAX_BYTES`] more and for [`LINGER_TIMEOUT`], so the client that is still sending it
/// finishes and reads the error answer instead of a reset.
pub async fn read_body_limited<B>(
    mut body: B,
    limit: usize,
) -> Result<bytes::Bytes, BodyLimitError<B::Error>>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    let mut out = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(out.freeze()),
            Some(Err(error)) => return Err(BodyLimitError::Read(error)),
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers
                };
                if out.len() + data.remaining() > limit {
                    let over = out.len() + data.remaining() - limit;
                    let drained =
                        discard_body(&mut body, LINGER_MAX_BYTES.saturating_sub(over)).await;
                    return Err(BodyLimitError::TooLarge { limit, drained });
                }
                bytes::BufMut::put(&mut out, &mut data);
            }
        }
    }
}

/// Reads and discards the rest of `body`, at most `max_bytes` and for [`LINGER_TIMEOUT`]; true
/// when it was all read.
pub async fn discard_body<B>(body: &mut B, max_bytes: usize) -> bool
where
    B: Body + Unpin,
    B::Data: Buf,
{
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut discarded = 0usize;
    while discarded <= max_bytes {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) | Ok(Some(Err(_))) => return false,
            Ok(None) => return true,
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    discarded += data.remaining();
                }
            }
        }
    }
    body.is_end_stream()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    use bytes::Bytes;
    use hyper::body::Frame;

    /// A body that yields the given chunks, one frame each.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(n: usize, size: usize) -> Chunks {
        Chunks((0..n).map(|_| Bytes::from(vec![b'x'; size])).collect())
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_collected() {
        let got = read_body_limited(chunks(3, 10), 30)
            .await
            .expect("within the limit");
        assert_eq!(got.len(), 30);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_drained_within_the_bound() {
        let error = read_body_limited(chunks(100, 1000), 500)
            .await
            .expect_err("over the limit");
        assert!(
            matches!(
                error,
                BodyLimitError::TooLarge {
                    limit: 500,
                    drained: true
                }
            ),
            "{error:?}"
        );
        // Far more than the linger bound: not drained, the caller's close may reset.
        let huge = chunks(LINGER_MAX_BYTES / 1000 + 10, 1000);
        let error = read_body_limited(huge, 500)
            .await
            .expect_err("over the limit");
        assert!(
            matches!(error, BodyLimitError::TooLarge { drained: false, .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn discard_stops_at_the_byte_bound_and_at_end_of_stream() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let deadline = Instant::now() + Duration::from_secs(5);
        client.write_all(&[0u8; 3000]).await.expect("write");
        assert_eq!(
            discard(&mut server, deadline, 1000).await,
            Discarded::Bounded(1000)
        );
        drop(client);
        assert_eq!(
            discard(&mut server, deadline, 1_000_000).await,
            Discarded::Complete(2000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn discard_stops_at_the_deadline() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let deadline = Instant::now() + LINGER_TIMEOUT;
        assert_eq!(
            discard(&mut server, deadline, LINGER_MAX_BYTES).await,
            Discarded::Bounded(0)
        );
        assert!(Instant::now() >= deadline);
    }
}
