//! One publish larger than every client's queue bound: the clients that read get all of it (the
//! publisher is paced by their reading instead of overflowing their queues), the service keeps
//! answering meanwhile, and a client that stopped reading is still cut off as a slow consumer.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Client, get, metric, start};
use tokio::net::TcpSocket;
use tokio_tungstenite::client_async;

const BOUND: usize = 64 * 1024;
const READERS: usize = 20;
const EVENTS: usize = 4000;
const DATA_BYTES: usize = 1900; // ~2 KB frames: ~8 MB per client, 125 times the bound

/// A client whose socket receive buffer is tiny, so the kernel cannot absorb what it does not read.
async fn stalled_client(server: &event_service::server::RunningServer) -> Client {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(server.addr).await.expect("connect");
    let (ws, _) = client_async(
        server.ws_url(),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("upgrade");
    Client { ws }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_queue_bound_reaches_every_reading_client() {
    let server = start(|c| {
        c.send_queue_bytes = BOUND;
        c.max_publish_bytes = 16 * 1024 * 1024;
    })
    .await;
    let mut stalled = stalled_client(&server).await;
    stalled.subscribe(1, &["burst.#"]).await;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut c = Client::connect(&server).await;
        c.subscribe(1, &["burst.*"]).await;
        readers.push(tokio::spawn(async move {
            for n in 0..EVENTS {
                let ev = c.recv_json().await;
                assert_eq!(ev["data"]["n"], n, "every event, in order");
            }
            c
        }));
    }

    let pad = "x".repeat(DATA_BYTES);
    let body: Vec<_> = (0..EVENTS)
        .map(|n| json!({"event":"burst.data","data":{"n": n, "pad": pad}}))
        .collect();
    let body = serde_json::Value::Array(body).to_string();
    assert!(body.len() > 100 * BOUND, "the burst is far over the bound");
    let url = format!("{}/readyz", server.http_url());
    let started = Instant::now();
    let publishing = tokio::spawn({
        let server_url = server.http_url();
        async move {
            let r =
                eventrouter_test_support::http::post_json(&format!("{server_url}/publish"), body)
                    .await
                    .expect("publish answered");
            (r.status, started.elapsed())
        }
    });
    // The service keeps answering while the burst goes out.
    let mut slowest_probe = Duration::ZERO;
    while !publishing.is_finished() {
        let t = Instant::now();
        let (status, _) = get(&url).await;
        assert_eq!(status, 200);
        slowest_probe = slowest_probe.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, took) = publishing.await.expect("publisher");
    assert_eq!(status, 202);
    let mut kept = Vec::new();
    for r in readers {
        kept.push(
            tokio::time::timeout(Duration::from_secs(60), r)
                .await
                .expect("every reading client got the whole burst within 60 s")
                .expect("reader"),
        );
    }
    eprintln!(
        "burst of {EVENTS} events (~{} MB per client) answered in {took:?}; slowest /readyz {slowest_probe:?}",
        EVENTS * (DATA_BYTES + 120) / 1_000_000
    );
    assert!(
        slowest_probe < Duration::from_secs(1),
        "/readyz took {slowest_probe:?}"
    );

    // Only the client that stopped reading was cut off.
    support::eventually(
        "the stalled client is closed as a slow consumer",
        || async {
            metric(
                &server,
                "eventrouter_disconnects_total",
                r#"reason="slow_consumer""#,
            )
            .await
                == 1.0
        },
    )
    .await;
    assert_eq!(
        metric(&server, "eventrouter_connections", "").await,
        READERS as f64
    );
    // Reading at last, it finds what the kernel buffered, then the end of the connection.
    let ended = stalled.expect_close().await;
    assert!(
        matches!(
            ended,
            None | Some(eventrouter_contract::close::SLOW_CONSUMER)
        ),
        "{ended:?}"
    );
    drop(kept);
    server.stop().await.expect("stop");
}
