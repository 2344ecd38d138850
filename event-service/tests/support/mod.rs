//! Shared helpers for the event service's socket tests: a real server on port 0, a real
//! WebSocket client (tokio-tungstenite), and the shared test-support crate's HTTP client,
//! Prometheus text reader and polling under the names these tests use.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use event_service::{config::Config, server::RunningServer};
use eventrouter_test_support::{http, prom::Scrape, wait};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

pub const WAIT: Duration = Duration::from_secs(10);

/// Starts a server with test defaults, adjusted by `tweak`.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = Config::for_tests();
    tweak(&mut config);
    RunningServer::start(config).await.expect("server starts")
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(server: &RunningServer) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, connect_async(server.ws_url()))
            .await
            .expect("connect in time")
            .expect("WebSocket upgrade");
        Self { ws }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    /// Next JSON text frame (WebSocket pings/pongs are skipped; the client answers pings itself).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("read ok");
            match msg {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Asserts nothing but pings arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame and returns its code (None: closed without a frame).
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn subscribe(&mut self, id: u64, events: &[&str]) -> Value {
        self.send_json(serde_json::json!({"op":"subscribe","id":id,"events":events}))
            .await;
        let reply = self.recv_json().await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["id"], id);
        reply
    }
}

pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

/// `POST /publish` with `body`; returns the status and the JSON answer (`null` when not JSON).
pub async fn publish(server: &RunningServer, body: impl Into<Bytes>) -> (u16, Value) {
    let response = http::post_json(&format!("{}/publish", server.http_url()), body)
        .await
        .expect("publish answered");
    (
        response.status,
        serde_json::from_slice(&response.body).unwrap_or(Value::Null),
    )
}

pub async fn publish_event(server: &RunningServer, event: &str, data: Value) {
    let (status, body) = publish(
        server,
        serde_json::json!({"event": event, "data": data}).to_string(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

/// `GET url` → (status, body).
pub async fn get(url: &str) -> (u16, String) {
    let response = http::get(url).await.expect("GET answered");
    (response.status, response.text())
}

pub async fn metrics_text(server: &RunningServer) -> String {
    let (status, body) = get(&format!("{}/metrics", server.admin_url())).await;
    assert_eq!(status, 200);
    body
}

/// The value of the series `name{labels}` (labels as `k="v"` joined by `,`; "" for none).
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    Scrape::parse(text).value(name, labels)
}

pub async fn metric(server: &RunningServer, name: &str, labels: &str) -> f64 {
    let text = metrics_text(server).await;
    metric_value(&text, name, labels).unwrap_or_else(|| panic!("no series {name}{{{labels}}}"))
}

/// Polls `check` until it returns true; panics naming `what` after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait::wait_until(what, WAIT, check).await;
}

/// The local port of a client's TCP socket.
pub fn local_port(client: &Client) -> u16 {
    match client.ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().expect("local addr").port(),
        _ => panic!("plain TCP expected"),
    }
}

/// Kernel queues of the established TCP socket `local_port → remote_port` as `(Recv-Q, Send-Q)`.
pub fn proc_net_tcp_queues(local_port: u16, remote_port: u16) -> Option<(u64, u64)> {
    eventrouter_test_support::kernel::tcp_queues(local_port, remote_port)
        .expect("read /proc/net/tcp")
        .map(|q| (q.rx, q.tx))
}
