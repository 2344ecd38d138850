//! The event as it travels inside one instance, and the rules for event names.
//!
//! Sources (the embedded bus, RabbitMQ) turn what they receive into an [`Event`] and hand it to an
//! [`crate::source::EventSink`]. `data` is the publisher's JSON, validated once on the way in and
//! then forwarded byte for byte: it is never re-parsed per recipient.

use std::time::SystemTime;

use bytes::Bytes;

/// Longest event name RabbitMQ accepts as a routing key.
pub const MAX_EVENT_NAME_BYTES: usize = 255;

/// One event on its way to this instance's subscribers.
#[derive(Clone, Debug)]
pub struct Event {
    /// The event name, e.g. `order.created` (the AMQP routing key).
    pub name: String,
    /// Unique id (the AMQP `message_id`, or generated on publish).
    pub id: String,
    /// When the event was published (the AMQP `timestamp`); feeds the delivery-latency histogram.
    pub time: SystemTime,
    /// The publisher's JSON value, exactly as received (already validated as JSON).
    pub data: Bytes,
}

impl Event {
    /// An event published now, with a fresh time-ordered id.
    pub fn new(name: impl Into<String>, data: Bytes) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::now_v7().to_string(),
            time: SystemTime::now(),
            data,
        }
    }

    /// The event's time as RFC 3339 with milliseconds (`2026-12-01T13:49:16.123Z`).
    pub fn time_rfc3339(&self) -> String {
        humantime::format_rfc3339_millis(self.time).to_string()
    }
}

/// Why an event name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventNameError {
    #[error("event name is empty")]
    Empty,
    #[error("event name is {len} bytes; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("event name has an empty word (leading, trailing or doubled '.')")]
    EmptyWord,
    #[error("event name may not contain '*' or '#' (those are subscription wildcards)")]
    Wildcard,
    #[error("event name may not contain whitespace or control characters")]
    BadCharacter,
}

/// Checks an event name: `.`-separated non-empty words, no wildcards, no whitespace, at most `max`
/// bytes (never more than [`MAX_EVENT_NAME_BYTES`]).
pub fn validate_event_name(name: &str, max: usize) -> Result<(), EventNameError> {
    let max = max.min(MAX_EVENT_NAME_BYTES);
    if name.is_empty() {
        return Err(EventNameError::Empty);
    }
    if name.len() > max {
        return Err(EventNameError::TooLong {
            len: name.len(),
            max,
        });
    }
    if name.split('.').any(str::is_empty) {
        return Err(EventNameError::EmptyWord);
    }
    if name.contains(['*', '#']) {
        return Err(EventNameError::Wildcard);
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EventNameError::BadCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["order.created", "user.42.notification", "a", "x-y_z:1.b"] {
            assert_eq!(validate_event_name(name, 255), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_bad_names_with_the_reason() {
        assert_eq!(validate_event_name("", 255), Err(EventNameError::Empty));
        assert_eq!(
            validate_event_name("a..b", 255),
            Err(EventNameError::EmptyWord)
        );
        assert_eq!(
            validate_event_name(".a", 255),
            Err(EventNameError::EmptyWord)
        );
        assert_eq!(
            validate_event_name("a.*", 255),
            Err(EventNameError::Wildcard)
        );
        assert_eq!(
            validate_event_name("a.#", 255),
            Err(EventNameError::Wildcard)
        );
        assert_eq!(
            validate_event_name("a b", 255),
            Err(EventNameError::BadCharacter)
        );
        assert_eq!(
            validate_event_name(&"a".repeat(300), 1000),
            Err(EventNameError::TooLong { len: 300, max: 255 })
        );
    }
}
