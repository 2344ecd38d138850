//! Rebalancing on a real RabbitMQ: two instances exchange heartbeats over the router's control
//! exchange; the one holding every connection closes the excess with 4002, the test plays the
//! load balancer and reconnects each closed client to the other instance, and the pair ends
//! balanced — then stays put (no client moved back and forth).
//!
//! Needs `EVENTROUTER_TEST_AMQP_URL` and `EVENTROUTER_TEST_RABBITMQ_MGMT_URL` (set by `tests/run`).

mod amqp_support;
mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use amqp_support::{
    DEFAULT_VHOST, amqp_config, amqp_url, encode_segment, management, unique, until,
};
use event_service::{config::Config, server::RunningServer};
use eventrouter_contract::{close, metrics as names};
use futures_util::StreamExt;
use tokio_tungstenite::{connect_async, tungstenite::Message};
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 30;
const BALANCE: Duration = Duration::from_secs(30);

fn fast_rebalancing(config: &mut Config) {
    config.heartbeat_interval = Duration::from_millis(200);
    config.rebalance_min_age = Duration::ZERO;
    config.rebalance_rate = 20.0;
    config.rebalance_tolerance = 0.1;
}

async fn ready(server: &RunningServer) -> bool {
    support::get(&format!("{}/readyz", server.http_url()))
        .await
        .0
        == 200
}

async fn gauge(server: &RunningServer, name: &str) -> f64 {
    support::metric(server, name, "").await
}

/// One client: connects to `first`, and whenever the server closes it, records the close code
/// and reconnects to `next` (the load balancer's choice), until `stop`.
fn client(
    first: String,
    next: String,
    codes: Arc<Mutex<Vec<Option<u16>>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut url = first;
        loop {
            let (mut ws, _) = connect_async(url.as_str())
                .await
                .expect("WebSocket upgrade");
            let code = loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                        Some(Ok(_)) => continue,
                        Some(Err(_)) | None => break None,
                    },
                }
            };
            codes.lock().expect("codes").push(code);
            url = next.clone();
        }
    })
}

#[tokio::test]
async fn an_instance_over_the_mean_moves_clients_to_a_new_instance_until_balanced() {
    let url = amqp_url();
    let exchange = unique("rebalance");
    let mut a_config = amqp_config(&url, &exchange, &unique("pod-a"));
    fast_rebalancing(&mut a_config);
    let a = RunningServer::start(a_config).await.expect("a starts");
    until("a ready", Duration::from_secs(15), || ready(&a)).await;

    let codes = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let mut b_config = amqp_config(&url, &exchange, &unique("pod-b"));
    fast_rebalancing(&mut b_config);
    // Every client starts on a; a closed one reconnects to b, where a new instance would be.
    let b = RunningServer::start(b_config).await.expect("b starts");
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| client(a.ws_url(), b.ws_url(), codes.clone(), stop.clone()))
        .collect();
    until("every client on a", Duration::from_secs(15), || async {
        gauge(&a, names::CONNECTIONS).await == CLIENTS as f64
    })
    .await;
    until("b ready", Duration::from_secs(15), || ready(&b)).await;

    // The control exchange is the router's own, never the events exchange.
    let control = format!("{exchange}.control");
    let path = format!(
        "exchanges/{}/{}",
        encode_segment(DEFAULT_VHOST),
        encode_segment(&control)
    );
    let declared = management().get(&path).await.expect("management API");
    let kind = declared.map(|e| e["type"].clone());
    assert_eq!(
        kind,
        Some(serde_json::json!("fanout")),
        "{control} is declared as a fanout"
    );

    // Balanced: a sheds down to the mean (15, every moved client lands on b), each move a 4002.
    let half = (CLIENTS / 2) as f64;
    until("a shed down to the mean", BALANCE, || async {
        gauge(&a, names::CONNECTIONS).await == half && gauge(&b, names::CONNECTIONS).await == half
    })
    .await;
    until("both instances see the pair", BALANCE, || async {
        gauge(&a, names::REBALANCE_FLEET_SIZE).await == 2.0
            && gauge(&b, names::REBALANCE_FLEET_SIZE).await == 2.0
    })
    .await;
    let shed = gauge(&a, names::REBALANCE_SHED).await;
    assert_eq!(shed, half, "a moved exactly its excess");
    assert_eq!(
        gauge(&b, names::REBALANCE_SHED).await,
        0.0,
        "b is under the mean"
    );
    {
        let codes = codes.lock().expect("codes");
        assert_eq!(codes.len() as f64, shed, "one close per shed connection");
        assert!(
            codes.iter().all(|&c| c == Some(close::REBALANCE)),
            "every move is a 4002 close: {codes:?}"
        );
    }

    // Settled: several heartbeats and decisions later nobody moved again.
    let heartbeats = gauge(&a, names::REBALANCE_HEARTBEATS_RECEIVED).await;
    until("more heartbeats heard", Duration::from_secs(10), || async {
        gauge(&a, names::REBALANCE_HEARTBEATS_RECEIVED).await >= heartbeats + 10.0
    })
    .await;
    assert_eq!(
        gauge(&a, names::REBALANCE_SHED).await,
        shed,
        "no further moves"
    );
    assert_eq!(gauge(&b, names::REBALANCE_SHED).await, 0.0);
    assert_eq!(gauge(&a, names::REBALANCE_HEARTBEATS_REJECTED).await, 0.0);

    stop.cancel();
    for task in tasks {
        task.await.expect("client task");
    }
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
}

#[tokio::test]
async fn with_rebalancing_off_nothing_moves_and_no_heartbeat_is_sent() {
    let url = amqp_url();
    let exchange = unique("norebalance");
    let mut a_config = amqp_config(&url, &exchange, &unique("pod-a"));
    fast_rebalancing(&mut a_config);
    a_config.rebalance = false;
    let a = RunningServer::start(a_config).await.expect("a starts");
    let mut b_config = amqp_config(&url, &exchange, &unique("pod-b"));
    fast_rebalancing(&mut b_config);
    let b = RunningServer::start(b_config).await.expect("b starts");
    until("both ready", Duration::from_secs(15), || async {
        ready(&a).await && ready(&b).await
    })
    .await;
    let codes = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let tasks: Vec<_> = (0..10)
        .map(|_| client(a.ws_url(), b.ws_url(), codes.clone(), stop.clone()))
        .collect();
    until("every client on a", Duration::from_secs(15), || async {
        gauge(&a, names::CONNECTIONS).await == 10.0
    })
    .await;
    // b runs rebalancing and hears only itself: a publishes no heartbeat.
    until(
        "b hears a dozen heartbeats",
        Duration::from_secs(15),
        || async { gauge(&b, names::REBALANCE_HEARTBEATS_RECEIVED).await >= 12.0 },
    )
    .await;
    assert_eq!(gauge(&b, names::REBALANCE_FLEET_SIZE).await, 1.0);
    assert_eq!(gauge(&a, names::REBALANCE_FLEET_SIZE).await, 0.0);
    assert_eq!(gauge(&a, names::REBALANCE_SHED).await, 0.0);
    assert_eq!(gauge(&a, names::CONNECTIONS).await, 10.0);
    assert!(codes.lock().expect("codes").is_empty());
    stop.cancel();
    for task in tasks {
        task.await.expect("client task");
    }
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
}
