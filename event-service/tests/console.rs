//! The console on the main port: served (page, its files, the JavaScript client, the stats) when
//! enabled, 404 when not, and the stats follow the instance's real state.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use serde_json::Value;
use support::{Client, eventually, publish_event, start};

const CLIENT_JS: &str = include_str!("../clients/js/index.js");

/// `GET url` → (status, content type, body).
async fn get(url: &str) -> (u16, String, String) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let resp = tokio::time::timeout(support::WAIT, client.get(url.parse().expect("url")))
        .await
        .expect("answered in time")
        .expect("GET");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn stats(base: &str) -> Value {
    let (status, content_type, body) = get(&format!("{base}/console/stats")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    serde_json::from_str(&body).expect("stats are JSON")
}

#[tokio::test]
async fn served_when_enabled() {
    let server = start(|c| c.console = Some(true)).await;
    let base = server.http_url();

    let (status, content_type, page) = get(&format!("{base}/")).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(
        page.contains("<title>event router console</title>"),
        "{page}"
    );
    for (path, kind, needle) in [
        ("/console/app.js", "text/javascript", "EventRouterClient"),
        ("/console/style.css", "text/css", "#events"),
    ] {
        let (status, content_type, body) = get(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}");
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        assert!(body.contains(needle), "{path}");
    }
    let (status, content_type, client) = get(&format!("{base}/console/client.js")).await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/javascript"));
    assert_eq!(
        client, CLIENT_JS,
        "the page uses the client of clients/js, byte for byte"
    );

    let before = stats(&base).await;
    assert_eq!(before["connections"], 0);
    assert_eq!(before["source"], "memory");
    assert_eq!(before["ready"], true);
    assert_eq!(before["draining"], false);
    assert_eq!(before["recv_q_bytes"], 0);
    assert_eq!(before["deliveries_total"], 0);

    let mut ws = Client::connect(&server).await;
    ws.subscribe(1, &["console.#"]).await;
    publish_event(&server, "console.test", serde_json::json!(1)).await;
    let event = ws.recv_json().await;
    assert_eq!(event["event"], "console.test");
    let after = stats(&base).await;
    assert_eq!(after["connections"], 1);
    assert_eq!(after["subscriptions"], 1);
    assert_eq!(after["bindings"], 1);
    assert_eq!(after["deliveries_total"], 1);
    assert_eq!(after["events_received_total"], 1);
    // The same numbers as the admin port's metrics (which the page never reads).
    let metrics = support::metrics_text(&server).await;
    for (field, name) in [
        ("connections", "eventrouter_connections"),
        ("deliveries_total", "eventrouter_deliveries_total"),
    ] {
        let value = support::metric_value(&metrics, name, "").expect(name);
        assert_eq!(after[field].as_f64(), Some(value), "{field}");
    }
    drop(ws);
    eventually("the connection gauge to drop", || async {
        stats(&base).await["connections"] == 0
    })
    .await;

    let (status, _, _) = get(&format!("{base}/console/nope")).await;
    assert_eq!(status, 404);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn on_with_demo() {
    let server = start(|c| c.demo = true).await;
    let (status, _, page) = get(&format!("{}/", server.http_url())).await;
    assert_eq!(status, 200);
    assert!(page.contains("/console/app.js"));
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn not_found_when_disabled() {
    for tweak in [
        (|_: &mut event_service::config::Config| {}) as fn(&mut _),
        |c| c.console = Some(false),
        |c| {
            c.demo = true;
            c.console = Some(false);
        },
    ] {
        let server = start(tweak).await;
        let base = server.http_url();
        for path in [
            "/",
            "/console/app.js",
            "/console/style.css",
            "/console/client.js",
            "/console/stats",
        ] {
            let (status, _, _) = get(&format!("{base}{path}")).await;
            assert_eq!(status, 404, "{path}");
        }
        // The rest of the main port is unchanged.
        let (status, _, _) = get(&format!("{base}/healthz")).await;
        assert_eq!(status, 200);
        server.stop().await.expect("stop");
    }
}
