//! The heartbeat: what one instance tells the others about its load, and its wire format.
//!
//! One small JSON object, versioned by `"v"`:
//!
//! ```json
//! {"v":1,"instance":"router-7d9f-abcde","started_ms":1764633600000,"seq":42,
//!  "connections":467,"max_connections":10000,"draining":false}
//! ```
//!
//! Decoding is strict about what it relies on and lenient about the rest: the size is bounded
//! before parsing, the version is read first (so a future version is told apart from garbage),
//! every field this version needs must be there and plausible, and unknown fields are ignored so
//! a later version can add optional fields without a version bump.

use serde::{Deserialize, Serialize};

/// The wire format version this build writes and reads.
pub const HEARTBEAT_VERSION: u64 = 1;

/// Largest encoded heartbeat accepted. A valid one is under 400 bytes (the instance name is at
/// most 253); anything bigger is not ours.
pub const MAX_HEARTBEAT_BYTES: usize = 1024;

/// Longest instance name: a Kubernetes object name (DNS subdomain), which a pod name is.
pub const MAX_INSTANCE_BYTES: usize = 253;

/// Largest connection count or limit a heartbeat may carry; far above what one process can hold,
/// low enough that summing a full fleet view cannot overflow.
pub const MAX_COUNT: u64 = 1 << 32;

/// One instance's load, as published on the router's control exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The instance's name (the pod name): the key of the fleet view.
    pub instance: String,
    /// When this process started (Unix milliseconds). Orders incarnations of one instance name: a
    /// restarted container keeps its pod name but starts its sequence again.
    pub started_ms: u64,
    /// Increases by one per heartbeat within one incarnation; orders heartbeats, so a late one is
    /// recognised and ignored.
    pub seq: u64,
    /// Open WebSocket connections when the heartbeat was sent.
    pub connections: u64,
    /// The instance's `--max-connections`.
    pub max_connections: u64,
    /// The instance is draining: it takes no share of the load and receives no moved clients.
    pub draining: bool,
}

impl Heartbeat {
    /// The order of heartbeats from one instance name: incarnation first, then sequence.
    pub fn order(&self) -> (u64, u64) {
        (self.started_ms, self.seq)
    }

    /// Encodes the heartbeat for the control exchange. Fails only for a heartbeat peers would
    /// reject (bad instance name, implausible counts), so nothing undecodable is ever published.
    pub fn encode(&self) -> Result<Vec<u8>, HeartbeatError> {
        self.validate()?;
        let bytes = serde_json::to_vec(&Versioned {
            v: HEARTBEAT_VERSION,
            heartbeat: self,
        })
        .map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_HEARTBEAT_BYTES {
            return Err(HeartbeatError::TooLarge {
                len: bytes.len(),
                max: MAX_HEARTBEAT_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes a heartbeat received from the control exchange.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeartbeatError> {
        if bytes.len() > MAX_HEARTBEAT_BYTES {
            return Err(HeartbeatError::TooLarge {
                len: bytes.len(),
                max: MAX_HEARTBEAT_BYTES,
            });
        }
        // The version first: a newer peer's heartbeat must read as "unsupported version", not as
        // whatever field its format happens to lack.
        let probe: VersionProbe =
            serde_json::from_slice(bytes).map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        match probe.v {
            None => return Err(HeartbeatError::MissingVersion),
            Some(HEARTBEAT_VERSION) => {}
            Some(other) => return Err(HeartbeatError::UnsupportedVersion(other)),
        }
        let heartbeat: Heartbeat =
            serde_json::from_slice(bytes).map_err(|e| HeartbeatError::Malformed(e.to_string()))?;
        heartbeat.validate()?;
        Ok(heartbeat)
    }

    fn validate(&self) -> Result<(), HeartbeatError> {
        let name = &self.instance;
        if name.is_empty() || name.len() > MAX_INSTANCE_BYTES {
            return Err(HeartbeatError::InvalidInstance(format!(
                "the instance name must be 1 to {MAX_INSTANCE_BYTES} bytes, got {}",
                name.len()
            )));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        {
            return Err(HeartbeatError::InvalidInstance(format!(
                "the instance name may hold letters, digits, '-', '.' and '_', not {bad:?}"
            )));
        }
        for (field, value) in [
            ("connections", self.connections),
            ("max_connections", self.max_connections),
        ] {
            if value > MAX_COUNT {
                return Err(HeartbeatError::Implausible { field, value });
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Versioned<'a> {
    v: u64,
    #[serde(flatten)]
    heartbeat: &'a Heartbeat,
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default)]
    v: Option<u64>,
}

/// Why a message on the control exchange is not a heartbeat this build can use. The receiver
/// counts and drops it; a stream of these means a foreign publisher or a version skew.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error("heartbeat of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("not a heartbeat object: {0}")]
    Malformed(String),
    #[error("heartbeat without a \"v\" version field")]
    MissingVersion,
    #[error(
        "heartbeat version {0} is not supported (this build reads version {HEARTBEAT_VERSION}); \
         upgrade every instance of the router to the same release"
    )]
    UnsupportedVersion(u64),
    #[error("invalid instance name: {0}")]
    InvalidInstance(String),
    #[error("implausible {field} {value} (more than {MAX_COUNT})")]
    Implausible { field: &'static str, value: u64 },
}

impl HeartbeatError {
    /// A bounded label for a "heartbeats rejected" counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            HeartbeatError::TooLarge { .. } => "too_large",
            HeartbeatError::Malformed(_) => "malformed",
            HeartbeatError::MissingVersion => "missing_version",
            HeartbeatError::UnsupportedVersion(_) => "unsupported_version",
            HeartbeatError::InvalidInstance(_) => "invalid_instance",
            HeartbeatError::Implausible { .. } => "implausible",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Heartbeat {
        Heartbeat {
            instance: "router-7d9f-abcde".into(),
            started_ms: 1_764_633_600_000,
            seq: 42,
            connections: 467,
            max_connections: 10_000,
            draining: false,
        }
    }

    #[test]
    fn round_trips_and_carries_the_version() {
        let hb = sample();
        let bytes = hb.encode().expect("valid heartbeat");
        let text = std::str::from_utf8(&bytes).expect("utf-8");
        assert!(text.starts_with(r#"{"v":1,"#), "{text}");
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
        assert_eq!(Heartbeat::decode(&bytes), Ok(hb));
    }

    #[test]
    fn longest_valid_name_fits_the_bound() {
        let mut hb = sample();
        hb.instance = "a".repeat(MAX_INSTANCE_BYTES);
        hb.started_ms = u64::MAX;
        hb.seq = u64::MAX;
        hb.connections = MAX_COUNT;
        hb.max_connections = MAX_COUNT;
        let bytes = hb.encode().expect("valid heartbeat");
        assert!(bytes.len() <= MAX_HEARTBEAT_BYTES);
        assert_eq!(Heartbeat::decode(&bytes), Ok(hb));
    }

    #[test]
    fn unknown_fields_are_ignored_so_the_format_can_grow() {
        let text = r#"{"v":1,"instance":"a","started_ms":1,"seq":2,"connections":3,
            "max_connections":4,"draining":true,"zone":"eu-west-1a"}"#;
        let hb = Heartbeat::decode(text.as_bytes()).expect("extra field tolerated");
        assert_eq!(hb.connections, 3);
        assert!(hb.draining);
    }

    #[test]
    fn garbage_is_rejected_with_a_typed_error() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "malformed"),
            (b"not json", "malformed"),
            (b"[1,2]", "malformed"),
            (br#"{"v":"1"}"#, "malformed"),
            (br#"{"instance":"a"}"#, "missing_version"),
            (br#"{"v":2,"whatever":true}"#, "unsupported_version"),
            (br#"{"v":1,"instance":"a"}"#, "malformed"),
            (
                br#"{"v":1,"instance":"a","started_ms":1,"seq":2,"connections":-3,"max_connections":4,"draining":false}"#,
                "malformed",
            ),
            (
                br#"{"v":1,"instance":"","started_ms":1,"seq":2,"connections":3,"max_connections":4,"draining":false}"#,
                "invalid_instance",
            ),
            (
                br#"{"v":1,"instance":"a b","started_ms":1,"seq":2,"connections":3,"max_connections":4,"draining":false}"#,
                "invalid_instance",
            ),
            (
                br#"{"v":1,"instance":"a","started_ms":1,"seq":2,"connections":99999999999,"max_connections":4,"draining":false}"#,
                "implausible",
            ),
        ];
        for (bytes, label) in cases {
            let err = Heartbeat::decode(bytes).expect_err("must be rejected");
            assert_eq!(
                err.metric_label(),
                *label,
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = vec![b' '; MAX_HEARTBEAT_BYTES + 1];
        assert_eq!(
            Heartbeat::decode(&big),
            Err(HeartbeatError::TooLarge {
                len: MAX_HEARTBEAT_BYTES + 1,
                max: MAX_HEARTBEAT_BYTES
            })
        );
    }

    #[test]
    fn an_invalid_heartbeat_is_never_encoded() {
        let mut hb = sample();
        hb.instance = "pod/with/slashes".into();
        assert_eq!(
            hb.encode().map_err(|e| e.metric_label()),
            Err("invalid_instance")
        );
    }

    #[test]
    fn incarnation_orders_before_sequence() {
        let old = Heartbeat {
            seq: 900,
            ..sample()
        };
        let restarted = Heartbeat {
            started_ms: old.started_ms + 1,
            seq: 0,
            ..sample()
        };
        assert!(restarted.order() > old.order());
    }
}
