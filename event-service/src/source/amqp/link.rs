//! The broker link: keeps one live connection (a "session") with the broker, and replaces it when
//! it dies.
//!
//! A session is: connect → declare the exchange (or check it exists) → declare this instance's
//! exclusive queue → under the write lock, re-bind every recorded pattern and start consuming →
//! mark up → consume until the connection or a channel fails, an operation asks for a new
//! connection, or shutdown. Then: mark down (readiness drops at once), close, back off with
//! jitter, start over. Every failure is logged with what to check; none ends the process.
//!
//! Any channel error ends the whole session rather than reopening one channel: the queue is
//! exclusive, so closing the connection is the one step that provably removes every binding the
//! instance no longer wants, and the next session rebuilds exactly the recorded set.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Acker, Connection, ConnectionProperties, Consumer, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::{
    AmqpSource, Link, heartbeats,
    message::{self, Malformed},
};
use crate::source::Origin;
use eventrouter_contract::amqp::OPERATION_TIMEOUT;
use eventrouter_runtime::amqp::is_not_found;

/// The reconnect delays before jitter: the first, doubling per failure up to the last. Jitter
/// adds up to as much again, so delays fall in [125 ms, 250 ms) first and [5 s, 10 s) at most.
const MIN_DELAY: Duration = Duration::from_millis(125);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// A session that lived this long counts as healthy: the next failure backs off from the start.
/// (A session that dies right after setup keeps growing the delay instead of spinning.)
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How long a clean close may take on shutdown or before reconnecting.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the queue must have had nothing ready before a partial ack batch is sent.
const ACK_IDLE: Duration = Duration::from_millis(5);
/// At most one log line per this interval about malformed messages (the counter has the rest).
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{step} failed: {source}")]
    Broker {
        step: &'static str,
        source: lapin::Error,
    },
    #[error("{step} got no answer within {timeout:?}")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error(
        "the exchange '{exchange}' does not exist: the operator declares it, or start the service \
         with --declare-exchange=true"
    )]
    ExchangeMissing { exchange: String },
}

/// Runs one broker step with the operation deadline, naming the step in the error.
async fn step<T>(
    step: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, SetupError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(SetupError::Broker { step, source }),
        Err(_) => Err(SetupError::Timeout {
            step,
            timeout: OPERATION_TIMEOUT,
        }),
    }
}

/// A set-up session: what the consume loop needs, and the connection to close at the end.
struct Connected {
    connection: Connection,
    consumer: Consumer,
    /// The control queue's consumer (heartbeats), when the control exchange is open.
    heartbeats: Option<Consumer>,
    generation: u64,
}

enum LinkEnd {
    Shutdown,
    Lost(String),
}

/// The manager task. Returns only on shutdown.
pub(super) async fn run(source: Arc<AmqpSource>, shutdown: CancellationToken) {
    let mut backoff = ReconnectDelays::new();
    let mut generation = 0u64;
    let mut ever_connected = false;
    let endpoint = source.settings.endpoint.clone();
    loop {
        if source.sink.strong_count() == 0 {
            debug!("the event sink is gone; the connection manager stops");
            return;
        }
        generation += 1;
        let setup = tokio::select! {
            () = shutdown.cancelled() => return,
            setup = set_up(&source, generation) => setup,
        };
        match setup {
            Ok(mut session) => {
                if ever_connected {
                    source.metrics.reconnected();
                }
                ever_connected = true;
                info!(
                    %endpoint,
                    queue = %source.settings.queue,
                    bindings = source.patterns().len(),
                    "connected to RabbitMQ; consuming"
                );
                let started = Instant::now();
                let end = live(&source, &mut session, &shutdown).await;
                // Readiness drops before anything else: the lock below may wait for in-flight
                // operations to fail.
                source.set_up(false);
                *source.link.write().await = None;
                source.blocked.store(false, Ordering::Release);
                close(&session.connection).await;
                match end {
                    LinkEnd::Shutdown => {
                        info!(%endpoint, "disconnected from RabbitMQ (shutdown)");
                        return;
                    }
                    LinkEnd::Lost(reason) => {
                        warn!(%endpoint, %reason, "lost the RabbitMQ session; reconnecting");
                    }
                }
                if started.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
            }
            Err(error) => {
                source.metrics.connect_failed();
                let (attempt, delay) = backoff.next_delay();
                warn!(
                    %endpoint,
                    %error,
                    attempt,
                    retry_in_ms = delay.as_millis(),
                    "cannot set up the RabbitMQ session; retrying"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        }
        // After a lost session: a short jittered pause, so a fleet does not reconnect at once.
        let (_, delay) = backoff.next_delay();
        debug!(
            retry_in_ms = delay.as_millis(),
            "waiting before reconnecting"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Connects and builds the topology; on success the session is live and the source is up.
async fn set_up(source: &AmqpSource, generation: u64) -> Result<Connected, SetupError> {
    let settings = &source.settings;
    let properties = ConnectionProperties::default()
        .with_connection_name(settings.connection_name.clone().into());
    let connection = step(
        "connecting",
        Connection::connect_uri(settings.uri.clone(), properties),
    )
    .await?;
    match build(source, &connection, generation).await {
        Ok((consumer, heartbeats)) => Ok(Connected {
            connection,
            consumer,
            heartbeats,
            generation,
        }),
        Err(error) => {
            close(&connection).await;
            Err(error)
        }
    }
}

async fn build(
    source: &AmqpSource,
    connection: &Connection,
    generation: u64,
) -> Result<(Consumer, Option<Consumer>), SetupError> {
    let settings = &source.settings;
    let control = step("opening the control channel", connection.create_channel()).await?;
    let exchange = settings.exchange_name();
    let declared = control.exchange_declare(
        exchange.clone(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            // Passive: only check that the exchange the operator owns is there.
            passive: !settings.declare_exchange,
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    );
    match step("declaring the exchange", declared).await {
        Ok(()) => {}
        Err(SetupError::Broker { source: e, .. })
            if !settings.declare_exchange && is_not_found(&e) =>
        {
            return Err(SetupError::ExchangeMissing {
                exchange: settings.exchange.clone(),
            });
        }
        Err(e) => return Err(e),
    }
    if settings.declare_exchange
        && let Some(stream) = &settings.history_stream
    {
        step(
            "declaring the history stream",
            control.queue_declare(
                stream.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                settings.stream_arguments(),
            ),
        )
        .await?;
        step(
            "binding the history stream",
            control.queue_bind(
                stream.as_str().into(),
                exchange.clone(),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    step(
        "declaring the queue",
        control.queue_declare(
            settings.queue_name(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                durable: false,
                ..QueueDeclareOptions::default()
            },
            settings.queue_arguments(),
        ),
    )
    .await?;
    let consume = step("opening the consumer channel", connection.create_channel()).await?;
    step(
        "setting the prefetch (basic.qos)",
        consume.basic_qos(settings.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let publish = step("opening the publish channel", connection.create_channel()).await?;
    step(
        "enabling publisher confirms",
        publish.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;

    let (heartbeat, heartbeats) = match open_heartbeats(source, connection).await {
        Some(h) => (Some(h.channel), Some(h.consumer)),
        None => (None, None),
    };

    // From here until the link is installed no bind or unbind can run, so the snapshot below is
    // exactly the set to restore.
    let mut link = source.link.write().await;
    let patterns = source.bound_patterns();
    for pattern in &patterns {
        let Ok(routing_key) = ShortString::try_new(pattern.as_str()) else {
            continue; // `bind` never records such a pattern
        };
        step(
            "restoring a binding",
            control.queue_bind(
                settings.queue_name(),
                exchange.clone(),
                routing_key,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    let consumer = step(
        "starting the consumer",
        consume.basic_consume(
            settings.queue_name(),
            // Empty tag: the broker generates a unique one.
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    *link = Some(Link {
        generation,
        control,
        publish,
        heartbeat,
    });
    source.set_up(true);
    debug!(restored = patterns.len(), "bindings restored");
    Ok((consumer, heartbeats))
}

/// Opens the control exchange's channel when rebalancing is on. A failure is logged and leaves
/// the session without heartbeats; it never fails the session (see `heartbeats`).
async fn open_heartbeats(
    source: &AmqpSource,
    connection: &Connection,
) -> Option<heartbeats::HeartbeatLink> {
    let exchange = source.settings.control_exchange.as_deref()?;
    let declare = source.settings.declare_exchange;
    match tokio::time::timeout(
        OPERATION_TIMEOUT,
        heartbeats::open(connection, exchange, declare),
    )
    .await
    {
        Ok(Ok(link)) => Some(link),
        Ok(Err(error)) if is_not_found(&error) => {
            warn!(
                exchange,
                "the control exchange does not exist: the operator declares it, or start the \
                 service with --declare-exchange=true; rebalancing holds"
            );
            None
        }
        Ok(Err(error)) => {
            warn!(exchange, %error, "could not open the control exchange; rebalancing holds");
            None
        }
        Err(_) => {
            warn!(exchange, timeout = ?OPERATION_TIMEOUT, "opening the control exchange got no answer; rebalancing holds");
            None
        }
    }
}

/// Consumes until the session ends, and says why it ended.
async fn live(
    source: &AmqpSource,
    session: &mut Connected,
    shutdown: &CancellationToken,
) -> LinkEnd {
    let mut events = session.connection.events_listener();
    let generation = session.generation;
    let broker_events = async {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::Error(error) => return format!("connection error: {error}"),
                lapin::Event::ConnectionBlocked(reason) => {
                    source.blocked.store(true, Ordering::Release);
                    warn!(%reason, "RabbitMQ blocked publishing (resource alarm); publishes get 503");
                }
                lapin::Event::ConnectionUnblocked => {
                    source.blocked.store(false, Ordering::Release);
                    info!("RabbitMQ unblocked publishing");
                }
                _ => {}
            }
        }
        "the connection's event stream ended".to_owned()
    };
    let recycle = async {
        loop {
            source.recycle.notified().await;
            if source.recycle_generation.load(Ordering::Acquire) == generation {
                return "an operation failed on this connection; replacing it".to_owned();
            }
        }
    };
    let inbox = &source.control_inbox;
    let consumer = &mut session.consumer;
    let heartbeat_consumer = session.heartbeats.as_mut();
    let heartbeats = async move {
        match heartbeat_consumer {
            Some(consumer) => heartbeats::forward(consumer, inbox).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => LinkEnd::Shutdown,
        never = heartbeats => match never {},
        reason = consume(source, consumer) => LinkEnd::Lost(reason),
        reason = broker_events => LinkEnd::Lost(reason),
        reason = recycle => LinkEnd::Lost(reason),
    }
}

/// Hands every message to the hub and acknowledges in batches; returns why it stopped.
///
/// Acks are sent with `multiple = true` every quarter prefetch, and once the queue has had
/// nothing ready for [`ACK_IDLE`]: with three quarters of the window always granted the broker
/// never stalls, the tail of a burst is acknowledged promptly, and the cost is one ack frame per
/// batch rather than per message. (Acking at every momentary lull instead costs an ack frame,
/// a wake-up of the AMQP I/O thread and broker work every few messages under load.)
async fn consume(source: &AmqpSource, consumer: &mut Consumer) -> String {
    // Held for this connection only; the manager task ends with the server that owns the hub.
    let Some(sink) = source.sink.upgrade() else {
        return "the event sink is gone (the server stopped)".to_owned();
    };
    let ack_every = usize::from(source.settings.prefetch / 4).max(1);
    let max_bytes = source.settings.max_message_bytes;
    let mut unacked: Option<Acker> = None;
    let mut unacked_count = 0usize;
    let mut malformed_log = RateLimitedLog::new(MALFORMED_LOG_INTERVAL);
    loop {
        // `timeout` polls the delivery first, so a ready one costs no timer. A pending acker
        // taken here is superseded by the next delivery's (`multiple` acks cover it).
        let next = match unacked.take() {
            None => consumer.next().await,
            Some(acker) => match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
                Ok(next) => next,
                Err(_) => {
                    unacked_count = 0;
                    if let Err(error) = acker.ack(BasicAckOptions { multiple: true }).await {
                        return format!("acknowledging failed: {error}");
                    }
                    consumer.next().await
                }
            },
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return format!("consumer error: {error}"),
            None => return "the broker cancelled the consumer (queue deleted?)".to_owned(),
        };
        let routing_key = delivery.routing_key.as_str();
        match message::decode(routing_key, &delivery.properties, delivery.data, max_bytes) {
            // Recipients more than half a queue behind: wait for them before taking the next
            // delivery, so a burst stays at the broker (within the prefetch) instead of
            // overflowing every client's queue.
            Ok(event) => {
                let dispatched = sink.dispatch(event, Origin::Amqp, true);
                sink.flush();
                if let Some(backlog) = dispatched.backlog {
                    backlog.drained().await;
                }
            }
            Err(reason) => {
                source.metrics.malformed(reason);
                malformed_log.log(reason, routing_key);
            }
        }
        unacked = Some(delivery.acker);
        unacked_count += 1;
        if unacked_count >= ack_every
            && let Some(acker) = unacked.take()
        {
            unacked_count = 0;
            if let Err(error) = acker.ack(BasicAckOptions { multiple: true }).await {
                return format!("acknowledging failed: {error}");
            }
        }
    }
}

/// Reconnect delays: exponential with jitter (backon's builder), reset after a healthy session.
///
/// Jitter matters more than the curve: when a broker restarts, every instance of every router
/// loses its connection at the same instant; without jitter they would all come back in lockstep
/// and hit the booting broker together on every attempt.
struct ReconnectDelays {
    delays: ExponentialBackoff,
    attempt: u32,
}

impl ReconnectDelays {
    fn builder() -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(MIN_DELAY)
            .with_max_delay(MAX_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }

    fn new() -> Self {
        Self {
            delays: Self::builder().build(),
            attempt: 0,
        }
    }

    /// Counts one more failed attempt; returns its number and the delay before the next.
    fn next_delay(&mut self) -> (u32, Duration) {
        self.attempt = self.attempt.saturating_add(1);
        // Without a maximum number of attempts the iterator never ends; the fallback is the cap.
        let delay = self.delays.next().unwrap_or(MAX_DELAY * 2);
        (self.attempt, delay)
    }

    /// After a session that worked: the next failure starts from the shortest delay again.
    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// Logs the first malformed message and then at most one line per interval, with the number
/// of malformed messages since the last line: a flood costs a counter increment, not log volume.
struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    fn log(&mut self, reason: Malformed, routing_key: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            reason = reason.as_str(),
            routing_key,
            suppressed_since_last_log = self.suppressed,
            "dropped a malformed message from the queue"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Closes the connection politely if it is still open; a dead one is simply dropped.
async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            connection.close(
                200,
                ShortString::from("event-service reconnecting or stopping"),
            ),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds_and_cap() {
        let mut delays = ReconnectDelays::new();
        let floors_ms = [125, 250, 500, 1000, 2000, 4000, 5000, 5000, 5000];
        for (i, floor) in floors_ms.into_iter().enumerate() {
            let (attempt, delay) = delays.next_delay();
            let floor = Duration::from_millis(floor);
            assert_eq!(attempt as usize, i + 1);
            assert!(
                delay >= floor && delay < floor * 2,
                "attempt {attempt}: {delay:?} not in [{floor:?}, {:?})",
                floor * 2
            );
        }
    }

    #[test]
    fn jitter_spreads_a_fleet_reconnecting_at_once() {
        let distinct: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| ReconnectDelays::new().next_delay().1)
            .collect();
        assert!(
            distinct.len() > 10,
            "50 instances drew only {} distinct first delays",
            distinct.len()
        );
    }

    #[test]
    fn reset_starts_over_and_many_attempts_stay_capped() {
        let mut delays = ReconnectDelays::new();
        for _ in 0..200 {
            assert!(delays.next_delay().1 < MAX_DELAY * 2);
        }
        delays.reset();
        let (attempt, delay) = delays.next_delay();
        assert_eq!(attempt, 1);
        assert!(delay < MIN_DELAY * 2, "{delay:?}");
    }
}
