//! When the event source cannot work (RabbitMQ unreachable), the service says so instead of
//! pretending: readiness is false, subscriptions get the `unavailable` error op and publishing
//! gets 503 — and the connection stays usable.
//!
//! The source here is the real AMQP source pointed at a loopback port nobody listens on.

mod support;

use event_service::config::SourceKind;
use serde_json::json;
use support::{Client, get, publish, start};

#[tokio::test]
async fn an_unreachable_broker_means_not_ready_unavailable_and_503() {
    // A port that was free a moment ago: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let server = start(|c| {
        c.source = SourceKind::Amqp;
        c.amqp_url = Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    })
    .await;

    let (status, body) = get(&format!("{}/readyz", server.http_url())).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("event source unavailable"), "{body}");

    let mut c = Client::connect(&server).await;
    c.send_json(json!({"op":"subscribe","id":1,"events":["order.*","user.#"]}))
        .await;
    let e = c.recv_json().await;
    assert_eq!(e["op"], "error", "{e}");
    assert_eq!(e["code"], "unavailable");
    assert_eq!(e["id"], 1);
    assert_eq!(e["events"], json!(["order.*", "user.#"]));

    let (status, body) = publish(&server, r#"{"event":"order.created","data":1}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()));

    // Nothing was recorded as held or bound, and the connection still answers.
    assert_eq!(
        support::metric(&server, "eventrouter_subscriptions", "").await,
        0.0
    );
    assert_eq!(
        support::metric(&server, "eventrouter_bindings", "").await,
        0.0
    );
    c.send_json(json!({"op":"ping","id":2})).await;
    assert_eq!(c.recv_json().await["op"], "pong");
    server.stop().await.expect("stop");
}
