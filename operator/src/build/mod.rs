//! Pure construction of every Kubernetes object a router wants, from its spec and its `Plan`.
//!
//! Nothing here talks to a cluster. `Desired` is the complete set: `apply` destructures it without
//! `..`, so adding a child here without applying it (or deleting it when undesired) does not
//! compile. Optional children are `Option`s: `None` means "must not exist".
//!
//! | module | children |
//! |---|---|
//! | `workload` | ServiceAccount, Deployment (the event service's env, probes, drain), Service, PodDisruptionBudget |
//! | `autoscaling` | HorizontalPodAutoscaler or KEDA ScaledObject |
//! | `monitoring` | the headless metrics Service and the ServiceMonitor |

mod autoscaling;
mod monitoring;
mod workload;

use std::collections::BTreeMap;

use eventrouter_contract::kube as names;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::DynamicObject;

pub use self::autoscaling::scaled_object_resource;
pub(crate) use self::monitoring::metrics_service_name;
pub use self::monitoring::service_monitor_resource;
use crate::crd::{AutoscalingProvider, EventRouter};
use crate::validate::Plan;

/// Every object a router wants. `None` children must not exist.
#[derive(Clone, Debug)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
    /// Headless Service exposing only the admin port, for the ServiceMonitor and metrics adapters.
    pub metrics_service: Service,
    pub disruption_budget: Option<PodDisruptionBudget>,
    pub horizontal_autoscaler: Option<HorizontalPodAutoscaler>,
    pub scaled_object: Option<DynamicObject>,
    pub service_monitor: Option<DynamicObject>,
}

/// Labels on every child; the first two also select the pods.
fn labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert(
        names::LABEL_COMPONENT.to_string(),
        names::COMPONENT_SERVICE.to_string(),
    );
    labels.insert(
        names::LABEL_MANAGED_BY.to_string(),
        names::MANAGED_BY.to_string(),
    );
    labels
}

/// The pod selector (stable across upgrades: never add labels here).
fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), names::APP_NAME.to_string()),
        (names::LABEL_INSTANCE.to_string(), name.to_string()),
    ])
}

/// The selector as the string the scale subresource reports.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Name, namespace, labels and the controller owner reference every child carries.
fn metadata(router: &EventRouter, plan: &Plan, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels(&plan.name)),
        owner_references: router.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// Build every child of `router`. Pure.
pub fn build(router: &EventRouter, plan: &Plan) -> Desired {
    Desired {
        service_account: workload::service_account(router, plan),
        deployment: workload::deployment(router, plan),
        service: workload::service(router, plan),
        metrics_service: monitoring::metrics_service(router, plan),
        disruption_budget: router
            .spec
            .disruption_budget
            .enabled
            .then(|| workload::disruption_budget(router, plan)),
        horizontal_autoscaler: (plan.autoscaler == Some(AutoscalingProvider::Hpa))
            .then(|| autoscaling::horizontal_autoscaler(router, plan)),
        scaled_object: (plan.autoscaler == Some(AutoscalingProvider::Keda))
            .then(|| autoscaling::scaled_object(router, plan)),
        service_monitor: plan
            .service_monitor
            .then(|| monitoring::service_monitor(router, plan)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};
    use crate::validate::{ClusterFacts, validate};

    pub(crate) fn desired(router: &EventRouter, facts: &ClusterFacts) -> Desired {
        let plan = validate(router, facts).expect("fixture is valid");
        build(router, &plan)
    }

    #[test]
    fn a_plain_router_gets_a_deployment_with_its_replicas_service_account_service_and_budget() {
        let d = desired(&a_router_named("chat"), &a_cluster_with_the_secret());
        let spec = d.deployment.spec.as_ref().expect("deployment spec");
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(d.service_account.metadata.name.as_deref(), Some("chat"));
        assert_eq!(d.service.metadata.name.as_deref(), Some("chat"));
        assert_eq!(
            d.metrics_service.metadata.name.as_deref(),
            Some("chat-metrics")
        );
        assert!(d.disruption_budget.is_some());
        assert!(d.horizontal_autoscaler.is_none());
        assert!(d.scaled_object.is_none());
        assert!(d.service_monitor.is_none());
    }

    #[test]
    fn every_child_is_owned_by_the_router_as_its_controller() {
        let router = a_router_named("chat");
        let d = desired(&router, &a_cluster_with_the_secret());
        let owners = [
            &d.service_account.metadata,
            &d.deployment.metadata,
            &d.service.metadata,
            &d.metrics_service.metadata,
            &d.disruption_budget.as_ref().expect("pdb").metadata,
        ];
        for meta in owners {
            let owner = &meta.owner_references.as_ref().expect("owner references")[0];
            assert_eq!(owner.kind, "EventRouter");
            assert_eq!(owner.uid, "0000-uid");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("events"));
        }
    }

    #[test]
    fn the_selector_string_matches_the_pod_selector() {
        assert_eq!(
            selector_string("chat"),
            "app.kubernetes.io/instance=chat,app.kubernetes.io/name=event-router"
        );
    }

    #[test]
    fn every_child_carries_the_selector_labels_and_the_managed_by_label() {
        let all = labels("chat");
        for (key, value) in selector_labels("chat") {
            assert_eq!(all.get(&key), Some(&value));
        }
        assert_eq!(all[names::LABEL_MANAGED_BY], names::MANAGED_BY);
        assert_eq!(all.len(), 4);
    }
}
