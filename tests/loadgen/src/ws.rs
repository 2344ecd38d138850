//! A minimal WebSocket client on a raw `TcpStream`: the HTTP upgrade, the `subscribe` op and its
//! `subscribed` ack, and the replies the client owes the server (pongs).
//!
//! A full client library would decode every message; the load generator's subscribers must not,
//! so after the handshake they keep the bare socket and scan frame headers (see [`crate::frame`]).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::frame::{self, FrameError, Scanner, opcode};

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

/// Sends `auth` (when a token is given) and `subscribe`, and reads until the `subscribed` ack,
/// answering pings on the way. An `auth` refusal arrives as an `error` op and fails the call.
pub async fn subscribe(
    mut stream: TcpStream,
    leftover: Vec<u8>,
    patterns: &[String],
    token: Option<&str>,
    timeout: Duration,
) -> Result<Subscribed, WsError> {
    let op = subscribe_op(1, patterns);
    let auth = token.map(auth_op);
    let work = async move {
        let mut first = Vec::new();
        if let Some(auth) = &auth {
            first.extend(frame::encode_client_frame(
                opcode::TEXT,
                auth.as_bytes(),
                mask(),
            ));
        }
        first.extend(frame::encode_client_frame(
            opcode::TEXT,
            op.as_bytes(),
            mask(),
        ));
        stream.write_all(&first).await?;
        let mut scanner = Scanner::capturing();
        let mut state = AckState::default();
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
                    scanner.capture_data = false;
                    return Ok(Subscribed {
                        stream,
                        scanner,
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

#[derive(Default)]
struct AckState {
    acked: bool,
    messages_after_ack: u64,
    pongs: Vec<u8>,
    error: Option<WsError>,
}

impl AckState {
    fn on_frame(&mut self, header: &frame::Header, payload: &[u8]) {
        match header.opcode {
            opcode::PING => self.pongs.extend(pong(payload)),
            opcode::CLOSE => {
                self.error
                    .get_or_insert(WsError::Closed(frame::close_code(payload)));
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
}
