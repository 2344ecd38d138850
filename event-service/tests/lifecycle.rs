//! Connection lifecycle: idle timeout, graceful drain, and `/metrics` + `/debug/connections`
//! checked against known traffic.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use support::{Client, get, metric, metrics_text, publish_event, start};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_silent_peer_is_closed_with_4001_after_the_idle_timeout() {
    let server = start(|c| {
        c.idle_timeout = Duration::from_millis(500);
        c.ping_interval = Duration::from_secs(30);
    })
    .await;
    let mut c = Client::connect(&server).await;
    let started = Instant::now();
    assert_eq!(
        c.expect_close().await,
        Some(eventrouter_contract::close::IDLE_TIMEOUT)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "closed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed too late: {waited:?}"
    );
    support::eventually("counted as idle timeout", || async {
        metric(
            &server,
            "eventrouter_disconnects_total",
            r#"reason="idle_timeout""#,
        )
        .await
            == 1.0
    })
    .await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_peer_answering_server_pings_stays_connected() {
    let server = start(|c| {
        c.idle_timeout = Duration::from_millis(600);
        c.ping_interval = Duration::from_millis(150);
    })
    .await;
    let mut c = Client::connect(&server).await;
    // Reading makes tungstenite answer each server ping with a pong: the peer is alive.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut pings = 0;
    while let Ok(msg) = tokio::time::timeout_at(until, c.ws.next()).await {
        match msg.expect("open").expect("ok") {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 5, "server pinged {pings} times");
    c.send_json(json!({"op":"ping","id":1})).await;
    assert_eq!(c.recv_json().await["op"], "pong", "still connected");
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_turns_readiness_off_then_closes_every_client_with_1001_spread_out() {
    const CLIENTS: usize = 4;
    let drain = Duration::from_secs(2);
    let server = start(|c| c.drain_duration = drain).await;
    let ready_url = format!("{}/readyz", server.http_url());
    assert_eq!(get(&ready_url).await.0, 200);
    let mut waiters = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = Client::connect(&server).await;
        c.subscribe(1, &["x"]).await;
        waiters.push(tokio::spawn(async move {
            let code = c.expect_close().await;
            (code, Instant::now())
        }));
    }
    let addr = server.addr;
    let started = Instant::now();
    server.begin_shutdown();
    // Readiness goes false first.
    let mut not_ready_at = None;
    while started.elapsed() < drain {
        let (status, body) = get(&ready_url).await;
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            not_ready_at = Some(Instant::now());
            break;
        }
    }
    let not_ready_at = not_ready_at.expect("readiness went false during the drain");
    // New clients are refused while draining.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!(
            "expected 503 while draining, got {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    let mut closes = Vec::new();
    for w in waiters {
        let (code, at) = w.await.expect("client task");
        assert_eq!(code, Some(eventrouter_contract::close::GOING_AWAY));
        closes.push(at);
    }
    let first = *closes.iter().min().expect("closes");
    let last = *closes.iter().max().expect("closes");
    assert!(
        not_ready_at <= first,
        "readiness went false before the first close"
    );
    assert!(
        last - first >= drain / 2,
        "closes spread over the drain: {:?}",
        last - first
    );
    server.wait().await.expect("serve returns after the drain");
    assert!(
        started.elapsed() < drain + Duration::from_secs(3),
        "exit at the deadline at worst"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

/// The gauges of buffered bytes that read 0 when nothing is in flight.
const BACKLOG_GAUGES: &[&str] = &[
    "eventrouter_socket_recv_queue_bytes",
    "eventrouter_socket_recv_queue_max_bytes",
    "eventrouter_socket_recv_queue_over_threshold_connections",
    "eventrouter_socket_send_queue_bytes",
    "eventrouter_socket_send_queue_max_bytes",
    "eventrouter_socket_send_queue_over_threshold_connections",
    "eventrouter_outbound_queue_bytes",
    "eventrouter_outbound_queue_max_bytes",
    "eventrouter_outbound_queue_over_threshold_connections",
    "eventrouter_kernel_buffered_bytes",
];

#[tokio::test]
async fn metrics_match_known_traffic() {
    let server = start(|c| {
        c.max_connections = 77;
        c.socket_sample_interval = Duration::from_millis(100);
    })
    .await;
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    a.subscribe(1, &["m.*"]).await;
    b.subscribe(1, &["m.a", "#"]).await;
    for (name, times) in [("m.a", 3), ("m.b", 2), ("x", 1)] {
        for _ in 0..times {
            publish_event(&server, name, json!(1)).await;
        }
    }
    for _ in 0..5 {
        a.recv_json().await;
    }
    for _ in 0..6 {
        b.recv_json().await;
    }
    a.send_json(json!({"op":"ping"})).await;
    a.send_json(json!({"op":"ping"})).await;
    a.send_text("nonsense").await;
    a.recv_json().await;
    a.recv_json().await;
    a.recv_json().await;

    // Every connection takes a fresh socket sample every 100 ms; wait until the samples show
    // nothing in flight, then read every figure from that one scrape.
    let text = eventrouter_test_support::wait::wait_for(
        "the socket and queue gauges to settle at 0",
        support::WAIT,
        || async {
            let text = metrics_text(&server).await;
            let busy: Vec<&str> = BACKLOG_GAUGES
                .iter()
                .copied()
                .filter(|name| support::metric_value(&text, name, "") != Some(0.0))
                .collect();
            if busy.is_empty() {
                Ok(text)
            } else {
                Err(format!("{busy:?}"))
            }
        },
    )
    .await;
    let m = |name: &str, labels: &str| {
        support::metric_value(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}}"))
    };
    assert_eq!(
        m("eventrouter_events_received_total", r#"source="memory""#),
        6.0
    );
    // a: 3 × m.a + 2 × m.b; b: 3 × m.a (once despite two patterns) + 2 × m.b + 1 × x.
    assert_eq!(m("eventrouter_deliveries_total", ""), 11.0);
    assert_eq!(m("eventrouter_subscriptions", ""), 3.0);
    assert_eq!(m("eventrouter_bindings", ""), 3.0);
    assert_eq!(m("eventrouter_connections", ""), 2.0);
    assert_eq!(m("eventrouter_connections_accepted_total", ""), 2.0);
    assert_eq!(
        m("eventrouter_client_frames_total", r#"kind="subscribe""#),
        2.0
    );
    assert_eq!(m("eventrouter_client_frames_total", r#"kind="ping""#), 2.0);
    assert_eq!(
        m("eventrouter_client_frames_total", r#"kind="invalid""#),
        1.0
    );
    assert_eq!(m("eventrouter_max_connections", ""), 77.0);
    assert_eq!(m("eventrouter_draining", ""), 0.0);
    assert!(m("eventrouter_delivery_latency_seconds_count", "") >= 1.0);
    assert!(m("process_resident_memory_bytes", "") > 0.0);
    for name in BACKLOG_GAUGES {
        assert_eq!(m(name, ""), 0.0, "{name} with no backlog");
    }

    let (status, body) = get(&format!("{}/debug/connections", server.admin_url())).await;
    assert_eq!(status, 200);
    let conns: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut subs: Vec<u64> = conns
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            for key in [
                "id",
                "peer",
                "age_seconds",
                "recv_q",
                "send_q",
                "outbound_bytes",
            ] {
                assert!(!c[key].is_null(), "{key} in {c}");
            }
            c["subscriptions"].as_u64().expect("subscriptions")
        })
        .collect();
    subs.sort();
    assert_eq!(subs, [1, 2]);

    drop(b);
    support::eventually("b's subscriptions and binding are released", || async {
        let t = metrics_text(&server).await;
        let v = |n: &str, l: &str| support::metric_value(&t, n, l).unwrap_or(-1.0);
        v("eventrouter_connections", "") == 1.0
            && v("eventrouter_subscriptions", "") == 1.0
            && v("eventrouter_bindings", "") == 1.0
            && v("eventrouter_disconnects_total", r#"reason="client_closed""#)
                + v("eventrouter_disconnects_total", r#"reason="error""#)
                == 1.0
    })
    .await;
    server.stop().await.expect("stop");
}
