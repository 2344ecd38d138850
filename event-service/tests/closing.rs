//! How connections end, seen from a client on a raw socket: the close code of each client error
//! (1009, 1007, 1002) arrives as a close frame, and a client still sending an oversized frame or
//! publish body reads the answer and then a clean end of stream, not a connection reset.

mod support;

use std::time::Duration;

use event_service::server::RunningServer;
use eventrouter_contract::close;
use support::{WAIT, start};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The mask every test frame uses (any key does; the server must unmask).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `first` is FIN/RSV/opcode; masked unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Opens a TCP connection and completes the WebSocket handshake by hand.
async fn handshake(server: &RunningServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write the upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("upgrade answered in time")
            .expect("read the upgrade answer");
        assert_eq!(
            n,
            1,
            "closed during the handshake: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Writes `bytes` the way a client on a real network does: a piece at a time, still sending
/// well after the server has answered (on loopback one big write would land whole in the kernel
/// buffers before the server even looks at it). Every piece must be taken: a server that closes
/// with the rest unread resets the connection and a write fails.
async fn send_slowly(stream: &mut TcpStream, bytes: &[u8]) {
    for (i, piece) in bytes.chunks(32 * 1024).enumerate() {
        tokio::time::timeout(WAIT, stream.write_all(piece))
            .await
            .expect("the piece is taken in time")
            .unwrap_or_else(|error| {
                panic!("piece {i} of the oversized request not written: {error}")
            });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How the server ended the connection, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
struct Ending {
    /// The code of the server's close frame (`None`: no close frame).
    code: Option<u16>,
    /// After it: end of stream (FIN) rather than a reset or a read error.
    clean_eof: bool,
}

/// Reads server frames until the close frame, then to the end of the stream.
async fn read_ending(stream: &mut TcpStream) -> Ending {
    let mut buf = Vec::new();
    let mut code = None;
    let clean_eof = loop {
        // Parse whatever whole frames the buffer holds.
        while code.is_none() && buf.len() >= 2 {
            let len7 = usize::from(buf[1] & 0x7F);
            let (len, start) = match len7 {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 => panic!("the server sent a frame over 64 KiB"),
                126 => break,
                n => (n, 2),
            };
            if buf.len() < start + len {
                break;
            }
            assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
            if buf[0] & 0x0F == 0x8 {
                assert!(len >= 2, "a close frame without a code");
                code = Some(u16::from_be_bytes([buf[start], buf[start + 1]]));
            }
            buf.drain(..start + len);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the server ends the connection in time")
        {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    Ending { code, clean_eof }
}

/// Sends `bytes` after a handshake and returns how the connection ended.
async fn ending_after(server: &RunningServer, bytes: &[u8]) -> Ending {
    let mut stream = handshake(server).await;
    stream.write_all(bytes).await.expect("write the frame");
    read_ending(&mut stream).await
}

async fn disconnects(server: &RunningServer, reason: &str) -> f64 {
    support::metric(
        server,
        "eventrouter_disconnects_total",
        &format!(r#"reason="{reason}""#),
    )
    .await
}

/// Waits until the disconnect counter `reason` reaches `n`.
async fn disconnects_reach(server: &RunningServer, reason: &str, n: f64) {
    support::eventually(&format!("{n} disconnects {reason}"), || async {
        disconnects(server, reason).await >= n
    })
    .await;
    assert_eq!(disconnects(server, reason).await, n);
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let server = start(|_| {}).await;
    let whole = frame(0x81, &[b'{', 0xC3, 0x28, b'}'], true);
    // Invalid across fragments: the first fragment ends inside a character that never finishes.
    let mut fragmented = frame(0x01, &[b'a', 0xE2, 0x82], true);
    fragmented.extend(frame(0x80, b"zz", true));
    for bytes in [whole, fragmented] {
        let ending = ending_after(&server, &bytes).await;
        assert_eq!(
            ending,
            Ending {
                code: Some(close::INVALID_PAYLOAD),
                clean_eof: true
            }
        );
    }
    disconnects_reach(&server, "invalid_utf8", 2.0).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn protocol_violations_close_1002() {
    let server = start(|_| {}).await;
    let mut fragmented_ping = frame(0x09, b"", true);
    fragmented_ping.extend(frame(0x80, b"", true));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked client frame", frame(0x81, b"{}", false)),
        ("reserved bit RSV1", frame(0xC1, b"{}", true)),
        ("reserved bit RSV3", frame(0x91, b"{}", true)),
        ("fragmented ping", fragmented_ping),
        ("126-byte ping", frame(0x89, &[b'p'; 126], true)),
        ("unknown data opcode 3", frame(0x83, b"{}", true)),
        ("unknown control opcode 11", frame(0x8B, b"", true)),
        ("continuation without a message", frame(0x80, b"{}", true)),
    ];
    let n = cases.len();
    for (what, bytes) in cases {
        let ending = ending_after(&server, &bytes).await;
        assert_eq!(
            ending,
            Ending {
                code: Some(close::PROTOCOL_ERROR),
                clean_eof: true
            },
            "{what}"
        );
    }
    disconnects_reach(&server, "protocol_error", n as f64).await;
    // A valid ping still gets its pong and the service carries on.
    let mut stream = handshake(&server).await;
    stream
        .write_all(&frame(0x89, &[b'p'; 125], true))
        .await
        .expect("write");
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .expect("pong in time")
        .expect("read");
    assert_eq!(head, [0x8A, 125], "a pong of the ping's 125 bytes");
    server.stop().await.expect("stop");
}

/// One masked text frame of `total` bytes on the wire, header included (a 64-bit length).
fn huge_text_frame(total: usize) -> Vec<u8> {
    let payload = vec![b'x'; total - 14];
    let bytes = frame(0x81, &payload, true);
    assert_eq!(bytes.len(), total);
    bytes
}

#[tokio::test]
async fn a_client_still_sending_an_oversized_frame_reads_1009() {
    let server = start(|c| c.max_frame_bytes = 1024).await;
    let mut stream = handshake(&server).await;
    // The whole 1 MiB frame is sent before anything is read, as a simple client does. The server
    // refuses it at its header; were the socket closed with the rest unread, the kernel would
    // reset the connection and a write would fail.
    send_slowly(&mut stream, &huge_text_frame(1024 * 1024)).await;
    assert_eq!(
        read_ending(&mut stream).await,
        Ending {
            code: Some(close::TOO_BIG),
            clean_eof: true
        }
    );
    disconnects_reach(&server, "too_big", 1.0).await;
    server.stop().await.expect("stop");
}

/// Sends a request head and `body` whole, then reads the answer to the end of the stream.
async fn post_then_read(server: &RunningServer, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write the head");
    send_slowly(&mut stream, body).await;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("the answer ends with a clean end of stream, no reset");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_client_still_sending_an_oversized_publish_body_reads_413() {
    let server = start(|c| c.max_publish_bytes = 1000).await;
    let size = 1024 * 1024;
    let body = vec![b' '; size];

    // Declared length over the limit.
    let head = format!(
        "POST /publish HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {size}\r\n\r\n"
    );
    let answer = post_then_read(&server, &head, &body).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );

    // Chunked: the limit is only found while reading.
    let mut chunked = Vec::new();
    for chunk in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /publish HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    let answer = post_then_read(&server, head, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A client that waits for `100 Continue` is answered at once, before sending its body.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(
            format!(
                "POST /publish HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n\
                 Content-Length: {size}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer))
        .await
        .expect("answered without the body")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Within the limit, publishing works as before.
    let (status, _) = support::publish(&server, r#"{"event":"a.b","data":1}"#).await;
    assert_eq!(status, 202);
    server.stop().await.expect("stop");
}
