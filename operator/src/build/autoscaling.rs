//! Autoscaling children: an autoscaling/v2 HorizontalPodAutoscaler on Pods metrics, or a KEDA
//! ScaledObject with Prometheus triggers, both on the service's connection and receive-queue
//! metrics.

use eventrouter_contract::autoscaling as metric_names;
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::metadata;
use crate::crd::{EventRouter, ScalingRules};
use crate::validate::Plan;

/// The KEDA ScaledObject API.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

fn scaling_rules(rules: &ScalingRules) -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(rules.stabilization_window_seconds),
        select_policy: Some("Max".into()),
        policies: Some(vec![HPAScalingPolicy {
            type_: "Pods".into(),
            value: rules.pods_per_minute,
            period_seconds: 60,
        }]),
        ..HPAScalingRules::default()
    }
}

fn pods_metric(name: &str, average: Quantity) -> MetricSpec {
    MetricSpec {
        type_: "Pods".into(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.into(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".into(),
                average_value: Some(average),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }
}

pub(super) fn horizontal_autoscaler(router: &EventRouter, plan: &Plan) -> HorizontalPodAutoscaler {
    let a = &router.spec.autoscaling;
    HorizontalPodAutoscaler {
        metadata: metadata(router, plan, plan.name.clone()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: plan.name.clone(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![
                pods_metric(
                    metric_names::CONNECTIONS_METRIC,
                    Quantity(a.target_connections_per_pod.to_string()),
                ),
                pods_metric(
                    metric_names::RECV_QUEUE_METRIC,
                    Quantity(a.target_recv_queue_bytes_per_pod.to_string()),
                ),
            ]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_up: Some(scaling_rules(&a.scale_up)),
                scale_down: Some(scaling_rules(&a.scale_down)),
            }),
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// The PromQL KEDA runs for `metric`: the sum over this router's pods (KEDA divides by replicas
/// for an `AverageValue` target).
fn keda_query(metric: &str, plan: &Plan) -> String {
    format!(
        "sum({metric}{{namespace=\"{ns}\",pod=~\"{name}-[a-z0-9]+-[a-z0-9]+\"}})",
        ns = plan.namespace,
        name = plan.name
    )
}

pub(super) fn scaled_object(router: &EventRouter, plan: &Plan) -> DynamicObject {
    let a = &router.spec.autoscaling;
    let address = a.prometheus_address.clone().unwrap_or_default();
    let trigger = |metric: &str, threshold: String| {
        json!({
            "type": "prometheus",
            "name": metric.replace('_', "-"),
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": address,
                "query": keda_query(metric, plan),
                "threshold": threshold,
                // An empty result must not read as zero load (that scales to minimum at peak).
                "ignoreNullValues": "false",
            }
        })
    };
    let behavior = HorizontalPodAutoscalerBehavior {
        scale_up: Some(scaling_rules(&a.scale_up)),
        scale_down: Some(scaling_rules(&a.scale_down)),
    };
    let mut object =
        DynamicObject::new(&plan.name, &scaled_object_resource()).within(&plan.namespace);
    object.metadata = metadata(router, plan, plan.name.clone());
    object.data = json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": plan.name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
            "triggers": [
                trigger(metric_names::CONNECTIONS_METRIC, a.target_connections_per_pod.to_string()),
                trigger(metric_names::RECV_QUEUE_METRIC, a.target_recv_queue_bytes_per_pod.to_string()),
            ],
        }
    });
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::desired;
    use crate::crd::AutoscalingProvider;
    use crate::validate::ClusterFacts;
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};

    fn an_autoscaled_router(provider: AutoscalingProvider) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.autoscaling.enabled = true;
        router.spec.autoscaling.provider = provider;
        router.spec.autoscaling.min_replicas = 3;
        router.spec.autoscaling.max_replicas = 12;
        router.spec.autoscaling.target_connections_per_pod = 2000;
        router.spec.autoscaling.target_recv_queue_bytes_per_pod = 262_144;
        router.spec.autoscaling.prometheus_address = Some("http://prometheus:9090".into());
        router
    }

    #[test]
    fn with_hpa_autoscaling_the_deployment_has_no_replicas_and_an_hpa_scales_on_both_pod_metrics() {
        let d = desired(
            &an_autoscaled_router(AutoscalingProvider::Hpa),
            &a_cluster_with_the_secret(),
        );
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
        assert!(d.scaled_object.is_none());
        let hpa = d
            .horizontal_autoscaler
            .expect("an HPA")
            .spec
            .expect("hpa spec");
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(3), 12));
        assert_eq!(hpa.scale_target_ref.name, "chat");
        let metrics: Vec<_> = hpa
            .metrics
            .iter()
            .flatten()
            .map(|m| {
                let pods = m.pods.as_ref().expect("a Pods metric");
                (
                    pods.metric.name.clone(),
                    pods.target.average_value.clone().expect("average").0,
                )
            })
            .collect();
        assert_eq!(
            metrics,
            vec![
                ("eventrouter_connections".to_string(), "2000".to_string()),
                (
                    "eventrouter_socket_recv_queue_bytes".to_string(),
                    "262144".to_string()
                ),
            ]
        );
        let behavior = hpa.behavior.expect("behavior");
        assert_eq!(
            behavior
                .scale_down
                .and_then(|r| r.stabilization_window_seconds),
            Some(300)
        );
    }

    #[test]
    fn with_keda_installed_a_scaled_object_replaces_the_hpa() {
        let facts = ClusterFacts {
            keda_installed: true,
            ..a_cluster_with_the_secret()
        };
        let d = desired(&an_autoscaled_router(AutoscalingProvider::Keda), &facts);
        assert!(d.horizontal_autoscaler.is_none());
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
        let so = d.scaled_object.expect("a ScaledObject");
        assert_eq!(
            so.types.as_ref().map(|t| t.api_version.as_str()),
            Some("keda.sh/v1alpha1")
        );
        let spec = &so.data["spec"];
        assert_eq!(spec["minReplicaCount"], 3);
        assert_eq!(spec["triggers"][0]["type"], "prometheus");
        assert_eq!(spec["triggers"][0]["metadata"]["threshold"], "2000");
        assert_eq!(spec["triggers"][0]["metadata"]["ignoreNullValues"], "false");
        assert_eq!(
            spec["triggers"][1]["metadata"]["query"],
            r#"sum(eventrouter_socket_recv_queue_bytes{namespace="events",pod=~"chat-[a-z0-9]+-[a-z0-9]+"})"#
        );
    }

    #[test]
    fn with_keda_missing_there_is_no_autoscaler_and_still_no_replicas() {
        let d = desired(
            &an_autoscaled_router(AutoscalingProvider::Keda),
            &a_cluster_with_the_secret(),
        );
        assert!(d.horizontal_autoscaler.is_none() && d.scaled_object.is_none());
        assert_eq!(d.deployment.spec.as_ref().expect("spec").replicas, None);
    }
}
