//! Monitoring children: the headless Service exposing only the admin port, and the Prometheus
//! Operator ServiceMonitor that scrapes it.

use std::collections::BTreeMap;

use eventrouter_contract::{http, prometheus as target_labels};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{metadata, selector_labels};
use crate::crd::EventRouter;
use crate::validate::Plan;

/// Label that marks the headless Service the ServiceMonitor scrapes.
const METRICS_SERVICE_LABEL: &str = "eventrouter.io/metrics";

/// The Prometheus Operator ServiceMonitor API.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// Name of the headless metrics Service.
pub(crate) fn metrics_service_name(name: &str) -> String {
    format!("{name}-metrics")
}

pub(super) fn metrics_service(router: &EventRouter, plan: &Plan) -> Service {
    let mut meta = metadata(router, plan, metrics_service_name(&plan.name));
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(METRICS_SERVICE_LABEL.into(), "true".into());
    Service {
        metadata: meta,
        spec: Some(K8sServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&plan.name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: i32::from(http::DEFAULT_ADMIN_PORT),
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..K8sServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(super) fn service_monitor(router: &EventRouter, plan: &Plan) -> DynamicObject {
    let mut selector = selector_labels(&plan.name);
    selector.insert(METRICS_SERVICE_LABEL.into(), "true".into());
    let mut object =
        DynamicObject::new(&plan.name, &service_monitor_resource()).within(&plan.namespace);
    object.metadata = metadata(router, plan, plan.name.clone());
    object.data = json!({
        "spec": {
            "selector": {"matchLabels": selector},
            "endpoints": [{
                "port": "metrics",
                "path": http::METRICS_PATH,
                "interval": router.spec.monitoring.interval,
                // The dashboards, alerts and adapter rules group by `router`.
                "relabelings": [{
                    "sourceLabels": [target_labels::ROUTER_LABEL_SOURCE],
                    "targetLabel": target_labels::ROUTER_LABEL,
                    "action": "replace",
                }],
            }],
        }
    });
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::desired;
    use crate::validate::ClusterFacts;
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};

    #[test]
    fn a_service_monitor_scrapes_the_metrics_service_when_the_crd_exists() {
        let facts = ClusterFacts {
            service_monitor_installed: true,
            ..a_cluster_with_the_secret()
        };
        let d = desired(&a_router_named("chat"), &facts);
        let sm = d.service_monitor.expect("a ServiceMonitor");
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
        let relabel = &sm.data["spec"]["endpoints"][0]["relabelings"][0];
        assert_eq!(relabel["targetLabel"], "router");
        assert_eq!(
            relabel["sourceLabels"][0],
            "__meta_kubernetes_pod_label_app_kubernetes_io_instance"
        );
        assert_eq!(
            sm.data["spec"]["selector"]["matchLabels"][METRICS_SERVICE_LABEL],
            "true"
        );
        let metrics_labels = d.metrics_service.metadata.labels.expect("labels");
        assert_eq!(metrics_labels[METRICS_SERVICE_LABEL], "true");
    }
}
