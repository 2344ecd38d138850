//! Centrifugo's JSON client protocol and HTTP server API, as far as the side-by-side benchmark
//! needs them (`--peer centrifugo`, see `tests/loadgen/side-by-side.sh`).
//!
//! Client → server, one JSON command per text frame: `{"id":1,"connect":{}}`, then
//! `{"id":2,"subscribe":{"channel":"…"}}` for each channel, and `{}` to answer a ping.
//!
//! Server → client: replies to commands carry the command's `id` (`{"id":1,"connect":{…}}`,
//! `{"id":2,"subscribe":{}}`, or `{"id":2,"error":{"code":…,"message":"…"}}`); pushes carry none
//! (`{"push":{"channel":"…","pub":{"data":…}}}` is a publication); and `{}` is an
//! application-level ping that the client must answer with `{}` within the server's pong timeout.
//! One WebSocket message may hold several replies, one per line.
//!
//! HTTP server API (key in `X-API-Key`): `POST /api/publish` with `{"channel","data"}` answers
//! `{"result":{}}`; `POST /api/batch` with `{"commands":[{"publish":{…}},…]}` answers
//! `{"replies":[{"publish":{}},…]}`. A refused command answers 200 too, with an `error` object in
//! place of its result.
//!
//! The subscribers' hot path classifies each line by its first bytes (Centrifugo's encoder
//! writes a push's `channel` before its `pub`) and falls back to a JSON parser only for lines it
//! does not recognise; replies, which only come during the handshake, are always parsed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::frame::Header;

/// Centrifugo's bidirectional WebSocket endpoint.
pub const WS_PATH: &str = "/connection/websocket";
/// One publication.
pub const PUBLISH_PATH: &str = "/api/publish";
/// Several commands in one request, executed in order.
pub const BATCH_PATH: &str = "/api/batch";
/// The id of the `connect` command; `subscribe` commands follow from [`FIRST_SUBSCRIBE_ID`].
pub const CONNECT_ID: u32 = 1;
pub const FIRST_SUBSCRIBE_ID: u32 = 2;
/// The answer to a server ping (an empty command).
pub const PONG: &[u8] = b"{}";

const PUSH_PREFIX: &[u8] = b"{\"push\":{";

/// The `connect` command, with a connection token when given.
pub fn connect_command(token: Option<&str>) -> String {
    match token {
        None => format!(r#"{{"id":{CONNECT_ID},"connect":{{}}}}"#),
        Some(token) => format!(
            r#"{{"id":{CONNECT_ID},"connect":{{"token":{}}}}}"#,
            json_string(token)
        ),
    }
}

/// The `subscribe` command for `channel`.
pub fn subscribe_command(id: u32, channel: &str) -> String {
    format!(
        r#"{{"id":{id},"subscribe":{{"channel":{}}}}}"#,
        json_string(channel)
    )
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// One reply of a server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// `{}`: answer with [`PONG`].
    Ping,
    /// A publication push; the whole line, whose `"data":{"t":…` carries the publish time.
    Publication(&'a [u8]),
    /// Any other push (join, leave, unsubscribe, disconnect, …).
    Push(&'a [u8]),
    /// The reply to command `id`, with the error's code and message when it failed.
    Reply { id: u32, error: Option<String> },
    /// A line the load generator does not understand.
    Unknown(&'a [u8]),
}

/// The replies of one complete server message, one per non-empty line.
pub fn lines(message: &[u8]) -> impl Iterator<Item = Line<'_>> {
    message
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .map(classify)
}

/// Classifies one reply.
pub fn classify(line: &[u8]) -> Line<'_> {
    if line == b"{}" {
        return Line::Ping;
    }
    if let Some(push) = line.strip_prefix(PUSH_PREFIX) {
        if starts_with_pub(push) {
            return Line::Publication(line);
        }
        return match parse_push(line) {
            Some(true) => Line::Publication(line),
            Some(false) => Line::Push(line),
            None => Line::Unknown(line),
        };
    }
    #[derive(Deserialize)]
    struct ReplyHead {
        id: Option<u32>,
        error: Option<ErrorBody>,
        push: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<ReplyHead>(line) {
        Ok(ReplyHead {
            id: Some(id),
            error,
            ..
        }) => Line::Reply {
            id,
            error: error.map(|e| e.to_string()),
        },
        Ok(ReplyHead { push: Some(_), .. }) => match parse_push(line) {
            Some(true) => Line::Publication(line),
            _ => Line::Push(line),
        },
        // An empty object with whitespace in it is a ping all the same.
        Ok(ReplyHead {
            id: None,
            error: None,
            push: None,
        }) if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line)
            .is_ok_and(|m| m.is_empty()) =>
        {
            Line::Ping
        }
        _ => Line::Unknown(line),
    }
}

/// The body of a push after `{"push":{` starts with an optional `"id":<n>,`, an optional
/// `"channel":"<name>",` and then `"pub":` for a publication: the order Centrifugo writes them.
fn starts_with_pub(push: &[u8]) -> bool {
    let mut rest = push;
    if let Some(after) = rest.strip_prefix(b"\"id\":") {
        let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
        match after[digits..].strip_prefix(b",") {
            Some(after) => rest = after,
            None => return false,
        }
    }
    if let Some(after) = rest.strip_prefix(b"\"channel\":") {
        let Some(end) = json_string_end(after) else {
            return false;
        };
        match after[end..].strip_prefix(b",") {
            Some(after) => rest = after,
            None => return false,
        }
    }
    rest.starts_with(b"\"pub\":")
}

/// The length of the JSON string at the start of `s`, quotes included.
fn json_string_end(s: &[u8]) -> Option<usize> {
    if s.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Whether a push line is a publication, by parsing it (`None`: not a JSON push).
fn parse_push(line: &[u8]) -> Option<bool> {
    #[derive(Deserialize)]
    struct Envelope {
        push: PushBody,
    }
    #[derive(Deserialize)]
    struct PushBody {
        #[serde(rename = "pub")]
        publication: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Envelope>(line)
        .ok()
        .map(|e| e.push.publication.is_some())
}

/// A command's or API call's `error`.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub message: String,
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

/// Puts a message split over several frames back together. Centrifugo sends each message as one
/// frame, but a client must not rely on it.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Vec<u8>,
}

impl Reassembler {
    /// Feeds one data frame (text, binary or continuation) and calls `on_message` with the whole
    /// message once its last frame arrived.
    pub fn feed(&mut self, header: &Header, payload: &[u8], on_message: impl FnOnce(&[u8])) {
        if header.fin && self.partial.is_empty() {
            on_message(payload);
            return;
        }
        self.partial.extend_from_slice(payload);
        if header.fin {
            on_message(&self.partial);
            self.partial.clear();
        }
    }
}

/// The body of `POST /api/publish`: one publication of `data` (JSON) to `channel`.
pub fn publish_body(channel: &str, data: &str) -> String {
    format!(r#"{{"channel":{},"data":{data}}}"#, json_string(channel))
}

/// The body of `POST /api/batch`: one publish command per `data` (JSON), executed in order.
pub fn batch_body<'a>(channel: &str, data: impl IntoIterator<Item = &'a str>) -> String {
    let channel = json_string(channel);
    let mut body = String::from(r#"{"commands":["#);
    for (k, data) in data.into_iter().enumerate() {
        if k > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"publish":{{"channel":{channel},"data":{data}}}}}"#
        ));
    }
    body.push_str("]}");
    body
}

/// What one API answer said: publications accepted, and the errors of those refused, by code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApiOutcome {
    pub accepted: u64,
    pub errors: BTreeMap<String, u64>,
}

/// Reads the answer to `POST /api/publish` (`{"result":{}}` or `{"error":{…}}`) or to
/// `POST /api/batch` (`{"replies":[…]}`, each a result or an `error`).
pub fn api_outcome(body: &[u8]) -> Result<ApiOutcome, String> {
    #[derive(Deserialize)]
    struct Answer {
        error: Option<ErrorBody>,
        result: Option<serde::de::IgnoredAny>,
        replies: Option<Vec<BatchReply>>,
    }
    #[derive(Deserialize)]
    struct BatchReply {
        error: Option<ErrorBody>,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not a Centrifugo API answer ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    })?;
    let mut outcome = ApiOutcome::default();
    let mut count = |error: Option<ErrorBody>| match error {
        None => outcome.accepted += 1,
        Some(e) => *outcome.errors.entry(format!("api_{}", e.code)).or_insert(0) += 1,
    };
    match answer {
        Answer {
            replies: Some(replies),
            ..
        } => replies.into_iter().for_each(|r| count(r.error)),
        Answer {
            error: Some(error), ..
        } => count(Some(error)),
        Answer {
            result: Some(_), ..
        } => count(None),
        _ => return Err("neither result, error nor replies".into()),
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::opcode;

    #[test]
    fn commands_are_centrifugos_json() {
        assert_eq!(connect_command(None), r#"{"id":1,"connect":{}}"#);
        assert_eq!(
            connect_command(Some("a.b\"c")),
            r#"{"id":1,"connect":{"token":"a.b\"c"}}"#
        );
        assert_eq!(
            subscribe_command(2, "bench.fanout"),
            r#"{"id":2,"subscribe":{"channel":"bench.fanout"}}"#
        );
        for command in [connect_command(None), subscribe_command(7, "x\"y")] {
            serde_json::from_str::<serde_json::Value>(&command).expect("valid JSON");
        }
    }

    #[test]
    fn a_multi_reply_message_splits_into_its_lines() {
        let message = b"{\"id\":1,\"connect\":{\"client\":\"c1\",\"version\":\"6.9.1\",\"ping\":20,\"pong\":true}}\n\
            {\"id\":2,\"subscribe\":{}}\n\
            {\"push\":{\"channel\":\"bench.fanout\",\"pub\":{\"data\":{\"t\":42,\"seq\":0}}}}\n\
            {}\n";
        let got: Vec<Line<'_>> = lines(message).collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0], Line::Reply { id: 1, error: None });
        assert_eq!(got[1], Line::Reply { id: 2, error: None });
        assert!(matches!(got[2], Line::Publication(_)));
        assert_eq!(got[3], Line::Ping);
        let Line::Publication(line) = got[2] else {
            unreachable!()
        };
        assert_eq!(crate::fanout::timestamp_of(line), Some(42));
    }

    #[test]
    fn publications_are_recognised_with_or_without_id_and_escapes() {
        for line in [
            &br#"{"push":{"channel":"bench.fanout","pub":{"data":{"t":1}}}}"#[..],
            br#"{"push":{"channel":"we\"ird\\","pub":{"data":{"t":1},"offset":3}}}"#,
            br#"{"push":{"id":5,"pub":{"data":1}}}"#,
            br#"{"push":{"pub":{"data":"x"}}}"#,
            // Another order than Centrifugo's: found by the parser, not the fast path.
            br#"{"push":{"pub":{"data":1},"channel":"a"}}"#,
            br#"{"push":{"channel":"a","extra":1,"pub":{"data":1}}}"#,
            br#"{"push": {"channel":"a","pub":{}}}"#,
        ] {
            assert_eq!(
                classify(line),
                Line::Publication(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn other_pushes_and_data_that_looks_like_a_publication_are_not_counted() {
        for line in [
            &br#"{"push":{"channel":"a","join":{"info":{"user":"u","conn_info":{"pub":1}}}}}"#[..],
            br#"{"push":{"channel":"\"pub\":","leave":{"info":{}}}}"#,
            br#"{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}"#,
            br#"{"push":{"channel":"a","unsubscribe":{"code":2000}}}"#,
        ] {
            assert_eq!(
                classify(line),
                Line::Push(line),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            classify(br#"{"push":{"channel":"a","xx"#),
            Line::Unknown(br#"{"push":{"channel":"a","xx"#)
        );
    }

    #[test]
    fn pings_replies_and_errors() {
        assert_eq!(classify(b"{}"), Line::Ping);
        assert_eq!(classify(b"{ }"), Line::Ping);
        assert_eq!(
            classify(br#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#),
            Line::Reply {
                id: 2,
                error: Some("error 103: permission denied".into())
            }
        );
        assert_eq!(
            classify(br#"{"id":3,"subscribe":{"recoverable":false}}"#),
            Line::Reply { id: 3, error: None }
        );
        assert_eq!(classify(b"not json"), Line::Unknown(b"not json"));
        assert_eq!(classify(b"[1]"), Line::Unknown(b"[1]"));
        // Blank lines and a trailing newline or CRLF are not replies.
        let got: Vec<Line<'_>> = lines(b"\n{}\r\n\n{}").collect();
        assert_eq!(got, vec![Line::Ping, Line::Ping]);
    }

    fn header(fin: bool, op: u8, len: usize) -> Header {
        Header {
            fin,
            opcode: op,
            payload_len: len as u64,
            header_len: 2,
        }
    }

    #[test]
    fn fragmented_messages_are_put_back_together() {
        let mut r = Reassembler::default();
        let mut messages = Vec::new();
        r.feed(&header(true, opcode::TEXT, 2), b"{}", |m| {
            messages.push(m.to_vec())
        });
        r.feed(&header(false, opcode::TEXT, 4), b"{\"pu", |m| {
            messages.push(m.to_vec())
        });
        r.feed(&header(false, opcode::CONTINUATION, 3), b"sh\":", |m| {
            messages.push(m.to_vec())
        });
        r.feed(&header(true, opcode::CONTINUATION, 3), b"{}}", |m| {
            messages.push(m.to_vec())
        });
        r.feed(&header(true, opcode::TEXT, 2), b"{}", |m| {
            messages.push(m.to_vec())
        });
        assert_eq!(
            messages,
            vec![b"{}".to_vec(), b"{\"push\":{}}".to_vec(), b"{}".to_vec()]
        );
    }

    #[test]
    fn api_bodies() {
        let one = publish_body("bench.x", r#"{"t":1}"#);
        assert_eq!(one, r#"{"channel":"bench.x","data":{"t":1}}"#);
        let batch = batch_body("bench.x", [r#"{"t":1}"#, r#"{"t":2}"#]);
        assert_eq!(
            batch,
            r#"{"commands":[{"publish":{"channel":"bench.x","data":{"t":1}}},{"publish":{"channel":"bench.x","data":{"t":2}}}]}"#
        );
        serde_json::from_str::<serde_json::Value>(&batch).expect("valid JSON");
    }

    #[test]
    fn api_answers() {
        assert_eq!(
            api_outcome(br#"{"result":{}}"#),
            Ok(ApiOutcome {
                accepted: 1,
                errors: BTreeMap::new()
            })
        );
        assert_eq!(
            api_outcome(br#"{"error":{"code":102,"message":"unknown channel"}}"#),
            Ok(ApiOutcome {
                accepted: 0,
                errors: [("api_102".to_owned(), 1)].into()
            })
        );
        assert_eq!(
            api_outcome(
                br#"{"replies":[{"publish":{}},{"error":{"code":108,"message":"not available"}},{"publish":{}}]}"#
            ),
            Ok(ApiOutcome {
                accepted: 2,
                errors: [("api_108".to_owned(), 1)].into()
            })
        );
        assert!(api_outcome(b"{}").is_err());
        assert!(api_outcome(b"Unauthorized").is_err());
    }
}
