//! Missed-event recovery on the embedded bus: a client that reconnects with `since` gets exactly
//! the events it missed, in order, then live ones, with no gap and no duplicate across the switch,
//! even while events keep being published during the recovery. And every refusal is an answer:
//! `recovered: false` for an unknown, evicted or too old `since`, an error op for a bad one.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, metric, publish, publish_event, start};

async fn subscribe_since(c: &mut Client, id: u64, events: &[&str], since: &str) -> Value {
    c.send_json(json!({"op":"subscribe","id":id,"events":events,"since":since}))
        .await;
    let reply = c.recv_json().await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["id"], id);
    reply
}

/// Receives the next event frame and returns (`data.n`, id).
async fn next_n(c: &mut Client) -> (u64, String) {
    let ev = c.recv_json().await;
    assert_eq!(ev["op"], "event", "{ev}");
    (
        ev["data"]["n"].as_u64().expect("numbered event"),
        ev["id"].as_str().expect("event id").to_owned(),
    )
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed_then_live_events() {
    let server = start(|_| {}).await;
    let mut first = Client::connect(&server).await;
    first.subscribe(1, &["order.#"]).await;
    let mut last_id = String::new();
    for n in 0..5 {
        publish_event(&server, "order.created", json!({"n": n})).await;
        let (got, id) = next_n(&mut first).await;
        assert_eq!(got, n);
        last_id = id;
    }
    drop(first);
    for n in 5..10 {
        publish_event(&server, "order.created", json!({"n": n})).await;
        // Not subscribed: must not be replayed.
        publish_event(&server, "user.1.created", json!({"n": 100 + n})).await;
    }

    let mut again = Client::connect(&server).await;
    let reply = subscribe_since(&mut again, 2, &["order.#"], &last_id).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 5..10 {
        assert_eq!(next_n(&mut again).await.0, n, "missed events in order");
    }
    publish_event(&server, "order.shipped", json!({"n": 10})).await;
    assert_eq!(next_n(&mut again).await.0, 10, "then live");
    again.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        metric(
            &server,
            "eventrouter_recoveries_total",
            "result=\"recovered\""
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&server, "eventrouter_recovered_events_total", "").await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_and_no_duplicate_while_events_keep_coming() {
    let server = start(|_| {}).await;
    let url = server.http_url();
    let total: u64 = 3000;
    let mut first = Client::connect(&server).await;
    first.subscribe(1, &["tick"]).await;
    let publisher = tokio::spawn(async move {
        for chunk in 0..(total / 10) {
            let body: Vec<Value> = (chunk * 10..chunk * 10 + 10)
                .map(|n| json!({"event":"tick","data":{"n":n}}))
                .collect();
            let response = eventrouter_test_support::http::post_json(
                &format!("{url}/publish"),
                Value::Array(body).to_string(),
            )
            .await
            .expect("publish answered");
            assert_eq!(response.status, 202);
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    });
    // Read a while, then leave and come back (several times) while publishing goes on.
    let mut expected = 0u64;
    let mut client = first;
    for round in 0..5u64 {
        let mut last = String::new();
        for _ in 0..(100 + round * 37) {
            let (n, id) = next_n(&mut client).await;
            assert_eq!(n, expected, "round {round}: every event once, in order");
            expected += 1;
            last = id;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        client = Client::connect(&server).await;
        let reply = subscribe_since(&mut client, 10 + round, &["tick"], &last).await;
        assert_eq!(reply["recovered"], true, "{reply}");
    }
    while expected < total {
        let (n, _) = next_n(&mut client).await;
        assert_eq!(
            n, expected,
            "every event once, in order, across every switch"
        );
        expected += 1;
    }
    publisher.await.expect("publisher");
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unknown_evicted_and_too_long_gaps_answer_recovered_false_and_subscribe_live() {
    let server = start(|c| {
        c.history_max_events = 20;
        c.recovery_max_events = 5;
    })
    .await;
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 1, &["a.*"], "no-such-event").await;
    assert_eq!(reply["recovered"], false, "{reply}");
    publish_event(&server, "a.b", json!({"n": 0})).await;
    let (_, first_id) = next_n(&mut c).await;
    for n in 1..8 {
        publish_event(&server, "a.b", json!({"n": n})).await;
        next_n(&mut c).await;
    }
    drop(c);

    // 7 events after `first_id`: more than the 5 one recovery replays.
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 2, &["a.*"], &first_id).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    publish_event(&server, "a.b", json!({"n": 8})).await;
    assert_eq!(next_n(&mut c).await.0, 8, "subscribed live all the same");
    drop(c);

    // Push `first_id` out of the 20-event history.
    for n in 9..40 {
        publish_event(&server, "other", json!({"n": n})).await;
    }
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 3, &["a.*"], &first_id).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    c.expect_silence(Duration::from_millis(200)).await;

    assert_eq!(
        metric(
            &server,
            "eventrouter_recoveries_total",
            "result=\"unknown\""
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &server,
            "eventrouter_recoveries_total",
            "result=\"too_many\""
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn without_history_since_answers_recovered_false() {
    let server = start(|c| c.history_max_events = 0).await;
    let mut c = Client::connect(&server).await;
    publish_event(&server, "a", json!({"n": 0})).await;
    let reply = subscribe_since(&mut c, 1, &["a"], "anything").await;
    assert_eq!(reply["recovered"], false, "{reply}");
    publish_event(&server, "a", json!({"n": 1})).await;
    assert_eq!(next_n(&mut c).await.0, 1);
    assert_eq!(
        metric(&server, "eventrouter_recoveries_total", "result=\"off\"").await,
        1.0
    );
}

#[tokio::test]
async fn only_newly_subscribed_patterns_are_replayed() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["a"]).await;
    publish_event(&server, "a", json!({"n": 0})).await;
    let (_, since) = next_n(&mut c).await;
    publish_event(&server, "a", json!({"n": 1})).await;
    publish_event(&server, "b", json!({"n": 2})).await;
    assert_eq!(next_n(&mut c).await.0, 1);
    // `a` is held already (its events arrived live); only `b` is new and replayed.
    let reply = subscribe_since(&mut c, 2, &["a", "b"], &since).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(next_n(&mut c).await.0, 2);
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_bad_since_is_an_invalid_request() {
    let server = start(|_| {}).await;
    let mut c = Client::connect(&server).await;
    for since in [json!(42), json!(""), json!("x".repeat(300))] {
        c.send_json(json!({"op":"subscribe","id":1,"events":["a"],"since":since}))
            .await;
        let reply = c.recv_json().await;
        assert_eq!(reply["op"], "error", "{reply}");
        assert_eq!(reply["code"], "invalid_request", "{reply}");
    }
    let (status, _) = publish(&server, json!({"event":"a","data":{"n":1}}).to_string()).await;
    assert_eq!(status, 202);
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_replay_larger_than_the_queue_bound_reaches_a_reading_client() {
    let server = start(|c| c.send_queue_bytes = 16 * 1024).await;
    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["big"]).await;
    publish_event(&server, "big", json!({"n": 0})).await;
    let (_, since) = next_n(&mut c).await;
    drop(c);
    // 2,000 missed events of ~250 bytes: 30 times the 16 KiB bound.
    let pad = "p".repeat(150);
    let events: Vec<Value> = (1..=2000)
        .map(|n| json!({"event":"big","data":{"n":n,"pad":pad}}))
        .collect();
    let (status, _) = publish(&server, Value::Array(events).to_string()).await;
    assert_eq!(status, 202);
    let mut c = Client::connect(&server).await;
    let reply = subscribe_since(&mut c, 2, &["big"], &since).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for n in 1..=2000 {
        assert_eq!(next_n(&mut c).await.0, n);
    }
    publish_event(&server, "big", json!({"n": 2001})).await;
    assert_eq!(next_n(&mut c).await.0, 2001, "then live");
    assert_eq!(
        metric(
            &server,
            "eventrouter_disconnects_total",
            "reason=\"slow_consumer\""
        )
        .await,
        0.0
    );
}
