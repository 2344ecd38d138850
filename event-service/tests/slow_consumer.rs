//! A client that never reads: the configured policy applies within the outbound bound, the
//! process's memory stays bounded, and every other client keeps receiving everything.

mod support;

use std::time::Duration;

use event_service::config::SlowConsumerPolicy;
use futures_util::StreamExt;
use serde_json::json;
use support::{Client, metric, publish, start};
use tokio_tungstenite::tungstenite::Message;

const BOUND: usize = 256 * 1024;
const EVENT_BYTES: usize = 4096;
const BATCH: usize = 50;
const BATCHES: usize = 160; // 8,000 events, ~32 MiB through the service

fn rss_bytes() -> u64 {
    eventrouter_test_support::kernel::own_rss_bytes().expect("own VmRSS")
}

/// Publishes every batch while `reader` drains the well-behaved client; returns the RSS growth.
async fn flood(server: &event_service::server::RunningServer, good: Client) -> (u64, Client) {
    let payload = "x".repeat(EVENT_BYTES);
    let reader = tokio::spawn(async move {
        let mut good = good;
        for n in 0..BATCH * BATCHES {
            let ev = good.recv_json().await;
            assert_eq!(
                ev["data"]["n"], n,
                "the reading client gets every event, in order"
            );
        }
        good
    });
    let before = rss_bytes();
    for b in 0..BATCHES {
        let events: Vec<_> = (0..BATCH)
            .map(|i| json!({"event":"bulk.data","data":{"n": b * BATCH + i, "pad": payload}}))
            .collect();
        let (status, _) = publish(server, serde_json::Value::Array(events).to_string()).await;
        assert_eq!(status, 202);
    }
    let good = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reading client got everything within 60 s")
        .expect("reader");
    let growth = rss_bytes().saturating_sub(before);
    (growth, good)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_the_slow_consumer_and_spares_the_others() {
    let server = start(|c| {
        c.send_queue_bytes = BOUND;
        // The embedded history keeps up to 16 MiB of the flood by design; measure the queues alone.
        c.history_max_events = 0;
        c.slow_consumer_policy = SlowConsumerPolicy::Disconnect;
    })
    .await;
    let mut slow = Client::connect(&server).await;
    slow.subscribe(1, &["bulk.#"]).await;
    let mut good = Client::connect(&server).await;
    good.subscribe(1, &["bulk.*"]).await;

    let (growth, _good) = flood(&server, good).await;
    eprintln!("RSS growth while flooding ~32 MiB past a non-reading client: {growth} bytes");
    assert!(growth < 24 * 1024 * 1024, "RSS grew by {growth} bytes");

    support::eventually("the slow consumer is disconnected", || async {
        metric(
            &server,
            "eventrouter_disconnects_total",
            r#"reason="slow_consumer""#,
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(metric(&server, "eventrouter_connections", "").await, 1.0);
    assert!(
        metric(
            &server,
            "eventrouter_drops_total",
            r#"reason="slow_consumer""#
        )
        .await
            >= 1.0
    );
    // When the slow client finally reads, it finds buffered events and then the end.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.ws.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the slow client's stream ends");
    assert!(
        matches!(
            ended,
            None | Some(eventrouter_contract::close::SLOW_CONSUMER)
        ),
        "{ended:?}"
    );
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_policy_keeps_the_slow_consumer_within_the_bound() {
    let server = start(|c| {
        c.send_queue_bytes = BOUND;
        // The embedded history keeps up to 16 MiB of the flood by design; measure the queues alone.
        c.history_max_events = 0;
        c.slow_consumer_policy = SlowConsumerPolicy::DropOldest;
        c.socket_sample_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_secs(120);
    })
    .await;
    let mut slow = Client::connect(&server).await;
    slow.subscribe(1, &["bulk.data"]).await;
    let mut good = Client::connect(&server).await;
    good.subscribe(1, &["#"]).await;

    let (growth, _good) = flood(&server, good).await;
    eprintln!("RSS growth (drop-oldest) while flooding ~32 MiB: {growth} bytes");
    assert!(growth < 24 * 1024 * 1024, "RSS grew by {growth} bytes");

    assert_eq!(
        metric(&server, "eventrouter_connections", "").await,
        2.0,
        "still connected"
    );
    let dropped = metric(
        &server,
        "eventrouter_drops_total",
        r#"reason="drop_oldest""#,
    )
    .await;
    assert!(dropped > 0.0, "events were dropped for the slow client");
    let queued = metric(&server, "eventrouter_outbound_queue_max_bytes", "").await;
    assert!(
        queued <= BOUND as f64,
        "outbound queue {queued} within the bound {BOUND}"
    );
    assert!(queued > 0.0, "the slow client's queue is full, not empty");
    // Its kernel send queue holds what the socket took; the service exports it.
    support::eventually("the stuck Send-Q is visible", || async {
        metric(&server, "eventrouter_socket_send_queue_max_bytes", "").await > 0.0
            && metric(&server, "eventrouter_kernel_buffered_bytes", "").await > 0.0
    })
    .await;

    // Reading now: it gets fewer events than published, and the newest one last.
    let mut received = 0usize;
    let mut last = None;
    loop {
        let ev = slow.recv_json().await;
        received += 1;
        let n = ev["data"]["n"].as_u64().expect("n");
        if let Some(prev) = last {
            assert!(n > prev, "still in publish order");
        }
        last = Some(n);
        if n as usize == BATCH * BATCHES - 1 {
            break;
        }
    }
    assert!(
        received < BATCH * BATCHES,
        "got {received}, some were dropped"
    );
    assert_eq!(
        received as f64 + dropped,
        (BATCH * BATCHES) as f64,
        "every event was either delivered or counted as dropped"
    );
    server.stop().await.expect("stop");
}
