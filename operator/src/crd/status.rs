//! What the operator writes back: the EventRouter's status and the broker topology it declared.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRouterStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Available`, `BrokerReady`, `Progressing`, `Paused`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods of the Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Ready pods of the Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Label selector of the pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The RabbitMQ topology the operator declared; the finalizer removes exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<RecordedTopology>,
}

/// Exchanges and bindings declared on the broker (AMQP cannot list bindings, so they are recorded).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedTopology {
    /// The router's exchange.
    pub exchange: String,
    /// The router's control exchange (fanout), where its pods publish load heartbeats. Absent
    /// from records written by operator versions that did not declare one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_exchange: Option<String>,
    /// Exchange-to-exchange bindings into `exchange`.
    #[serde(default)]
    pub bindings: Vec<RecordedBinding>,
}

impl RecordedTopology {
    /// The recorded exchanges for messages: `exchange "chat" and control exchange "chat.control"`.
    pub fn describe_exchanges(&self) -> String {
        match &self.control_exchange {
            Some(control) => format!(
                "exchange {:?} and control exchange {control:?}",
                self.exchange
            ),
            None => format!("exchange {:?}", self.exchange),
        }
    }
}

/// One exchange-to-exchange binding.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct RecordedBinding {
    /// Source exchange.
    pub source: String,
    /// Binding pattern.
    pub routing_key: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_a_control_exchange_still_reads_and_names_only_its_exchange() {
        // Written by an operator that declared no control exchange.
        let record: RecordedTopology =
            serde_json::from_value(serde_json::json!({"exchange": "chat", "bindings": []}))
                .expect("an older record parses");
        assert_eq!(record.control_exchange, None);
        assert_eq!(record.describe_exchanges(), r#"exchange "chat""#);
        let current = RecordedTopology {
            control_exchange: Some("chat.control".into()),
            ..record
        };
        assert_eq!(
            serde_json::to_value(&current).expect("serializes")["controlExchange"],
            "chat.control"
        );
    }
}
