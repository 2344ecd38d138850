//! Two real event-service instances on one RabbitMQ, WebSocket clients on each, and events
//! published by an independent AMQP client (plain lapin, not the service): each event reaches
//! exactly the clients whose patterns match, the broker holds exactly the bindings the clients
//! need, and an event nobody on an instance wants never enters that instance's queue.
//!
//! Needs `EVENTROUTER_TEST_AMQP_URL` and `EVENTROUTER_TEST_RABBITMQ_MGMT_URL` (set by `tests/run`).

mod amqp_support;
mod support;

use std::time::Duration;

use amqp_support::{
    DEFAULT_VHOST, Management, Publisher, WAIT, amqp_config, amqp_url, encode_segment, management,
    unique, until,
};
use event_service::server::RunningServer;
use serde_json::{Value, json};
use support::Client;

async fn ready(server: &RunningServer) -> bool {
    support::get(&format!("{}/readyz", server.http_url()))
        .await
        .0
        == 200
}

/// Reads the next `event` frames until `n` arrived; returns their names.
async fn recv_events(client: &mut Client, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    while names.len() < n {
        let frame: Value = client.recv_json().await;
        assert_eq!(frame["op"], "event", "{frame}");
        names.push(frame["event"].as_str().expect("event name").to_owned());
    }
    names
}

async fn bindings_become(mgmt: &Management, exchange: &str, queue: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    until(
        &format!("bindings of {queue} to be {want:?}"),
        WAIT,
        || async {
            mgmt.routing_keys(DEFAULT_VHOST, exchange, queue)
                .await
                .expect("bindings")
                == want
        },
    )
    .await;
}

/// Messages the exchange received from publishers, as the broker's statistics count them.
async fn exchange_publish_in(mgmt: &Management, exchange: &str) -> u64 {
    mgmt.get(&format!(
        "exchanges/{}/{}",
        encode_segment(DEFAULT_VHOST),
        encode_segment(exchange)
    ))
    .await
    .expect("the exchange")
    .and_then(|e| e["message_stats"]["publish_in"].as_u64())
    .unwrap_or(0)
}

async fn queue_publish_count(mgmt: &Management, queue: &str) -> u64 {
    mgmt.queue(DEFAULT_VHOST, queue)
        .await
        .expect("queue")
        .and_then(|q| q["message_stats"]["publish"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_external_publish_reaches_exactly_the_matching_clients_on_two_instances() {
    let url = amqp_url();
    let mgmt = management();
    let exchange = unique("e2e");
    let (pod_a, pod_b) = (unique("router-a"), unique("router-b"));
    let (queue_a, queue_b) = (format!("{exchange}.{pod_a}"), format!("{exchange}.{pod_b}"));
    let a = RunningServer::start(amqp_config(&url, &exchange, &pod_a))
        .await
        .expect("instance A starts");
    let b = RunningServer::start(amqp_config(&url, &exchange, &pod_b))
        .await
        .expect("instance B starts");
    until("both instances ready", WAIT, || async {
        ready(&a).await && ready(&b).await
    })
    .await;

    let mut a_orders = Client::connect(&a).await;
    let mut a_users = Client::connect(&a).await;
    let mut b_created = Client::connect(&b).await;
    let mut b_billing = Client::connect(&b).await;
    a_orders.subscribe(1, &["order.*"]).await;
    a_users.subscribe(1, &["user.#"]).await;
    b_created.subscribe(1, &["order.created"]).await;
    b_billing
        .subscribe(1, &["billing.paid", "order.created"])
        .await;

    // `subscribed` means bound: the broker already holds every binding, and nothing else.
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &exchange, &queue_a)
            .await
            .expect("bindings"),
        vec!["order.*", "user.#"]
    );
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &exchange, &queue_b)
            .await
            .expect("bindings"),
        vec!["billing.paid", "order.created"],
        "two local subscribers of order.created share one binding"
    );

    let publisher = Publisher::connect(&url, &exchange)
        .await
        .expect("the test publisher connects");
    for (key, n) in [
        ("order.created", 1),
        ("user.7.message", 2),
        ("billing.paid", 3),
        ("order.shipped", 4),
        ("inventory.changed", 5), // nobody anywhere
        ("order.created.v2", 6),  // matches neither order.* nor order.created
    ] {
        publisher
            .publish_json(key, &json!({ "n": n }).to_string())
            .await
            .expect("the broker confirms");
    }

    assert_eq!(
        recv_events(&mut a_orders, 2).await,
        vec!["order.created", "order.shipped"]
    );
    assert_eq!(recv_events(&mut a_users, 1).await, vec!["user.7.message"]);
    assert_eq!(recv_events(&mut b_created, 1).await, vec!["order.created"]);
    assert_eq!(
        recv_events(&mut b_billing, 2).await,
        vec!["order.created", "billing.paid"]
    );
    // The broker routed into each instance's queue only what someone there subscribed to:
    // A got order.created, user.7.message, order.shipped; B got order.created, billing.paid.
    until("queue A counted 3 routed messages", WAIT, || async {
        queue_publish_count(&mgmt, &queue_a).await == 3
    })
    .await;
    until("queue B counted 2 routed messages", WAIT, || async {
        queue_publish_count(&mgmt, &queue_b).await == 2
    })
    .await;
    // The broker has routed everything it will (the positive signal): no client gets more.
    for client in [&mut a_orders, &mut a_users, &mut b_created, &mut b_billing] {
        client.expect_silence(Duration::from_millis(500)).await;
    }

    // Last unsubscribe removes the binding; a disconnect removes what that client alone held.
    a_orders
        .send_json(json!({"op":"unsubscribe","id":2,"events":["order.*"]}))
        .await;
    bindings_become(&mgmt, &exchange, &queue_a, &["user.#"]).await;
    drop(a_users);
    bindings_become(&mgmt, &exchange, &queue_a, &[]).await;
    drop(b_created);
    // Wait until B has handled the disconnect, then check that the binding it shared stayed.
    until("B to count the closed connection", WAIT, || async {
        support::metric(&b, "eventrouter_connections", "").await == 1.0
    })
    .await;
    assert_eq!(
        mgmt.routing_keys(DEFAULT_VHOST, &exchange, &queue_b)
            .await
            .expect("bindings"),
        vec!["billing.paid", "order.created"],
        "order.created is still held by another client on B"
    );
    drop(b_billing);
    bindings_become(&mgmt, &exchange, &queue_b, &[]).await;

    // With nothing bound, published events no longer enter A's queue at all.
    let published_before = exchange_publish_in(&mgmt, &exchange).await;
    publisher
        .publish_all(&[("order.created", "{}"), ("user.1", "{}")])
        .await
        .expect("the broker confirms");
    // The exchange counting both publishes is the broker's own sign that it routed them; the
    // queue's counter, from the same statistics, must not have moved.
    until("the exchange to count both publishes", WAIT, || async {
        exchange_publish_in(&mgmt, &exchange).await >= published_before + 2
    })
    .await;
    assert_eq!(queue_publish_count(&mgmt, &queue_a).await, 3);

    a.stop().await.expect("A stops");
    b.stop().await.expect("B stops");
    until(
        "both queues are gone with their instances",
        WAIT,
        || async {
            mgmt.queue(DEFAULT_VHOST, &queue_a)
                .await
                .expect("queue")
                .is_none()
                && mgmt
                    .queue(DEFAULT_VHOST, &queue_b)
                    .await
                    .expect("queue")
                    .is_none()
        },
    )
    .await;
}

#[tokio::test]
async fn post_publish_goes_through_the_broker_to_the_other_instance() {
    let url = amqp_url();
    let exchange = unique("e2e-pub");
    let a = RunningServer::start(amqp_config(&url, &exchange, &unique("pub-a")))
        .await
        .expect("instance A starts");
    let b = RunningServer::start(amqp_config(&url, &exchange, &unique("pub-b")))
        .await
        .expect("instance B starts");
    until("both instances ready", WAIT, || async {
        ready(&a).await && ready(&b).await
    })
    .await;
    let mut on_b = Client::connect(&b).await;
    on_b.subscribe(1, &["chat.*"]).await;

    support::publish_event(&a, "chat.hello", json!({"text": "hi"})).await;
    let frame = on_b.recv_json().await;
    assert_eq!(frame["op"], "event");
    assert_eq!(frame["event"], "chat.hello");
    assert_eq!(frame["data"], json!({"text": "hi"}));
    assert!(frame["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(
        support::metric(&a, "eventrouter_publish_confirms_total", "").await,
        1.0
    );
    assert_eq!(
        support::metric(&b, "eventrouter_events_received_total", r#"source="amqp""#).await,
        1.0
    );
    a.stop().await.expect("A stops");
    b.stop().await.expect("B stops");
}
