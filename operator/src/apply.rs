//! Applies a `Desired` set to the API server with server-side apply (one field manager, forced),
//! and deletes children that are no longer desired.
//!
//! `apply_children` destructures `Desired` without `..`: a new child added to `build` is a compile
//! error here until it is applied (or deleted when `None`).

use std::fmt::Debug;

use eventrouter_contract::kube as names;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

use crate::build::{
    Desired, metrics_service_name, scaled_object_resource, service_monitor_resource,
};
use crate::error::Error;

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

fn params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

async fn apply_typed<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("child name"))?;
    api.patch(&name, &params(), &Patch::Apply(object))
        .await
        .map_err(Error::kube("applying a child"))
}

async fn apply_dynamic(
    client: &Client,
    namespace: &str,
    resource: &ApiResource,
    object: &DynamicObject,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let name = object.name_any();
    api.patch(&name, &params(), &Patch::Apply(object))
        .await
        .map_err(Error::kube("applying a custom-resource child"))?;
    Ok(())
}

fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    owner_uid: &str,
) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == owner_uid)
}

/// Delete `name` if it exists and this router owns it (a same-named object someone else made stays).
async fn delete_owned<K>(api: Api<K>, name: &str, owner_uid: &str) -> Result<bool, Error>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api
        .get_opt(name)
        .await
        .map_err(Error::kube("looking up an undesired child"))?
    {
        Some(existing) if owned_by(existing.meta(), owner_uid) => {
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => Ok(true),
                // Already gone counts as done.
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
                Err(source) => Err(Error::Kube {
                    action: "deleting an undesired child",
                    source,
                }),
            }
        }
        _ => Ok(false),
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
        // The broker side is declared over AMQP by the reconciler, not applied here.
        topology: _,
    } = desired;
    let mut applied = Applied::default();

    apply_typed(client, namespace, &service_account).await?;
    applied.deployment = Some(apply_typed(client, namespace, &deployment).await?);
    apply_typed(client, namespace, &service).await?;
    apply_typed(client, namespace, &metrics_service).await?;
    debug_assert_eq!(
        metrics_service.metadata.name.as_deref(),
        Some(metrics_service_name(name).as_str())
    );

    match disruption_budget {
        Some(pdb) => {
            apply_typed(client, namespace, &pdb).await?;
        }
        None => {
            if delete_owned(
                Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
                name,
                owner_uid,
            )
            .await?
            {
                applied.deleted.push("PodDisruptionBudget");
            }
        }
    }
    match horizontal_autoscaler {
        Some(hpa) => {
            apply_typed(client, namespace, &hpa).await?;
        }
        None => {
            if delete_owned(
                Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), namespace),
                name,
                owner_uid,
            )
            .await?
            {
                applied.deleted.push("HorizontalPodAutoscaler");
            }
        }
    }
    let keda = scaled_object_resource();
    match scaled_object {
        Some(so) => apply_dynamic(client, namespace, &keda, &so).await?,
        None if apis.keda => {
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &keda);
            if delete_owned(api, name, owner_uid).await? {
                applied.deleted.push("ScaledObject");
            }
        }
        None => {}
    }
    let monitor = service_monitor_resource();
    match service_monitor {
        Some(sm) => apply_dynamic(client, namespace, &monitor, &sm).await?,
        None if apis.service_monitor => {
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &monitor);
            if delete_owned(api, name, owner_uid).await? {
                applied.deleted.push("ServiceMonitor");
            }
        }
        None => {}
    }
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
