//! The publisher: numbered events straight to RabbitMQ at a fixed rate, each one recoverable —
//! AMQP `message_id` a UUIDv7, `timestamp` in seconds and the `timestamp_in_ms` header, as a
//! backend publishing to the router's exchange is asked to set them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
};
use tokio::sync::{oneshot, watch};

use super::{client::Phase, wire};

/// The routing key of every event (the clients subscribe to `bench.#`).
pub(super) const EVENT: &str = "bench.recovery";

/// The header the service reads the publish time in milliseconds from.
const TIMESTAMP_MS_HEADER: &str = "timestamp_in_ms";

/// What the publisher did.
#[derive(Debug, Default)]
pub(super) struct Published {
    pub events: u64,
    pub seconds: f64,
    /// How far the publisher fell behind its schedule at worst.
    pub max_behind: Duration,
}

/// Where and how fast to publish.
#[derive(Debug, Clone)]
pub(super) struct PublishSettings {
    pub amqp_url: String,
    pub exchange: String,
    pub rate: u64,
    pub pad: String,
}

/// Publishes from the warm-up on at `rate` events/s, event `n` due at `n / rate` s after the
/// start, until `stop`; `published` counts the events handed to the broker so far. Sends the
/// final count on `stopped`.
pub(super) async fn publish(
    settings: PublishSettings,
    mut phase: watch::Receiver<Phase>,
    published: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
    stopped: oneshot::Sender<u64>,
) -> anyhow::Result<Published> {
    let connection = Connection::connect(&settings.amqp_url, ConnectionProperties::default())
        .await
        .context("the publisher connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    phase
        .wait_for(|p| !matches!(p, Phase::Connect))
        .await
        .context("the run ended before the warm-up")?;
    let period = Duration::from_secs_f64(1.0 / settings.rate.max(1) as f64);
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut max_behind = Duration::ZERO;
    loop {
        let due = start + period.mul_f64(n as f64);
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        max_behind = max_behind.max(due.elapsed());
        let t_us = wire::now_micros();
        let ms = t_us / 1000;
        let id = wire::uuid_v7(ms, n, rand::random());
        let mut headers = FieldTable::default();
        headers.insert(
            TIMESTAMP_MS_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_timestamp(ms / 1000)
            .with_content_type("application/json".into())
            .with_headers(headers);
        channel
            .basic_publish(
                settings.exchange.as_str().into(),
                EVENT.into(),
                BasicPublishOptions::default(),
                &wire::body(n, t_us, &settings.pad),
                properties,
            )
            .await
            .context("publishing")?;
        n += 1;
        published.store(n, Ordering::Release);
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = stopped.send(n);
    let _ = connection.close(200, "done".into()).await;
    Ok(Published {
        events: n,
        seconds,
        max_behind,
    })
}
