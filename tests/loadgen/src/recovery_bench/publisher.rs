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

/// The routing keys of the events: event `n` goes to topic `n % topics`, named this followed by
/// the topic's number (`bench.0`, `bench.1`, ...).
pub(super) const TOPIC_PREFIX: &str = "bench.";

/// The routing key (and event name) of topic `index`.
pub(super) fn topic_name(index: u64) -> String {
    format!("{TOPIC_PREFIX}{index}")
}

/// One of the `count` topics the events are spread over: it carries the events whose sequence
/// number `n` has `n % count == index`, i.e. `index`, `index + count`, `index + 2 * count`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Topic {
    pub index: u64,
    pub count: u64,
}

impl Default for Topic {
    /// The single topic of a one-topic run.
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Topic {
    /// The topic of client (or event) number `n` of a run with `count` topics (at least 1).
    pub fn of(n: u64, count: u64) -> Self {
        let count = count.max(1);
        Self {
            index: n % count,
            count,
        }
    }

    /// The exact event name a client of this topic subscribes to.
    pub fn pattern(&self) -> String {
        topic_name(self.index)
    }

    /// How many of the events `0..end` are on this topic.
    pub fn events_before(&self, end: u64) -> u64 {
        match end.checked_sub(self.index) {
            None | Some(0) => 0,
            Some(after) => (after - 1) / self.count + 1,
        }
    }

    /// How many of the events `from..end` are on this topic.
    pub fn events_between(&self, from: u64, end: u64) -> u64 {
        self.events_before(end)
            .saturating_sub(self.events_before(from))
    }

    /// The last event of this topic among the first `published` ones (none when none of them
    /// is on it).
    pub fn last_of(&self, published: u64) -> Option<u64> {
        let last = published.checked_sub(1)?.checked_sub(self.index)?;
        Some(self.index + last / self.count * self.count)
    }
}

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
    /// Event `n` goes to topic `n % topics` (at least 1).
    pub topics: u64,
    pub pad: String,
}

/// Publishes from the warm-up on at `rate` events/s, event `n` due at `n / rate` s after the
/// start and routed to topic `n % topics`, until `stop`; `published` counts the events handed to the broker so far. Sends the
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
    let topics = settings.topics.max(1);
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
                topic_name(n % topics).as_str().into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of `0..end` on `topic`, counted one by one.
    fn by_hand(topic: Topic, from: u64, end: u64) -> Vec<u64> {
        (from..end)
            .filter(|n| n % topic.count == topic.index)
            .collect()
    }

    #[test]
    fn topic_arithmetic_matches_counting_by_hand() {
        for count in 1..=5 {
            for index in 0..count {
                let topic = Topic { index, count };
                for end in 0..30 {
                    let all = by_hand(topic, 0, end);
                    assert_eq!(
                        topic.events_before(end),
                        all.len() as u64,
                        "{topic:?} {end}"
                    );
                    assert_eq!(topic.last_of(end), all.last().copied(), "{topic:?} {end}");
                    for from in 0..=end {
                        assert_eq!(
                            topic.events_between(from, end),
                            by_hand(topic, from, end).len() as u64,
                            "{topic:?} {from}..{end}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn topics_are_named_and_assigned_round_robin() {
        assert_eq!(topic_name(3), "bench.3");
        assert_eq!(Topic::of(7, 5), Topic { index: 2, count: 5 });
        assert_eq!(Topic::of(7, 1), Topic::default());
        assert_eq!(Topic::of(7, 0), Topic::default());
        assert_eq!(Topic::of(7, 5).pattern(), "bench.2");
    }
}
