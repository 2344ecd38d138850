//! Missed-event recovery: `spec.history`, the RabbitMQ stream the operator keeps for a router.
//!
//! A client that reconnects subscribes with `since` (the id of the last event it saw) and gets
//! what it missed. The events come from the router's history stream, `<exchange>.history`: a
//! RabbitMQ queue of type `stream`, bound to the router's exchange with `patterns`, which the
//! operator declares with the retention below and the pods only read.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults::*;

/// RabbitMQ's `x-max-age` syntax: a positive whole number and one unit, `Y` (years), `M`
/// (months), `D` (days), `h`, `m` or `s` (`24h`, `7D`). No leading zero, at most nine digits.
pub const MAX_AGE_PATTERN: &str = "^[1-9][0-9]{0,8}[YMDhms]$";

/// The smallest `maxBytes` and `maxSegmentBytes` accepted (1 MiB).
pub const MIN_HISTORY_BYTES: i64 = 1_048_576;

/// The largest segment RabbitMQ accepts (`x-stream-max-segment-size-bytes`, 3 GB).
pub const MAX_SEGMENT_BYTES: i64 = 3_000_000_000;

/// Missed-event recovery from a RabbitMQ stream.
///
/// When enabled, the operator declares the durable stream `<exchange>.history` (a queue of type
/// `stream`) with the retention below, binds it to the router's exchange with `patterns`, and
/// passes its name to the pods, which read it to answer a `subscribe` with `since` (a reconnecting
/// client's last event id). The service's RabbitMQ user needs read permission on the stream and
/// write permission on it through the default exchange (the pods publish a small marker to find
/// its end). RabbitMQ cannot change a stream's arguments in place: a changed `maxAge`, `maxBytes`
/// or `maxSegmentBytes` is reported (condition `HistoryReady=False`, reason
/// `StreamArgumentsDiffer`) and the stream keeps its retention until it is deleted (losing its
/// history) and the operator declares it anew. Disabling history unbinds the stream; with
/// `deletionPolicy: delete` it is deleted too.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.maxSegmentBytes) || self.maxSegmentBytes <= self.maxBytes",
        "message": "maxSegmentBytes must not exceed maxBytes: RabbitMQ removes whole segments only, never the one being written"
    }
]))]
pub struct HistorySpec {
    /// Keep a history stream and let clients recover missed events from it.
    #[serde(default)]
    pub enabled: bool,

    /// How long the stream keeps an event (the stream's `x-max-age`): a positive whole number and
    /// one unit, `Y`, `M` (months), `D`, `h`, `m` (minutes) or `s`, e.g. `24h` or `7D`. Retention
    /// removes whole segments, so events may stay up to one segment longer.
    #[serde(default = "default_history_max_age")]
    #[schemars(length(max = 10), regex(pattern = MAX_AGE_PATTERN))]
    pub max_age: String,

    /// Most bytes the stream keeps (the stream's `x-max-length-bytes`); the oldest segments are
    /// removed beyond it.
    #[serde(default = "default_history_max_bytes")]
    #[schemars(range(min = 1_048_576, max = 1_099_511_627_776_i64))]
    pub max_bytes: i64,

    /// Size of the stream's segment files (the stream's `x-stream-max-segment-size-bytes`).
    /// Unset: RabbitMQ's default, 500 MB. Retention removes whole segments only, never the one
    /// being written, so with a `maxBytes` under a few segments set this to a fraction of it
    /// (a quarter or less); at most `maxBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1_048_576, max = 3_000_000_000_i64))]
    pub max_segment_bytes: Option<i64>,

    /// Binding patterns (RabbitMQ topic syntax) of the events the stream keeps: words separated
    /// by `.`, where `*` (one word) and `#` (any number) are whole words. `#` keeps every event.
    #[serde(default = "default_history_patterns")]
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 255)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.all(p, p.matches('", pattern_regex!(), "'))"),
            "message": "each pattern is words separated by '.', where '*' and '#' are whole words (e.g. 'order.#'); no ',' or whitespace"
        }
    ]))]
    pub patterns: Vec<String>,

    /// Most events one recovery (`subscribe` with `since`) replays; a client that missed more
    /// is told it could not recover (`recovered: false`) and must resynchronise on its own.
    #[serde(default = "default_recovery_max_events")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub recovery_max_events: u32,

    /// Most recoveries one pod runs at once; more wait their turn.
    #[serde(default = "default_recovery_max_concurrent")]
    #[schemars(range(min = 1, max = 4096))]
    pub recovery_max_concurrent: u32,
}
