//! The RabbitMQ source: one queue per instance, bound to exactly the patterns its clients hold.
//!
//! # Layout
//!
//! - this module — [`AmqpSource`], the handle the hub and the HTTP layer use: `bind`, `unbind`,
//!   `publish`, `is_up`. It owns the set of bound patterns, the truth restored after a reconnect.
//! - `link` — the live broker link: the channels of the current connection and the background
//!   manager that keeps one up: connect, declare, restore bindings, consume, notice the loss, back
//!   off (exponential with jitter, `backon`), do it again.
//! - `heartbeats` — the control exchange's channel: load heartbeats out and in, for rebalancing.
//! - `message` — event ⇄ AMQP message mapping and the malformed-message rules (pure).
//! - `settings` — the configuration, resolved and checked at start (pure).
//! - `broker_metrics` — broker up, reconnects, publish confirms/failures, malformed messages.
//!
//! # Consistency between bindings and reconnects
//!
//! Every operation on the current connection holds a read lock on it; the connection manager takes
//! the write lock to swap connections and to re-bind the recorded patterns. So a pattern is either
//! recorded before the manager snapshots the set (and restored on the new queue), or bound on the
//! new connection after the restore: none falls between two connections.

mod broker_metrics;
mod heartbeats;
mod link;
pub(crate) mod message;
mod settings;

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use eventrouter_contract::amqp::OPERATION_TIMEOUT;
use futures_util::future::join_all;
use lapin::{
    Channel, Confirmation,
    options::{BasicPublishOptions, QueueBindOptions},
    types::{FieldTable, ShortString},
};
use tokio::sync::{Notify, RwLock, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use self::message::EncodeError;
use self::{
    broker_metrics::{BrokerMetrics, PublishFailure},
    settings::AmqpSettings,
};
use super::{EventSink, Rejected, SourceError, Unavailable};
use crate::{config::Config, event::Event};

/// Why the AMQP source could not start (bad configuration only: an unreachable broker is not an
/// error at start, the source keeps retrying and readiness stays false).
#[derive(Debug, thiserror::Error)]
pub enum AmqpStartError {
    #[error("--source amqp needs --amqp-url or --amqp-url-file")]
    MissingUrl,
    #[error("could not read the AMQP URL file {path}: {source}")]
    UrlFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the AMQP URL is not valid ({reason}); expected amqp://user:pass@host:5672/vhost")]
    InvalidUrl { reason: String },
    #[error("{setting}: {reason}")]
    InvalidSetting {
        setting: &'static str,
        reason: String,
    },
    #[error("could not register the AMQP metrics (registered twice on one registry?): {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The channels of the current connection that operations need.
#[derive(Clone)]
struct Link {
    /// Which connection this is (counts up); a failed operation names it when asking for a new one.
    generation: u64,
    /// Declares and (un)binds.
    control: Channel,
    /// In confirm mode: every publish is confirmed by the broker.
    publish: Channel,
    /// Publishes heartbeats to the control exchange; `None` when rebalancing is off or the
    /// control exchange could not be opened on this connection.
    heartbeat: Option<Channel>,
}

/// The RabbitMQ source. Cheap to share (`Arc`); a background task keeps it connected until the
/// shutdown token given to [`AmqpSource::start`] is cancelled.
pub struct AmqpSource {
    settings: AmqpSettings,
    /// Held weakly: the hub owns this source, and a strong reference back would keep both alive.
    sink: Weak<dyn EventSink>,
    metrics: BrokerMetrics,
    /// The live connection's channels; `None` while disconnected.
    link: RwLock<Option<Link>>,
    /// Every pattern the broker confirmed and nobody unbound since: restored on each new queue.
    bound: Mutex<BTreeSet<String>>,
    up: AtomicBool,
    /// The broker blocked this connection's publishers (a memory or disk alarm): publishes fail
    /// fast instead of hanging, and a slow confirm is not mistaken for a dead connection.
    blocked: AtomicBool,
    /// An operation failed in a way that leaves the connection's state unknown (a timeout, a
    /// channel closed by the broker): the generation it asks the manager to replace.
    recycle_generation: AtomicU64,
    recycle: Notify,
    /// Where heartbeats read from the control exchange go (the rebalancer's inbox).
    control_inbox: OnceLock<mpsc::Sender<Vec<u8>>>,
}

impl AmqpSource {
    /// Starts the connection manager in the background and returns at once.
    ///
    /// Only configuration mistakes are errors. An unreachable broker is not: the manager retries
    /// with backoff and logs why, and [`AmqpSource::is_up`] stays false until it is connected.
    pub async fn start(
        config: &Config,
        sink: Weak<dyn EventSink>,
        registry: &prometheus::Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<AmqpSource>, AmqpStartError> {
        let settings = AmqpSettings::from_config(config)?;
        let metrics = BrokerMetrics::register(registry)?;
        let source = Arc::new(AmqpSource {
            settings,
            sink,
            metrics,
            link: RwLock::new(None),
            bound: Mutex::new(BTreeSet::new()),
            up: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            recycle_generation: AtomicU64::new(0),
            recycle: Notify::new(),
            control_inbox: OnceLock::new(),
        });
        tokio::spawn(link::run(Arc::clone(&source), shutdown));
        Ok(source)
    }

    /// The name of this instance's queue on the broker.
    pub fn queue_name(&self) -> &str {
        &self.settings.queue
    }

    /// The exchange events are published to and consumed from.
    pub fn exchange(&self) -> &str {
        &self.settings.exchange
    }

    /// This instance's name (the pod name, else a random one): the key of its heartbeats.
    pub fn instance(&self) -> &str {
        &self.settings.instance
    }

    /// The control exchange, when rebalancing is on.
    pub fn control_exchange(&self) -> Option<&str> {
        self.settings.control_exchange.as_deref()
    }

    /// Sends every message read from the control exchange to `inbox` from the next session on
    /// (the first call wins).
    pub(crate) fn attach_control_inbox(&self, inbox: mpsc::Sender<Vec<u8>>) {
        let _ = self.control_inbox.set(inbox);
    }

    /// Publishes a heartbeat to the control exchange (unconfirmed: the next one replaces a lost
    /// one). [`SourceError::Unavailable`] while disconnected or when the control exchange is not
    /// open on this connection.
    pub(crate) async fn publish_heartbeat(&self, body: &[u8]) -> Result<(), SourceError> {
        let Some(exchange) = self.settings.control_exchange.as_deref() else {
            return Err(not_connected());
        };
        let guard = self.link.read().await;
        let channel = guard
            .as_ref()
            .and_then(|link| link.heartbeat.as_ref())
            .ok_or_else(not_connected)?;
        match tokio::time::timeout(
            OPERATION_TIMEOUT,
            heartbeats::publish(channel, exchange, body),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(source_error(error)),
            Err(_) => Err(SourceError::Timeout),
        }
    }

    /// Binds `pattern` on this instance's queue; returns once the broker confirmed `queue.bind`.
    ///
    /// While disconnected this fails with [`SourceError::Unavailable`] and records nothing: the
    /// caller rolls its subscription back, so the recorded set holds only confirmed bindings.
    pub async fn bind(&self, pattern: &str) -> Result<(), SourceError> {
        let routing_key = ShortString::try_new(pattern)
            .map_err(|_| SourceError::Rejected(Rejected::PatternTooLong))?;
        let guard = self.link.read().await;
        let link = guard.as_ref().ok_or_else(not_connected)?;
        let bind = link.control.queue_bind(
            self.settings.queue_name(),
            self.settings.exchange_name(),
            routing_key,
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        self.control_operation("queue.bind", pattern, link.generation, bind)
            .await?;
        self.patterns().insert(pattern.to_owned());
        debug!(pattern, queue = %self.settings.queue, "bound");
        Ok(())
    }

    /// Removes `pattern` from this instance's queue.
    ///
    /// The pattern is forgotten first, whatever the broker says: it will not be restored on the
    /// next connection. While disconnected there is nothing to undo (the queue is exclusive, so it
    /// went with the old connection) and this returns Ok. If the broker fails the unbind, the
    /// connection is replaced — its queue and every stale binding go with it — and the error is
    /// returned for the log only: the caller need not retry.
    pub async fn unbind(&self, pattern: &str) -> Result<(), SourceError> {
        let guard = self.link.read().await;
        let was_bound = self.patterns().remove(pattern);
        let Some(link) = guard.as_ref() else {
            return Ok(());
        };
        if !was_bound {
            return Ok(());
        }
        let Ok(routing_key) = ShortString::try_new(pattern) else {
            return Ok(()); // never bound: `bind` refuses such patterns
        };
        let unbind = link.control.queue_unbind(
            self.settings.queue_name(),
            self.settings.exchange_name(),
            routing_key,
            FieldTable::default(),
        );
        self.control_operation("queue.unbind", pattern, link.generation, unbind)
            .await?;
        debug!(pattern, queue = %self.settings.queue, "unbound");
        Ok(())
    }

    /// Runs one control-channel operation under [`OPERATION_TIMEOUT`]. A failure or a missing
    /// answer leaves the connection's state unknown, so it asks for the connection `generation`
    /// to be replaced (its exclusive queue and every binding go with it) and returns the error.
    async fn control_operation(
        &self,
        operation: &'static str,
        pattern: &str,
        generation: u64,
        work: impl Future<Output = lapin::Result<()>>,
    ) -> Result<(), SourceError> {
        match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                warn!(operation, pattern, %error, "failed; replacing the connection");
                self.request_recycle(generation);
                Err(source_error(error))
            }
            Err(_) => {
                warn!(operation, pattern, timeout = ?OPERATION_TIMEOUT, "no answer; replacing the connection");
                self.request_recycle(generation);
                Err(SourceError::Timeout)
            }
        }
    }

    /// Publishes every event to the exchange and returns `Ok(n)` only once the broker confirmed
    /// all of them.
    ///
    /// [`SourceError::Unavailable`] while disconnected (the HTTP layer answers 503),
    /// [`SourceError::Rejected`] when the broker nacked any, [`SourceError::Timeout`] when
    /// confirms did not all arrive in time. On an error some events may still have been
    /// delivered; publishers that retry can use the event id to drop duplicates.
    pub async fn publish(&self, events: Vec<Event>) -> Result<usize, SourceError> {
        let n = events.len();
        if n == 0 {
            return Ok(0);
        }
        // Encode everything first so that a bad event fails the request before anything is sent.
        let mut encoded = Vec::with_capacity(n);
        for event in &events {
            match message::encode(event) {
                Ok(e) => encoded.push(e),
                Err(error) => {
                    self.metrics.publish_failed(PublishFailure::Error, n);
                    return Err(SourceError::Rejected(Rejected::Unencodable(error)));
                }
            }
        }
        // Hold the read lock only to pick the channel: confirms can take a while, and the manager
        // must be able to swap connections meanwhile (a dead channel fails the confirms anyway).
        let link = self.link.read().await.clone();
        let Some(link) = link else {
            self.metrics.publish_failed(PublishFailure::Unavailable, n);
            return Err(not_connected());
        };
        if self.blocked.load(Ordering::Acquire) {
            self.metrics.publish_failed(PublishFailure::Unavailable, n);
            return Err(SourceError::Unavailable(Unavailable::Blocked));
        }
        let work = async {
            let mut confirms = Vec::with_capacity(n);
            for (event, (routing_key, properties)) in events.iter().zip(encoded) {
                let confirm = link
                    .publish
                    .basic_publish(
                        self.settings.exchange_name(),
                        routing_key,
                        BasicPublishOptions::default(),
                        &event.data,
                        properties,
                    )
                    .await?;
                confirms.push(confirm);
            }
            Ok::<_, lapin::Error>(join_all(confirms).await)
        };
        let outcomes = match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(error)) => {
                let err = source_error(error);
                let reason = match err {
                    SourceError::Unavailable(_) => PublishFailure::Unavailable,
                    _ => PublishFailure::Error,
                };
                self.metrics.publish_failed(reason, n);
                self.request_recycle(link.generation);
                return Err(err);
            }
            Err(_) => {
                self.metrics.publish_failed(PublishFailure::Timeout, n);
                // A broker that blocked us mid-publish is alive: replacing the connection would
                // only throw away the queue. Anything else that swallows confirms is not.
                if !self.blocked.load(Ordering::Acquire) {
                    self.request_recycle(link.generation);
                }
                return Err(SourceError::Timeout);
            }
        };
        let (mut acked, mut nacked, mut first_error) = (0usize, 0usize, None);
        for outcome in outcomes {
            match outcome {
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => acked += 1,
                Ok(Confirmation::Nack(_)) => nacked += 1,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        self.metrics.confirmed(acked);
        if nacked > 0 {
            self.metrics.publish_failed(PublishFailure::Nack, nacked);
        }
        if let Some(error) = first_error {
            self.metrics
                .publish_failed(PublishFailure::Error, n - acked - nacked);
            self.request_recycle(link.generation);
            return Err(source_error(error));
        }
        if nacked > 0 {
            return Err(SourceError::Rejected(Rejected::Nacked { nacked, total: n }));
        }
        Ok(acked)
    }

    /// True while connected with the queue declared, every recorded pattern bound and the
    /// consumer running. Readiness follows this.
    /// The stream recoveries read, when configured.
    pub(crate) fn history_stream(&self) -> Option<&str> {
        self.settings.history_stream.as_deref()
    }

    /// Largest message body taken from the broker (the same bound the live consumer applies).
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.settings.max_message_bytes
    }

    /// Opens a connection of its own to the broker for `purpose` (shown in the management UI),
    /// apart from the live link: a recovery's long read never queues behind, or fails, the live
    /// consumer.
    pub(crate) async fn connect_side(&self, purpose: &str) -> lapin::Result<lapin::Connection> {
        let properties = lapin::ConnectionProperties::default()
            .with_connection_name(format!("{} ({purpose})", self.settings.connection_name).into());
        lapin::Connection::connect_uri(self.settings.uri.clone(), properties).await
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The patterns currently recorded as bound (what a reconnect restores).
    pub fn bound_patterns(&self) -> Vec<String> {
        self.patterns().iter().cloned().collect()
    }

    fn patterns(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A panic while holding this lock cannot leave the set half-updated (single insert or
        // remove), so a poisoned lock is still consistent.
        self.bound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.metrics.set_up(up);
    }

    /// Asks the manager to replace connection `generation` (ignored if it is already gone).
    fn request_recycle(&self, generation: u64) {
        self.recycle_generation.store(generation, Ordering::Release);
        self.recycle.notify_one();
    }
}

fn not_connected() -> SourceError {
    SourceError::Unavailable(Unavailable::NotConnected)
}

/// A broker that refused the request (a channel-level AMQP error) versus one that is gone.
fn source_error(error: lapin::Error) -> SourceError {
    if error.is_amqp_soft_error() {
        SourceError::Rejected(Rejected::Channel(error))
    } else {
        SourceError::Unavailable(Unavailable::Connection(error))
    }
}
