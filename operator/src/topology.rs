//! The broker topology a router wants: its exchange and upstream bindings, as plain data.
//!
//! `validate` computes it, `build` carries it in `Desired`, and the AMQP `broker` module declares
//! it. It lives apart from `broker` so the pure modules never import the I/O one.

use std::collections::BTreeSet;

use crate::crd::{RecordedBinding, RecordedTopology};

/// The topology a router wants on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTopology {
    pub exchange: String,
    pub bindings: BTreeSet<RecordedBinding>,
}

impl DesiredTopology {
    /// The record written to status once this topology is declared.
    pub fn record(&self) -> RecordedTopology {
        RecordedTopology {
            exchange: self.exchange.clone(),
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
            bindings: BTreeSet::from([binding("users", "user.#"), binding("orders", "order.*")]),
        };
        assert_eq!(
            desired.record(),
            RecordedTopology {
                exchange: "chat".into(),
                bindings: vec![binding("orders", "order.*"), binding("users", "user.#")],
            }
        );
    }
}
