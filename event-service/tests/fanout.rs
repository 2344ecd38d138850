//! Fan-out over many real connections: every subscriber gets every event exactly once, in
//! publish order, whatever mix of patterns it used. Not a benchmark (see BENCHMARKS.md); it
//! prints the rate it saw so regressions are visible in the log.

mod support;

use std::time::Instant;

use serde_json::json;
use support::{Client, metric, publish, start};

const SUBSCRIBERS: usize = 200;
const EVENTS: usize = 1000;
const BATCH: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_every_event_once_in_order() {
    let server = start(|_| {}).await;
    let patterns = ["fan.out", "fan.*", "#", "fan.#", "*.out"];
    let mut readers = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut c = Client::connect(&server).await;
        let p = patterns[i % patterns.len()];
        // Some hold two overlapping patterns: still one copy each.
        if i % 7 == 0 {
            c.subscribe(1, &[p, "fan.out"]).await;
        } else {
            c.subscribe(1, &[p]).await;
        }
        readers.push(tokio::spawn(async move {
            for n in 0..EVENTS {
                let ev = c.recv_json().await;
                assert_eq!(ev["data"], n, "in order, no gaps, no duplicates");
            }
            c.expect_silence(std::time::Duration::from_millis(100))
                .await;
        }));
    }
    let started = Instant::now();
    for b in 0..EVENTS / BATCH {
        let events: Vec<_> = (0..BATCH)
            .map(|i| json!({"event":"fan.out","data": b * BATCH + i}))
            .collect();
        let (status, _) = publish(&server, serde_json::Value::Array(events).to_string()).await;
        assert_eq!(status, 202);
    }
    for r in readers {
        r.await.expect("reader");
    }
    let elapsed = started.elapsed();
    let deliveries = metric(&server, "eventrouter_deliveries_total", "").await;
    assert_eq!(deliveries, (SUBSCRIBERS * EVENTS) as f64);
    eprintln!(
        "{deliveries} deliveries to {SUBSCRIBERS} connections in {elapsed:?} \
         ({:.0}/s, test build, client in the same process)",
        deliveries / elapsed.as_secs_f64()
    );
    server.stop().await.expect("stop");
}

/// Events published one at a time go to parked connections through the group writers (straight
/// into the socket). Frames larger than the socket takes at once get cut mid-frame while a
/// client is not reading; the connection's task must finish each cut frame before anything
/// else, so a client that resumes reading gets every event whole and in order, and so does
/// one that never paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_events_written_straight_into_sockets_arrive_whole_and_in_order() {
    const LONE: usize = 60;
    let server = start(|c| c.send_queue_bytes = 64 * 1024 * 1024).await;
    let mut paused = Client::connect(&server).await;
    paused.subscribe(1, &["lone.big"]).await;
    let mut reading = Client::connect(&server).await;
    reading.subscribe(1, &["lone.big"]).await;
    let reader = tokio::spawn(async move {
        for n in 0..LONE {
            let ev = reading.recv_json().await;
            assert_eq!(ev["data"]["n"], n, "in order, no gaps");
        }
    });
    // Sizes cross the 125- and 65,535-byte header boundaries; the paused client's socket buffers
    // fill within the first few events, so later writes are cut part-way.
    for n in 0..LONE {
        let pad = "x".repeat([100, 5_000, 70_000, 300_000][n % 4]);
        let body = json!({"event": "lone.big", "data": {"n": n, "pad": pad}}).to_string();
        let (status, _) = publish(&server, body).await;
        assert_eq!(status, 202);
    }
    reader.await.expect("the reading client");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for n in 0..LONE {
        let ev = paused.recv_json().await;
        assert_eq!(ev["data"]["n"], n, "in order, no gaps, every frame whole");
        assert_eq!(
            ev["data"]["pad"].as_str().map(str::len),
            Some([100, 5_000, 70_000, 300_000][n % 4])
        );
    }
    paused
        .expect_silence(std::time::Duration::from_millis(100))
        .await;
    let deliveries = metric(&server, "eventrouter_deliveries_total", "").await;
    assert_eq!(deliveries, (2 * LONE) as f64);
    server.stop().await.expect("stop");
}
