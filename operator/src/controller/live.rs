//! The reconcile of a live (not deleting) router, in steps: gather the facts `validate` needs,
//! stop early when paused or invalid, apply the children, declare the broker topology, write the
//! status, record the Events the outcome owes.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use eventrouter_contract::kube as names;

use super::events::{EventAction, EventReason, Note, outcome_notes, paused_note};
use super::{Context, INVALID_SPEC_RETRY};
use crate::apply::{apply_children, current_deployment};
use crate::broker::{Broker, BrokerError, Synced};
use crate::build::{build, selector_string};
use crate::crd::{
    AutoscalingProvider, DeletionPolicy, EventRouter, EventRouterStatus, KeyFile, RecordedTopology,
};
use crate::error::Error;
use crate::metrics::RouterReplicas;
use crate::status::{
    BrokerOutcome, ConditionType, HistoryOutcome, Observed, Phase, conditions, is_true,
};
use crate::topology::DesiredTopology;
use crate::validate::{ClusterFacts, KeyPresence, Plan, SecretLookup, validate};

/// The AMQP URL from the router's Secret (`data` first, then `stringData`), trimmed.
pub(super) async fn read_amqp_url(
    client: &Client,
    namespace: &str,
    router: &EventRouter,
) -> Result<SecretLookup, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_ref = &router.spec.rabbitmq.secret_ref;
    let Some(secret) = secrets
        .get_opt(&secret_ref.name)
        .await
        .map_err(Error::kube("reading the AMQP Secret"))?
    else {
        return Ok(SecretLookup::SecretMissing);
    };
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned());
    let from_string = secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .cloned();
    Ok(match from_data.or(from_string) {
        Some(url) => SecretLookup::Found(url.trim().to_string()),
        None => SecretLookup::KeyMissing,
    })
}

/// Whether each Secret key `spec.auth` references exists. Only presence is checked: the pods
/// read the content (and re-read it when it changes), the operator never keeps it.
async fn look_up_key_files(
    client: &Client,
    namespace: &str,
    router: &EventRouter,
) -> Result<BTreeMap<KeyFile, KeyPresence>, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut found = BTreeMap::new();
    for (file, secret_ref) in router.spec.key_files() {
        let presence = match secrets
            .get_opt(&secret_ref.name)
            .await
            .map_err(Error::kube("reading a Secret spec.auth references"))?
        {
            None => KeyPresence::SecretMissing,
            Some(secret) => {
                let in_data = secret
                    .data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&secret_ref.key));
                let in_string_data = secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&secret_ref.key));
                if in_data || in_string_data {
                    KeyPresence::Present
                } else {
                    KeyPresence::KeyMissing
                }
            }
        };
        found.insert(file, presence);
    }
    Ok(found)
}

/// Server-side apply of the status subresource.
async fn write_status(
    client: &Client,
    router: &EventRouter,
    status: &EventRouterStatus,
) -> Result<(), Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<EventRouter> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({
        "apiVersion": crate::crd::api_version(),
        "kind": names::KIND,
        "status": status,
    });
    api.patch_status(
        &router.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("writing the status"))?;
    Ok(())
}

/// The status for `observed`, keeping transition times of unchanged conditions. Pure.
fn status_of(
    router: &EventRouter,
    observed: &Observed<'_>,
    topology: Option<&RecordedTopology>,
    now: &Time,
) -> EventRouterStatus {
    let previous = router
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let (replicas, ready) = crate::status::replica_counts(observed.deployment);
    EventRouterStatus {
        observed_generation: router.metadata.generation,
        conditions: conditions(observed, previous, now),
        replicas,
        ready_replicas: ready,
        selector: Some(selector_string(&router.name_any())),
        topology: topology.cloned(),
    }
}

/// The HPA whose status holds the desired replicas: the operator's own, or the one KEDA makes
/// for the ScaledObject (`keda-hpa-<name>`). `None` without autoscaling. Pure.
fn autoscaler_name(router: &EventRouter) -> Option<String> {
    let autoscaling = &router.spec.autoscaling;
    let name = router.name_any();
    autoscaling.enabled.then(|| match autoscaling.provider {
        AutoscalingProvider::Hpa => name,
        AutoscalingProvider::Keda => format!("keda-hpa-{name}"),
    })
}

/// Report the router's current and desired replicas in the operator's metrics (the routers
/// dashboard's *Replicas* panel). A failed read of the autoscaler only loses that detail, so it
/// falls back rather than failing the reconcile.
async fn record_replicas(ctx: &Context, router: &EventRouter, deployment: Option<&Deployment>) {
    let namespace = router.namespace().unwrap_or_default();
    let name = router.name_any();
    let autoscaler = match autoscaler_name(router) {
        Some(hpa_name) => {
            let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &namespace);
            api.get_opt(&hpa_name).await.unwrap_or_else(|error| {
                debug!(%error, router = %name, %namespace, hpa = %hpa_name, "cannot read the autoscaler's status");
                None
            })
        }
        None => None,
    };
    ctx.metrics.set_router_replicas(
        &namespace,
        &name,
        RouterReplicas::observe(deployment, autoscaler.as_ref()),
    );
}

/// Status and replica gauges for a router whose children and broker are left as they are: it
/// is paused or its spec is invalid. The recorded topology is kept.
async fn report_untouched(ctx: &Context, router: &EventRouter, phase: Phase) -> Result<(), Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let deployment = current_deployment(&ctx.client, &namespace, &router.name_any()).await?;
    record_replicas(ctx, router, deployment.as_ref()).await;
    let observed = Observed {
        generation: router.metadata.generation,
        phase,
        deployment: deployment.as_ref(),
    };
    let recorded = router.status.as_ref().and_then(|s| s.topology.as_ref());
    let status = status_of(router, &observed, recorded, &Time(Timestamp::now()));
    write_status(&ctx.client, router, &status).await
}

/// Whether the broker must be contacted: the topology changed, the broker was not ready, or the
/// last declaration is not recent. A reconcile woken by a child's status update otherwise
/// skips the AMQP round trip; the periodic resync still re-declares, repairing drift. Pure.
fn broker_sync_needed(
    previous: &EventRouterStatus,
    wanted: &RecordedTopology,
    recently_synced: bool,
) -> bool {
    let unchanged = previous.topology.as_ref() == Some(wanted)
        && is_true(&previous.conditions, ConditionType::BrokerReady);
    !(unchanged && recently_synced)
}

/// Declare the topology with the Secret's URL; the new record, or why not.
async fn sync_broker(
    url: &str,
    desired: &DesiredTopology,
    recorded: Option<&RecordedTopology>,
    policy: DeletionPolicy,
) -> Result<Synced, BrokerError> {
    let mut broker = Broker::connect(url).await?;
    let result = broker
        .sync(desired, recorded, policy == DeletionPolicy::Delete)
        .await;
    broker.close().await;
    result
}

/// The broker step: declare `topology` unless nothing changed since a recent declaration. A
/// record that differs from the wanted one (a history stream RabbitMQ keeps with other
/// arguments) is never "unchanged", so such a router is declared again at every reconcile.
async fn declare_topology(
    ctx: &Context,
    router: &EventRouter,
    url: &str,
    topology: &DesiredTopology,
) -> Result<Synced, BrokerError> {
    let previous = router.status.clone().unwrap_or_default();
    let key = (router.namespace().unwrap_or_default(), router.name_any());
    let generation = router.metadata.generation;
    let wanted = topology.record();
    if !broker_sync_needed(
        &previous,
        &wanted,
        ctx.broker_recently_synced(&key, generation),
    ) {
        return Ok(Synced {
            record: wanted,
            stream_arguments_differ: None,
        });
    }
    let result = sync_broker(
        url,
        topology,
        previous.topology.as_ref(),
        router.spec.deletion_policy,
    )
    .await;
    ctx.remember_broker_sync(key, generation, result.is_ok());
    result
}

/// The facts `validate` needs: the Secret's URL and which optional APIs the cluster serves.
async fn gather_facts(ctx: &Context, router: &EventRouter) -> Result<ClusterFacts, Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let amqp_url = read_amqp_url(&ctx.client, &namespace, router).await?;
    let key_files = look_up_key_files(&ctx.client, &namespace, router).await?;
    let apis = ctx.optional_apis().await?;
    Ok(ClusterFacts {
        amqp_url,
        keda_installed: apis.keda,
        service_monitor_installed: apis.service_monitor,
        key_files,
    })
}

/// Reconcile one live (not deleting) router.
pub(super) async fn reconcile_live(
    router: Arc<EventRouter>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = router.name_any();
    let previous = router.status.clone().unwrap_or_default();
    let resync = Action::requeue(ctx.settings.resync);
    let facts = gather_facts(&ctx, &router).await?;

    if router.spec.paused {
        report_untouched(&ctx, &router, Phase::Paused).await?;
        if let Some(note) = paused_note(&previous.conditions) {
            ctx.publish(&router, note).await;
        }
        return Ok(resync);
    }
    let plan = match validate(&router, &facts) {
        Ok(plan) => plan,
        Err(invalid) => {
            ctx.metrics.invalid_specs.inc();
            warn!(router = %name, %namespace, problems = %invalid, "invalid spec; no child changed");
            let problems = invalid.to_string();
            report_untouched(
                &ctx,
                &router,
                Phase::Invalid {
                    problems: problems.clone(),
                },
            )
            .await?;
            let note = Note::warning(EventReason::InvalidSpec, EventAction::Validate, problems);
            ctx.publish(&router, note).await;
            return Ok(Action::requeue(INVALID_SPEC_RETRY.min(ctx.settings.resync)));
        }
    };
    let SecretLookup::Found(url) = &facts.amqp_url else {
        return Err(Error::MissingField("AMQP URL after validation"));
    };
    let deployment = apply(&ctx, &router, &plan).await?;
    let broker = declare_topology(&ctx, &router, url, &plan.topology).await;
    finish(&ctx, &router, &plan, deployment.as_ref(), broker).await?;
    debug!(router = %name, %namespace, "reconciled");
    Ok(resync)
}

/// Build and apply every child; the Deployment as the API server returned it.
async fn apply(
    ctx: &Context,
    router: &EventRouter,
    plan: &Plan,
) -> Result<Option<Deployment>, Error> {
    let uid = router.uid().ok_or(Error::MissingField("uid"))?;
    let apis = ctx.optional_apis().await?;
    let desired = build(router, plan);
    let applied = match apply_children(
        &ctx.client,
        &plan.namespace,
        &plan.name,
        &uid,
        desired,
        apis,
    )
    .await
    {
        Ok(applied) => applied,
        Err(error) => {
            let note = Note::warning(
                EventReason::ApplyFailed,
                EventAction::Apply,
                error.to_string(),
            );
            ctx.publish(router, note).await;
            return Err(error);
        }
    };
    record_replicas(ctx, router, applied.deployment.as_ref()).await;
    for kind in &applied.deleted {
        let text = format!("deleted the {kind}: the spec no longer asks for it");
        let note = Note::normal(EventReason::ChildDeleted, EventAction::Apply, text);
        ctx.publish(router, note).await;
    }
    Ok(applied.deployment)
}

/// Write the status for the broker's outcome, then record the Events it owes. A broker failure
/// fails the reconcile (after the status says why), so it is retried with backoff.
async fn finish(
    ctx: &Context,
    router: &EventRouter,
    plan: &Plan,
    deployment: Option<&Deployment>,
    broker: Result<Synced, BrokerError>,
) -> Result<(), Error> {
    let previous = router.status.clone().unwrap_or_default();
    let history = history_outcome(plan, &broker);
    let (outcome, record, broker_error) = match broker {
        Ok(synced) => (BrokerOutcome::Ready, Some(synced.record), None),
        Err(error) => (
            BrokerOutcome::Failed {
                reason: error.reason(),
                message: error.to_string(),
            },
            previous.topology.clone(),
            Some(error),
        ),
    };
    let observed = Observed {
        generation: router.metadata.generation,
        phase: Phase::Reconciled {
            broker: outcome,
            history: history.clone(),
            keda_missing: plan.keda_missing,
        },
        deployment,
    };
    let status = status_of(router, &observed, record.as_ref(), &Time(Timestamp::now()));
    write_status(&ctx.client, router, &status).await?;

    let declared = if broker_error.is_none() {
        record.as_ref()
    } else {
        None
    };
    for note in outcome_notes(
        &previous,
        router.metadata.generation,
        plan.keda_missing,
        declared,
        &history,
    ) {
        ctx.publish(router, note).await;
    }
    if let Some(error) = broker_error {
        let note = Note::warning(
            EventReason::Broker(error.reason()),
            EventAction::DeclareTopology,
            error.to_string(),
        );
        ctx.publish(router, note).await;
        return Err(Error::Broker(error));
    }
    Ok(())
}

/// What the broker step did with the history stream `plan` asks for (if any). Pure.
fn history_outcome(plan: &Plan, broker: &Result<Synced, BrokerError>) -> HistoryOutcome {
    if plan.topology.history.is_none() {
        return HistoryOutcome::Off;
    }
    match broker {
        Err(_) => HistoryOutcome::NotDeclared,
        Ok(Synced {
            stream_arguments_differ: Some(refusal),
            ..
        }) => HistoryOutcome::ArgumentsDiffer {
            message: refusal.clone(),
        },
        Ok(_) => HistoryOutcome::Declared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RecordedBinding;
    use crate::status::Reason;
    use crate::validate::tests::a_router_named;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn a_record(key: &str) -> RecordedTopology {
        RecordedTopology {
            exchange: "chat".into(),
            control_exchange: Some("chat.control".into()),
            bindings: vec![RecordedBinding {
                source: "orders".into(),
                routing_key: key.into(),
            }],
            history: None,
        }
    }

    fn broker_ready(status: &str) -> Condition {
        Condition {
            type_: ConditionType::BrokerReady.to_string(),
            status: status.into(),
            reason: Reason::TopologyDeclared.to_string(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn the_broker_is_skipped_only_when_unchanged_ready_and_recently_declared() {
        let previous = EventRouterStatus {
            topology: Some(a_record("order.*")),
            conditions: vec![broker_ready("True")],
            ..EventRouterStatus::default()
        };
        assert!(!broker_sync_needed(&previous, &a_record("order.*"), true));
        assert!(
            broker_sync_needed(&previous, &a_record("order.*"), false),
            "stale"
        );
        assert!(
            broker_sync_needed(&previous, &a_record("refund.#"), true),
            "changed"
        );
        // A record written before the control exchange existed: declare it at once.
        let older = EventRouterStatus {
            topology: Some(RecordedTopology {
                control_exchange: None,
                ..a_record("order.*")
            }),
            ..previous.clone()
        };
        assert!(
            broker_sync_needed(&older, &a_record("order.*"), true),
            "no control exchange recorded"
        );
        let failing = EventRouterStatus {
            conditions: vec![broker_ready("False")],
            ..previous
        };
        assert!(
            broker_sync_needed(&failing, &a_record("order.*"), true),
            "not ready"
        );
        assert!(broker_sync_needed(
            &EventRouterStatus::default(),
            &a_record("order.*"),
            true
        ));
    }

    #[test]
    fn the_desired_replicas_come_from_the_operators_hpa_or_kedas() {
        let mut router = a_router_named("chat");
        assert_eq!(autoscaler_name(&router), None);
        router.spec.autoscaling.enabled = true;
        assert_eq!(autoscaler_name(&router).as_deref(), Some("chat"));
        router.spec.autoscaling.provider = AutoscalingProvider::Keda;
        assert_eq!(autoscaler_name(&router).as_deref(), Some("keda-hpa-chat"));
    }

    #[test]
    fn the_status_keeps_the_topology_and_reports_the_selector() {
        let router = a_router_named("chat");
        let observed = Observed {
            generation: Some(1),
            phase: Phase::Paused,
            deployment: None,
        };
        let now = Time(Timestamp::UNIX_EPOCH);
        let status = status_of(&router, &observed, Some(&a_record("#")), &now);
        assert_eq!(status.topology, Some(a_record("#")));
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(
            status.selector.as_deref(),
            Some(selector_string("chat").as_str())
        );
        assert_eq!((status.replicas, status.ready_replicas), (None, None));
        assert!(is_true(&status.conditions, ConditionType::Paused));
    }

    #[test]
    fn the_history_outcome_follows_the_plan_and_the_broker() {
        use crate::crd::HistorySpec;
        use crate::validate::tests::a_cluster_with_the_secret;

        let synced = |differ: Option<&str>| -> Result<Synced, BrokerError> {
            Ok(Synced {
                record: a_record("#"),
                stream_arguments_differ: differ.map(str::to_string),
            })
        };
        let off = validate(&a_router_named("chat"), &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(history_outcome(&off, &synced(None)), HistoryOutcome::Off);
        let mut router = a_router_named("chat");
        router.spec.history = Some(HistorySpec::enabled());
        let on = validate(&router, &a_cluster_with_the_secret()).expect("valid");
        assert_eq!(
            history_outcome(&on, &synced(None)),
            HistoryOutcome::Declared
        );
        assert_eq!(
            history_outcome(&on, &synced(Some("PRECONDITION_FAILED"))),
            HistoryOutcome::ArgumentsDiffer {
                message: "PRECONDITION_FAILED".into()
            }
        );
        let unreachable = Err(BrokerError::Timeout(std::time::Duration::from_secs(5)));
        assert_eq!(
            history_outcome(&on, &unreachable),
            HistoryOutcome::NotDeclared
        );
    }
}
