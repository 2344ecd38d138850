//! The Kubernetes Events the reconciler records: their reasons and actions as types, and the
//! pure decisions of which ones a reconcile owes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::events::EventType;

use crate::crd::{EventRouterStatus, RecordedTopology};
use crate::status::{
    ConditionType, HistoryOutcome, Reason, find, has_reason, is_true,
    stream_arguments_differ_message,
};

/// The `reason` of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub(crate) enum EventReason {
    Paused,
    InvalidSpec,
    ApplyFailed,
    ChildDeleted,
    Reconciled,
    AutoscalerUnavailable,
    TopologyDeclared,
    TopologyRetained,
    BrokerCleanupSkipped,
    BrokerCleanupAbandoned,
    /// RabbitMQ holds the history stream with other arguments than the spec's.
    StreamArgumentsDiffer,
    /// A broker failure, named like the `BrokerReady` condition's reason.
    Broker(Reason),
}

impl EventReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Broker(reason) => reason.into(),
            other => other.into(),
        }
    }
}

/// The `action` of an Event: the reconcile step that acted or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub(crate) enum EventAction {
    Reconcile,
    Validate,
    Apply,
    DeclareTopology,
    Cleanup,
}

/// One Event to record about a router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Note {
    pub type_: EventType,
    pub reason: EventReason,
    pub action: EventAction,
    pub text: String,
}

impl Note {
    pub(crate) fn normal(reason: EventReason, action: EventAction, text: String) -> Self {
        Self {
            type_: EventType::Normal,
            reason,
            action,
            text,
        }
    }

    pub(crate) fn warning(reason: EventReason, action: EventAction, text: String) -> Self {
        Self {
            type_: EventType::Warning,
            reason,
            action,
            text,
        }
    }
}

/// A paused router is announced once, when it becomes paused.
pub(crate) fn paused_note(previous: &[Condition]) -> Option<Note> {
    (!is_true(previous, ConditionType::Paused)).then(|| {
        Note::normal(
            EventReason::Paused,
            EventAction::Reconcile,
            "spec.paused is true: children and broker are left as they are".into(),
        )
    })
}

/// What a reconcile that applied every child tells about its outcome, in order: a new
/// generation applied, KEDA missing (once), the topology declared when its record changed, the
/// history stream's arguments differing from the spec (once per refusal).
pub(crate) fn outcome_notes(
    previous: &EventRouterStatus,
    generation: Option<i64>,
    keda_missing: bool,
    record: Option<&RecordedTopology>,
    history: &HistoryOutcome,
) -> Vec<Note> {
    let mut notes = Vec::new();
    if previous.observed_generation != generation {
        notes.push(Note::normal(
            EventReason::Reconciled,
            EventAction::Apply,
            format!(
                "applied generation {} to every child",
                generation.unwrap_or_default()
            ),
        ));
    }
    if keda_missing && !has_reason(&previous.conditions, Reason::AutoscalerUnavailable) {
        notes.push(Note::warning(
            EventReason::AutoscalerUnavailable,
            EventAction::Apply,
            "provider keda, but keda.sh/v1alpha1 ScaledObjects are not served".into(),
        ));
    }
    if let Some(record) = record
        && previous.topology.as_ref() != Some(record)
    {
        let history_patterns = record
            .history
            .as_ref()
            .map(|h| format!(" and {} history pattern(s)", h.patterns.len()))
            .unwrap_or_default();
        notes.push(Note::normal(
            EventReason::TopologyDeclared,
            EventAction::DeclareTopology,
            format!(
                "{} with {} upstream binding(s){history_patterns}",
                record.describe(),
                record.bindings.len()
            ),
        ));
    }
    if let HistoryOutcome::ArgumentsDiffer { message } = history {
        let text = stream_arguments_differ_message(message);
        let already_told =
            find(&previous.conditions, ConditionType::HistoryReady).is_some_and(|c| {
                c.reason == Reason::StreamArgumentsDiffer.as_ref() && c.message == text
            });
        if !already_told {
            notes.push(Note::warning(
                EventReason::StreamArgumentsDiffer,
                EventAction::DeclareTopology,
                text,
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::RecordedBinding;

    fn a_condition(type_: ConditionType, status: &str, reason: Reason) -> Condition {
        Condition {
            type_: type_.to_string(),
            status: status.into(),
            reason: reason.to_string(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    fn a_record(bindings: usize) -> RecordedTopology {
        RecordedTopology {
            exchange: "chat".into(),
            control_exchange: Some("chat.control".into()),
            bindings: (0..bindings)
                .map(|i| RecordedBinding {
                    source: format!("up{i}"),
                    routing_key: "#".into(),
                })
                .collect(),
            history: None,
        }
    }

    fn reasons(notes: &[Note]) -> Vec<&'static str> {
        notes.iter().map(|n| n.reason.as_str()).collect()
    }

    #[test]
    fn pausing_is_announced_only_on_the_way_in() {
        assert!(paused_note(&[]).is_some());
        let running = a_condition(ConditionType::Paused, "False", Reason::Running);
        assert!(paused_note(&[running]).is_some());
        let paused = a_condition(ConditionType::Paused, "True", Reason::PausedBySpec);
        assert_eq!(paused_note(&[paused]), None);
    }

    #[test]
    fn a_first_reconcile_announces_the_generation_and_the_topology() {
        let notes = outcome_notes(
            &EventRouterStatus::default(),
            Some(1),
            false,
            Some(&a_record(2)),
            &HistoryOutcome::Off,
        );
        assert_eq!(reasons(&notes), ["Reconciled", "TopologyDeclared"]);
        assert_eq!(notes[0].text, "applied generation 1 to every child");
        assert_eq!(
            notes[1].text,
            "exchange \"chat\" and control exchange \"chat.control\" with 2 upstream binding(s)"
        );
        assert!(notes.iter().all(|n| n.type_ == EventType::Normal));
    }

    #[test]
    fn a_steady_state_resync_records_nothing() {
        let previous = EventRouterStatus {
            observed_generation: Some(3),
            topology: Some(a_record(1)),
            ..EventRouterStatus::default()
        };
        assert_eq!(
            outcome_notes(
                &previous,
                Some(3),
                false,
                Some(&a_record(1)),
                &HistoryOutcome::Off
            ),
            []
        );
        assert_eq!(
            outcome_notes(&previous, Some(3), false, None, &HistoryOutcome::Off),
            []
        );
    }

    #[test]
    fn missing_keda_is_warned_about_once() {
        let previous = EventRouterStatus {
            observed_generation: Some(3),
            ..EventRouterStatus::default()
        };
        let notes = outcome_notes(&previous, Some(3), true, None, &HistoryOutcome::Off);
        assert_eq!(reasons(&notes), ["AutoscalerUnavailable"]);
        assert_eq!(notes[0].type_, EventType::Warning);
        let warned = EventRouterStatus {
            conditions: vec![a_condition(
                ConditionType::Ready,
                "False",
                Reason::AutoscalerUnavailable,
            )],
            ..previous
        };
        assert_eq!(
            outcome_notes(&warned, Some(3), true, None, &HistoryOutcome::Off),
            []
        );
    }

    #[test]
    fn broker_reasons_read_like_the_condition() {
        assert_eq!(
            EventReason::Broker(Reason::UpstreamExchangeMissing).as_str(),
            "UpstreamExchangeMissing"
        );
        assert_eq!(
            EventReason::BrokerCleanupSkipped.as_str(),
            "BrokerCleanupSkipped"
        );
        assert_eq!(
            <&str>::from(EventAction::DeclareTopology),
            "DeclareTopology"
        );
    }

    #[test]
    fn a_history_stream_is_counted_in_the_declaration() {
        let record = RecordedTopology {
            history: Some(crate::crd::RecordedHistory {
                stream: "chat.history".into(),
                arguments: None,
                patterns: vec!["#".into()],
            }),
            ..a_record(0)
        };
        let notes = outcome_notes(
            &EventRouterStatus::default(),
            Some(1),
            false,
            Some(&record),
            &HistoryOutcome::Declared,
        );
        assert_eq!(
            notes[1].text,
            "exchange \"chat\", control exchange \"chat.control\" and history stream \"chat.history\" with 0 upstream binding(s) and 1 history pattern(s)"
        );
    }

    #[test]
    fn differing_stream_arguments_are_warned_about_once_per_refusal() {
        let refusal = |age: &str| HistoryOutcome::ArgumentsDiffer {
            message: format!("inequivalent arg 'x-max-age': received '{age}' but current is '24h'"),
        };
        let previous = EventRouterStatus {
            observed_generation: Some(3),
            topology: Some(a_record(0)),
            ..EventRouterStatus::default()
        };
        let notes = outcome_notes(&previous, Some(3), false, None, &refusal("48h"));
        assert_eq!(reasons(&notes), ["StreamArgumentsDiffer"]);
        assert_eq!(notes[0].type_, EventType::Warning);
        assert!(
            notes[0]
                .text
                .starts_with("history stream arguments differ from spec; RabbitMQ cannot change them in place: inequivalent arg 'x-max-age'"),
            "{}",
            notes[0].text
        );
        let told = EventRouterStatus {
            conditions: vec![Condition {
                type_: ConditionType::HistoryReady.to_string(),
                status: "False".into(),
                reason: Reason::StreamArgumentsDiffer.to_string(),
                message: notes[0].text.clone(),
                observed_generation: Some(3),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            ..previous
        };
        assert_eq!(
            outcome_notes(&told, Some(3), false, None, &refusal("48h")),
            [],
            "the same refusal again"
        );
        assert_eq!(
            reasons(&outcome_notes(&told, Some(3), false, None, &refusal("7D"))),
            ["StreamArgumentsDiffer"],
            "a new spec, a new refusal"
        );
    }
}
