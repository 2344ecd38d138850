//! How a WebSocket session ends: the close code a client's read error earns, the close frame
//! written straight to the socket when the WebSocket layer could not queue it, and the lingering
//! close that lets the client read that frame before any reset.
//!
//! A read error (a frame over `--max-frame-bytes`, a text frame that is not UTF-8, a protocol
//! violation) leaves tungstenite's state active, so the session's ordinary close path queues the
//! close frame and flushes it; the stream only stops yielding messages. [`finish`] then flushes
//! whatever is still buffered, shuts down the write side and reads and discards what the client
//! still sends (bounded by [`LINGER_TIMEOUT`] and [`LINGER_MAX_BYTES`]): closing a socket with
//! unread bytes sends a reset, and a client still sending its oversized frame would see its
//! write fail instead of reading the close frame.

use std::{future::poll_fn, task::Poll};

use eventrouter_contract::close;
use eventrouter_runtime::linger::{
    self, Discarded, LINGER_MAX_BYTES, LINGER_TIMEOUT, poll_discard_ready,
};
use tokio::{io::AsyncWriteExt, time::Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, error::ProtocolError};

use crate::{service_metrics::DisconnectReason, ws::Ws};

/// The close frame the server sends for a client's read error, and why the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ServerClose {
    pub code: u16,
    pub reason: &'static str,
    pub why: DisconnectReason,
}

/// The close a read error calls for; `None` when there is nobody left to tell (the client
/// vanished, the transport failed).
pub(crate) fn for_read_error(error: &WsError) -> Option<ServerClose> {
    let close = |code, reason, why| Some(ServerClose { code, reason, why });
    match error {
        WsError::Capacity(_) => close(close::TOO_BIG, "frame too big", DisconnectReason::TooBig),
        WsError::Utf8(_) => close(
            close::INVALID_PAYLOAD,
            "text is not valid UTF-8",
            DisconnectReason::InvalidUtf8,
        ),
        WsError::Protocol(violation) => protocol_violation(violation).and_then(|reason| {
            close(
                close::PROTOCOL_ERROR,
                reason,
                DisconnectReason::ProtocolError,
            )
        }),
        _ => None,
    }
}

/// The close reason for a frame that breaks RFC 6455; `None` for the protocol errors that are not
/// the client's frames (handshake, state, a reset without a close).
fn protocol_violation(error: &ProtocolError) -> Option<&'static str> {
    Some(match error {
        ProtocolError::UnmaskedFrameFromClient => "unmasked client frame",
        ProtocolError::NonZeroReservedBits => "reserved bits set",
        ProtocolError::FragmentedControlFrame => "fragmented control frame",
        ProtocolError::ControlFrameTooBig => "control frame over 125 bytes",
        ProtocolError::InvalidOpcode(_)
        | ProtocolError::UnknownControlFrameType(_)
        | ProtocolError::UnknownDataFrameType(_) => "unknown opcode",
        ProtocolError::UnexpectedContinueFrame => "continuation frame without a message",
        ProtocolError::ExpectedFragment(_) => "new message inside a fragmented one",
        ProtocolError::InvalidCloseSequence => "invalid close frame",
        _ => return None,
    })
}

/// A server close frame as bytes on the wire: FIN + opcode 8, unmasked, the code, then `reason`
/// cut to the 123 bytes a control frame leaves (at a character boundary).
pub fn close_frame_bytes(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    // At most 125: fits the 7-bit length.
    frame.push((2 + reason.len()) as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// Ends a session's socket: flushes what the WebSocket still buffers (the close frame), writes
/// `unsent_close` straight to the socket when the WebSocket layer could not queue it, shuts down
/// the write side and discards what the client still sends until it closes, within
/// [`LINGER_TIMEOUT`] and [`LINGER_MAX_BYTES`] in all.
pub(crate) async fn finish(ws: &mut Ws, unsent_close: Option<(u16, &'static str)>, conn: u64) {
    let deadline = Instant::now() + LINGER_TIMEOUT;
    let mut discarded = 0usize;
    let mut eof = false;
    // Read meanwhile: a client blocked sending into a full socket reads only once it is done.
    let flushed = tokio::time::timeout_at(
        deadline,
        poll_fn(|cx| {
            if let Poll::Ready(result) = ws.poll_flush(cx) {
                return Poll::Ready(result.is_ok());
            }
            if !eof && discarded < LINGER_MAX_BYTES {
                match poll_discard_ready(ws.get_mut().tcp_mut(), cx, LINGER_MAX_BYTES - discarded) {
                    Discarded::Complete(n) => {
                        discarded += n;
                        eof = true;
                    }
                    Discarded::Bounded(n) => discarded += n,
                    Discarded::Failed(_) => return Poll::Ready(false),
                }
            }
            Poll::Pending
        }),
    )
    .await
    .unwrap_or(false);
    if !flushed {
        tracing::debug!(
            conn,
            "the socket was not flushed; closing without lingering"
        );
        return;
    }
    // Flushed: nothing of a direct write is left in the wrapper.
    let stream = ws.get_mut().tcp_mut();
    if let Some((code, reason)) = unsent_close {
        let frame = close_frame_bytes(code, reason);
        if !matches!(
            tokio::time::timeout_at(deadline, stream.write_all(&frame)).await,
            Ok(Ok(()))
        ) {
            tracing::debug!(conn, code, "close frame not written");
        }
    }
    let rest = if eof {
        // The client already closed its side: just send ours.
        let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
        Discarded::Complete(0)
    } else {
        linger::shutdown_and_discard(stream, deadline, LINGER_MAX_BYTES - discarded).await
    };
    tracing::trace!(
        conn,
        discarded = discarded + rest.bytes(),
        ?rest,
        "connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError as P};

    #[test]
    fn read_errors_map_to_close_codes() {
        let code = |e: WsError| for_read_error(&e).map(|c| (c.code, c.why));
        assert_eq!(
            code(WsError::Capacity(CapacityError::MessageTooLong {
                size: 2,
                max_size: 1
            })),
            Some((1009, DisconnectReason::TooBig))
        );
        assert_eq!(
            code(WsError::Utf8("bad".into())),
            Some((1007, DisconnectReason::InvalidUtf8))
        );
        for violation in [
            P::UnmaskedFrameFromClient,
            P::NonZeroReservedBits,
            P::FragmentedControlFrame,
            P::ControlFrameTooBig,
            P::InvalidOpcode(3),
            P::UnknownControlFrameType(11),
            P::UnexpectedContinueFrame,
            P::InvalidCloseSequence,
        ] {
            assert_eq!(
                code(WsError::Protocol(violation)),
                Some((1002, DisconnectReason::ProtocolError))
            );
        }
        for nobody_to_tell in [
            WsError::Protocol(P::ResetWithoutClosingHandshake),
            WsError::Protocol(P::SendAfterClosing),
            WsError::ConnectionClosed,
            WsError::Io(std::io::ErrorKind::ConnectionReset.into()),
        ] {
            assert_eq!(code(nobody_to_tell), None);
        }
    }

    #[test]
    fn close_frames_are_unmasked_and_bounded() {
        assert_eq!(
            close_frame_bytes(1007, "bad"),
            [0x88, 5, 0x03, 0xEF, b'b', b'a', b'd']
        );
        let long = "é".repeat(100);
        let frame = close_frame_bytes(1002, &long);
        assert_eq!(usize::from(frame[1]), frame.len() - 2);
        assert!(frame.len() - 2 <= 125);
        assert!(
            std::str::from_utf8(&frame[4..]).is_ok(),
            "cut at a char boundary"
        );
    }
}
