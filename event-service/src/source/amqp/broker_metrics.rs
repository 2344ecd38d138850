//! The AMQP source's metrics, registered once on the service's registry.
//!
//! Names come from `eventrouter_contract::metrics`. Every label value is created at start, so
//! dashboards and alerts see a zero series instead of no series before the first failure.

use eventrouter_contract::metrics as names;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use strum::IntoEnumIterator;

use super::message::Malformed;

/// Why a publish failed (the `reason` label of `eventrouter_publish_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::EnumIter)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum PublishFailure {
    /// Not connected to the broker (the HTTP layer answers 503).
    Unavailable,
    /// The broker answered with a negative confirm.
    Nack,
    /// The broker closed the channel or connection instead of confirming.
    Error,
    /// No confirm within the operation deadline.
    Timeout,
}

impl PublishFailure {
    /// The label value (the variant in snake_case).
    fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Clone)]
pub(crate) struct BrokerMetrics {
    up: IntGauge,
    reconnects: IntCounter,
    connect_failures: IntCounter,
    confirms: IntCounter,
    publish_failures: IntCounterVec,
    malformed: IntCounterVec,
}

impl BrokerMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGauge::new(
            names::BROKER_UP,
            "1 while connected to RabbitMQ with the queue declared, bound and consumed",
        )?;
        let reconnects = IntCounter::new(
            names::BROKER_RECONNECTS,
            "Connections to RabbitMQ re-established after one was lost",
        )?;
        let connect_failures = IntCounter::new(
            names::BROKER_CONNECT_FAILURES,
            "Attempts to connect to RabbitMQ and set up the queue that failed (each is retried)",
        )?;
        let confirms = IntCounter::new(
            names::PUBLISH_CONFIRMS,
            "Events published to RabbitMQ and confirmed by the broker",
        )?;
        let publish_failures = IntCounterVec::new(
            Opts::new(
                names::PUBLISH_FAILURES,
                "Events that could not be published to RabbitMQ, by reason",
            ),
            &["reason"],
        )?;
        let malformed = IntCounterVec::new(
            Opts::new(
                names::MALFORMED_MESSAGES,
                "Messages dropped from this instance's queue because they are not events, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(reconnects.clone()))?;
        registry.register(Box::new(connect_failures.clone()))?;
        registry.register(Box::new(confirms.clone()))?;
        registry.register(Box::new(publish_failures.clone()))?;
        registry.register(Box::new(malformed.clone()))?;
        for reason in PublishFailure::iter() {
            publish_failures.with_label_values(&[reason.as_str()]);
        }
        for reason in Malformed::iter() {
            malformed.with_label_values(&[reason.as_str()]);
        }
        Ok(Self {
            up,
            reconnects,
            connect_failures,
            confirms,
            publish_failures,
            malformed,
        })
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }

    pub(crate) fn connect_failed(&self) {
        self.connect_failures.inc();
    }

    pub(crate) fn confirmed(&self, n: usize) {
        self.confirms.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub(crate) fn publish_failed(&self, reason: PublishFailure, n: usize) {
        self.publish_failures
            .with_label_values(&[reason.as_str()])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub(crate) fn malformed(&self, reason: Malformed) {
        self.malformed.with_label_values(&[reason.as_str()]).inc();
    }
}
