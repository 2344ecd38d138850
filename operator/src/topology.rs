//! The broker topology a router wants: its exchange, its control exchange and its upstream
//! bindings, as plain data.
//!
//! `validate` computes it, `build` carries it in `Desired`, and the AMQP `broker` module declares
//! it. It lives apart from `broker` so the pure modules never import the I/O one.

use std::collections::BTreeSet;

use crate::crd::{RecordedBinding, RecordedTopology};

/// The topology a router wants on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTopology {
    /// The durable topic exchange clients' events are published to.
    pub exchange: String,
    /// The durable fanout exchange the pods publish their load heartbeats to. Never the events
    /// exchange: a client subscribed to `#` would receive the heartbeats.
    pub control_exchange: String,
    pub bindings: BTreeSet<RecordedBinding>,
}

impl DesiredTopology {
    /// The record written to status once this topology is declared.
    pub fn record(&self) -> RecordedTopology {
        RecordedTopology {
            exchange: self.exchange.clone(),
            control_exchange: Some(self.control_exchange.clone()),
            bindings: self.bindings.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_lists_every_binding_in_order() {
        let binding = |source: &str, key: &str| RecordedBinding {
            source: source.into(),
            routing_key: key.into(),
        };
        let desired = DesiredTopology {
            exchange: "chat".into(),
            control_exchange: "chat.control".into(),
            bindings: BTreeSet::from([binding("users", "user.#"), binding("orders", "order.*")]),
        };
        assert_eq!(
            desired.record(),
            RecordedTopology {
                exchange: "chat".into(),
                control_exchange: Some("chat.control".into()),
                bindings: vec![binding("orders", "order.*"), binding("users", "user.#")],
            }
        );
    }
}
