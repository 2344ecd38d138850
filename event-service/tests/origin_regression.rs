//! The origin regression: clients that only ever send pings must never leave bytes piling up in
//! the server's kernel receive queues.
//!
//! Clients send WebSocket pings and app-level `ping` ops every few milliseconds for several
//! seconds and receive nothing but the answers. The server-side Recv-Q of every one of those
//! connections is measured from outside the service, in `/proc/net/tcp` (what `ss` and netstat
//! read), and must return to 0 while the clients stay connected; the service's own
//! `eventrouter_socket_recv_queue_bytes` must agree, and it must have counted every ping. That
//! the reader sees unread bytes at all is tested next to it, in the test-support crate's `kernel`.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{Client, local_port, metric, proc_net_tcp_queues, start};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 20;
const FLOOD: Duration = Duration::from_secs(4);
const EVERY: Duration = Duration::from_millis(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_only_clients_leave_no_bytes_in_server_recv_queues() {
    let server = start(|c| {
        c.socket_sample_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_secs(60);
        // This test floods on purpose (hundreds of frames a second per client) to prove every
        // byte is read; the per-connection frame rate limit would cut it short.
        c.client_frame_rate = 0.0;
    })
    .await;
    let server_port = server.addr.port();
    let ws_pings = Arc::new(AtomicU64::new(0));
    let app_pings = Arc::new(AtomicU64::new(0));
    let mut ports = Vec::new();
    let mut tasks = Vec::new();
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    for _ in 0..CLIENTS {
        let client = Client::connect(&server).await;
        ports.push(local_port(&client));
        let (mut tx, mut rx) = client.ws.split();
        let (ws_pings, app_pings) = (ws_pings.clone(), app_pings.clone());
        let mut stop = stop_tx.subscribe();
        // Reader: the client takes its pongs; it never sees an event.
        let reader = tokio::spawn(async move {
            let mut pongs = 0u64;
            while let Some(Ok(msg)) = rx.next().await {
                match msg {
                    Message::Text(t) => {
                        let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                        assert_eq!(v["op"], "pong", "nothing but pongs: {v}");
                        pongs += 1;
                    }
                    Message::Pong(_) | Message::Ping(_) => {}
                    Message::Close(_) => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            pongs
        });
        let writer = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(EVERY);
            let mut n = 0u64;
            while started.elapsed() < FLOOD {
                tick.tick().await;
                tx.send(Message::Ping(b"are you there"[..].into()))
                    .await
                    .expect("ping");
                ws_pings.fetch_add(1, Ordering::Relaxed);
                tx.send(Message::Text(
                    json!({"op":"ping","id":n}).to_string().into(),
                ))
                .await
                .expect("app ping");
                app_pings.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            // Stay connected, silent, until the checks are done.
            let _ = stop.recv().await;
            let _ = tx.send(Message::Close(None)).await;
        });
        tasks.push((reader, writer));
    }

    // During the flood, sample every connection's Recv-Q from outside.
    let mut worst_during = 0u64;
    let flood_end = tokio::time::Instant::now() + FLOOD;
    while tokio::time::Instant::now() < flood_end {
        for &p in &ports {
            let (rx, _) = proc_net_tcp_queues(server_port, p).expect("server socket listed");
            worst_during = worst_during.max(rx);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // After the flood, with every client still connected: all server-side Recv-Q back to 0.
    support::eventually("every server-side Recv-Q is 0 in /proc/net/tcp", || {
        let ports = ports.clone();
        async move {
            ports.iter().all(|&p| {
                proc_net_tcp_queues(server_port, p)
                    .expect("server socket listed")
                    .0
                    == 0
            })
        }
    })
    .await;
    // The service's own metric agrees (it samples every 100 ms here).
    support::eventually("eventrouter_socket_recv_queue_bytes is 0", || async {
        metric(&server, "eventrouter_socket_recv_queue_bytes", "").await == 0.0
    })
    .await;
    assert_eq!(
        metric(&server, "eventrouter_connections", "").await,
        CLIENTS as f64
    );
    // And it read every single ping.
    let sent_ws = ws_pings.load(Ordering::Relaxed) as f64;
    let sent_app = app_pings.load(Ordering::Relaxed) as f64;
    assert!(sent_app > 500.0, "the flood ran ({sent_app} app pings)");
    support::eventually("the server counted every ping", || async {
        metric(
            &server,
            "eventrouter_client_frames_total",
            r#"kind="ws_ping""#,
        )
        .await
            == sent_ws
            && metric(&server, "eventrouter_client_frames_total", r#"kind="ping""#).await
                == sent_app
    })
    .await;
    let _ = stop_tx.send(());
    let mut pongs = 0;
    for (reader, writer) in tasks {
        writer.await.expect("writer");
        pongs += reader.await.expect("reader");
    }
    assert_eq!(pongs as f64, sent_app, "one pong op per ping op");
    eprintln!(
        "{CLIENTS} clients, {sent_app} app pings + {sent_ws} WebSocket pings in {FLOOD:?}; \
         worst server Recv-Q seen during the flood: {worst_during} bytes"
    );
    server.stop().await.expect("stop");
}
