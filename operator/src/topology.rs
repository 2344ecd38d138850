//! The broker topology a router wants: its exchange, its control exchange, its upstream bindings
//! and its history stream, as plain data.
//!
//! `validate` computes it, `build` carries it in `Desired`, and the AMQP `broker` module declares
//! it. It lives apart from `broker` so the pure modules never import the I/O one; so do the
//! decisions `broker` acts on (what a record no longer wanted leaves to unbind or delete).

use std::collections::BTreeSet;

use crate::crd::{RecordedBinding, RecordedHistory, RecordedTopology, StreamArguments};

/// The topology a router wants on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTopology {
    /// The durable topic exchange clients' events are published to.
    pub exchange: String,
    /// The durable fanout exchange the pods publish their load heartbeats to. Never the events
    /// exchange: a client subscribed to `#` would receive the heartbeats.
    pub control_exchange: String,
    pub bindings: BTreeSet<RecordedBinding>,
    /// The history stream, when `spec.history` is enabled.
    pub history: Option<DesiredHistory>,
}

/// The history stream a router wants: a durable RabbitMQ stream bound to the router's exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredHistory {
    pub stream: String,
    pub arguments: StreamArguments,
    /// Binding patterns from the router's exchange into the stream.
    pub patterns: BTreeSet<String>,
}

impl DesiredTopology {
    /// The record written to status once this topology is declared.
    pub fn record(&self) -> RecordedTopology {
        RecordedTopology {
            exchange: self.exchange.clone(),
            control_exchange: Some(self.control_exchange.clone()),
            bindings: self.bindings.iter().cloned().collect(),
            history: self.history.as_ref().map(|history| RecordedHistory {
                stream: history.stream.clone(),
                arguments: Some(history.arguments.clone()),
                patterns: history.patterns.iter().cloned().collect(),
            }),
        }
    }

    /// The record written when RabbitMQ refused the history stream's arguments (it holds the
    /// stream with others): everything as declared, without the arguments it did not take.
    pub fn record_with_differing_stream_arguments(&self) -> RecordedTopology {
        let mut record = self.record();
        if let Some(history) = record.history.as_mut() {
            history.arguments = None;
        }
        record
    }
}

/// What is left to undo of a recorded history stream that the desired topology (on the same
/// exchange) no longer wants as it was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaleHistory {
    /// `(stream, pattern)` bindings from the router's exchange to remove.
    pub unbind: Vec<(String, String)>,
    /// The stream to delete (history turned off under `deletionPolicy: delete`).
    pub delete: Option<String>,
}

/// Pure: compare the recorded history with the desired one on the same exchange. Patterns
/// dropped from the spec are unbound; a stream no longer wanted is unbound (so it stops
/// filling), and deleted too when `delete_stale` (`deletionPolicy: delete`).
pub fn stale_history(
    desired: Option<&DesiredHistory>,
    recorded: Option<&RecordedHistory>,
    delete_stale: bool,
) -> StaleHistory {
    let Some(recorded) = recorded else {
        return StaleHistory::default();
    };
    let still_wanted = desired.filter(|d| d.stream == recorded.stream);
    let unbind = recorded
        .patterns
        .iter()
        .filter(|p| still_wanted.is_none_or(|d| !d.patterns.contains(*p)))
        .map(|p| (recorded.stream.clone(), p.clone()))
        .collect();
    let delete = (still_wanted.is_none() && delete_stale).then(|| recorded.stream.clone());
    StaleHistory { unbind, delete }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(source: &str, key: &str) -> RecordedBinding {
        RecordedBinding {
            source: source.into(),
            routing_key: key.into(),
        }
    }

    fn arguments() -> StreamArguments {
        StreamArguments {
            max_age: "24h".into(),
            max_bytes: 1_073_741_824,
            max_segment_bytes: Some(104_857_600),
        }
    }

    fn history(patterns: &[&str]) -> DesiredHistory {
        DesiredHistory {
            stream: "chat.history".into(),
            arguments: arguments(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn recorded(patterns: &[&str]) -> RecordedHistory {
        RecordedHistory {
            stream: "chat.history".into(),
            arguments: Some(arguments()),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn the_record_lists_every_binding_in_order() {
        let desired = DesiredTopology {
            exchange: "chat".into(),
            control_exchange: "chat.control".into(),
            bindings: BTreeSet::from([binding("users", "user.#"), binding("orders", "order.*")]),
            history: None,
        };
        assert_eq!(
            desired.record(),
            RecordedTopology {
                exchange: "chat".into(),
                control_exchange: Some("chat.control".into()),
                bindings: vec![binding("orders", "order.*"), binding("users", "user.#")],
                history: None,
            }
        );
    }

    #[test]
    fn the_record_holds_the_history_stream_its_arguments_and_sorted_patterns() {
        let desired = DesiredTopology {
            exchange: "chat".into(),
            control_exchange: "chat.control".into(),
            bindings: BTreeSet::new(),
            history: Some(history(&["user.#", "order.*"])),
        };
        assert_eq!(
            desired.record().history,
            Some(recorded(&["order.*", "user.#"]))
        );
        // Arguments RabbitMQ refused are not recorded as declared.
        let differing = desired.record_with_differing_stream_arguments();
        assert_eq!(
            differing.history,
            Some(RecordedHistory {
                arguments: None,
                ..recorded(&["order.*", "user.#"])
            })
        );
        assert_ne!(differing, desired.record(), "so the next reconcile retries");
    }

    #[test]
    fn dropped_patterns_are_unbound_and_nothing_else() {
        let stale = stale_history(
            Some(&history(&["order.*"])),
            Some(&recorded(&["order.*", "refund.#"])),
            true,
        );
        assert_eq!(
            stale,
            StaleHistory {
                unbind: vec![("chat.history".into(), "refund.#".into())],
                delete: None,
            }
        );
        assert_eq!(
            stale_history(Some(&history(&["#"])), Some(&recorded(&["#"])), true),
            StaleHistory::default()
        );
        assert_eq!(
            stale_history(Some(&history(&["#"])), None, true),
            StaleHistory::default(),
            "nothing recorded, nothing stale"
        );
    }

    #[test]
    fn history_turned_off_unbinds_the_stream_and_deletes_it_only_under_delete() {
        let unbind_all = vec![
            ("chat.history".to_string(), "order.*".to_string()),
            ("chat.history".to_string(), "refund.#".to_string()),
        ];
        assert_eq!(
            stale_history(None, Some(&recorded(&["order.*", "refund.#"])), true),
            StaleHistory {
                unbind: unbind_all.clone(),
                delete: Some("chat.history".into()),
            }
        );
        assert_eq!(
            stale_history(None, Some(&recorded(&["order.*", "refund.#"])), false),
            StaleHistory {
                unbind: unbind_all,
                delete: None,
            },
            "retain keeps the stream (and its history), unbound"
        );
    }
}
