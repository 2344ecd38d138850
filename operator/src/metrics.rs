//! The operator's own metrics, registered once and served on the admin port's `/metrics`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `eventrouter_operator_reconciles_total` | counter | `result` = `ok` \| `error` |
//! | `eventrouter_operator_reconcile_errors_total` | counter | `reason` = `Error::metric_label()` |
//! | `eventrouter_operator_reconcile_duration_seconds` | histogram | — |
//! | `eventrouter_operator_leader` | gauge | — (1 while this process holds the Lease) |
//! | `eventrouter_operator_invalid_specs_total` | counter | — |

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
        // Names are literals known to be valid, and each is registered exactly once here.
        let reconciles = IntCounterVec::new(
            Opts::new(
                "eventrouter_operator_reconciles_total",
                "Reconciles of EventRouters by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "eventrouter_operator_reconcile_errors_total",
                "Failed reconciles by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "eventrouter_operator_reconcile_duration_seconds",
                "Duration of one reconcile.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "eventrouter_operator_leader",
            "1 while this operator holds the leader Lease.",
        )
        .expect("valid metric");
        let invalid_specs = IntCounter::new(
            "eventrouter_operator_invalid_specs_total",
            "Reconciles that found a spec the API server accepted but the operator cannot act on.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(invalid_specs.clone()),
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
        }
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
