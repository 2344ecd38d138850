//! Pure computation of an EventRouter's status from what one reconcile observed.
//!
//! Conditions (each with `observedGeneration`; `lastTransitionTime` only moves when the status
//! value changes):
//!
//! | type | True when | reasons |
//! |---|---|---|
//! | `Ready` | everything below is fine and the spec is valid | `Reconciled`, `InvalidSpec`, `Paused`, `BrokerNotReady`, `AutoscalerUnavailable`, `NotAvailable` |
//! | `Available` | the Deployment has at least one ready pod | `MinimumReplicasAvailable`, `NoReadyReplicas`, `DeploymentMissing` |
//! | `BrokerReady` | the exchange and bindings are declared | `TopologyDeclared`, `BrokerUnreachable`, `UpstreamExchangeMissing`, `BrokerRefused`, `InvalidSpec`, `Paused` |
//! | `Progressing` | a rollout is under way | `RolloutInProgress`, `RolloutComplete`, `Paused` |
//! | `Paused` | `spec.paused` is true | `PausedBySpec`, `Running` |
//! | `HistoryReady` (only with `spec.history` enabled) | the history stream is declared with the spec's arguments and bound | `StreamDeclared`, `StreamArgumentsDiffer`, `BrokerNotReady`, `InvalidSpec` |
//!
//! `HistoryReady` does not count towards `Ready`: a stream RabbitMQ keeps with other arguments
//! than the spec's still serves recoveries, with its old retention.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition types of an EventRouter's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::AsRefStr, strum::Display, strum::EnumString)]
pub enum ConditionType {
    Ready,
    Available,
    BrokerReady,
    Progressing,
    Paused,
    HistoryReady,
}

/// Every condition reason (the table above), as the API value `as_ref()` spells.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::AsRefStr,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
pub enum Reason {
    Reconciled,
    InvalidSpec,
    Paused,
    BrokerNotReady,
    AutoscalerUnavailable,
    NotAvailable,
    MinimumReplicasAvailable,
    NoReadyReplicas,
    DeploymentMissing,
    TopologyDeclared,
    BrokerUnreachable,
    UpstreamExchangeMissing,
    BrokerRefused,
    RolloutInProgress,
    RolloutComplete,
    PausedBySpec,
    Running,
    StreamDeclared,
    StreamArgumentsDiffer,
}

/// What happened on the broker side of a reconcile that got that far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerOutcome {
    Ready,
    Failed { reason: Reason, message: String },
}

/// What happened to the history stream in a reconcile that reached the broker step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryOutcome {
    /// `spec.history` is off: no `HistoryReady` condition.
    Off,
    /// Declared with the spec's arguments and bound.
    Declared,
    /// RabbitMQ holds the stream with other arguments and cannot change them in place;
    /// `message` is its refusal.
    ArgumentsDiffer { message: String },
    /// The broker step failed before the stream was declared (see `BrokerReady`).
    NotDeclared,
}

/// How far a reconcile went: each state once, so no combination is contradictory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `spec.paused`: nothing was changed; the last broker condition still describes the broker.
    Paused,
    /// The spec cannot be acted on; `problems` is the message. Nothing was changed.
    Invalid { problems: String },
    /// Children applied and the broker declared (or failed).
    Reconciled {
        broker: BrokerOutcome,
        history: HistoryOutcome,
        /// Autoscaling asks for KEDA but ScaledObjects are not served.
        keda_missing: bool,
    },
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub phase: Phase,
    pub deployment: Option<&'a Deployment>,
}

fn condition(
    type_: ConditionType,
    ok: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The condition of `type_` in `conditions`, if any.
pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_ref())
}

/// Whether `conditions` hold `type_` with status `True`.
pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Whether any of `conditions` has `reason`.
pub fn has_reason(conditions: &[Condition], reason: Reason) -> bool {
    conditions.iter().any(|c| c.reason == reason.as_ref())
}

/// Keep `lastTransitionTime` from `previous` when the status value did not change.
fn carry_transition_times(mut next: Vec<Condition>, previous: &[Condition]) -> Vec<Condition> {
    for c in &mut next {
        if let Some(old) = previous.iter().find(|p| p.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

/// The ready and total replicas of `deployment`.
pub fn replica_counts(deployment: Option<&Deployment>) -> (Option<i32>, Option<i32>) {
    let status = deployment.and_then(|d| d.status.as_ref());
    (
        status.and_then(|s| s.replicas).or(deployment.map(|_| 0)),
        status
            .and_then(|s| s.ready_replicas)
            .or(deployment.map(|_| 0)),
    )
}

fn progressing(observed: &Observed<'_>, now: &Time) -> Condition {
    use ConditionType::Progressing;
    let g = observed.generation;
    let rollout_in_progress = |message| {
        condition(
            Progressing,
            true,
            Reason::RolloutInProgress,
            message,
            g,
            now,
        )
    };
    match observed.deployment {
        _ if observed.phase == Phase::Paused => {
            condition(Progressing, false, Reason::Paused, "paused".into(), g, now)
        }
        Some(d) => {
            let status = d.status.clone().unwrap_or_default();
            let generation_seen = status.observed_generation >= d.metadata.generation;
            let desired = d
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .or(status.replicas)
                .unwrap_or(0);
            let updated = status.updated_replicas.unwrap_or(0);
            let rolling =
                !generation_seen || updated < desired || status.replicas.unwrap_or(0) > updated;
            if rolling {
                let message = format!("{updated} of {desired} pods updated");
                rollout_in_progress(message)
            } else {
                let message = "every pod runs the current template".into();
                condition(Progressing, false, Reason::RolloutComplete, message, g, now)
            }
        }
        None => rollout_in_progress("creating the Deployment".into()),
    }
}

fn broker(observed: &Observed<'_>, previous: &[Condition], now: &Time) -> Condition {
    use ConditionType::BrokerReady;
    let g = observed.generation;
    match &observed.phase {
        Phase::Reconciled {
            broker: BrokerOutcome::Ready,
            ..
        } => condition(
            BrokerReady,
            true,
            Reason::TopologyDeclared,
            "exchange and bindings are declared".into(),
            g,
            now,
        ),
        Phase::Reconciled {
            broker: BrokerOutcome::Failed { reason, message },
            ..
        } => condition(BrokerReady, false, *reason, message.clone(), g, now),
        // Paused: the broker was not touched, so the last known state still describes it.
        Phase::Paused => find(previous, BrokerReady).cloned().unwrap_or_else(|| {
            condition(BrokerReady, false, Reason::Paused, "paused".into(), g, now)
        }),
        Phase::Invalid { .. } => condition(
            BrokerReady,
            false,
            Reason::InvalidSpec,
            "the spec is invalid".into(),
            g,
            now,
        ),
    }
}

/// The history stream's condition, if `spec.history` is (or, when nothing was reconciled, was)
/// enabled.
fn history(observed: &Observed<'_>, previous: &[Condition], now: &Time) -> Option<Condition> {
    use ConditionType::HistoryReady;
    let g = observed.generation;
    match &observed.phase {
        Phase::Reconciled {
            history, broker, ..
        } => match history {
            HistoryOutcome::Off => None,
            HistoryOutcome::Declared => Some(condition(
                HistoryReady,
                true,
                Reason::StreamDeclared,
                "the history stream is declared with the spec's arguments and bound".into(),
                g,
                now,
            )),
            HistoryOutcome::ArgumentsDiffer { message } => Some(condition(
                HistoryReady,
                false,
                Reason::StreamArgumentsDiffer,
                stream_arguments_differ_message(message),
                g,
                now,
            )),
            HistoryOutcome::NotDeclared => {
                let message = match broker {
                    BrokerOutcome::Failed { message, .. } => message.clone(),
                    BrokerOutcome::Ready => "the broker topology is not declared".into(),
                };
                Some(condition(
                    HistoryReady,
                    false,
                    Reason::BrokerNotReady,
                    message,
                    g,
                    now,
                ))
            }
        },
        // Paused: the broker was not touched, so the last known state still describes it.
        Phase::Paused => find(previous, HistoryReady).cloned(),
        Phase::Invalid { .. } => find(previous, HistoryReady).map(|_| {
            condition(
                HistoryReady,
                false,
                Reason::InvalidSpec,
                "the spec is invalid".into(),
                g,
                now,
            )
        }),
    }
}

/// The `HistoryReady` message (and the Event's) when RabbitMQ refused the stream's arguments.
pub fn stream_arguments_differ_message(refusal: &str) -> String {
    format!(
        "history stream arguments differ from spec; RabbitMQ cannot change them in place: {refusal}. The stream keeps its current retention; delete it (losing its history) for the operator to declare it anew, or set spec.history back"
    )
}

/// The conditions for `observed`, given the `previous` ones and the current time.
pub fn conditions(observed: &Observed<'_>, previous: &[Condition], now: &Time) -> Vec<Condition> {
    use ConditionType::{Available, Paused, Ready};
    let g = observed.generation;
    let (replicas, ready) = replica_counts(observed.deployment);
    let ready = ready.unwrap_or(0);

    let paused = if observed.phase == Phase::Paused {
        let message = "spec.paused is true: the operator changes nothing".into();
        condition(Paused, true, Reason::PausedBySpec, message, g, now)
    } else {
        let message = "the operator reconciles this router".into();
        condition(Paused, false, Reason::Running, message, g, now)
    };

    let available = match observed.deployment {
        None => condition(
            Available,
            false,
            Reason::DeploymentMissing,
            "the Deployment does not exist yet".into(),
            g,
            now,
        ),
        Some(_) if ready > 0 => condition(
            Available,
            true,
            Reason::MinimumReplicasAvailable,
            format!("{ready} of {} pods ready", replicas.unwrap_or(0)),
            g,
            now,
        ),
        Some(_) => condition(
            Available,
            false,
            Reason::NoReadyReplicas,
            "no pod is ready yet".into(),
            g,
            now,
        ),
    };

    let progressing = progressing(observed, now);
    let broker = broker(observed, previous, now);

    let keda_missing = matches!(
        observed.phase,
        Phase::Reconciled {
            keda_missing: true,
            ..
        }
    );
    let (ok, reason, message) = match &observed.phase {
        Phase::Invalid { problems } => (false, Reason::InvalidSpec, problems.clone()),
        Phase::Paused => (false, Reason::Paused, "spec.paused is true".into()),
        Phase::Reconciled { .. } if broker.status != "True" => {
            (false, Reason::BrokerNotReady, broker.message.clone())
        }
        Phase::Reconciled { .. } if keda_missing => (
            false,
            Reason::AutoscalerUnavailable,
            "autoscaling.provider is keda but the cluster does not serve keda.sh/v1alpha1 ScaledObjects; install KEDA or use provider hpa".into(),
        ),
        Phase::Reconciled { .. } if available.status != "True" => {
            (false, Reason::NotAvailable, available.message.clone())
        }
        Phase::Reconciled { .. } => (
            true,
            Reason::Reconciled,
            "all children applied, topology declared, pods ready".into(),
        ),
    };
    let ready_condition = condition(Ready, ok, reason, message, g, now);

    let mut next = vec![ready_condition, available, broker, progressing, paused];
    next.extend(history(observed, previous, now));
    carry_transition_times(next, previous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn a_deployment_with(ready: i32, of: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(of),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(of),
                updated_replicas: Some(of),
                ready_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn healthy(deployment: &Deployment) -> Observed<'_> {
        Observed {
            generation: Some(4),
            phase: Phase::Reconciled {
                broker: BrokerOutcome::Ready,
                history: HistoryOutcome::Off,
                keda_missing: false,
            },
            deployment: Some(deployment),
        }
    }

    fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        let type_: ConditionType = type_.parse().expect("a condition type");
        super::find(conditions, type_).expect("condition present")
    }

    #[test]
    fn a_healthy_router_is_ready_available_and_not_progressing() {
        let d = a_deployment_with(2, 2);
        let c = conditions(&healthy(&d), &[], &at(100));
        assert_eq!(find(&c, "Ready").status, "True");
        assert_eq!(find(&c, "Available").status, "True");
        assert_eq!(find(&c, "BrokerReady").status, "True");
        assert_eq!(find(&c, "Progressing").reason, "RolloutComplete");
        assert_eq!(find(&c, "Paused").status, "False");
        assert!(c.iter().all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn an_invalid_spec_makes_ready_false_with_the_problems_as_message() {
        let d = a_deployment_with(2, 2);
        let observed = Observed {
            phase: Phase::Invalid {
                problems: "Secret \"amqp\" does not exist".into(),
            },
            ..healthy(&d)
        };
        let ready = find(&conditions(&observed, &[], &at(100)), "Ready").clone();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(ready.message.contains("amqp"));
    }

    #[test]
    fn an_unreachable_broker_makes_broker_ready_and_ready_false() {
        let d = a_deployment_with(2, 2);
        let observed = Observed {
            phase: Phase::Reconciled {
                broker: BrokerOutcome::Failed {
                    reason: Reason::BrokerUnreachable,
                    message: "connection refused".into(),
                },
                history: HistoryOutcome::Off,
                keda_missing: false,
            },
            ..healthy(&d)
        };
        let c = conditions(&observed, &[], &at(100));
        assert_eq!(find(&c, "BrokerReady").reason, "BrokerUnreachable");
        assert_eq!(find(&c, "Ready").reason, "BrokerNotReady");
    }

    /// The conditions of a router that was healthy at t=100 and is in `phase` at t=200.
    fn healthy_then(phase: Phase) -> Vec<Condition> {
        let d = a_deployment_with(2, 2);
        let before = conditions(&healthy(&d), &[], &at(100));
        let observed = Observed {
            phase,
            ..healthy(&d)
        };
        conditions(&observed, &before, &at(200))
    }

    #[test]
    fn paused_keeps_the_last_broker_condition() {
        let c = healthy_then(Phase::Paused);
        assert_eq!(find(&c, "Paused").status, "True");
        assert_eq!(find(&c, "Ready").reason, "Paused");
        assert_eq!(find(&c, "BrokerReady").status, "True");
        assert_eq!(find(&c, "BrokerReady").last_transition_time, at(100));
    }

    #[test]
    fn transition_times_move_only_when_the_status_changes() {
        let d = a_deployment_with(2, 2);
        let first = conditions(&healthy(&d), &[], &at(100));
        let second = conditions(&healthy(&d), &first, &at(200));
        assert_eq!(find(&second, "Ready").last_transition_time, at(100));
        let down = a_deployment_with(0, 2);
        let third = conditions(&healthy(&down), &second, &at(300));
        assert_eq!(find(&third, "Available").last_transition_time, at(300));
        assert_eq!(find(&third, "Ready").reason, "NotAvailable");
    }

    #[test]
    fn a_rollout_in_progress_is_progressing() {
        let mut d = a_deployment_with(2, 3);
        if let Some(s) = d.status.as_mut() {
            s.updated_replicas = Some(1);
        }
        assert_eq!(
            find(&conditions(&healthy(&d), &[], &at(1)), "Progressing").reason,
            "RolloutInProgress"
        );
    }

    #[test]
    fn missing_keda_says_so_in_ready() {
        let d = a_deployment_with(2, 2);
        let observed = Observed {
            phase: Phase::Reconciled {
                broker: BrokerOutcome::Ready,
                history: HistoryOutcome::Off,
                keda_missing: true,
            },
            ..healthy(&d)
        };
        let ready = find(&conditions(&observed, &[], &at(1)), "Ready").clone();
        assert_eq!(ready.reason, "AutoscalerUnavailable");
        assert!(ready.message.contains("keda.sh"));
    }

    #[test]
    fn paused_without_a_previous_broker_condition_says_paused() {
        let observed = Observed {
            generation: Some(1),
            phase: Phase::Paused,
            deployment: None,
        };
        let c = conditions(&observed, &[], &at(1));
        assert_eq!(find(&c, "BrokerReady").reason, "Paused");
        assert_eq!(find(&c, "Progressing").reason, "Paused");
        assert_eq!(find(&c, "Available").reason, "DeploymentMissing");
    }

    #[test]
    fn an_invalid_spec_is_not_broker_ready_even_if_it_was_before() {
        let c = healthy_then(Phase::Invalid {
            problems: "bad".into(),
        });
        let broker = find(&c, "BrokerReady");
        assert_eq!(
            (broker.status.as_str(), broker.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(find(&c, "Paused").reason, "Running");
    }

    #[test]
    fn reasons_and_types_are_spelled_as_their_variants() {
        assert_eq!(
            Reason::UpstreamExchangeMissing.as_ref(),
            "UpstreamExchangeMissing"
        );
        assert_eq!(
            "BrokerReady".parse::<ConditionType>(),
            Ok(ConditionType::BrokerReady)
        );
        let d = a_deployment_with(2, 2);
        let c = conditions(&healthy(&d), &[], &at(1));
        assert!(is_true(&c, ConditionType::Ready));
        assert!(has_reason(&c, Reason::TopologyDeclared));
        assert!(!has_reason(&c, Reason::AutoscalerUnavailable));
    }

    fn with_history(deployment: &Deployment, history: HistoryOutcome) -> Observed<'_> {
        Observed {
            phase: Phase::Reconciled {
                broker: BrokerOutcome::Ready,
                history,
                keda_missing: false,
            },
            ..healthy(deployment)
        }
    }

    #[test]
    fn history_has_its_condition_only_when_enabled() {
        let d = a_deployment_with(2, 2);
        let off = conditions(&healthy(&d), &[], &at(1));
        assert_eq!(super::find(&off, ConditionType::HistoryReady), None);
        let declared = conditions(&with_history(&d, HistoryOutcome::Declared), &[], &at(1));
        let history = find(&declared, "HistoryReady");
        assert_eq!(
            (history.status.as_str(), history.reason.as_str()),
            ("True", "StreamDeclared")
        );
        assert_eq!(find(&declared, "Ready").status, "True");
    }

    #[test]
    fn differing_stream_arguments_are_reported_but_leave_the_router_ready() {
        let d = a_deployment_with(2, 2);
        let refusal = "PRECONDITION_FAILED - inequivalent arg 'x-max-age' for queue 'chat.history' in vhost '/': received '48h' but current is '24h'";
        let c = conditions(
            &with_history(
                &d,
                HistoryOutcome::ArgumentsDiffer {
                    message: refusal.into(),
                },
            ),
            &[],
            &at(1),
        );
        let history = find(&c, "HistoryReady");
        assert_eq!(
            (history.status.as_str(), history.reason.as_str()),
            ("False", "StreamArgumentsDiffer")
        );
        assert!(
            history.message.starts_with(
                "history stream arguments differ from spec; RabbitMQ cannot change them in place: PRECONDITION_FAILED - inequivalent arg 'x-max-age'"
            ),
            "{}",
            history.message
        );
        assert_eq!(find(&c, "BrokerReady").status, "True");
        assert_eq!(find(&c, "Ready").reason, "Reconciled");
    }

    #[test]
    fn history_follows_the_broker_an_invalid_spec_and_a_pause() {
        let d = a_deployment_with(2, 2);
        let failed = Observed {
            phase: Phase::Reconciled {
                broker: BrokerOutcome::Failed {
                    reason: Reason::BrokerUnreachable,
                    message: "cannot connect to RabbitMQ".into(),
                },
                history: HistoryOutcome::NotDeclared,
                keda_missing: false,
            },
            ..healthy(&d)
        };
        let c = conditions(&failed, &[], &at(1));
        let history = find(&c, "HistoryReady");
        assert_eq!(
            (history.reason.as_str(), history.message.as_str()),
            ("BrokerNotReady", "cannot connect to RabbitMQ")
        );

        let before = conditions(&with_history(&d, HistoryOutcome::Declared), &[], &at(100));
        let paused = Observed {
            phase: Phase::Paused,
            ..healthy(&d)
        };
        let c = conditions(&paused, &before, &at(200));
        assert_eq!(find(&c, "HistoryReady").status, "True");
        assert_eq!(find(&c, "HistoryReady").last_transition_time, at(100));
        let invalid = Observed {
            phase: Phase::Invalid {
                problems: "bad".into(),
            },
            ..healthy(&d)
        };
        let c = conditions(&invalid, &before, &at(200));
        assert_eq!(find(&c, "HistoryReady").reason, "InvalidSpec");
        // Never enabled: an invalid or paused router gets no history condition.
        let c = conditions(&invalid, &[], &at(200));
        assert_eq!(super::find(&c, ConditionType::HistoryReady), None);
    }
}
