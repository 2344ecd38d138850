//! One test per limit: the documented answer, and the service keeps serving afterwards.

mod support;

use std::time::Duration;

use event_service::server::RunningServer;
use eventrouter_contract::close;
use futures_util::SinkExt;
use serde_json::json;
use support::{Client, publish, publish_event, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A fresh client can still subscribe and receive an event.
async fn still_serving(server: &RunningServer) {
    let mut c = Client::connect(server).await;
    c.subscribe(99, &["health.check"]).await;
    publish_event(server, "health.check", json!("ok")).await;
    assert_eq!(c.recv_json().await["data"], "ok");
}

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let server = start(|c| c.max_frame_bytes = 1024).await;
    let mut c = Client::connect(&server).await;
    c.send_text("x".repeat(2000)).await;
    assert_eq!(c.expect_close().await, Some(close::TOO_BIG));
    still_serving(&server).await;
    let m = support::metric(
        &server,
        "eventrouter_disconnects_total",
        r#"reason="too_big""#,
    )
    .await;
    assert_eq!(m, 1.0);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    c.ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send");
    assert_eq!(c.expect_close().await, Some(close::UNSUPPORTED_DATA));
    still_serving(&server).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn invalid_json_and_unknown_op_get_error_ops() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    c.send_text("{not json").await;
    let e = c.recv_json().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_json"))
    );
    c.send_json(json!({"op":"explode","id":5})).await;
    let e = c.recv_json().await;
    assert_eq!(e["code"], "unknown_op");
    assert_eq!(e["id"], 5);
    // The same connection still works.
    c.subscribe(6, &["a.b"]).await;
    still_serving(&server).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn persistent_abuse_closes_1008() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    for _ in 0..event_service::session::MAX_INVALID_IN_ROW {
        c.send_text("garbage").await;
    }
    // Nine error ops, then the policy close.
    for _ in 1..event_service::session::MAX_INVALID_IN_ROW {
        assert_eq!(c.recv_json().await["code"], "invalid_json");
    }
    assert_eq!(c.expect_close().await, Some(close::POLICY));
    still_serving(&server).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_valid_request_resets_the_abuse_count() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    for round in 0..3 {
        for _ in 1..event_service::session::MAX_INVALID_IN_ROW {
            c.send_text("garbage").await;
            assert_eq!(c.recv_json().await["code"], "invalid_json");
        }
        c.send_json(json!({"op":"ping","id":round})).await;
        assert_eq!(c.recv_json().await["op"], "pong");
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn subscriptions_per_connection_are_capped() {
    let server = start(|c| c.max_subscriptions = 3).await;
    let mut c = Client::connect(&server).await;
    c.send_json(json!({"op":"subscribe","id":1,"events":["a","b","c","d"]}))
        .await;
    assert_eq!(c.recv_json().await["code"], "too_many_subscriptions");
    c.subscribe(2, &["a", "b", "c"]).await;
    // Re-subscribing what it holds is fine; a fourth is not.
    c.subscribe(3, &["a"]).await;
    c.send_json(json!({"op":"subscribe","id":4,"events":["d"]}))
        .await;
    let e = c.recv_json().await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("too_many_subscriptions"), Some(4))
    );
    // After dropping one, there is room again.
    c.send_json(json!({"op":"unsubscribe","id":5,"events":["a"]}))
        .await;
    assert_eq!(c.recv_json().await["op"], "unsubscribed");
    c.subscribe(6, &["d"]).await;
    still_serving(&server).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn pattern_length_is_capped() {
    let server = start(|c| c.max_pattern_length = 16).await;
    let mut c = Client::connect(&server).await;
    c.send_json(json!({"op":"subscribe","id":1,"events":["a".repeat(17)]}))
        .await;
    let e = c.recv_json().await;
    assert_eq!(e["code"], "pattern_too_long");
    c.subscribe(2, &["a".repeat(16).as_str()]).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn handshake_timeout_drops_silent_connections() {
    let server = start(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    for partial in [&b""[..], b"GET /ws HTTP/1.1\r\nHost: x\r\n"] {
        let mut raw = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("tcp");
        raw.write_all(partial).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        // The server closes: EOF (or a 408 answer followed by EOF), well within a few seconds.
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
                .await
                .expect("server closed the silent connection within 5 s")
                .unwrap_or(0);
            if n == 0 {
                break;
            }
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "not before the timeout"
        );
    }
    still_serving(&server).await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let server = start(|c| c.max_connections = 2).await;
    let a = Client::connect(&server).await;
    let _b = Client::connect(&server).await;
    match tokio_tungstenite::connect_async(server.ws_url()).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    let rejected = support::metric(
        &server,
        "eventrouter_connections_rejected_total",
        r#"reason="max_connections""#,
    )
    .await;
    assert_eq!(rejected, 1.0);
    drop(a);
    // The slot frees once the server notices the first client left.
    support::eventually("a slot frees up", || async {
        tokio_tungstenite::connect_async(server.ws_url())
            .await
            .is_ok()
    })
    .await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn publish_body_over_the_limit_gets_413() {
    let server = start(|c| c.max_publish_bytes = 1000).await;
    let big = json!({"event":"a.b","data":"x".repeat(2000)}).to_string();
    let (status, body) = publish(&server, big).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = publish(&server, json!({"event":"a.b","data":"small"}).to_string()).await;
    assert_eq!(status, 202);
    still_serving(&server).await;
    server.stop().await.expect("stop");
}
