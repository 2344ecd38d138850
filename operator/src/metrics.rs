//! The operator's own metrics, registered once and served on the admin port's `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `eventrouter_operator_reconciles_total` | counter | `result` = `ok` \| `error` |
//! | `eventrouter_operator_reconcile_errors_total` | counter | `reason` = `Error::metric_label()` |
//! | `eventrouter_operator_reconcile_duration_seconds` | histogram | — |
//! | `eventrouter_operator_leader` | gauge | — (1 while this process holds the Lease) |
//! | `eventrouter_operator_invalid_specs_total` | counter | — |
//! | `eventrouter_operator_router_replicas` | gauge | `router_namespace`, `router`, `state` = `current` \| `desired` |
//!
//! `eventrouter_operator_router_replicas` is what the routers dashboard's *Replicas* panel shows
//! instead of kube-state-metrics' HPA series: `current` is the router Deployment's
//! `status.replicas`, `desired` the autoscaler's `status.desiredReplicas` (its HPA, KEDA's too)
//! once the HPA controller has written a status and, without autoscaling or before that, the
//! Deployment's `spec.replicas`. The router's namespace is `router_namespace`, not `namespace`: Prometheus
//! puts the operator pod's own `namespace` target label on every series it scrapes here, and
//! without `honorLabels` a metric label of that name would be renamed `exported_namespace`.
//! Only the leader reports routers; a router's series go when it is deleted or no longer found,
//! and all of them when this process stops leading.

use std::time::Instant;

use eventrouter_contract::operator_metrics::{self as names, ROUTER_NAMESPACE_LABEL};
use eventrouter_contract::prometheus::ROUTER_LABEL;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::error::Error;

/// Every operator metric.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    pub leader: IntGauge,
    pub invalid_specs: IntCounter,
    /// Per router: `current` and `desired` replicas (see the module docs).
    pub router_replicas: IntGaugeVec,
}

/// One router's replicas as the operator last saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterReplicas {
    /// Pods the Deployment has (`status.replicas`), ready or not.
    pub current: i64,
    /// What the autoscaler wants, else what the Deployment is asked to run.
    pub desired: i64,
}

impl RouterReplicas {
    /// The replicas of a router from its Deployment and, when autoscaling is on, the HPA that
    /// scales it. `None` without a Deployment (nothing runs, nothing to report).
    ///
    /// `desired` is the HPA's `status.desiredReplicas` once the HPA controller has written a
    /// status; until then (and without autoscaling) it is the Deployment's `spec.replicas`, which
    /// is what the operator applied or, with autoscaling, what the autoscaler last set through the
    /// scale subresource. The API server returns a new HPA with `status.desiredReplicas: 0` (a
    /// required field), so a status counts as written only when it has conditions, which the HPA
    /// controller sets on every pass (`AbleToScale`, `ScalingActive`, ...).
    pub fn observe(
        deployment: Option<&Deployment>,
        autoscaler: Option<&HorizontalPodAutoscaler>,
    ) -> Option<Self> {
        let deployment = deployment?;
        let current = deployment
            .status
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        // The API server defaults an omitted `spec.replicas` to 1, so a Deployment read back from
        // it always has one; 1 is that same default.
        let spec_replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let desired = autoscaler
            .and_then(|hpa| hpa.status.as_ref())
            .filter(|s| s.conditions.as_ref().is_some_and(|c| !c.is_empty()))
            .map_or(spec_replicas, |s| s.desired_replicas);
        Some(Self {
            current: i64::from(current),
            desired: i64::from(desired),
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        // Names are the contract's (checked valid there), and each is registered exactly once here.
        let reconciles = IntCounterVec::new(
            Opts::new(names::RECONCILES, "Reconciles of EventRouters by result."),
            &["result"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(names::RECONCILE_ERRORS, "Failed reconciles by reason."),
            &["reason"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(names::RECONCILE_DURATION, "Duration of one reconcile.").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            names::LEADER,
            "1 while this operator holds the leader Lease.",
        )
        .expect("valid metric");
        let invalid_specs = IntCounter::new(
            names::INVALID_SPECS,
            "Reconciles that found a spec the API server accepted but the operator cannot act on.",
        )
        .expect("valid metric");
        let router_replicas = IntGaugeVec::new(
            Opts::new(
                names::ROUTER_REPLICAS,
                "Replicas of each EventRouter: current (pods its Deployment has) and desired (the \
                 autoscaler's desired replicas, else the Deployment's spec.replicas).",
            ),
            &[ROUTER_NAMESPACE_LABEL, ROUTER_LABEL, "state"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(invalid_specs.clone()),
            Box::new(router_replicas.clone()),
        ] {
            registry
                .register(collector)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            invalid_specs,
            router_replicas,
        }
    }

    /// Report `replicas` for the router `namespace`/`name`, or remove its series when `None`.
    pub fn set_router_replicas(
        &self,
        namespace: &str,
        name: &str,
        replicas: Option<RouterReplicas>,
    ) {
        let Some(replicas) = replicas else {
            self.forget_router(namespace, name);
            return;
        };
        for (state, value) in [("current", replicas.current), ("desired", replicas.desired)] {
            self.router_replicas
                .with_label_values(&[namespace, name, state])
                .set(value);
        }
    }

    /// Remove the router's series (it was deleted): a gone router must not linger on dashboards.
    pub fn forget_router(&self, namespace: &str, name: &str) {
        for state in ["current", "desired"] {
            // Absent series (never reported) are fine: there is nothing to remove.
            let _ = self
                .router_replicas
                .remove_label_values(&[namespace, name, state]);
        }
    }

    /// Remove every router's series (this process stopped leading; the new leader reports them).
    pub fn forget_routers(&self) {
        self.router_replicas.reset();
    }

    /// Start timing a reconcile; the duration is recorded when the timer drops.
    pub fn start_reconcile(&self) -> ReconcileTimer {
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    pub fn record_success(&self) {
        self.reconciles.with_label_values(&["ok"]).inc();
    }

    pub fn record_failure(&self, error: &Error) {
        self.reconciles.with_label_values(&["error"]).inc();
        self.errors.with_label_values(&[error.metric_label()]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

/// Records the elapsed time into the duration histogram on drop, whatever path the reconcile took.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::autoscaling::v2::{
        HorizontalPodAutoscalerCondition, HorizontalPodAutoscalerStatus,
    };

    use super::*;

    fn deployment(spec_replicas: Option<i32>, status_replicas: Option<i32>) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: spec_replicas,
                ..DeploymentSpec::default()
            }),
            status: status_replicas.map(|r| DeploymentStatus {
                replicas: Some(r),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    /// An HPA whose controller computed `desired` replicas.
    fn hpa(desired: Option<i32>) -> HorizontalPodAutoscaler {
        HorizontalPodAutoscaler {
            status: desired.map(|d| HorizontalPodAutoscalerStatus {
                desired_replicas: d,
                current_replicas: Some(1),
                conditions: Some(vec![HorizontalPodAutoscalerCondition {
                    type_: "AbleToScale".into(),
                    status: "True".into(),
                    reason: Some("ReadyForNewScale".into()),
                    ..HorizontalPodAutoscalerCondition::default()
                }]),
                ..HorizontalPodAutoscalerStatus::default()
            }),
            ..HorizontalPodAutoscaler::default()
        }
    }

    /// An HPA as the API server returns it before any controller wrote its status.
    fn new_hpa() -> HorizontalPodAutoscaler {
        HorizontalPodAutoscaler {
            status: Some(HorizontalPodAutoscalerStatus::default()),
            ..HorizontalPodAutoscaler::default()
        }
    }

    #[test]
    fn every_contract_operator_metric_is_registered() {
        let metrics = Metrics::new();
        metrics.record_success();
        metrics.record_failure(&Error::MissingField("uid"));
        metrics.set_router_replicas(
            "ns",
            "r",
            Some(RouterReplicas {
                current: 1,
                desired: 1,
            }),
        );
        drop(metrics.start_reconcile());
        let registered: Vec<String> = metrics
            .registry
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        for name in names::ALL {
            assert!(
                registered.iter().any(|r| r == name),
                "{name} in {registered:?}"
            );
        }
        assert_eq!(registered.len(), names::ALL.len(), "{registered:?}");
    }

    fn replica_lines(metrics: &Metrics) -> Vec<String> {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("eventrouter_operator_router_replicas{"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn desired_is_the_autoscalers_once_it_has_a_status_else_the_deployments_spec() {
        let d = deployment(Some(2), Some(1));
        let fixed = RouterReplicas::observe(Some(&d), None);
        assert_eq!(
            fixed,
            Some(RouterReplicas {
                current: 1,
                desired: 2
            })
        );
        assert_eq!(RouterReplicas::observe(Some(&d), Some(&hpa(None))), fixed);
        assert_eq!(
            RouterReplicas::observe(Some(&d), Some(&new_hpa())),
            fixed,
            "desiredReplicas 0 of a status no controller wrote is not a desire"
        );
        assert_eq!(
            RouterReplicas::observe(Some(&d), Some(&hpa(Some(5)))),
            Some(RouterReplicas {
                current: 1,
                desired: 5
            })
        );
        let fresh = deployment(Some(3), None);
        assert_eq!(
            RouterReplicas::observe(Some(&fresh), None),
            Some(RouterReplicas {
                current: 0,
                desired: 3
            })
        );
        assert_eq!(RouterReplicas::observe(None, Some(&hpa(Some(5)))), None);
    }

    #[test]
    fn router_replicas_are_set_replaced_and_removed_per_router() {
        let metrics = Metrics::new();
        let two = RouterReplicas {
            current: 2,
            desired: 3,
        };
        metrics.set_router_replicas("shop", "chat", Some(two));
        metrics.set_router_replicas("news", "chat", Some(two));
        metrics.set_router_replicas(
            "shop",
            "chat",
            Some(RouterReplicas {
                current: 3,
                desired: 3,
            }),
        );
        let lines = replica_lines(&metrics);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines.contains(
            &r#"eventrouter_operator_router_replicas{router="chat",router_namespace="shop",state="current"} 3"#.to_string()
        ), "{lines:?}");
        assert!(lines.contains(
            &r#"eventrouter_operator_router_replicas{router="chat",router_namespace="news",state="desired"} 3"#.to_string()
        ), "{lines:?}");

        // A deleted router's series go; the other router's stay.
        metrics.forget_router("shop", "chat");
        metrics.forget_router("shop", "never-seen");
        let lines = replica_lines(&metrics);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains(r#"router_namespace="news""#))
        );

        // A router without a Deployment reports nothing.
        metrics.set_router_replicas("news", "chat", None);
        assert!(replica_lines(&metrics).is_empty());

        // Losing leadership clears every router.
        metrics.set_router_replicas("shop", "chat", Some(two));
        metrics.forget_routers();
        assert!(replica_lines(&metrics).is_empty());
    }
}
