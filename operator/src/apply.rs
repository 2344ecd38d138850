//! Applies a `Desired` set to the API server with server-side apply (one field manager, forced),
//! and deletes children that are no longer desired, every child through one `reconcile_child`.
//!
//! `apply_children` destructures `Desired` without `..`: a new child added to `build` is a compile
//! error here until it is applied (or deleted when `None`).

use std::fmt::Debug;

use eventrouter_contract::kube as names;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use crate::build::{
    Desired, metrics_service_name, scaled_object_resource, service_monitor_resource,
};
use crate::error::{Error, is_not_found};

/// Which optional APIs the cluster serves (so a missing CRD is neither applied to nor deleted from).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalApis {
    pub keda: bool,
    pub service_monitor: bool,
}

/// What applying changed, for events.
#[derive(Debug, Default)]
pub struct Applied {
    /// The Deployment as the API server returned it (its status feeds the router's status).
    pub deployment: Option<Deployment>,
    /// Kinds of children that were deleted because they are no longer desired.
    pub deleted: Vec<&'static str>,
}

/// What `reconcile_child` did.
enum ChildOutcome<K> {
    /// Applied; the object as the API server returned it.
    Applied(K),
    /// Not desired, and the router's object of that name was deleted.
    Deleted,
    /// Not desired and not there (or not the router's, or its API is not served).
    Absent,
}

/// The one way a child is brought to its desired state: server-side apply it (one field manager,
/// forced) when `desired` is `Some`, else delete the object named `name` if this router owns it
/// (a same-named object someone else made stays). `served` is false for an optional API the
/// cluster does not serve, which is then neither applied to nor deleted from.
async fn reconcile_child<K>(
    api: Api<K>,
    name: &str,
    owner_uid: &str,
    desired: Option<&K>,
    served: bool,
) -> Result<ChildOutcome<K>, Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    if let Some(object) = desired {
        let params = PatchParams::apply(names::FIELD_MANAGER).force();
        let child = object
            .meta()
            .name
            .as_deref()
            .ok_or(Error::MissingField("child name"))?;
        let applied = api
            .patch(child, &params, &Patch::Apply(object))
            .await
            .map_err(Error::kube("applying a child"))?;
        return Ok(ChildOutcome::Applied(applied));
    }
    if !served {
        return Ok(ChildOutcome::Absent);
    }
    let existing = api
        .get_opt(name)
        .await
        .map_err(Error::kube("looking up an undesired child"))?;
    let owned = existing.is_some_and(|e| {
        e.meta()
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == owner_uid)
    });
    if !owned {
        return Ok(ChildOutcome::Absent);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(ChildOutcome::Deleted),
        // Already gone counts as done.
        Err(error) if is_not_found(&error) => Ok(ChildOutcome::Absent),
        Err(source) => Err(Error::Kube {
            action: "deleting an undesired child",
            source,
        }),
    }
}

/// Apply every desired child of the router `name` (uid `owner_uid`) and delete undesired ones.
pub async fn apply_children(
    client: &Client,
    namespace: &str,
    name: &str,
    owner_uid: &str,
    desired: Desired,
    apis: OptionalApis,
) -> Result<Applied, Error> {
    let Desired {
        service_account,
        deployment,
        service,
        metrics_service,
        disruption_budget,
        horizontal_autoscaler,
        scaled_object,
        service_monitor,
    } = desired;
    let typed = || client.clone();
    let mut applied = Applied::default();
    let mut note = |kind: &'static str, deleted: bool| {
        if deleted {
            applied.deleted.push(kind);
        }
    };

    let sa_name = service_account.metadata.name.clone().unwrap_or_default();
    reconcile_child(
        Api::namespaced(typed(), namespace),
        &sa_name,
        owner_uid,
        Some(&service_account),
        true,
    )
    .await?;
    let deployment = match reconcile_child(
        Api::namespaced(typed(), namespace),
        name,
        owner_uid,
        Some(&deployment),
        true,
    )
    .await?
    {
        ChildOutcome::Applied(deployment) => Some(deployment),
        ChildOutcome::Deleted | ChildOutcome::Absent => None,
    };
    reconcile_child(
        Api::namespaced(typed(), namespace),
        name,
        owner_uid,
        Some(&service),
        true,
    )
    .await?;
    let metrics_name = metrics_service_name(name);
    debug_assert_eq!(
        metrics_service.metadata.name.as_deref(),
        Some(metrics_name.as_str())
    );
    reconcile_child(
        Api::namespaced(typed(), namespace),
        &metrics_name,
        owner_uid,
        Some(&metrics_service),
        true,
    )
    .await?;

    let outcome = reconcile_child::<PodDisruptionBudget>(
        Api::namespaced(typed(), namespace),
        name,
        owner_uid,
        disruption_budget.as_ref(),
        true,
    )
    .await?;
    note(
        "PodDisruptionBudget",
        matches!(outcome, ChildOutcome::Deleted),
    );
    let outcome = reconcile_child::<HorizontalPodAutoscaler>(
        Api::namespaced(typed(), namespace),
        name,
        owner_uid,
        horizontal_autoscaler.as_ref(),
        true,
    )
    .await?;
    note(
        "HorizontalPodAutoscaler",
        matches!(outcome, ChildOutcome::Deleted),
    );
    let keda = Api::namespaced_with(typed(), namespace, &scaled_object_resource());
    let outcome = reconcile_child(keda, name, owner_uid, scaled_object.as_ref(), apis.keda).await?;
    note("ScaledObject", matches!(outcome, ChildOutcome::Deleted));
    let monitors = Api::namespaced_with(typed(), namespace, &service_monitor_resource());
    let outcome = reconcile_child(
        monitors,
        name,
        owner_uid,
        service_monitor.as_ref(),
        apis.service_monitor,
    )
    .await?;
    note("ServiceMonitor", matches!(outcome, ChildOutcome::Deleted));

    applied.deployment = deployment;
    if !applied.deleted.is_empty() {
        info!(router = name, namespace, deleted = ?applied.deleted, "deleted children that are no longer desired");
    }
    Ok(applied)
}

/// The router's Deployment as it is now, if any (used while paused or invalid, when nothing is applied).
pub async fn current_deployment(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Deployment>, Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(Error::kube("reading the Deployment"))
}
