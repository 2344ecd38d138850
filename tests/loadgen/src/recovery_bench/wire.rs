//! What the recovery benchmark puts on the wire and reads back, without a JSON parser.
//!
//! Each event's body puts the padding first and the two numbers a client needs last:
//! `{"p":"xx…","t":<publish time, µs>,"s":<sequence number>}`. The service splices the body
//! into its frame as the last field (`{"op":"event",…,"data":<body>}`), so a client reads both
//! numbers from the last ~40 bytes of the frame, and the event id from a fixed place near its
//! start: a few dozen byte comparisons per frame instead of a JSON parse.

use std::time::{SystemTime, UNIX_EPOCH};

/// How an event frame starts.
const EVENT_PREFIX: &[u8] = b"{\"op\":\"event\",";

/// The key before the event id in an event frame.
const ID_KEY: &[u8] = b",\"id\":\"";

/// How far into a frame the id key is looked for (past the event name).
const ID_SEARCH: usize = 320;

/// Longest event id kept (a UUID is 36 characters).
pub const MAX_ID_LEN: usize = 64;

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The JSON body of event `seq` published at `t_us`.
pub fn body(seq: u64, t_us: u64, pad: &str) -> Vec<u8> {
    format!(r#"{{"p":"{pad}","t":{t_us},"s":{seq}}}"#).into_bytes()
}

/// A UUIDv7 (RFC 9562) made at `ms` milliseconds since the epoch: the 48-bit time, version 7,
/// 12 bits of `counter` (so ids made within one millisecond still sort in order), the variant
/// and 62 random bits.
pub fn uuid_v7(ms: u64, counter: u64, random: u64) -> String {
    let hi = ((ms & 0xFFFF_FFFF_FFFF) << 16) | 0x7000 | (counter & 0x0FFF);
    let lo = 0x8000_0000_0000_0000 | (random & 0x3FFF_FFFF_FFFF_FFFF);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

/// A text message from the service, as far as the benchmark cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// An event frame: its sequence number, publish time (µs) and id.
    Event { seq: u64, t_us: u64, id: &'a [u8] },
    /// The `subscribed` reply; `recovered` when it answers a `subscribe` with `since`.
    Subscribed { recovered: Option<bool> },
    /// An `error` op with code `busy`: too many recoveries wait; retry.
    Busy,
    /// Any other `error` op.
    Error,
    /// An event frame whose tail or id is not the benchmark's.
    Unreadable,
    /// Anything else.
    Other,
}

/// Classifies one text message.
pub fn classify(payload: &[u8]) -> Message<'_> {
    if payload.starts_with(EVENT_PREFIX) {
        return match (tail(payload), event_id(payload)) {
            (Some((seq, t_us)), Some(id)) => Message::Event { seq, t_us, id },
            _ => Message::Unreadable,
        };
    }
    if contains(payload, b"\"op\":\"subscribed\"") {
        let recovered = if contains(payload, b"\"recovered\":true") {
            Some(true)
        } else if contains(payload, b"\"recovered\":false") {
            Some(false)
        } else {
            None
        };
        return Message::Subscribed { recovered };
    }
    if contains(payload, b"\"op\":\"error\"") {
        return if contains(payload, b"\"code\":\"busy\"") {
            Message::Busy
        } else {
            Message::Error
        };
    }
    Message::Other
}

/// The sequence number and publish time from the tail of an event frame
/// (`…,"t":<µs>,"s":<seq>}}`).
pub fn tail(frame: &[u8]) -> Option<(u64, u64)> {
    let rest = frame.strip_suffix(b"}}")?;
    let (seq, rest) = digits_back(rest)?;
    let rest = rest.strip_suffix(b",\"s\":")?;
    let (t_us, rest) = digits_back(rest)?;
    rest.strip_suffix(b",\"t\":")?;
    Some((seq, t_us))
}

/// The event id of an event frame (`{"op":"event","event":"…","id":"<id>",…`).
pub fn event_id(frame: &[u8]) -> Option<&[u8]> {
    let head = &frame[..frame.len().min(ID_SEARCH)];
    let start = head.windows(ID_KEY.len()).position(|w| w == ID_KEY)? + ID_KEY.len();
    let len = frame.get(start..)?.iter().position(|&c| c == b'"')?;
    (len > 0 && len <= MAX_ID_LEN).then(|| &frame[start..start + len])
}

/// The decimal number at the end of `bytes`, and what precedes it.
fn digits_back(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let n = bytes
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if n == 0 || n > 19 {
        return None;
    }
    let (rest, digits) = bytes.split_at(bytes.len() - n);
    let value = digits.iter().try_fold(0u64, |acc, c| {
        acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })?;
    Some((value, rest))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event frame as the service writes it (`protocol::event_frame`).
    fn frame(id: &str, data: &[u8]) -> Vec<u8> {
        let mut out = format!(
            r#"{{"op":"event","event":"bench.recovery","id":"{id}","time":"2026-01-01T00:00:00.123Z","data":"#
        )
        .into_bytes();
        out.extend_from_slice(data);
        out.push(b'}');
        out
    }

    #[test]
    fn the_body_is_json_with_both_numbers() {
        let body = body(42, 1_760_000_000_123_456, "xxxx");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["s"], 42);
        assert_eq!(v["t"], 1_760_000_000_123_456u64);
        assert_eq!(v["p"], "xxxx");
    }

    #[test]
    fn an_event_frame_gives_its_sequence_time_and_id() {
        let id = uuid_v7(1_760_000_000_123, 5, 99);
        let f = frame(&id, &body(1234, 1_760_000_000_123_456, "pad"));
        assert_eq!(
            classify(&f),
            Message::Event {
                seq: 1234,
                t_us: 1_760_000_000_123_456,
                id: id.as_bytes()
            }
        );
        assert_eq!(tail(&frame(&id, &body(0, 1, ""))), Some((0, 1)));
    }

    #[test]
    fn foreign_event_frames_are_unreadable() {
        let f = frame("a", br#"{"s":1,"t":2}"#);
        assert_eq!(classify(&f), Message::Unreadable);
        let f = frame("a", br#"{"t":2,"s":99999999999999999999999}"#);
        assert_eq!(classify(&f), Message::Unreadable);
        assert_eq!(tail(b"}}"), None);
        assert_eq!(event_id(br#"{"op":"event","id":""}"#), None);
    }

    #[test]
    fn replies_are_told_apart() {
        assert_eq!(
            classify(br#"{"op":"subscribed","id":1,"events":["bench.#"],"recovered":true}"#),
            Message::Subscribed {
                recovered: Some(true)
            }
        );
        assert_eq!(
            classify(br#"{"op":"subscribed","id":1,"events":["bench.#"],"recovered":false}"#),
            Message::Subscribed {
                recovered: Some(false)
            }
        );
        assert_eq!(
            classify(br#"{"op":"subscribed","id":1,"events":["bench.#"]}"#),
            Message::Subscribed { recovered: None }
        );
        assert_eq!(
            classify(br#"{"op":"error","id":1,"code":"busy","message":"retry","events":[]}"#),
            Message::Busy
        );
        assert_eq!(
            classify(br#"{"op":"error","id":1,"code":"invalid_pattern","message":"x"}"#),
            Message::Error
        );
        assert_eq!(classify(br#"{"op":"pong"}"#), Message::Other);
    }

    #[test]
    fn uuid_v7_layout() {
        let ms = 0x0190_1234_5678u64;
        let id = uuid_v7(ms, 0xABC, u64::MAX);
        assert_eq!(id.len(), 36);
        let hex: String = id.chars().filter(|c| *c != '-').collect();
        let value = u128::from_str_radix(&hex, 16).expect("hex");
        assert_eq!((value >> 80) as u64, ms, "48-bit time");
        assert_eq!((value >> 76) & 0xF, 7, "version");
        assert_eq!((value >> 64) & 0xFFF, 0xABC, "counter");
        assert_eq!((value >> 62) & 0x3, 0b10, "variant");
        assert!(uuid_v7(ms, 1, 0) < uuid_v7(ms, 2, 0));
        assert!(uuid_v7(ms, 0xFFF, 0) < uuid_v7(ms + 1, 0, 0));
    }
}
