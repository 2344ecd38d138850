//! Helpers for the RabbitMQ tests of the event service: the shared test-support crate's broker
//! helpers (the shared node, an independent lapin publisher, management API reads, dedicated
//! nodes for tests that stop or restart the broker) under the names these tests use, plus what
//! only these tests need: a collecting event sink and a read of a registry's series.
//!
//! Every helper that needs a service panics with the variable to set and the command to run when
//! it is missing: these tests never pass by skipping.
// Each test binary uses a different subset of these helpers and re-exports.
#![allow(dead_code, unused_imports)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use event_service::{
    event::Event,
    source::{Dispatched, EventSink, Origin},
};
use tokio::sync::Notify;

pub use eventrouter_test_support::rabbitmq::{
    DEFAULT_VHOST, Management, Publisher, RabbitNode, amqp_url, declare_topic_exchange,
    encode_segment,
};
pub use eventrouter_test_support::unique_name as unique;
pub use eventrouter_test_support::wait::wait_until as until;

pub const WAIT: Duration = Duration::from_secs(15);

/// The service's test configuration reading from RabbitMQ at `url`: it declares `exchange` and
/// binds its own queue, named after `pod`.
pub fn amqp_config(url: &str, exchange: &str, pod: &str) -> event_service::config::Config {
    let mut config = event_service::config::Config::for_tests();
    config.source = event_service::config::SourceKind::Amqp;
    config.amqp_url = Some(url.to_owned());
    config.exchange = exchange.to_owned();
    config.declare_exchange = true;
    config.pod_name = Some(pod.to_owned());
    config
}

/// Management API of the shared node.
pub fn management() -> Management {
    Management::shared()
}

/// An [`EventSink`] that keeps everything it is given.
#[derive(Default)]
pub struct Collector {
    events: Mutex<Vec<Event>>,
    arrived: Notify,
}

impl EventSink for Collector {
    fn dispatch(&self, event: Event, origin: Origin, alone: bool) -> Dispatched {
        assert_eq!(origin, Origin::Amqp);
        assert!(alone, "RabbitMQ delivers events one at a time");
        self.events.lock().expect("collector lock").push(event);
        self.arrived.notify_waiters();
        Dispatched {
            delivered: 1,
            backlog: None,
        }
    }
}

impl Collector {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn names(&self) -> Vec<String> {
        self.events
            .lock()
            .expect("collector lock")
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("collector lock").clone()
    }

    pub fn len(&self) -> usize {
        self.events.lock().expect("collector lock").len()
    }

    /// Waits until at least `n` events arrived; panics after [`WAIT`].
    pub async fn wait_for(&self, n: usize) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            if self.len() >= n {
                return self.events();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "expected {n} events within {WAIT:?}, got {}: {:?}",
                    self.len(),
                    self.names()
                );
            }
        }
    }
}

/// The value of an unlabelled or labelled series in a registry (0 when absent).
pub fn metric(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .find(|m| match label {
            None => true,
            Some((k, v)) => m
                .get_label()
                .iter()
                .any(|l| l.name() == k && l.value() == v),
        })
        .map(|m| {
            if m.get_counter().has_value() {
                m.get_counter().value()
            } else {
                m.get_gauge().value()
            }
        })
        .unwrap_or(0.0)
}
