//! Heartbeats over the control exchange: where the instances of one router tell each other
//! their load.
//!
//! A channel of its own on the session's connection, so nothing here can close the channels
//! events flow on: the router's control exchange (a durable `fanout`, declared by the operator
//! with the rest of the topology, or checked passively unless `--declare-exchange`), and a
//! server-named, exclusive, auto-delete queue bound to it, consumed without acknowledgements (a
//! lost heartbeat is replaced by the next one). The queue is bounded (length and message TTL),
//! so a stalled instance never piles up heartbeats.
//!
//! A failure here never takes the event path down: the session stays up, the rebalancer stops
//! hearing its own heartbeat and holds (`not_heard`), and the next session tries again.

use std::{convert::Infallible, sync::OnceLock};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, Consumer, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Heartbeats waiting in this instance's control queue at most: far more than a fleet sends in
/// one interval; beyond it the oldest are dropped (the newest are the ones that matter).
const QUEUE_MAX_LENGTH: i64 = 4096;
/// A heartbeat older than this is useless (peers expire after three intervals).
const MESSAGE_TTL_MS: i64 = 30_000;

/// The open control channel and its consumer.
pub(super) struct HeartbeatLink {
    pub channel: Channel,
    pub consumer: Consumer,
}

/// Declares (or checks) the control exchange, declares and binds this instance's control queue,
/// and starts consuming it.
pub(super) async fn open(
    connection: &Connection,
    exchange: &str,
    declare: bool,
) -> Result<HeartbeatLink, lapin::Error> {
    let channel = connection.create_channel().await?;
    let exchange_name = ShortString::from(exchange);
    channel
        .exchange_declare(
            exchange_name.clone(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: !declare,
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(QUEUE_MAX_LENGTH),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head")),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(MESSAGE_TTL_MS),
    );
    let queue = channel
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                durable: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange_name,
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            ShortString::from(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    debug!(exchange, queue = %queue.name(), "control channel open");
    Ok(HeartbeatLink { channel, consumer })
}

/// Publishes one heartbeat. Not confirmed: the next heartbeat replaces a lost one.
pub(super) async fn publish(
    channel: &Channel,
    exchange: &str,
    body: &[u8],
) -> Result<(), lapin::Error> {
    channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(""),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_content_type(ShortString::from("application/json")),
        )
        .await
        .map(drop)
}

/// Hands every message of the control queue to `inbox` once it is attached (dropping it when the
/// inbox is full: the rebalancer is behind and the next heartbeat will do). Never returns: when
/// the consumer ends, it says so once and waits for the session to be replaced.
pub(super) async fn forward(
    consumer: &mut Consumer,
    inbox: &OnceLock<mpsc::Sender<Vec<u8>>>,
) -> Infallible {
    while let Some(delivery) = consumer.next().await {
        match delivery {
            Ok(delivery) => {
                if let Some(inbox) = inbox.get() {
                    let _ = inbox.try_send(delivery.data);
                }
            }
            Err(error) => {
                warn!(%error, "the control channel failed; rebalancing holds until the next session");
                break;
            }
        }
    }
    std::future::pending().await
}
