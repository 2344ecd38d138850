//! The AMQP source on its own against a real RabbitMQ: bindings on the broker follow bind/unbind,
//! only bound events enter the queue, publishes are confirmed and carry the event's properties,
//! malformed messages are counted and dropped while good ones flow, and an unreachable broker is
//! reported, not fatal.
//!
//! Needs `EVENTROUTER_TEST_AMQP_URL` and `EVENTROUTER_TEST_RABBITMQ_MGMT_URL` (set by `tests/run`).

mod amqp_support;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use amqp_support::{
    Collector, DEFAULT_VHOST, Publisher, WAIT, amqp_url, management, metric, unique, until,
};
use bytes::Bytes;
use event_service::{
    config::Config,
    event::Event,
    source::{SourceError, amqp::AmqpSource},
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;

struct Started {
    source: Arc<AmqpSource>,
    sink: Arc<Collector>,
    registry: prometheus::Registry,
    exchange: String,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_source(url: &str, tweak: impl FnOnce(&mut Config)) -> Started {
    let exchange = unique("amqp-test");
    let mut config = Config::for_tests();
    config.amqp_url = Some(url.to_owned());
    config.exchange = exchange.clone();
    config.declare_exchange = true;
    config.pod_name = Some(unique("pod"));
    tweak(&mut config);
    let sink = Collector::new();
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    let source = AmqpSource::start(
        &config,
        Arc::<Collector>::downgrade(&sink),
        &registry,
        shutdown.clone(),
    )
    .await
    .expect("valid configuration");
    Started {
        source,
        sink,
        registry,
        exchange,
        _stop: shutdown.drop_guard(),
    }
}

async fn until_up(source: &AmqpSource) {
    until("the source is up", WAIT, || async { source.is_up() }).await;
}

/// Waits until the source has counted a failed connection attempt: the positive signal that it
/// tried and failed, before a test asserts that it is (still) down.
async fn until_a_connect_failure(registry: &prometheus::Registry) {
    until("a failed connection attempt is counted", WAIT, || async {
        metric(registry, "eventrouter_broker_connect_failures_total", None) >= 1.0
    })
    .await;
}

#[tokio::test]
async fn bindings_on_the_broker_follow_bind_and_unbind_and_only_bound_events_arrive() {
    let url = amqp_url();
    let mgmt = management();
    let s = start_source(&url, |_| {}).await;
    until_up(&s.source).await;
    let queue = s.source.queue_name().to_owned();
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &s.exchange, &queue)
            .await
            .expect("bindings"),
        Vec::<String>::new(),
        "a fresh queue has no bindings"
    );

    s.source.bind("order.*").await.expect("bind order.*");
    s.source.bind("user.#").await.expect("bind user.#");
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &s.exchange, &queue)
            .await
            .expect("bindings"),
        vec!["order.*", "user.#"],
        "bind returns only once the broker holds the binding"
    );

    let publisher = Publisher::connect(&url, &s.exchange)
        .await
        .expect("the test publisher connects");
    publisher
        .publish_all(&[
            ("billing.paid", r#"{"n":0}"#), // nobody bound
            ("order.created", r#"{"n":1}"#),
            ("order.created.late", r#"{"n":2}"#), // '*' is one word
            ("user.42.notification", r#"{"n":3}"#),
        ])
        .await
        .expect("the broker confirms");
    let events = s.sink.wait_for(2).await;
    // The queue never saw the unbound events: the broker counted exactly two messages into it,
    // so no third one can still arrive.
    until("the queue's publish counter", WAIT, || async {
        mgmt.queue(DEFAULT_VHOST, &queue)
            .await
            .expect("queue")
            .and_then(|q| q["message_stats"]["publish"].as_u64())
            == Some(2)
    })
    .await;

    assert_eq!(
        s.sink.names(),
        vec!["order.created", "user.42.notification"]
    );
    assert_eq!(events[0].data, Bytes::from_static(br#"{"n":1}"#));

    s.source.unbind("order.*").await.expect("unbind");
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &s.exchange, &queue)
            .await
            .expect("bindings"),
        vec!["user.#"]
    );
    assert_eq!(s.source.bound_patterns(), vec!["user.#"]);
    publisher
        .publish_all(&[("order.created", r#"{"n":4}"#), ("user.1", r#"{"n":5}"#)])
        .await
        .expect("the broker confirms");
    s.sink.wait_for(3).await;
    // Only user.1 entered the queue (three messages in all), so nothing else can still arrive.
    until("the queue's publish counter", WAIT, || async {
        mgmt.queue(DEFAULT_VHOST, &queue)
            .await
            .expect("queue")
            .and_then(|q| q["message_stats"]["publish"].as_u64())
            == Some(3)
    })
    .await;
    assert_eq!(
        s.sink.names(),
        vec!["order.created", "user.42.notification", "user.1"]
    );
}

#[tokio::test]
async fn publish_is_confirmed_and_carries_the_event_properties() {
    let url = amqp_url();
    let s = start_source(&url, |_| {}).await;
    until_up(&s.source).await;

    // An independent consumer on the same exchange sees exactly what the source published.
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare a private queue");
    channel
        .queue_bind(
            q.name().clone(),
            s.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind #");
    let mut consumer = channel
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let time = UNIX_EPOCH + Duration::from_millis(1_800_000_000_456);
    let events = vec![
        Event {
            name: "order.created".into(),
            id: "evt-1".into(),
            time,
            data: Bytes::from_static(br#"{"order":1}"#),
        },
        Event::new("order.paid", Bytes::from_static(b"[true]")),
    ];
    let n = s.source.publish(events).await.expect("confirmed publish");
    assert_eq!(n, 2);
    assert_eq!(
        metric(&s.registry, "eventrouter_publish_confirms_total", None),
        2.0
    );

    let first = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a message in time")
        .expect("stream open")
        .expect("a delivery");
    first.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(first.routing_key.as_str(), "order.created");
    assert_eq!(first.data, br#"{"order":1}"#);
    let p = &first.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("evt-1"));
    assert_eq!(p.timestamp(), &Some(1_800_000_000));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        p.headers()
            .as_ref()
            .and_then(|h| h.inner().get("timestamp_in_ms").cloned()),
        Some(AMQPValue::LongLongInt(1_800_000_000_456))
    );
    let second = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a second message in time")
        .expect("stream open")
        .expect("a delivery");
    assert_eq!(second.routing_key.as_str(), "order.paid");

    // And the source's own consumer turns such a message back into the same event.
    s.source.bind("order.created").await.expect("bind");
    let again = Event {
        name: "order.created".into(),
        id: "evt-2".into(),
        time,
        data: Bytes::from_static(br#"{"order":2}"#),
    };
    s.source.publish(vec![again]).await.expect("publish");
    let got = s.sink.wait_for(1).await;
    assert_eq!(got[0].id, "evt-2");
    assert_eq!(
        got[0].time, time,
        "millisecond publish time survives the trip"
    );
    assert_eq!(got[0].data, Bytes::from_static(br#"{"order":2}"#));
}

#[tokio::test]
async fn malformed_messages_are_counted_and_dropped_while_good_ones_flow() {
    let url = amqp_url();
    let s = start_source(&url, |c| c.max_publish_bytes = 1024).await;
    until_up(&s.source).await;
    s.source.bind("#").await.expect("bind #");
    let publisher = Publisher::connect(&url, &s.exchange)
        .await
        .expect("the test publisher connects");

    for i in 0..5 {
        publisher
            .publish_all(&[
                ("good.one", format!(r#"{{"i":{i}}}"#).as_str()),
                ("bad.json", "{not json"),
            ])
            .await
            .expect("the broker confirms");
        publisher
            .publish(
                "bad.size",
                format!("\"{}\"", "x".repeat(2000)).as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("the broker confirms");
        publisher
            .publish_json("", r#"{"empty":"key"}"#)
            .await
            .expect("the broker confirms");
    }
    publisher
        .publish_json("good.last", r#"{"last":true}"#)
        .await
        .expect("the broker confirms");

    let events = s.sink.wait_for(6).await;
    // Every malformed message was counted, so all 21 were handled: no late event can arrive.
    until("malformed counters", WAIT, || async {
        let m = |reason| {
            metric(
                &s.registry,
                "eventrouter_malformed_messages_total",
                Some(("reason", reason)),
            )
        };
        m("invalid_json") == 5.0 && m("too_large") == 5.0 && m("empty_routing_key") == 5.0
    })
    .await;
    let names = s.sink.names();
    assert_eq!(names.len(), 6, "only the good messages arrive: {names:?}");
    assert!(names[..5].iter().all(|n| n == "good.one"));
    assert_eq!(names[5], "good.last");
    assert_eq!(events[4].data, Bytes::from_static(br#"{"i":4}"#));
    assert!(
        s.source.is_up(),
        "malformed input never takes the source down"
    );
    // Dropped means acknowledged: nothing is left waiting in the queue.
    let mgmt = management();
    until("the queue to be drained", WAIT, || async {
        mgmt.queue(DEFAULT_VHOST, s.source.queue_name())
            .await
            .expect("queue")
            .is_some_and(|q| q["messages"].as_u64() == Some(0))
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_broker_is_reported_not_fatal() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let s = start_source(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), |_| {}).await;
    until_a_connect_failure(&s.registry).await;
    assert!(!s.source.is_up());
    assert_eq!(metric(&s.registry, "eventrouter_broker_up", None), 0.0);
    assert!(matches!(
        s.source.bind("a.b").await,
        Err(SourceError::Unavailable(_))
    ));
    assert!(
        s.source.bound_patterns().is_empty(),
        "a failed bind is not recorded"
    );
    assert!(matches!(
        s.source
            .publish(vec![Event::new("a.b", Bytes::from_static(b"1"))])
            .await,
        Err(SourceError::Unavailable(_))
    ));
    assert_eq!(
        metric(
            &s.registry,
            "eventrouter_publish_failures_total",
            Some(("reason", "unavailable"))
        ),
        1.0
    );
    assert!(s.source.unbind("a.b").await.is_ok());
}

#[tokio::test]
async fn a_missing_exchange_keeps_the_source_down_until_it_exists() {
    let url = amqp_url();
    let s = start_source(&url, |c| c.declare_exchange = false).await;
    until_a_connect_failure(&s.registry).await;
    assert!(
        !s.source.is_up(),
        "without --declare-exchange the source waits for the operator's exchange"
    );
    // The operator declares it: the next retry succeeds.
    let _publisher = Publisher::connect(&url, &s.exchange)
        .await
        .expect("the test publisher connects");
    until(
        "the source is up once the exchange exists",
        Duration::from_secs(40),
        || async { s.source.is_up() },
    )
    .await;
    s.source.bind("x.y").await.expect("bind");
}
