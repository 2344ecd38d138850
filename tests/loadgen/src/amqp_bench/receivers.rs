//! The workload's two ends: the publisher, and the receivers that get the identical workload — a
//! bare lapin consumer with the service's queue arguments, prefetch and ack policy (run in this
//! process or, through [`super::process`], in one of its own), and a WebSocket client of the
//! service. The minimal consumer is in [`super::minimal`].

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio_tungstenite::tungstenite::Message;

use super::service::Service;
use super::{
    ACK_IDLE, IDLE_END, QUEUE_MAX_LENGTH, QUEUE_TTL_MS, Received, body, now_micros, sent_micros,
};

pub(super) fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::try_from(QUEUE_MAX_LENGTH).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(QUEUE_TTL_MS));
    args
}

/// Publishes `n` events to `exchange` as fast as the broker takes them (no confirms: the broker's
/// own flow control paces the publisher), or at `rate` per second when given.
pub(super) async fn publish(
    channel: &Channel,
    exchange: &str,
    n: u64,
    rate: Option<u64>,
    pad: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let tick = Duration::from_millis(5);
    let per_tick = rate.map(|r| (r * 5 / 1000).max(1));
    let mut interval = tokio::time::interval(tick);
    let mut seq = 0;
    while seq < n {
        if let Some(per_tick) = per_tick {
            interval.tick().await;
            for _ in 0..per_tick.min(n - seq) {
                publish_one(channel, exchange, seq, pad).await?;
                seq += 1;
            }
        } else {
            publish_one(channel, exchange, seq, pad).await?;
            seq += 1;
        }
    }
    Ok(started.elapsed())
}

async fn publish_one(channel: &Channel, exchange: &str, seq: u64, pad: &str) -> anyhow::Result<()> {
    let key = if seq.is_multiple_of(2) {
        "bench.even"
    } else {
        "bench.odd"
    };
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            &body(seq, pad),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .context("publishing")?;
    Ok(())
}

/// The bare consumer: a lapin consumer with the service's queue arguments, prefetch and batched
/// `multiple` acks, doing nothing with the messages but counting them.
pub(super) async fn bare_consumer(
    connection: &Connection,
    exchange: &str,
    prefetch: u16,
    latency: bool,
) -> anyhow::Result<(
    tokio::task::JoinHandle<Received>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            queue_args(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "bench.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let ack_every = u64::from(prefetch / 4).max(1);
    let task = tokio::spawn(async move {
        let _ = ready_tx.send(());
        let mut got = Received::default();
        let mut pending = 0;
        let mut last_acker: Option<lapin::Acker> = None;
        loop {
            // The service's ack policy: every quarter prefetch, and after ACK_IDLE with nothing
            // ready.
            // A pending acker taken here is superseded by the next delivery's.
            let ready = match last_acker.take() {
                None => None,
                Some(acker) => match tokio::time::timeout(ACK_IDLE, consumer.next()).await {
                    Ok(next) => Some(next),
                    Err(_) => {
                        pending = 0;
                        let _ = acker.ack(BasicAckOptions { multiple: true }).await;
                        None
                    }
                },
            };
            let next = match ready {
                Some(next) => next,
                None => match tokio::time::timeout(IDLE_END, consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some(Ok(delivery)) = next else { break };
            let at = Instant::now();
            got.note(at);
            if latency
                && let Some(sent) = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(sent_micros)
            {
                got.latencies_us.push(now_micros().saturating_sub(sent));
            }
            last_acker = Some(delivery.acker);
            pending += 1;
            if pending >= ack_every
                && let Some(acker) = last_acker.take()
            {
                pending = 0;
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            }
        }
        let _ = channel.close(200, "done".into()).await;
        got
    });
    Ok((task, ready_rx))
}

/// A WebSocket client on the service subscribed to `bench.#`, counting event frames.
pub(super) async fn ws_receiver(
    service: &Service,
    latency: bool,
) -> anyhow::Result<tokio::task::JoinHandle<Received>> {
    let (mut ws, _) = tokio_tungstenite::connect_async(service.ws.as_str())
        .await
        .context("connecting the WebSocket client")?;
    ws.send(Message::text(
        r#"{"op":"subscribe","id":1,"events":["bench.#"]}"#,
    ))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => break,
            Some(Ok(Message::Text(t))) => bail!("unexpected answer to subscribe: {t}"),
            Some(Ok(_)) => continue,
            other => bail!("the WebSocket closed before subscribing: {other:?}"),
        }
    }
    Ok(tokio::spawn(async move {
        let mut got = Received::default();
        loop {
            match tokio::time::timeout(IDLE_END, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    got.note(Instant::now());
                    if latency && let Some(sent) = sent_micros(t.as_str()) {
                        got.latencies_us.push(now_micros().saturating_sub(sent));
                    }
                }
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
        }
        let _ = ws.close(None).await;
        got
    }))
}
