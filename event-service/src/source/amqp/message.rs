//! The mapping between an [`Event`] and an AMQP message, both ways. Pure.
//!
//! On the wire an event is: routing key = event name, body = the event's JSON `data`, property
//! `message_id` = event id, `timestamp` = event time in whole seconds (the AMQP field), header
//! `timestamp_in_ms` = the same time in milliseconds (the header RabbitMQ's own message-timestamp
//! plugin uses), content type `application/json`. Publishers written by others usually set only
//! some of these; every one is optional on the way in except the routing key and a JSON body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::event::Event;

/// Header carrying the publish time in milliseconds since the epoch (the AMQP `timestamp`
/// property only has seconds, too coarse for a delivery-latency histogram).
pub(crate) const TIMESTAMP_MS_HEADER: &str = "timestamp_in_ms";

pub(crate) const CONTENT_TYPE_JSON: &str = "application/json";

/// Why a message from the queue was dropped (the `reason` label of
/// `eventrouter_malformed_messages_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Malformed {
    EmptyRoutingKey,
    TooLarge,
    InvalidJson,
}

impl Malformed {
    /// The label value (the variant in snake_case).
    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Turns a consumed message into an event, or says why it is not one.
///
/// The body is checked to be JSON once here (without building a value) and then travels as the
/// same bytes to every recipient.
pub(crate) fn decode(
    routing_key: &str,
    properties: &BasicProperties,
    body: Vec<u8>,
    max_body_bytes: usize,
) -> Result<Event, Malformed> {
    if routing_key.is_empty() {
        return Err(Malformed::EmptyRoutingKey);
    }
    if body.len() > max_body_bytes {
        return Err(Malformed::TooLarge);
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Err(Malformed::InvalidJson);
    }
    let id = match properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
        _ => uuid::Uuid::now_v7().to_string(),
    };
    Ok(Event {
        name: routing_key.to_owned(),
        id,
        time: publish_time(properties).unwrap_or_else(SystemTime::now),
        data: Bytes::from(body),
    })
}

/// Latest publish time taken from a message: the last second of year 9999. Event frames write
/// the time in RFC 3339, which has no later years (and far larger values overflow `SystemTime`);
/// a later time is ignored like a missing one.
const MAX_PUBLISH_SECS: u64 = 253_402_300_799;

/// The publish time: the millisecond header when present, else the AMQP timestamp (seconds).
fn publish_time(properties: &BasicProperties) -> Option<SystemTime> {
    let from_header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(TIMESTAMP_MS_HEADER))
        .and_then(integer)
        .filter(|ms| *ms > 0 && *ms / 1000 <= MAX_PUBLISH_SECS)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    from_header.or_else(|| {
        properties
            .timestamp()
            .filter(|s| *s > 0 && *s <= MAX_PUBLISH_SECS)
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
    })
}

/// Publishers pick whatever integer type their client library likes for a header.
pub(crate) fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// The routing key, id and properties for publishing `event`.
///
/// Fails only for an event name or id over the AMQP short-string limit; callers validate names
/// before, so this is a second line of defence rather than a panic.
/// Why an event cannot be written as an AMQP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the event name is longer than 255 bytes")]
    NameTooLong,
    #[error("the event id is longer than 255 bytes")]
    IdTooLong,
}

pub(crate) fn encode(event: &Event) -> Result<(ShortString, BasicProperties), EncodeError> {
    let routing_key =
        ShortString::try_new(event.name.as_str()).map_err(|_| EncodeError::NameTooLong)?;
    let message_id = ShortString::try_new(event.id.as_str()).map_err(|_| EncodeError::IdTooLong)?;
    let since_epoch = event.time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut headers = FieldTable::default();
    headers.insert(
        TIMESTAMP_MS_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)),
    );
    let properties = BasicProperties::default()
        .with_message_id(message_id)
        .with_timestamp(since_epoch.as_secs())
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_headers(headers);
    Ok((routing_key, properties))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_event_decodes_to_the_same_event() {
        let time = UNIX_EPOCH + Duration::from_millis(1_764_600_000_123);
        let event = Event {
            name: "order.created".into(),
            id: "evt-1".into(),
            time,
            data: Bytes::from_static(br#"{"order":42}"#),
        };
        let (key, props) = encode(&event).expect("encodable event");
        assert_eq!(key.as_str(), "order.created");
        assert_eq!(props.timestamp(), &Some(1_764_600_000));
        assert_eq!(
            props.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let back =
            decode(key.as_str(), &props, event.data.to_vec(), 1024).expect("a valid message");
        assert_eq!(back.name, event.name);
        assert_eq!(back.id, event.id);
        assert_eq!(back.time, time, "millisecond header wins over seconds");
        assert_eq!(back.data, event.data);
    }

    #[test]
    fn a_bare_message_gets_an_id_and_the_receive_time() {
        let before = SystemTime::now();
        let e = decode("a.b", &BasicProperties::default(), b"[1,2]".to_vec(), 64)
            .expect("a valid message");
        assert!(!e.id.is_empty());
        assert!(e.time >= before);
    }

    #[test]
    fn seconds_timestamp_is_used_without_the_header() {
        let props = BasicProperties::default().with_timestamp(1_700_000_000);
        let e = decode("a", &props, b"1".to_vec(), 64).expect("a valid message");
        assert_eq!(e.time, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }

    #[test]
    fn times_past_year_9999_are_ignored() {
        // Found by fuzzing: such a time made the event frame's RFC 3339 formatting panic (and
        // a seconds timestamp near `u64::MAX` overflowed `SystemTime`).
        let last = UNIX_EPOCH + Duration::from_secs(MAX_PUBLISH_SECS);
        let mut headers = FieldTable::default();
        headers.insert(
            TIMESTAMP_MS_HEADER.into(),
            AMQPValue::LongLongInt((MAX_PUBLISH_SECS as i64 + 1) * 1000),
        );
        for props in [
            BasicProperties::default().with_headers(headers),
            BasicProperties::default().with_timestamp(MAX_PUBLISH_SECS + 1),
            BasicProperties::default().with_timestamp(u64::MAX),
        ] {
            let e = decode("a", &props, b"1".to_vec(), 64).expect("a valid message");
            assert!(e.time < last, "receive time, not the message's");
            let frame = crate::protocol::event_frame(&e);
            assert!(serde_json::from_slice::<serde_json::Value>(&frame).is_ok());
        }
        let props = BasicProperties::default().with_timestamp(MAX_PUBLISH_SECS);
        let e = decode("a", &props, b"1".to_vec(), 64).expect("a valid message");
        assert_eq!(e.time, last);
        assert!(e.time_rfc3339().starts_with("9999-12-31T23:59:59"));
    }

    #[test]
    fn malformed_messages_are_classified() {
        let p = BasicProperties::default();
        assert_eq!(
            decode("", &p, b"{}".to_vec(), 64).err(),
            Some(Malformed::EmptyRoutingKey)
        );
        assert_eq!(
            decode("a", &p, vec![b' '; 65], 64).err(),
            Some(Malformed::TooLarge)
        );
        for body in [&b"not json"[..], b"{\"a\":", b"", b"\xff\xfe"] {
            assert_eq!(
                decode("a", &p, body.to_vec(), 64).err(),
                Some(Malformed::InvalidJson),
                "{body:?}"
            );
        }
    }

    #[test]
    fn over_long_names_are_refused_not_panicked_on() {
        let event = Event::new("a".repeat(300), Bytes::from_static(b"{}"));
        assert!(encode(&event).is_err());
    }
}
