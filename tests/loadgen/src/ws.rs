//! A minimal WebSocket client on a raw `TcpStream`: the HTTP upgrade, the `subscribe` op and its
//! `subscribed` ack, and the replies the client owes the server (pongs).
//!
//! A full client library would decode every message; the load generator's subscribers must not,
//! so after the handshake they keep the bare socket and scan frame headers (see [`crate::frame`]).
//!
//! With `--peer centrifugo` the handshake is Centrifugo's (`connect`, then `subscribe` per
//! channel, see [`crate::centrifugo`]), and [`Protocol`] counts publications inside each message
//! (Centrifugo packs several replies into one) and answers its `{}` pings as well.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::{
    centrifugo::{self, Line},
    cli::Peer,
    frame::{self, FrameError, Scanner, opcode},
};

/// The sample nonce of RFC 6455 §1.3 and its accept value. Every connection may send the same
/// key: it only proves the server speaks WebSocket, and using the RFC's pair lets the client
/// verify `Sec-WebSocket-Accept` without carrying SHA-1.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Largest upgrade response the client accepts.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Why a connection could not be opened or subscribed. `kind()` names it for the report.
#[derive(Debug, Error)]
pub enum WsError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upgrade was refused with HTTP {0}")]
    Rejected(u16),
    #[error("malformed upgrade response: {0}")]
    BadResponse(String),
    #[error("bad frame from the server: {0}")]
    Frame(#[from] FrameError),
    #[error("the server answered the subscription with an error: {0}")]
    SubscribeError(String),
    #[error("the server closed the connection (close code {0:?})")]
    Closed(Option<u16>),
    #[error("timed out")]
    Timeout,
}

impl WsError {
    /// A short stable name for counting failures by kind.
    pub fn kind(&self) -> String {
        match self {
            Self::Connect(e) => format!("connect:{:?}", e.kind()),
            Self::Io(e) => format!("io:{:?}", e.kind()),
            Self::Rejected(status) => format!("http_{status}"),
            Self::BadResponse(_) => "bad_response".into(),
            Self::Frame(_) => "bad_frame".into(),
            Self::SubscribeError(_) => "subscribe_error".into(),
            Self::Closed(code) => format!("closed_{}", code.unwrap_or(0)),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// Where to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
}

/// A subscribed connection: the bare socket, its scanner, and what already arrived after the ack.
pub struct Subscribed {
    pub stream: TcpStream,
    pub scanner: Scanner,
    /// How to read the frames that follow.
    pub protocol: Protocol,
    /// Messages that arrived in the same read as the ack (already counted off the wire).
    pub messages_after_ack: u64,
}

/// A fresh random client mask.
pub fn mask() -> [u8; 4] {
    rand::random()
}

/// Encodes a pong answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Vec<u8> {
    frame::encode_client_frame(opcode::PONG, payload, mask())
}

/// Encodes the `{}` text frame that answers a Centrifugo ping.
pub fn centrifugo_pong() -> Vec<u8> {
    frame::encode_client_frame(opcode::TEXT, centrifugo::PONG, mask())
}

/// What the frames of one read amounted to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events delivered.
    pub events: u64,
    /// Pings received (WebSocket pings, and Centrifugo's `{}`); each answer went to `replies`.
    pub pings: u64,
    /// The close code, when the server sent a close frame (0: a close frame without a code).
    pub close: Option<u16>,
}

/// A subscribed connection's reading of its peer's protocol: which frames deliver events, which
/// are pings and how they are answered.
#[derive(Debug, Default)]
pub struct Protocol {
    pub peer: Peer,
    message: centrifugo::Reassembler,
}

impl Protocol {
    pub fn new(peer: Peer) -> Self {
        Self {
            peer,
            message: centrifugo::Reassembler::default(),
        }
    }

    /// Whether the scanner must capture data payloads to count events: Centrifugo packs several
    /// replies into one message, so its messages are read, not just counted.
    pub fn needs_payloads(&self) -> bool {
        self.peer == Peer::Centrifugo
    }

    /// Handles one complete frame: adds to `tally`, appends the answer to a ping to `replies`, and
    /// calls `on_event` with each event's bytes (the frame's payload, empty when it was not
    /// captured; for Centrifugo the publication's line).
    pub fn on_frame(
        &mut self,
        header: &frame::Header,
        payload: &[u8],
        tally: &mut Tally,
        replies: &mut Vec<u8>,
        mut on_event: impl FnMut(&[u8]),
    ) {
        match header.opcode {
            opcode::PING => {
                tally.pings += 1;
                replies.extend(pong(payload));
            }
            opcode::CLOSE => {
                tally
                    .close
                    .get_or_insert(frame::close_code(payload).unwrap_or(0));
            }
            opcode::PONG => {}
            _ if self.peer == Peer::Centrifugo => self.message.feed(header, payload, |message| {
                for line in centrifugo::lines(message) {
                    match line {
                        Line::Publication(line) => {
                            tally.events += 1;
                            on_event(line);
                        }
                        Line::Ping => {
                            tally.pings += 1;
                            replies.extend(centrifugo_pong());
                        }
                        Line::Push(_) | Line::Reply { .. } | Line::Unknown(_) => {}
                    }
                }
            }),
            _ if header.ends_message() => {
                tally.events += 1;
                on_event(payload);
            }
            _ => {}
        }
    }
}

/// Connects (from `source` when given, so connections can spread over several loopback
/// addresses and their ephemeral-port ranges) and performs the upgrade.
/// Returns the stream and any bytes that followed the response head.
pub async fn connect(
    target: &Target,
    source: Option<IpAddr>,
) -> Result<(TcpStream, Vec<u8>), WsError> {
    let stream = match source {
        None => TcpStream::connect(target.addr)
            .await
            .map_err(WsError::Connect)?,
        Some(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(WsError::Connect)?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(WsError::Connect)?;
            socket
                .connect(target.addr)
                .await
                .map_err(WsError::Connect)?
        }
    };
    upgrade(stream, target).await
}

async fn upgrade(mut stream: TcpStream, target: &Target) -> Result<(TcpStream, Vec<u8>), WsError> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        path = target.path,
        host = target.addr,
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(WsError::BadResponse("response head too long".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(WsError::BadResponse(
                "connection closed during the upgrade".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    check_upgrade_response(&buf[..head_end])?;
    Ok((stream, buf[head_end..].to_vec()))
}

/// Validates a `101 Switching Protocols` response head.
pub fn check_upgrade_response(head: &[u8]) -> Result<(), WsError> {
    let text = std::str::from_utf8(head).map_err(|_| WsError::BadResponse("not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| WsError::BadResponse(format!("status line {status_line:?}")))?;
    if status != 101 {
        return Err(WsError::Rejected(status));
    }
    let accept = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim())
    });
    match accept {
        Some(ACCEPT) => Ok(()),
        other => Err(WsError::BadResponse(format!(
            "Sec-WebSocket-Accept {other:?}, expected {ACCEPT}"
        ))),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `subscribe` op for `patterns`.
pub fn subscribe_op(id: u64, patterns: &[String]) -> String {
    // `op` first, as the protocol documents it, for servers that read it first.
    let events = serde_json::to_string(patterns).unwrap_or_else(|_| "[]".to_owned());
    format!(r#"{{"op":"subscribe","id":{id},"events":{events}}}"#)
}

/// The `auth` op carrying `token`.
pub fn auth_op(token: &str) -> String {
    let token = serde_json::to_string(token).unwrap_or_else(|_| "\"\"".to_owned());
    format!(r#"{{"op":"auth","id":0,"token":{token}}}"#)
}

/// The frames that open a subscription: `auth` (when a token is given) and `subscribe` for the
/// event service's protocol; `connect` (with the token) and one `subscribe` per channel for
/// Centrifugo's.
fn handshake_frames(peer: Peer, patterns: &[String], token: Option<&str>) -> Vec<u8> {
    let mut messages = Vec::new();
    match peer {
        Peer::Eventrouter | Peer::Bun => {
            messages.extend(token.map(auth_op));
            messages.push(subscribe_op(1, patterns));
        }
        Peer::Centrifugo => {
            messages.push(centrifugo::connect_command(token));
            for (id, channel) in (centrifugo::FIRST_SUBSCRIBE_ID..).zip(patterns) {
                messages.push(centrifugo::subscribe_command(id, channel));
            }
        }
    }
    messages
        .iter()
        .flat_map(|m| frame::encode_client_frame(opcode::TEXT, m.as_bytes(), mask()))
        .collect()
}

/// Sends the handshake (see [`handshake_frames`]) and reads until the subscription is
/// acknowledged (`subscribed`; for Centrifugo, a reply to `connect` and to every `subscribe`),
/// answering pings on the way. A refusal (an `error` op or error reply) fails the call.
pub async fn subscribe(
    mut stream: TcpStream,
    leftover: Vec<u8>,
    peer: Peer,
    patterns: &[String],
    token: Option<&str>,
    timeout: Duration,
) -> Result<Subscribed, WsError> {
    let first = handshake_frames(peer, patterns, token);
    let mut state = AckState::new(peer, patterns.len());
    let work = async move {
        stream.write_all(&first).await?;
        let mut scanner = Scanner::capturing();
        let mut buf = vec![0u8; 4096];
        let mut chunk = leftover;
        loop {
            if !chunk.is_empty() {
                scanner.feed(&chunk, |h, p| state.on_frame(h, p))?;
                if !state.pongs.is_empty() {
                    stream.write_all(&state.pongs).await?;
                    state.pongs.clear();
                }
                if let Some(err) = state.error.take() {
                    return Err(err);
                }
                if state.acked {
                    scanner.capture_data = state.protocol.needs_payloads();
                    return Ok(Subscribed {
                        stream,
                        scanner,
                        protocol: state.protocol,
                        messages_after_ack: state.messages_after_ack,
                    });
                }
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(WsError::Closed(None));
            }
            chunk = buf[..n].to_vec();
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| WsError::Timeout)?
}

struct AckState {
    protocol: Protocol,
    /// Centrifugo: the ids of the commands whose replies are still awaited.
    pending: Vec<u32>,
    acked: bool,
    messages_after_ack: u64,
    pongs: Vec<u8>,
    error: Option<WsError>,
}

impl AckState {
    fn new(peer: Peer, channels: usize) -> Self {
        let pending = match peer {
            Peer::Centrifugo => (centrifugo::CONNECT_ID..).take(1 + channels).collect(),
            Peer::Eventrouter | Peer::Bun => Vec::new(),
        };
        Self {
            protocol: Protocol::new(peer),
            pending,
            acked: false,
            messages_after_ack: 0,
            pongs: Vec::new(),
            error: None,
        }
    }

    fn on_frame(&mut self, header: &frame::Header, payload: &[u8]) {
        match header.opcode {
            opcode::PING => self.pongs.extend(pong(payload)),
            opcode::CLOSE => {
                self.error
                    .get_or_insert(WsError::Closed(frame::close_code(payload)));
            }
            opcode::PONG => {}
            _ if self.protocol.peer == Peer::Centrifugo => {
                let Self {
                    protocol,
                    pending,
                    acked,
                    messages_after_ack,
                    pongs,
                    error,
                } = self;
                protocol.message.feed(header, payload, |message| {
                    for line in centrifugo::lines(message) {
                        match line {
                            Line::Reply {
                                id,
                                error: Some(why),
                            } => {
                                let command = if id == centrifugo::CONNECT_ID {
                                    "connect"
                                } else {
                                    "subscribe"
                                };
                                error.get_or_insert(WsError::SubscribeError(format!(
                                    "{command} (id {id}): {why}"
                                )));
                            }
                            Line::Reply { id, error: None } => {
                                pending.retain(|p| *p != id);
                                *acked = pending.is_empty();
                            }
                            // Counted whether or not every subscription is acknowledged yet: a
                            // publication only follows its own channel's reply.
                            Line::Publication(_) => *messages_after_ack += 1,
                            Line::Ping => pongs.extend(centrifugo_pong()),
                            Line::Push(_) | Line::Unknown(_) => {}
                        }
                    }
                });
            }
            _ if header.ends_message() && self.acked => self.messages_after_ack += 1,
            opcode::TEXT => {
                let text = String::from_utf8_lossy(payload);
                if text.contains("\"op\":\"subscribed\"") {
                    self.acked = true;
                } else if text.contains("\"op\":\"error\"") {
                    self.error
                        .get_or_insert(WsError::SubscribeError(text.into_owned()));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_proper_upgrade() {
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
             sec-websocket-accept: {ACCEPT}\r\n\r\n"
        );
        assert!(check_upgrade_response(head.as_bytes()).is_ok());
    }

    #[test]
    fn refusals_carry_their_status() {
        let err = check_upgrade_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            .expect_err("503 is a refusal");
        assert_eq!(err.kind(), "http_503");
        let err = check_upgrade_response(
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n",
        )
        .expect_err("wrong accept");
        assert_eq!(err.kind(), "bad_response");
    }

    #[test]
    fn subscribe_op_shape() {
        assert_eq!(
            subscribe_op(1, &["bench.x".to_owned()]),
            r#"{"op":"subscribe","id":1,"events":["bench.x"]}"#
        );
    }

    /// An unmasked server frame with FIN set.
    fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126, "short frames only");
        let mut out = vec![0x80 | op, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    /// The payloads of a run of short masked client frames.
    fn client_payloads(mut bytes: &[u8]) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        while let [b0, b1, rest @ ..] = bytes {
            assert_eq!(b1 & 0x80, 0x80, "client frames are masked");
            let (len, rest) = match b1 & 0x7F {
                126 => (
                    usize::from(u16::from_be_bytes([rest[0], rest[1]])),
                    &rest[2..],
                ),
                len => (usize::from(len), rest),
            };
            let (mask, rest) = rest.split_at(4);
            let payload: Vec<u8> = rest[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            out.push((b0 & 0x0F, String::from_utf8(payload).expect("UTF-8")));
            bytes = &rest[len..];
        }
        out
    }

    #[test]
    fn handshakes_per_peer() {
        let channels = ["bench.a".to_owned(), "bench.b".to_owned()];
        for peer in [Peer::Eventrouter, Peer::Bun] {
            assert_eq!(
                client_payloads(&handshake_frames(peer, &channels[..1], None)),
                vec![(
                    opcode::TEXT,
                    r#"{"op":"subscribe","id":1,"events":["bench.a"]}"#.to_owned()
                )]
            );
        }
        assert_eq!(
            client_payloads(&handshake_frames(Peer::Centrifugo, &channels, None)),
            vec![
                (opcode::TEXT, r#"{"id":1,"connect":{}}"#.to_owned()),
                (
                    opcode::TEXT,
                    r#"{"id":2,"subscribe":{"channel":"bench.a"}}"#.to_owned()
                ),
                (
                    opcode::TEXT,
                    r#"{"id":3,"subscribe":{"channel":"bench.b"}}"#.to_owned()
                ),
            ]
        );
    }

    fn feed_ack(state: &mut AckState, bytes: &[u8]) {
        Scanner::capturing()
            .feed(bytes, |h, p| state.on_frame(h, p))
            .expect("valid frames");
    }

    #[test]
    fn centrifugo_ack_needs_every_reply() {
        let mut state = AckState::new(Peer::Centrifugo, 2);
        feed_ack(
            &mut state,
            &server_frame(
                opcode::TEXT,
                b"{\"id\":1,\"connect\":{\"client\":\"c\",\"ping\":20,\"pong\":true}}\n{}",
            ),
        );
        assert!(!state.acked);
        assert_eq!(
            client_payloads(&state.pongs),
            vec![(opcode::TEXT, "{}".to_owned())]
        );
        let mut rest = server_frame(opcode::TEXT, b"{\"id\":2,\"subscribe\":{}}");
        rest.extend(server_frame(
            opcode::TEXT,
            b"{\"id\":3,\"subscribe\":{}}\n{\"push\":{\"channel\":\"bench.b\",\"pub\":{\"data\":1}}}",
        ));
        feed_ack(&mut state, &rest);
        assert!(state.acked);
        assert_eq!(state.messages_after_ack, 1);
        assert!(state.error.is_none());
    }

    #[test]
    fn centrifugo_refusals_and_closes_fail_the_handshake() {
        let mut state = AckState::new(Peer::Centrifugo, 1);
        feed_ack(
            &mut state,
            &server_frame(
                opcode::TEXT,
                b"{\"id\":1,\"connect\":{}}\n{\"id\":2,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
            ),
        );
        let err = state.error.take().expect("refused");
        assert_eq!(err.kind(), "subscribe_error");
        assert!(
            err.to_string().contains("subscribe (id 2): error 103"),
            "{err}"
        );

        let mut state = AckState::new(Peer::Centrifugo, 1);
        feed_ack(
            &mut state,
            &server_frame(opcode::CLOSE, &3501u16.to_be_bytes()),
        );
        assert_eq!(
            state.error.map(|e| e.kind()),
            Some("closed_3501".to_owned())
        );
    }

    fn tally(
        protocol: &mut Protocol,
        capture: bool,
        bytes: &[u8],
    ) -> (Tally, Vec<Vec<u8>>, Vec<u8>) {
        let mut scanner = Scanner::new();
        scanner.capture_data = capture;
        let (mut t, mut events, mut replies) = (Tally::default(), Vec::new(), Vec::new());
        scanner
            .feed(bytes, |h, p| {
                protocol.on_frame(h, p, &mut t, &mut replies, |e| events.push(e.to_vec()))
            })
            .expect("valid frames");
        (t, events, replies)
    }

    #[test]
    fn event_service_frames_count_one_event_each() {
        let mut bytes = server_frame(opcode::TEXT, br#"{"op":"event","data":{"t":1}}"#);
        bytes.extend(server_frame(
            opcode::TEXT,
            br#"{"op":"event","data":{"t":2}}"#,
        ));
        bytes.extend(server_frame(opcode::PING, b"p"));
        let mut protocol = Protocol::new(Peer::Bun);
        assert!(!protocol.needs_payloads());
        let (t, events, replies) = tally(&mut protocol, false, &bytes);
        assert_eq!(
            t,
            Tally {
                events: 2,
                pings: 1,
                close: None
            }
        );
        assert_eq!(
            events,
            vec![Vec::<u8>::new(), Vec::new()],
            "payloads not captured"
        );
        assert_eq!(
            client_payloads(&replies),
            vec![(opcode::PONG, "p".to_owned())]
        );
    }

    #[test]
    fn centrifugo_messages_count_their_publications_and_answer_pings() {
        let publication = br#"{"push":{"channel":"bench.fanout","pub":{"data":{"t":7,"seq":1}}}}"#;
        let mut message = publication.to_vec();
        message.push(b'\n');
        message.extend_from_slice(b"{}");
        message.push(b'\n');
        message.extend_from_slice(publication);
        let mut bytes = server_frame(opcode::TEXT, &message[..100]);
        bytes[0] &= 0x7F; // not the last frame of the message
        bytes.extend(server_frame(opcode::CONTINUATION, &message[100..]));
        bytes.extend(server_frame(opcode::CLOSE, &1001u16.to_be_bytes()));
        let mut protocol = Protocol::new(Peer::Centrifugo);
        assert!(protocol.needs_payloads());
        let (t, events, replies) = tally(&mut protocol, true, &bytes);
        assert_eq!(
            t,
            Tally {
                events: 2,
                pings: 1,
                close: Some(1001)
            }
        );
        assert_eq!(events, vec![publication.to_vec(), publication.to_vec()]);
        assert_eq!(
            client_payloads(&replies),
            vec![(opcode::TEXT, "{}".to_owned())]
        );
        assert!(
            events
                .iter()
                .all(|e| crate::fanout::timestamp_of(e) == Some(7))
        );
    }
}
