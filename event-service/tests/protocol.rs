//! The wire protocol over real sockets: subscribe/unsubscribe, exact and wildcard patterns, acks,
//! per-connection order, app-level and WebSocket pings, and the publish API's answers.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{Client, publish, publish_event, start};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn subscribe_receive_unsubscribe() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    let ack = c.subscribe(1, &["order.created"]).await;
    assert_eq!(ack["events"], json!(["order.created"]));

    publish_event(&server, "order.created", json!({"id": 7, "s": "x"})).await;
    let ev = c.recv_json().await;
    assert_eq!(ev["op"], "event");
    assert_eq!(ev["event"], "order.created");
    assert_eq!(ev["data"], json!({"id": 7, "s": "x"}));
    assert!(ev["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(ev["time"].as_str().is_some_and(|s| s.ends_with('Z')));

    // Events nobody subscribed to are not delivered.
    publish_event(&server, "order.deleted", json!(1)).await;
    c.send_json(json!({"op":"unsubscribe","id":2,"events":["order.created"]}))
        .await;
    let ack = c.recv_json().await;
    assert_eq!(
        ack,
        json!({"op":"unsubscribed","id":2,"events":["order.created"]})
    );
    publish_event(&server, "order.created", json!(2)).await;
    // Positive signal instead of a quiet period: events keep publish order on a connection, so
    // when an event published afterwards arrives next, nothing was delivered before it.
    c.subscribe(3, &["order.done"]).await;
    publish_event(&server, "order.done", json!(3)).await;
    let ev = c.recv_json().await;
    assert_eq!(
        (&ev["event"], &ev["data"]),
        (&json!("order.done"), &json!(3)),
        "no order.deleted and no order.created after the unsubscribe: {ev}"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn wildcard_patterns_follow_rabbitmq_topic_rules() {
    let server = start(|_| {}).await;
    // (pattern, names that must arrive, names that must not)
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "user.*.notification",
            &["user.42.notification"],
            &["user.notification", "user.4.2.notification"],
        ),
        (
            "order.#",
            &["order", "order.created", "order.eu.created"],
            &["orders.created"],
        ),
        ("#", &["a", "a.b.c"], &[]),
        ("a.#.b", &["a.b", "a.x.b", "a.x.y.b"], &["a.x.c", "b.a"]),
        ("*", &["solo"], &["two.words"]),
        ("#.end", &["end", "x.y.end"], &["end.x"]),
    ];
    for (i, (pattern, yes, no)) in cases.iter().enumerate() {
        let mut c = Client::connect(&server).await;
        c.subscribe(i as u64, &[pattern]).await;
        for name in no.iter().chain(yes.iter()) {
            publish_event(&server, name, json!(name)).await;
        }
        for name in yes.iter() {
            let ev = c.recv_json().await;
            assert_eq!(ev["event"], *name, "pattern {pattern}");
        }
        c.expect_silence(Duration::from_millis(200)).await;
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn overlapping_patterns_deliver_once_and_events_keep_publish_order() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    let ack = c.subscribe(1, &["seq.*", "seq.n", "#"]).await;
    assert_eq!(ack["events"], json!(["seq.*", "seq.n", "#"]));
    let batch: Vec<_> = (0..200)
        .map(|n| json!({"event":"seq.n","data":n}))
        .collect();
    let (status, body) = publish(&server, serde_json::Value::Array(batch).to_string()).await;
    assert_eq!((status, body), (202, json!({"accepted": 200})));
    for n in 0..200 {
        let ev = c.recv_json().await;
        assert_eq!(ev["data"], n, "in publish order, once each");
    }
    c.expect_silence(Duration::from_millis(200)).await;
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn app_ping_gets_pong_and_websocket_ping_gets_pong() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    c.send_json(json!({"op":"ping","id":"abc"})).await;
    assert_eq!(c.recv_json().await, json!({"op":"pong","id":"abc"}));
    c.send_json(json!({"op":"ping"})).await;
    assert_eq!(c.recv_json().await, json!({"op":"pong"}));

    c.ws.send(Message::Ping(b"hello"[..].into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(support::WAIT, c.ws.next())
        .await
        .expect("pong in time")
        .expect("open")
        .expect("ok");
    assert_eq!(pong, Message::Pong(b"hello"[..].into()));
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn server_pings_on_its_interval() {
    let server = start(|c| c.ping_interval = Duration::from_millis(100)).await;
    let mut c = Client::connect(&server).await;
    let msg = tokio::time::timeout(Duration::from_secs(3), c.ws.next())
        .await
        .expect("a ping within 3 s")
        .expect("open")
        .expect("ok");
    assert!(matches!(msg, Message::Ping(_)), "{msg:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn subscription_errors_are_error_ops_and_the_connection_carries_on() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    c.send_json(json!({"op":"subscribe","id":1,"events":["bad..pattern"]}))
        .await;
    let err = c.recv_json().await;
    assert_eq!(err["op"], "error");
    assert_eq!(err["code"], "invalid_pattern");
    assert_eq!(err["id"], 1);
    c.send_json(json!({"op":"subscribe","id":2,"events":["order*"]}))
        .await;
    assert_eq!(c.recv_json().await["code"], "invalid_pattern");
    c.subscribe(3, &["ok.*"]).await;
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn publish_api_answers() {
    let server = start(|_| {}).await;
    let (s, b) = publish(&server, r#"{"event":"a.b","data":{"x":1}}"#).await;
    assert_eq!((s, b), (202, json!({"accepted": 1})));
    for (body, needle) in [
        ("not json", "invalid JSON"),
        (r#"{"event":"a..b","data":1}"#, "bad event name"),
        (r#"{"event":"a.*","data":1}"#, "bad event name"),
        (r#"{"event":"a.b"}"#, "missing \"data\""),
        (r#"{"data":1}"#, "missing \"event\""),
    ] {
        let (s, b) = publish(&server, body).await;
        assert_eq!(s, 400, "{body}");
        let msg = b["error"].as_str().expect("error message");
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let (status, ready) = support::get(&format!("{}/readyz", server.http_url())).await;
    assert_eq!((status, ready.trim()), (200, "ready"));
    let (status, _) = support::get(&format!("{}/healthz", server.http_url())).await;
    assert_eq!(status, 200);
    let (status, _) = support::get(&format!("{}/nope", server.http_url())).await;
    assert_eq!(status, 404);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_request_larger_than_the_read_buffer_is_read_whole() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    // 100 patterns of ~200 bytes: a ~20 KiB frame, ten times the per-connection read buffer.
    let patterns: Vec<String> = (0..100)
        .map(|i| format!("big.{i}.{}", "w".repeat(190)))
        .collect();
    let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
    let ack = c.subscribe(1, &refs).await;
    assert_eq!(ack["events"].as_array().map(Vec::len), Some(100));
    publish_event(&server, &patterns[42], json!("hit")).await;
    assert_eq!(c.recv_json().await["data"], "hit");
    server.stop().await.expect("clean stop");
}
