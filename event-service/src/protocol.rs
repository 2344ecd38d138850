//! The client wire protocol: JSON text frames, parsed with hard limits, and the server's replies.
//!
//! Client → server: `subscribe` / `unsubscribe` (with `events`, a list of patterns), `ping`, and
//! with authentication on `auth` / `refresh` (with `token`), each with an optional `id` echoed in
//! the reply. Server → client: `subscribed`, `unsubscribed`, `pong`, `authenticated`,
//! `refreshed`, `error` (with a [`ErrorCode`]) and `event`.
//!
//! Pure: no I/O. The frame size limit is enforced before this module sees a frame (by the
//! WebSocket codec, `--max-frame-bytes`); this module bounds everything inside a frame.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Longest `id` a client may attach to a request (a string id; numbers are always fine).
pub const MAX_ID_BYTES: usize = 64;

/// Longest event id `since` may carry (an AMQP `message-id` is a short string: 255 bytes).
pub const MAX_EVENT_ID_BYTES: usize = 255;

/// A request id, echoed in the reply: a JSON number or a short string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Number(u64),
    Text(String),
}

/// One parsed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    Subscribe {
        id: Option<RequestId>,
        events: Vec<String>,
        /// The id of the last event the client received: replay what it missed since then.
        since: Option<String>,
    },
    Unsubscribe {
        id: Option<RequestId>,
        events: Vec<String>,
    },
    Ping {
        id: Option<RequestId>,
    },
    /// The connection token, as the first message (browsers cannot set headers on a WebSocket).
    Auth {
        id: Option<RequestId>,
        token: String,
    },
    /// A new token before the current one expires.
    Refresh {
        id: Option<RequestId>,
        token: String,
    },
}

impl ClientOp {
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            ClientOp::Subscribe { id, .. }
            | ClientOp::Unsubscribe { id, .. }
            | ClientOp::Ping { id }
            | ClientOp::Auth { id, .. }
            | ClientOp::Refresh { id, .. } => id.as_ref(),
        }
    }
}

/// The machine-readable `code` of an `error` op. Every value is documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    InvalidJson,
    /// The JSON has no known `op`.
    UnknownOp,
    /// A known op with missing or malformed fields (e.g. `events` not a list of strings).
    InvalidRequest,
    /// A pattern is not valid topic syntax.
    InvalidPattern,
    /// A pattern is longer than `--max-pattern-length`.
    PatternTooLong,
    /// The subscription would exceed `--max-subscriptions` for this connection.
    TooManySubscriptions,
    /// The event source could not bind the pattern (broker down); retry later.
    Unavailable,
    /// Too many requests are still being processed on this connection; slow down.
    Busy,
    /// The token was refused (bad signature, expired, wrong issuer, ...); the message says why.
    Unauthorized,
    /// A requested pattern is not covered by what the token (or anonymous access) grants.
    Forbidden,
    /// The connection sends frames faster than `--client-frame-rate`; the frame was ignored.
    RateLimited,
}

impl ErrorCode {
    /// The wire value (as serialized).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A frame the server could not accept, with what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
    /// The request id, when the frame was JSON and carried one.
    pub id: Option<RequestId>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    events: Option<serde_json::Value>,
    #[serde(default)]
    token: Option<serde_json::Value>,
    #[serde(default)]
    since: Option<serde_json::Value>,
}

/// Parses one client text frame. `max_events` bounds the `events` list (the subscription limit),
/// so a huge list is refused before any pattern is looked at.
pub fn parse_client_frame(text: &str, max_events: usize) -> Result<ClientOp, ParseError> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| ParseError {
        code: if e.is_data() {
            ErrorCode::InvalidRequest
        } else {
            ErrorCode::InvalidJson
        },
        message: if e.is_data() {
            "a request must be a JSON object with an \"op\"".into()
        } else {
            format!("not valid JSON: {e}")
        },
        id: None,
    })?;
    let id = parse_id(env.id)?;
    let fail = |code, message: String| ParseError {
        code,
        message,
        id: id.clone(),
    };
    let Some(op) = env.op else {
        return Err(fail(ErrorCode::UnknownOp, "missing \"op\"".into()));
    };
    let events = |value: Option<serde_json::Value>| -> Result<Vec<String>, ParseError> {
        let Some(serde_json::Value::Array(items)) = value else {
            return Err(fail(
                ErrorCode::InvalidRequest,
                "\"events\" must be a non-empty list of pattern strings".into(),
            ));
        };
        if items.is_empty() {
            return Err(fail(
                ErrorCode::InvalidRequest,
                "\"events\" must not be empty".into(),
            ));
        }
        if items.len() > max_events {
            return Err(fail(
                ErrorCode::TooManySubscriptions,
                format!(
                    "{} patterns in one request; at most {max_events} per connection",
                    items.len()
                ),
            ));
        }
        items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(fail(
                    ErrorCode::InvalidRequest,
                    "every entry of \"events\" must be a string".into(),
                )),
            })
            .collect()
    };
    match op.as_ref() {
        "subscribe" => {
            let events = events(env.events)?;
            let since = match env.since {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s))
                    if !s.is_empty() && s.len() <= MAX_EVENT_ID_BYTES =>
                {
                    Some(s)
                }
                Some(_) => {
                    return Err(fail(
                        ErrorCode::InvalidRequest,
                        format!(
                            "\"since\" must be an event id: a non-empty string of at most {MAX_EVENT_ID_BYTES} bytes"
                        ),
                    ));
                }
            };
            Ok(ClientOp::Subscribe { events, id, since })
        }
        "unsubscribe" => Ok(ClientOp::Unsubscribe {
            events: events(env.events)?,
            id,
        }),
        "ping" => Ok(ClientOp::Ping { id }),
        "auth" | "refresh" => {
            let Some(serde_json::Value::String(token)) = env.token else {
                return Err(fail(
                    ErrorCode::InvalidRequest,
                    "\"token\" must be a string (the JWT)".into(),
                ));
            };
            Ok(if op == "auth" {
                ClientOp::Auth { id, token }
            } else {
                ClientOp::Refresh { id, token }
            })
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(fail(
                ErrorCode::UnknownOp,
                format!(
                    "unknown op {shown:?}; expected subscribe, unsubscribe, ping, auth or refresh"
                ),
            ))
        }
    }
}

fn parse_id(value: Option<serde_json::Value>) -> Result<Option<RequestId>, ParseError> {
    let bad = |message: &str| ParseError {
        code: ErrorCode::InvalidRequest,
        message: message.into(),
        id: None,
    };
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(|n| Some(RequestId::Number(n)))
            .ok_or_else(|| bad("\"id\" must be a non-negative integer or a short string")),
        Some(serde_json::Value::String(s)) if s.len() <= MAX_ID_BYTES => {
            Ok(Some(RequestId::Text(s)))
        }
        Some(serde_json::Value::String(_)) => Err(bad("\"id\" string is longer than 64 bytes")),
        Some(_) => Err(bad(
            "\"id\" must be a non-negative integer or a short string",
        )),
    }
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Reply<'a> {
    Subscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        events: &'a [String],
        /// Only when the request carried `since`: whether every missed event follows.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Unsubscribed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        events: &'a [String],
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    Authenticated {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sub: Option<&'a str>,
        exp: u64,
    },
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        exp: u64,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        removed: &'a [String],
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        events: &'a [String],
    },
}

fn encode(reply: &Reply<'_>) -> String {
    // Serialising these plain structs cannot fail (string keys, no maps with non-string keys).
    serde_json::to_string(reply).unwrap_or_else(|_| String::from("{\"op\":\"error\"}"))
}

pub fn subscribed(id: Option<&RequestId>, events: &[String]) -> String {
    encode(&Reply::Subscribed {
        id,
        events,
        recovered: None,
    })
}

/// The answer to a `subscribe` with `since`: `recovered` says whether the events missed since
/// then follow (in order, before any live event of these patterns) or could not be replayed.
pub fn subscribed_since(id: Option<&RequestId>, events: &[String], recovered: bool) -> String {
    encode(&Reply::Subscribed {
        id,
        events,
        recovered: Some(recovered),
    })
}

pub fn unsubscribed(id: Option<&RequestId>, events: &[String]) -> String {
    encode(&Reply::Unsubscribed { id, events })
}

pub fn pong(id: Option<&RequestId>) -> String {
    encode(&Reply::Pong { id })
}

/// The answer to a successful `auth`: the token's subject and expiry (seconds since the epoch).
pub fn authenticated(id: Option<&RequestId>, sub: Option<&str>, exp: u64) -> String {
    encode(&Reply::Authenticated { id, sub, exp })
}

/// The answer to a successful `refresh`; `removed` lists the subscriptions the new token no
/// longer allows (they were unsubscribed).
pub fn refreshed(id: Option<&RequestId>, exp: u64, removed: &[String]) -> String {
    encode(&Reply::Refreshed { id, exp, removed })
}

/// An `error` op; `events` names the patterns concerned (may be empty).
pub fn error(id: Option<&RequestId>, code: ErrorCode, message: &str, events: &[String]) -> String {
    encode(&Reply::Error {
        id,
        code,
        message,
        events,
    })
}

/// Encodes an `event` frame once; the hub shares the result with every recipient.
///
/// `data` is spliced in byte for byte: it was validated as JSON when the event entered the
/// instance, so it is never re-parsed here.
pub fn event_frame(event: &Event) -> Bytes {
    let time = event.time_rfc3339();
    // The fixed parts are 75 bytes (keys, quotes, the 24-byte time); room for a few escapes.
    // An estimate that is too small would grow the buffer to twice its size, and the shared
    // frame would keep that allocation for every recipient and in the history.
    let mut out = Vec::with_capacity(96 + event.name.len() + event.id.len() + event.data.len());
    out.extend_from_slice(b"{\"op\":\"event\",\"event\":");
    write_json_string(&mut out, &event.name);
    out.extend_from_slice(b",\"id\":");
    write_json_string(&mut out, &event.id);
    out.extend_from_slice(b",\"time\":\"");
    out.extend_from_slice(time.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    out.extend_from_slice(&event.data);
    out.push(b'}');
    Bytes::from(out)
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse_client_frame(
                r#"{"op":"subscribe","id":1,"events":["order.created","user.42.*"]}"#,
                10
            ),
            Ok(ClientOp::Subscribe {
                id: Some(RequestId::Number(1)),
                events: vec!["order.created".into(), "user.42.*".into()],
                since: None,
            })
        );
        assert_eq!(
            parse_client_frame(
                r#"{"op":"subscribe","events":["a"],"since":"0190a1b2-0000-7000-8000-000000000000"}"#,
                10
            ),
            Ok(ClientOp::Subscribe {
                id: None,
                events: vec!["a".into()],
                since: Some("0190a1b2-0000-7000-8000-000000000000".into()),
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"unsubscribe","id":"x","events":["a"]}"#, 10),
            Ok(ClientOp::Unsubscribe {
                id: Some(RequestId::Text("x".into())),
                events: vec!["a".into()],
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"ping","id":3}"#, 10),
            Ok(ClientOp::Ping {
                id: Some(RequestId::Number(3))
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"ping"}"#, 10),
            Ok(ClientOp::Ping { id: None })
        );
    }

    #[test]
    fn refuses_with_codes() {
        let code = |text: &str| parse_client_frame(text, 3).map_err(|e| e.code);
        assert_eq!(code("not json"), Err(ErrorCode::InvalidJson));
        assert_eq!(code("{\"op\":"), Err(ErrorCode::InvalidJson));
        assert_eq!(code("[1,2]"), Err(ErrorCode::InvalidRequest));
        assert_eq!(code("{}"), Err(ErrorCode::UnknownOp));
        assert_eq!(code(r#"{"op":"publish"}"#), Err(ErrorCode::UnknownOp));
        assert_eq!(
            code(r#"{"op":"subscribe"}"#),
            Err(ErrorCode::InvalidRequest)
        );
        assert_eq!(
            code(r#"{"op":"subscribe","events":[]}"#),
            Err(ErrorCode::InvalidRequest)
        );
        assert_eq!(
            code(r#"{"op":"subscribe","events":[1]}"#),
            Err(ErrorCode::InvalidRequest)
        );
        assert_eq!(
            code(r#"{"op":"subscribe","events":["a","b","c","d"]}"#),
            Err(ErrorCode::TooManySubscriptions)
        );
        assert_eq!(
            code(r#"{"op":"ping","id":-1}"#),
            Err(ErrorCode::InvalidRequest)
        );
        let long = format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long), Err(ErrorCode::InvalidRequest));
    }

    #[test]
    fn auth_ops_need_a_string_token() {
        assert_eq!(
            parse_client_frame(r#"{"op":"auth","id":1,"token":"a.b.c"}"#, 3),
            Ok(ClientOp::Auth {
                id: Some(RequestId::Number(1)),
                token: "a.b.c".into()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"refresh","token":"x"}"#, 3),
            Ok(ClientOp::Refresh {
                id: None,
                token: "x".into()
            })
        );
        for bad in [r#"{"op":"auth"}"#, r#"{"op":"refresh","token":5}"#] {
            assert_eq!(
                parse_client_frame(bad, 3).map_err(|e| e.code),
                Err(ErrorCode::InvalidRequest)
            );
        }
        assert_eq!(
            authenticated(None, Some("42"), 7),
            r#"{"op":"authenticated","sub":"42","exp":7}"#
        );
        assert_eq!(
            refreshed(Some(&RequestId::Number(2)), 9, &["a.#".into()]),
            r#"{"op":"refreshed","id":2,"exp":9,"removed":["a.#"]}"#
        );
    }

    #[test]
    fn errors_keep_the_request_id() {
        let err = parse_client_frame(r#"{"op":"nope","id":9}"#, 3).expect_err("unknown op");
        assert_eq!(err.id, Some(RequestId::Number(9)));
    }

    #[test]
    fn deeply_nested_json_is_refused_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_client_frame(&deep, 3).is_err());
    }

    #[test]
    fn replies_are_the_documented_json() {
        let id = RequestId::Number(1);
        assert_eq!(
            subscribed(Some(&id), &["a.*".into()]),
            r#"{"op":"subscribed","id":1,"events":["a.*"]}"#
        );
        assert_eq!(
            subscribed_since(None, &["a.*".into()], false),
            r#"{"op":"subscribed","events":["a.*"],"recovered":false}"#
        );
        assert_eq!(pong(None), r#"{"op":"pong"}"#);
        assert_eq!(
            error(Some(&id), ErrorCode::InvalidPattern, "bad", &[]),
            r#"{"op":"error","id":1,"code":"invalid_pattern","message":"bad"}"#
        );
    }

    #[test]
    fn event_frame_forwards_data_verbatim() {
        let mut event = Event::new("order.\"x\"", Bytes::from_static(b"{ \"a\" : 1 }"));
        event.id = "id-1".into();
        event.time = std::time::UNIX_EPOCH;
        let frame = event_frame(&event);
        assert_eq!(
            std::str::from_utf8(&frame).expect("utf-8"),
            r#"{"op":"event","event":"order.\"x\"","id":"id-1","time":"1970-01-01T00:00:00.000Z","data":{ "a" : 1 }}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&frame).expect("valid JSON");
        assert_eq!(parsed["data"]["a"], 1);
    }
}
