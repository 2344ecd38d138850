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

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What happened on the broker side during this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerState {
    Ready,
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Not attempted (invalid spec, paused): the previous condition is kept if there is one.
    NotAttempted {
        reason: &'static str,
        message: String,
    },
}

/// Everything the status is computed from.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub paused: bool,
    /// Problems that make the spec unusable (the `InvalidSpec` message).
    pub invalid: Option<String>,
    pub broker: BrokerState,
    pub deployment: Option<&'a Deployment>,
    /// Autoscaling asks for KEDA but ScaledObjects are not served.
    pub keda_missing: bool,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
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

/// The conditions for `observed`, given the `previous` ones and the current time.
pub fn conditions(observed: &Observed<'_>, previous: &[Condition], now: &Time) -> Vec<Condition> {
    let g = observed.generation;
    let (replicas, ready) = replica_counts(observed.deployment);
    let ready = ready.unwrap_or(0);

    let paused = if observed.paused {
        condition(
            "Paused",
            true,
            "PausedBySpec",
            "spec.paused is true: the operator changes nothing".into(),
            g,
            now,
        )
    } else {
        condition(
            "Paused",
            false,
            "Running",
            "the operator reconciles this router".into(),
            g,
            now,
        )
    };

    let available = match observed.deployment {
        None => condition(
            "Available",
            false,
            "DeploymentMissing",
            "the Deployment does not exist yet".into(),
            g,
            now,
        ),
        Some(_) if ready > 0 => condition(
            "Available",
            true,
            "MinimumReplicasAvailable",
            format!("{ready} of {} pods ready", replicas.unwrap_or(0)),
            g,
            now,
        ),
        Some(_) => condition(
            "Available",
            false,
            "NoReadyReplicas",
            "no pod is ready yet".into(),
            g,
            now,
        ),
    };

    let progressing = match observed.deployment {
        _ if observed.paused => condition("Progressing", false, "Paused", "paused".into(), g, now),
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
                condition(
                    "Progressing",
                    true,
                    "RolloutInProgress",
                    format!("{updated} of {desired} pods updated"),
                    g,
                    now,
                )
            } else {
                condition(
                    "Progressing",
                    false,
                    "RolloutComplete",
                    "every pod runs the current template".into(),
                    g,
                    now,
                )
            }
        }
        None => condition(
            "Progressing",
            true,
            "RolloutInProgress",
            "creating the Deployment".into(),
            g,
            now,
        ),
    };

    let broker = match &observed.broker {
        BrokerState::Ready => condition(
            "BrokerReady",
            true,
            "TopologyDeclared",
            "exchange and bindings are declared".into(),
            g,
            now,
        ),
        BrokerState::Failed { reason, message } => {
            condition("BrokerReady", false, reason, message.clone(), g, now)
        }
        BrokerState::NotAttempted { reason, message } => {
            match previous.iter().find(|c| c.type_ == "BrokerReady") {
                // Paused: the broker was not touched, so the last known state still describes it.
                Some(old) if *reason == "Paused" => old.clone(),
                _ => condition("BrokerReady", false, reason, message.clone(), g, now),
            }
        }
    };

    let ready_condition = if let Some(problems) = &observed.invalid {
        condition("Ready", false, "InvalidSpec", problems.clone(), g, now)
    } else if observed.paused {
        condition(
            "Ready",
            false,
            "Paused",
            "spec.paused is true".into(),
            g,
            now,
        )
    } else if broker.status != "True" {
        condition(
            "Ready",
            false,
            "BrokerNotReady",
            broker.message.clone(),
            g,
            now,
        )
    } else if observed.keda_missing {
        condition(
            "Ready",
            false,
            "AutoscalerUnavailable",
            "autoscaling.provider is keda but the cluster does not serve keda.sh/v1alpha1 ScaledObjects; install KEDA or use provider hpa".into(),
            g,
            now,
        )
    } else if available.status != "True" {
        condition(
            "Ready",
            false,
            "NotAvailable",
            available.message.clone(),
            g,
            now,
        )
    } else {
        condition(
            "Ready",
            true,
            "Reconciled",
            "all children applied, topology declared, pods ready".into(),
            g,
            now,
        )
    };

    carry_transition_times(
        vec![ready_condition, available, broker, progressing, paused],
        previous,
    )
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
            paused: false,
            invalid: None,
            broker: BrokerState::Ready,
            deployment: Some(deployment),
            keda_missing: false,
        }
    }

    fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
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
            invalid: Some("Secret \"amqp\" does not exist".into()),
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
            broker: BrokerState::Failed {
                reason: "BrokerUnreachable",
                message: "connection refused".into(),
            },
            ..healthy(&d)
        };
        let c = conditions(&observed, &[], &at(100));
        assert_eq!(find(&c, "BrokerReady").reason, "BrokerUnreachable");
        assert_eq!(find(&c, "Ready").reason, "BrokerNotReady");
    }

    #[test]
    fn paused_keeps_the_last_broker_condition() {
        let d = a_deployment_with(2, 2);
        let before = conditions(&healthy(&d), &[], &at(100));
        let observed = Observed {
            paused: true,
            broker: BrokerState::NotAttempted {
                reason: "Paused",
                message: "paused".into(),
            },
            ..healthy(&d)
        };
        let c = conditions(&observed, &before, &at(200));
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
            keda_missing: true,
            ..healthy(&d)
        };
        let ready = find(&conditions(&observed, &[], &at(1)), "Ready").clone();
        assert_eq!(ready.reason, "AutoscalerUnavailable");
        assert!(ready.message.contains("keda.sh"));
    }
}
