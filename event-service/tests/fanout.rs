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
