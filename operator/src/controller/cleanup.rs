//! The finalizer's work: remove exactly the recorded topology (exchanges, bindings, history
//! stream) from the broker, or nothing, by policy or annotation; give up after `cleanup_timeout`
//! so deletion never hangs forever.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::info;

use super::Context;
use super::events::{EventAction, EventReason, Note};
use super::live::read_amqp_url;
use crate::broker::Broker;
use crate::crd::{DeletionPolicy, EventRouter, RecordedTopology, SKIP_BROKER_CLEANUP_ANNOTATION};
use crate::error::Error;
use crate::validate::SecretLookup;

/// What the finalizer does with the broker, decided from the router alone.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cleanup {
    /// Nothing was ever declared.
    Nothing,
    /// The skip annotation or `deletionPolicy: retain` leaves the topology; the Event says which.
    Leave(Note),
    /// Remove this topology.
    Remove(RecordedTopology),
}

/// Pure: what to do with `router`'s recorded topology.
fn decide(router: &EventRouter) -> Cleanup {
    let Some(recorded) = router.status.as_ref().and_then(|s| s.topology.clone()) else {
        return Cleanup::Nothing;
    };
    let skip = router
        .annotations()
        .get(SKIP_BROKER_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    if skip {
        return Cleanup::Leave(Note::warning(
            EventReason::BrokerCleanupSkipped,
            EventAction::Cleanup,
            format!(
                "annotation {SKIP_BROKER_CLEANUP_ANNOTATION}=true: {} left on the broker",
                recorded.describe()
            ),
        ));
    }
    if router.spec.deletion_policy == DeletionPolicy::Retain {
        return Cleanup::Leave(Note::normal(
            EventReason::TopologyRetained,
            EventAction::Cleanup,
            format!(
                "deletionPolicy retain: {} left on the broker",
                recorded.describe()
            ),
        ));
    }
    Cleanup::Remove(recorded)
}

/// How long `router` has been deleting at `now` (zero before its deletion timestamp is set).
fn deleting_for(router: &EventRouter, now: Timestamp) -> Duration {
    router
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| now.duration_since(t.0).try_into().ok())
        .unwrap_or(Duration::ZERO)
}

/// The finalizer: remove exactly the recorded topology (or nothing, by policy or annotation).
pub(super) async fn cleanup(router: Arc<EventRouter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let done = Action::await_change();
    let recorded = match decide(&router) {
        Cleanup::Nothing => return Ok(done),
        Cleanup::Leave(note) => {
            ctx.publish(&router, note).await;
            return Ok(done);
        }
        Cleanup::Remove(recorded) => recorded,
    };
    let SecretLookup::Found(url) = read_amqp_url(&ctx.client, &namespace, &router).await? else {
        // Without credentials nothing can be removed; blocking deletion forever would not help.
        let text = format!(
            "the AMQP Secret is gone: {} left on the broker",
            recorded.describe()
        );
        let note = Note::warning(
            EventReason::BrokerCleanupSkipped,
            EventAction::Cleanup,
            text,
        );
        ctx.publish(&router, note).await;
        return Ok(done);
    };
    let result = async {
        let mut broker = Broker::connect(&url).await?;
        let result = broker.remove(&recorded).await;
        broker.close().await;
        result
    }
    .await;
    let Err(error) = result else {
        info!(router = %router.name_any(), %namespace, exchange = %recorded.exchange, control_exchange = recorded.control_exchange.as_deref().unwrap_or_default(), "broker topology removed");
        return Ok(done);
    };
    let timeout = ctx.settings.cleanup_timeout;
    if deleting_for(&router, Timestamp::now()) > timeout {
        let text = format!(
            "gave up removing {} after {}: {error}",
            recorded.describe(),
            humantime::format_duration(timeout)
        );
        let note = Note::warning(
            EventReason::BrokerCleanupAbandoned,
            EventAction::Cleanup,
            text,
        );
        ctx.publish(&router, note).await;
        return Ok(done);
    }
    let text =
        format!("{error}; retrying (annotate {SKIP_BROKER_CLEANUP_ANNOTATION}=true to skip)");
    let note = Note::warning(
        EventReason::Broker(error.reason()),
        EventAction::Cleanup,
        text,
    );
    ctx.publish(&router, note).await;
    Err(Error::Broker(error))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::crd::EventRouterStatus;
    use crate::validate::tests::a_router_named;

    fn a_deleted_router(policy: DeletionPolicy) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.deletion_policy = policy;
        router.status = Some(EventRouterStatus {
            topology: Some(RecordedTopology {
                exchange: "chat".into(),
                control_exchange: Some("chat.control".into()),
                bindings: Vec::new(),
                history: None,
            }),
            ..EventRouterStatus::default()
        });
        router
    }

    fn reason(cleanup: &Cleanup) -> Option<&'static str> {
        match cleanup {
            Cleanup::Leave(note) => Some(note.reason.as_str()),
            _ => None,
        }
    }

    #[test]
    fn nothing_recorded_means_nothing_to_remove() {
        let mut router = a_deleted_router(DeletionPolicy::Delete);
        router.status = None;
        assert_eq!(decide(&router), Cleanup::Nothing);
    }

    #[test]
    fn delete_removes_the_record_retain_and_the_annotation_leave_it() {
        let router = a_deleted_router(DeletionPolicy::Delete);
        assert!(matches!(
            decide(&router),
            Cleanup::Remove(r) if r.exchange == "chat" && r.control_exchange.as_deref() == Some("chat.control")
        ));
        let retained = decide(&a_deleted_router(DeletionPolicy::Retain));
        assert_eq!(reason(&retained), Some("TopologyRetained"));
        let Cleanup::Leave(note) = &retained else {
            panic!("retain leaves the topology: {retained:?}");
        };
        assert_eq!(
            note.text,
            r#"deletionPolicy retain: exchange "chat" and control exchange "chat.control" left on the broker"#
        );
        let mut annotated = a_deleted_router(DeletionPolicy::Delete);
        annotated
            .annotations_mut()
            .insert(SKIP_BROKER_CLEANUP_ANNOTATION.into(), "true".into());
        assert_eq!(reason(&decide(&annotated)), Some("BrokerCleanupSkipped"));
        annotated
            .annotations_mut()
            .insert(SKIP_BROKER_CLEANUP_ANNOTATION.into(), "no".into());
        assert!(matches!(decide(&annotated), Cleanup::Remove(_)));
    }

    #[test]
    fn the_deletion_age_counts_from_the_deletion_timestamp() {
        let mut router = a_deleted_router(DeletionPolicy::Delete);
        let now = Timestamp::from_second(1_000).expect("valid");
        assert_eq!(deleting_for(&router, now), Duration::ZERO);
        router.metadata.deletion_timestamp =
            Some(Time(Timestamp::from_second(400).expect("valid")));
        assert_eq!(deleting_for(&router, now), Duration::from_secs(600));
    }

    #[test]
    fn a_recorded_history_stream_is_removed_or_left_with_the_rest() {
        let with_stream = |policy| {
            let mut router = a_deleted_router(policy);
            if let Some(topology) = router.status.as_mut().and_then(|s| s.topology.as_mut()) {
                topology.history = Some(crate::crd::RecordedHistory {
                    stream: "chat.history".into(),
                    arguments: None,
                    patterns: vec!["#".into()],
                });
            }
            router
        };
        assert!(matches!(
            decide(&with_stream(DeletionPolicy::Delete)),
            Cleanup::Remove(r) if r.history.as_ref().is_some_and(|h| h.stream == "chat.history")
        ));
        let Cleanup::Leave(note) = decide(&with_stream(DeletionPolicy::Retain)) else {
            panic!("retain leaves the topology");
        };
        assert_eq!(
            note.text,
            r#"deletionPolicy retain: exchange "chat", control exchange "chat.control" and history stream "chat.history" left on the broker"#
        );
    }
}
