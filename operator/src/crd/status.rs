//! What the operator writes back: the EventRouter's status and the broker topology it declared.
//!
//! The topology record grows only by optional fields (`#[serde(default)]`, skipped when empty),
//! so a record written by an older operator still reads, and an older operator reading a newer
//! record ignores what it does not know.

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
    /// `Ready`, `Available`, `BrokerReady`, `Progressing`, `Paused`, and `HistoryReady` when
    /// `spec.history` is enabled.
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

/// Exchanges, bindings and the history stream declared on the broker (AMQP cannot list
/// bindings, so they are recorded).
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
    /// The history stream (`spec.history`) and its bindings. Absent while history is off, and
    /// from records written by operator versions without history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<RecordedHistory>,
}

impl RecordedTopology {
    /// What the record names, for messages: `exchange "chat", control exchange "chat.control" and
    /// history stream "chat.history"`.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("exchange {:?}", self.exchange)];
        if let Some(control) = &self.control_exchange {
            parts.push(format!("control exchange {control:?}"));
        }
        if let Some(history) = &self.history {
            parts.push(format!("history stream {:?}", history.stream));
        }
        match parts.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => parts.concat(),
        }
    }
}

/// The history stream as declared: a durable RabbitMQ queue of type `stream` bound to the
/// router's exchange.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedHistory {
    /// The stream's name.
    pub stream: String,
    /// The retention arguments the operator declared the stream with. Absent when RabbitMQ holds
    /// the stream with other arguments than the spec's (condition `HistoryReady`, reason
    /// `StreamArgumentsDiffer`, says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<StreamArguments>,
    /// Binding patterns from the router's exchange into the stream.
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// A history stream's retention arguments, fixed when RabbitMQ creates the stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamArguments {
    /// `x-max-age`.
    pub max_age: String,
    /// `x-max-length-bytes`.
    pub max_bytes: i64,
    /// `x-stream-max-segment-size-bytes`; absent: RabbitMQ's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_segment_bytes: Option<i64>,
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
        assert_eq!(record.history, None);
        assert_eq!(record.describe(), r#"exchange "chat""#);
        let current = RecordedTopology {
            control_exchange: Some("chat.control".into()),
            ..record
        };
        let json = serde_json::to_value(&current).expect("serializes");
        assert_eq!(json["controlExchange"], "chat.control");
        assert!(json.get("history").is_none(), "no history, no key: {json}");
        assert_eq!(
            current.describe(),
            r#"exchange "chat" and control exchange "chat.control""#
        );
    }

    #[test]
    fn a_history_record_round_trips_and_is_named_in_messages() {
        let record = RecordedTopology {
            exchange: "chat".into(),
            control_exchange: Some("chat.control".into()),
            bindings: Vec::new(),
            history: Some(RecordedHistory {
                stream: "chat.history".into(),
                arguments: Some(StreamArguments {
                    max_age: "24h".into(),
                    max_bytes: 1_073_741_824,
                    max_segment_bytes: None,
                }),
                patterns: vec!["#".into()],
            }),
        };
        let json = serde_json::to_value(&record).expect("serializes");
        assert_eq!(
            json["history"],
            serde_json::json!({
                "stream": "chat.history",
                "arguments": {"maxAge": "24h", "maxBytes": 1_073_741_824_i64},
                "patterns": ["#"]
            })
        );
        let back: RecordedTopology = serde_json::from_value(json).expect("parses");
        assert_eq!(back, record);
        assert_eq!(
            record.describe(),
            r#"exchange "chat", control exchange "chat.control" and history stream "chat.history""#
        );
        // Arguments RabbitMQ did not take from the spec are not recorded.
        let differing: RecordedHistory = serde_json::from_value(
            serde_json::json!({"stream": "chat.history", "patterns": ["#"]}),
        )
        .expect("parses");
        assert_eq!(differing.arguments, None);
    }
}
