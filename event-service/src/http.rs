//! The main port (hyper 1, HTTP/1.1): `GET /ws` upgrades, `POST /publish`, `/healthz`, `/readyz`.
//!
//! The upgrade path checks the connection limit before answering 101 (over `--max-connections`
//! gets 503), takes the raw `TcpStream` back out of hyper (so the session can sample its kernel
//! queues) and hands it to a `session` task with a small-buffer WebSocket configuration. The
//! request headers must arrive within `--handshake-timeout` or the connection is dropped.

use std::{convert::Infallible, net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use bytes::Bytes;
use eventrouter_contract::http as paths;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};
use tokio_util::sync::CancellationToken;

use crate::{
    connection::ConnShared,
    event::{Event, validate_event_name},
    metrics::RejectReason,
    server::Shared,
    session,
};

pub(crate) type Body = Full<Bytes>;

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// Accepts connections on the main port until `stop` fires.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(serve_connection(stream, peer, shared));
            }
            Err(error) => {
                // EMFILE and friends: back off a little rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    // Batching already coalesces writes; Nagle would only add delay to the last frame of a batch.
    let _ = stream.set_nodelay(true);
    let timeout = shared.config.handshake_timeout;
    let svc = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(req, peer, shared).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(error) = conn.await {
        tracing::debug!(%peer, %error, "http connection ended with an error");
    }
}

async fn route(req: Request<Incoming>, peer: SocketAddr, shared: Arc<Shared>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, paths::WS_PATH) => upgrade(req, peer, shared),
        (&Method::POST, paths::PUBLISH_PATH) => publish(req, &shared).await,
        (&Method::GET, paths::HEALTHZ_PATH) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, paths::READYZ_PATH) => match shared.readiness.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (_, paths::WS_PATH | paths::PUBLISH_PATH | paths::HEALTHZ_PATH | paths::READYZ_PATH) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => crate::console::route(&req, &shared)
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n")),
    }
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn upgrade(mut req: Request<Incoming>, peer: SocketAddr, shared: Arc<Shared>) -> Response<Body> {
    let metrics = &shared.metrics;
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let valid = header_has_token(&req, header::CONNECTION, "upgrade")
        && header_has_token(&req, header::UPGRADE, "websocket")
        && req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let Some(key) = key.filter(|_| valid) else {
        metrics
            .connections_rejected
            .with_label_values(&[RejectReason::BadHandshake.as_str()])
            .inc();
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    };
    if shared.readiness.is_draining() {
        metrics
            .connections_rejected
            .with_label_values(&[RejectReason::Draining.as_str()])
            .inc();
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining; connect elsewhere\n",
        );
    }
    let Ok(permit) = shared.connection_slots.clone().try_acquire_owned() else {
        metrics
            .connections_rejected
            .with_label_values(&[RejectReason::MaxConnections.as_str()])
            .inc();
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached on this instance; retry\n",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared2 = shared.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(error) => {
                tracing::debug!(%peer, %error, "upgrade failed");
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!(%peer, "upgraded connection is not a plain TcpStream; dropped");
                return;
            }
        };
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        // `read_buf` is hyper's whole 8 KiB read buffer frozen, even when empty: copy out what
        // the client already sent and free it, or every connection would keep 8 KiB for life.
        let leftover = read_buf.to_vec();
        drop(read_buf);
        let stream = io.into_inner();
        let fd = stream.as_raw_fd();
        let ws = WebSocketStream::from_partially_read(
            stream,
            leftover,
            Role::Server,
            Some(shared2.ws_config),
        )
        .await;
        run_session(ws, fd, peer, shared2).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    r
}

async fn run_session(
    ws: WebSocketStream<TcpStream>,
    fd: std::os::fd::RawFd,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let id = shared.next_conn_id();
    let conn = Arc::new(ConnShared::new(id, peer));
    shared.conns.insert(conn.clone());
    shared.metrics.connections.inc();
    shared.metrics.connections_accepted.inc();
    tracing::debug!(conn = id, %peer, "connected");
    let reason = session::run(
        ws,
        fd,
        conn,
        shared.hub.clone(),
        shared.metrics.clone(),
        shared.session.clone(),
    )
    .await;
    shared.conns.remove(id);
    shared.metrics.connections.dec();
    shared.metrics.disconnect(reason);
    shared.conn_closed.notify_waiters();
    tracing::debug!(conn = id, %peer, reason = reason.as_str(), "disconnected");
}

#[derive(Deserialize)]
struct PublishItem<'a> {
    event: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Parses a publish body: one `{"event","data"}` object or a JSON array of them.
pub(crate) fn parse_publish(body: &[u8], max_name: usize) -> Result<Vec<Event>, String> {
    let first = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .copied()
        .unwrap_or(b' ');
    let items: Vec<PublishItem<'_>> = if first == b'[' {
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?
    } else {
        vec![serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?]
    };
    if items.is_empty() {
        return Err("the array holds no events".into());
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |msg: String| {
                if first == b'[' {
                    format!("event #{i}: {msg}")
                } else {
                    msg
                }
            };
            let name = item
                .event
                .ok_or_else(|| at("missing \"event\" (the event name)".into()))?;
            validate_event_name(&name, max_name)
                .map_err(|e| at(format!("bad event name {name:?}: {e}")))?;
            let data = item
                .data
                .ok_or_else(|| at("missing \"data\" (any JSON value but null)".into()))?;
            Ok(Event::new(
                name,
                Bytes::copy_from_slice(data.get().as_bytes()),
            ))
        })
        .collect()
}

async fn publish(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let max = shared.config.max_publish_bytes;
    let too_big = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_big();
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_big();
            }
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("could not read the body: {error}"),
            );
        }
    };
    let events = match parse_publish(&body, shared.config.max_pattern_length) {
        Ok(events) => events,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let Some(source) = shared.hub.source() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the event source is starting",
        );
    };
    match source.publish(events).await {
        Ok(n) => json(StatusCode::ACCEPTED, &serde_json::json!({ "accepted": n })),
        Err(error) => json_error(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies() {
        let one = parse_publish(br#"{"event":"order.created","data":{"id": 1}}"#, 255)
            .expect("one event");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "order.created");
        assert_eq!(&one[0].data[..], br#"{"id": 1}"#, "data kept byte for byte");
        let two = parse_publish(
            br#" [{"event":"a","data":1},{"event":"b","data":"x"}]"#,
            255,
        )
        .expect("batch");
        assert_eq!(two.len(), 2);
        for bad in [
            &b"nope"[..],
            br#"{"event":"a"}"#,
            br#"{"data":1}"#,
            br#"{"event":"a.*","data":1}"#,
            br#"{"event":"a","data":null}"#,
            br#"[]"#,
            br#"[{"event":"a","data":1},{"event":"","data":1}]"#,
        ] {
            assert!(
                parse_publish(bad, 255).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
