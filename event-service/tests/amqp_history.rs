//! Missed-event recovery from RabbitMQ: the router's stream keeps the history, and a client that
//! reconnects to *another* instance with `since` receives exactly the events it missed, then live
//! ones, while events keep being published. An id the stream does not have (unknown, or removed by
//! retention) answers `recovered: false`; a broker restart during a recovery never yields a
//! silent gap.
//!
//! Needs `EVENTROUTER_TEST_AMQP_URL` and `EVENTROUTER_TEST_RABBITMQ_MGMT_URL` (set by `tests/run`);
//! the restart test starts a node of its own with `tests/infra/rabbitmq.sh`.

mod amqp_support;
mod support;

use std::time::{Duration, SystemTime};

use amqp_support::{
    DEFAULT_VHOST, Publisher, RabbitNode, WAIT, amqp_config, amqp_url, management, unique, until,
};
use event_service::{config::Config, server::RunningServer};
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use support::Client;

async fn ready(server: &RunningServer) -> bool {
    support::get(&format!("{}/readyz", server.http_url()))
        .await
        .0
        == 200
}

fn history_config(url: &str, exchange: &str, pod: &str) -> Config {
    let mut config = amqp_config(url, exchange, pod);
    config.history_stream = Some(format!("{exchange}.history"));
    config.idle_timeout = Duration::from_secs(600);
    config
}

async fn start_ready(config: Config) -> RunningServer {
    let server = RunningServer::start(config)
        .await
        .expect("the service starts");
    until("the instance is ready", WAIT, || async {
        ready(&server).await
    })
    .await;
    server
}

async fn subscribe_since(c: &mut Client, id: u64, events: &[&str], since: &str) -> Value {
    c.send_json(json!({"op":"subscribe","id":id,"events":events,"since":since}))
        .await;
    let reply = c.recv_json().await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

async fn next_n(c: &mut Client) -> (u64, String) {
    let ev = c.recv_json().await;
    assert_eq!(ev["op"], "event", "{ev}");
    (
        ev["data"]["n"].as_u64().expect("numbered event"),
        ev["id"].as_str().expect("event id").to_owned(),
    )
}

/// Properties a backend publishing straight to RabbitMQ sets for its events to be recoverable.
fn recoverable(id: &str) -> BasicProperties {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    BasicProperties::default()
        .with_message_id(id.into())
        .with_timestamp(secs)
        .with_content_type("application/json".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_another_instance_replays_exactly_the_missed_events_while_publishing_goes_on()
 {
    let url = amqp_url();
    let exchange = unique("history");
    let a = start_ready(history_config(&url, &exchange, &unique("router-a"))).await;
    let b = start_ready(history_config(&url, &exchange, &unique("router-b"))).await;
    let stream = management()
        .queue(DEFAULT_VHOST, &format!("{exchange}.history"))
        .await
        .expect("management API")
        .expect("the stream exists");
    assert_eq!(stream["type"], "stream", "{stream}");

    // One backend publishing straight to RabbitMQ, numbered events, one at a time.
    let total: u64 = 1500;
    let publisher = Publisher::connect(&url, &exchange)
        .await
        .expect("the test publisher connects");
    let mut first = Client::connect(&a).await;
    first.subscribe(1, &["order.#"]).await;
    let publishing = tokio::spawn(async move {
        for n in 0..total {
            let id = uuid::Uuid::now_v7().to_string();
            let name = if n % 3 == 0 {
                "order.created"
            } else {
                "order.paid"
            };
            publisher
                .publish(
                    name,
                    json!({"n": n}).to_string().as_bytes(),
                    recoverable(&id),
                )
                .await
                .expect("the broker confirms");
            // Not subscribed: never replayed.
            if n % 10 == 0 {
                publisher
                    .publish_json("user.1.seen", &json!({"n": 100_000 + n}).to_string())
                    .await
                    .expect("the broker confirms");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    // Leave and come back, alternating instances, while the publisher goes on.
    let servers = [&a, &b];
    let mut client = first;
    let mut expected = 0u64;
    for round in 0..6usize {
        let mut last = String::new();
        for _ in 0..(60 + round * 31) {
            let (n, id) = next_n(&mut client).await;
            assert_eq!(n, expected, "round {round}: every event once, in order");
            expected += 1;
            last = id;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(50 * round as u64)).await;
        client = Client::connect(servers[(round + 1) % 2]).await;
        let reply = subscribe_since(&mut client, 10 + round as u64, &["order.#"], &last).await;
        assert_eq!(reply["recovered"], true, "round {round}: {reply}");
    }
    while expected < total {
        let (n, _) = next_n(&mut client).await;
        assert_eq!(
            n, expected,
            "every event once, in order, across every switch"
        );
        expected += 1;
    }
    publishing.await.expect("publisher");
    client.expect_silence(Duration::from_millis(500)).await;

    // Events published through the service's own POST /publish carry ids that recover too.
    let mut c = Client::connect(&a).await;
    c.subscribe(1, &["audit.*"]).await;
    let (status, body) =
        support::publish(&b, json!({"event":"audit.x","data":{"n":0}}).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let (_, since) = next_n(&mut c).await;
    drop(c);
    let events: Vec<Value> = (1..=3)
        .map(|n| json!({"event":"audit.x","data":{"n":n}}))
        .collect();
    let (status, body) = support::publish(&a, Value::Array(events).to_string()).await;
    assert_eq!(status, 202, "{body}");
    let mut c = Client::connect(&b).await;
    let reply = subscribe_since(&mut c, 2, &["audit.*"], &since).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 1..=3 {
        assert_eq!(next_n(&mut c).await.0, n);
    }
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_id_the_stream_does_not_have_answers_recovered_false_and_subscribes_live() {
    let url = amqp_url();
    let exchange = unique("history-unknown");
    let server = start_ready(history_config(&url, &exchange, &unique("router"))).await;
    let mut c = Client::connect(&server).await;
    for (i, since) in [
        uuid::Uuid::now_v7().to_string(),
        "not-a-uuid".to_owned(),
        "9b2d3c1e-8f4a-4c2b-9d3e-1a2b3c4d5e6f".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        // A pattern the connection does not hold yet each time (held ones are live already).
        let pattern = format!("a{i}.#");
        let reply = subscribe_since(&mut c, 1, &[pattern.as_str()], since).await;
        assert_eq!(reply["recovered"], false, "{since}: {reply}");
    }
    let (status, _) =
        support::publish(&server, json!({"event":"a1.b","data":{"n":7}}).to_string()).await;
    assert_eq!(status, 202);
    assert_eq!(next_n(&mut c).await.0, 7, "subscribed live all the same");
}

/// Declares a stream whose retention removes old segments quickly.
async fn declare_short_stream(url: &str, exchange: &str, stream: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    amqp_support::declare_topic_exchange(&channel, exchange)
        .await
        .expect("exchange");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert("x-max-age".into(), AMQPValue::LongString("2s".into()));
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(2000),
    );
    channel
        .queue_declare(
            stream.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("stream");
    channel
        .queue_bind(
            stream.into(),
            exchange.into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_event_removed_by_retention_answers_recovered_false() {
    let url = amqp_url();
    let exchange = unique("history-retention");
    let stream = format!("{exchange}.history");
    declare_short_stream(&url, &exchange, &stream).await;
    let mut config = history_config(&url, &exchange, &unique("router"));
    config.declare_exchange = false;
    // The in-memory window keeps events no longer than this; older ones come from the stream.
    config.history_max_age = Duration::from_secs(1);
    let server = start_ready(config).await;

    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["r.*"]).await;
    let (status, _) =
        support::publish(&server, json!({"event":"r.x","data":{"n":0}}).to_string()).await;
    assert_eq!(status, 202);
    let (_, old) = next_n(&mut c).await;
    drop(c);
    // Still there: recovers.
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 1, &["r.*"], &old).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    drop(c);

    // Past the 2 s age, and enough new segments for retention to remove the old one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pad = "x".repeat(500);
    until(
        "retention removes the first segment",
        Duration::from_secs(60),
        || {
            let (server, pad, old) = (&server, &pad, &old);
            async move {
                let events: Vec<Value> = (0..20)
                    .map(|n| json!({"event":"other","data":{"n":n,"pad":pad}}))
                    .collect();
                let (status, _) = support::publish(server, Value::Array(events).to_string()).await;
                assert_eq!(status, 202);
                let mut c = Client::connect(server).await;
                let reply = subscribe_since(&mut c, 2, &["r.*"], old).await;
                reply["recovered"] == false
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_broker_restart_during_recoveries_never_leaves_a_silent_gap() {
    let node = RabbitNode::start("amqp-history")
        .await
        .expect("a dedicated RabbitMQ node");
    let exchange = unique("history-restart");
    let server = start_ready(history_config(
        node.amqp_url(),
        &exchange,
        &unique("router"),
    ))
    .await;
    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["big.*"]).await;
    let (status, _) =
        support::publish(&server, json!({"event":"big.x","data":{"n":0}}).to_string()).await;
    assert_eq!(status, 202);
    let (_, since) = next_n(&mut c).await;
    drop(c);
    // A long history to read: 20,000 events, 5,000 of them wanted.
    for chunk in 0..20u64 {
        let events: Vec<Value> = (0..1000u64)
            .map(|i| {
                let n = chunk * 1000 + i + 1;
                let name = if n % 4 == 0 { "big.x" } else { "noise.y" };
                json!({"event":name,"data":{"n":n}})
            })
            .collect();
        let (status, body) = support::publish(&server, Value::Array(events).to_string()).await;
        assert_eq!(status, 202, "{body}");
    }
    let want: Vec<u64> = (1..=20_000u64).filter(|n| n % 4 == 0).collect();

    // Recoveries start; the broker restarts under them.
    let mut clients = Vec::new();
    for i in 0..5u64 {
        let mut c = Client::connect(&server).await;
        c.send_json(json!({"op":"subscribe","id":i,"events":["big.*"],"since":since}))
            .await;
        clients.push(c);
    }
    node.restart().await.expect("the broker restarts");
    for mut c in clients {
        let reply = c.recv_json().await;
        eprintln!("during the restart: {reply}");
        match reply["op"].as_str() {
            // Recovered: every missed event, in order, exactly once.
            Some("subscribed") if reply["recovered"] == true => {
                for &n in &want {
                    assert_eq!(next_n(&mut c).await.0, n, "{reply}");
                }
            }
            // Or told so: recovered false, or the subscribe failed with an error.
            Some("subscribed") => assert_eq!(reply["recovered"], false, "{reply}"),
            Some("error") => assert_eq!(reply["code"], "unavailable", "{reply}"),
            _ => panic!("unexpected reply {reply}"),
        }
    }
    // Once the broker is back, the same `since` recovers everything.
    until(
        "the instance is ready again",
        Duration::from_secs(90),
        || async { ready(&server).await },
    )
    .await;
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 9, &["big.*"], &since).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for &n in &want {
        assert_eq!(next_n(&mut c).await.0, n);
    }
}

#[tokio::test]
async fn a_gap_over_the_bounds_answers_recovered_false() {
    let url = amqp_url();
    let exchange = unique("history-bounds");
    let mut config = history_config(&url, &exchange, &unique("router"));
    config.history_max_bytes = 64 * 1024;
    config.recovery_max_events = 50;
    let server = start_ready(config).await;
    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["g.*"]).await;
    let (status, _) =
        support::publish(&server, json!({"event":"g.x","data":{"n":0}}).to_string()).await;
    assert_eq!(status, 202);
    let (_, since) = next_n(&mut c).await;
    drop(c);

    // 60 matching events: over the 50 one recovery replays.
    let events: Vec<Value> = (1..=60)
        .map(|n| json!({"event":"g.x","data":{"n":n}}))
        .collect();
    let (status, _) = support::publish(&server, Value::Array(events).to_string()).await;
    assert_eq!(status, 202);
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 2, &["g.*"], &since).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    drop(c);

    // Then 1,000 other events of ~200 bytes: over the 64 KiB window.
    let pad = "y".repeat(200);
    let events: Vec<Value> = (0..1000)
        .map(|n| json!({"event":"other","data":{"n":n,"pad":pad}}))
        .collect();
    let (status, _) = support::publish(&server, Value::Array(events).to_string()).await;
    assert_eq!(status, 202);
    let mut c = Client::connect(&server).await;
    // A pattern that matches none of them: still over the window, which holds every event.
    let reply = subscribe_since(&mut c, 3, &["nothing.*"], &since).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    let text = support::metrics_text(&server).await;
    assert_eq!(
        support::metric_value(&text, "eventrouter_recoveries_total", "result=\"too_many\""),
        Some(2.0),
        "{text}"
    );
}
