//! The main port (hyper 1, HTTP/1.1): `GET /ws` upgrades, `POST /publish`, `/healthz`, `/readyz`.
//!
//! The upgrade path checks the connection limit before answering 101 (over `--max-connections`
//! gets 503), takes the raw `TcpStream` back out of hyper (so the session can sample its kernel
//! queues) and hands it to a `session` task with a small-buffer WebSocket configuration. The
//! request headers must arrive within `--handshake-timeout` or the connection is dropped.
//!
//! The upgrade is written here rather than taken from a WebSocket server library because the
//! session needs the raw `TcpStream` (its fd, for the kernel queue samples), which those hide.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use eventrouter_contract::http as paths;
use eventrouter_runtime::http::{self as serving, Body, ServeOptions, json, text};
use eventrouter_runtime::linger::{
    BodyLimitError, LINGER_MAX_BYTES, discard_body, read_body_limited,
};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::OwnedSemaphorePermit,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{
        Verified,
        publish::{PublishAuthError, bearer},
    },
    client_limits::{IpRefusal, IpSlot},
    connection::ConnShared,
    direct::ConnStream,
    event::{Event, EventNameError, validate_event_name},
    service_metrics::RejectReason,
    session,
    state::Shared,
    ws::Ws,
};

fn json_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// Serves the main port until `stop` fires.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let options = ServeOptions {
        name: "main",
        header_read_timeout: shared.config.handshake_timeout,
        // Batching already coalesces writes; Nagle would only add delay to a batch's last frame.
        nodelay: true,
        accept_metrics: Some(shared.metrics.accept_metrics()),
    };
    serving::serve(listener, options, stop, |peer| {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(req, peer, shared).await) }
        })
    })
    .await;
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

/// 401 for a refused `Authorization` header at the upgrade.
fn unauthorized(shared: &Shared, label: &str, message: &str) -> Response<Body> {
    let metrics = &shared.metrics;
    metrics.auth_checks.with_label_values(&[label]).inc();
    metrics
        .connections_rejected
        .with_label_values(&[RejectReason::Unauthorized.as_str()])
        .inc();
    let mut r = json_error(StatusCode::UNAUTHORIZED, format!("unauthorized: {message}"));
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    r
}

/// 429 (or 503 when the address table is full) for a client address over its limits.
fn refuse_address(shared: &Shared, refusal: IpRefusal) -> Response<Body> {
    let (reason, status, message) = match refusal {
        IpRefusal::TooMany(max) => (
            RejectReason::IpLimit,
            StatusCode::TOO_MANY_REQUESTS,
            format!("this address holds {max} connections already (--max-connections-per-ip)\n"),
        ),
        IpRefusal::TooFast => (
            RejectReason::IpRate,
            StatusCode::TOO_MANY_REQUESTS,
            "this address opens connections too fast (--connect-rate-per-ip); retry later\n"
                .to_owned(),
        ),
        IpRefusal::Busy => (
            RejectReason::IpLimit,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many client addresses tracked; retry\n".to_owned(),
        ),
    };
    shared
        .metrics
        .connections_rejected
        .with_label_values(&[reason.as_str()])
        .inc();
    let mut r = text(status, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
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
    if !shared
        .access
        .origin_allowed(req.headers().get(header::ORIGIN).map(HeaderValue::as_bytes))
    {
        metrics
            .connections_rejected
            .with_label_values(&[RejectReason::Origin.as_str()])
            .inc();
        return text(
            StatusCode::FORBIDDEN,
            "this origin may not open a WebSocket here (--allowed-origins)\n",
        );
    }
    let ip_slot = match &shared.access.ip_limits {
        None => None,
        Some(limits) => {
            let ip = shared.access.client_ip(peer.ip(), req.headers());
            match limits.admit(ip) {
                Ok(slot) => Some(slot),
                Err(refusal) => return refuse_address(&shared, refusal),
            }
        }
    };
    let token = match (
        &shared.access.auth,
        req.headers().get(header::AUTHORIZATION),
    ) {
        (Some(auth), Some(value)) => {
            let Some(token) = bearer(value.as_bytes()).and_then(|t| std::str::from_utf8(t).ok())
            else {
                return unauthorized(
                    &shared,
                    "malformed",
                    "expected \"Authorization: Bearer <token>\"",
                );
            };
            match auth.verify(token) {
                Ok(verified) => {
                    metrics.auth_checks.with_label_values(&["ok"]).inc();
                    // Boxed: the connection's task keeps this slot for its whole life.
                    Some(Box::new(verified))
                }
                Err(error) => return unauthorized(&shared, error.label(), &error.to_string()),
            }
        }
        _ => None,
    };
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
        let ws = Ws::new(ConnStream::new(stream), leftover, shared2.ws_config);
        // The connection gets a task of its own, sized to the session alone; this one (and the
        // upgrade's state) ends here.
        tokio::spawn(Connection::start(
            ws,
            peer,
            shared2,
            token,
            // Boxed: most servers set no per-address limits, and it would be 24 bytes more in
            // every connection's task.
            (permit, ip_slot.map(Box::new)),
        ));
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

/// One connection's task: its session, then the bookkeeping when it ends. The connection
/// limit's slot (taken as a permit, kept as a count to keep the task small: returned in `Drop`)
/// and the per-address slot are held for the connection's life.
struct Connection {
    session: session::SessionTask,
    shared: Arc<Shared>,
    _ip_slot: Option<Box<IpSlot>>,
}

impl Connection {
    fn start(
        ws: Ws,
        peer: SocketAddr,
        shared: Arc<Shared>,
        token: Option<Box<Verified>>,
        (permit, ip_slot): (OwnedSemaphorePermit, Option<Box<IpSlot>>),
    ) -> Self {
        permit.forget();
        let id = shared.next_conn_id();
        let conn = Arc::new(ConnShared::new(id, peer));
        shared.conns.insert(conn.clone());
        shared.metrics.connections.inc();
        shared.metrics.connections_accepted.inc();
        tracing::debug!(conn = id, %peer, "connected");
        let session = session::run(ws, conn, shared.hub.clone(), shared.session.clone(), token);
        Self {
            session,
            shared,
            _ip_slot: ip_slot,
        }
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let (reason, conn) = std::task::ready!(Pin::new(&mut self.session).poll(cx));
        let shared = &self.shared;
        shared.conns.remove(conn.id);
        shared.metrics.connections.dec();
        shared.metrics.disconnect(reason);
        shared.conn_closed.notify_waiters();
        tracing::debug!(conn = conn.id, peer = %conn.peer, reason = reason.as_str(), "disconnected");
        Poll::Ready(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.connection_slots.add_permits(1);
    }
}

#[derive(Deserialize)]
struct PublishItem<'a> {
    event: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Why a publish body was refused (answered 400 with this message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishBodyError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the array holds no events")]
    EmptyArray,
    /// A bad item of a JSON array: the message names its index.
    #[error("event #{index}: {error}")]
    InArray {
        index: usize,
        error: PublishItemError,
    },
    /// The body's single object is bad.
    #[error(transparent)]
    Single(PublishItemError),
}

/// What is wrong with one `{"event","data"}` object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishItemError {
    #[error("missing \"event\" (the event name)")]
    MissingName,
    #[error("bad event name {name:?}: {error}")]
    BadName { name: String, error: EventNameError },
    #[error("missing \"data\" (any JSON value but null)")]
    MissingData,
}

fn parse_item(item: PublishItem<'_>, max_name: usize) -> Result<Event, PublishItemError> {
    let name = item.event.ok_or(PublishItemError::MissingName)?;
    if let Err(error) = validate_event_name(&name, max_name) {
        return Err(PublishItemError::BadName { name, error });
    }
    let data = item.data.ok_or(PublishItemError::MissingData)?;
    Ok(Event::new(
        name,
        Bytes::copy_from_slice(data.get().as_bytes()),
    ))
}

/// Parses a publish body: one `{"event","data"}` object or a JSON array of them.
pub(crate) fn parse_publish(body: &[u8], max_name: usize) -> Result<Vec<Event>, PublishBodyError> {
    let is_array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if !is_array {
        let item: PublishItem<'_> = serde_json::from_slice(body)?;
        return parse_item(item, max_name)
            .map(|event| vec![event])
            .map_err(PublishBodyError::Single);
    }
    let items: Vec<PublishItem<'_>> = serde_json::from_slice(body)?;
    if items.is_empty() {
        return Err(PublishBodyError::EmptyArray);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            parse_item(item, max_name).map_err(|error| PublishBodyError::InArray { index, error })
        })
        .collect()
}

/// 401 (no or unknown key) or 403 (an event outside the key's patterns) for a publish.
fn publish_refused(shared: &Shared, error: &PublishAuthError) -> Response<Body> {
    shared
        .metrics
        .publish_rejected
        .with_label_values(&[error.label()])
        .inc();
    match error {
        PublishAuthError::Forbidden { .. } => json_error(StatusCode::FORBIDDEN, error.to_string()),
        _ => {
            let mut r = json_error(StatusCode::UNAUTHORIZED, error.to_string());
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

async fn publish(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    // A request without a valid key is refused before its body is read.
    if let Some(keys) = &shared.access.publish_keys
        && let Err(error) = keys.check(
            authorization.as_ref().map(HeaderValue::as_bytes),
            std::iter::empty(),
        )
    {
        return publish_refused(shared, &error);
    }
    let body = match read_publish_body(req, shared.config.max_publish_bytes).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let events = match parse_publish(&body, shared.config.max_event_name_length) {
        Ok(events) => events,
        Err(error) => return json_error(StatusCode::BAD_REQUEST, error.to_string()),
    };
    if let Some(keys) = &shared.access.publish_keys
        && let Err(error) = keys.check(
            authorization.as_ref().map(HeaderValue::as_bytes),
            events.iter().map(|e| e.name.as_str()),
        )
    {
        return publish_refused(shared, &error);
    }
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

/// Reads a publish body of at most `max` bytes; else the answer: 400 (unreadable) or 413.
///
/// A 413 closes the connection (`Connection: close`) and is given only once the rest of the body
/// was read and discarded, at most `LINGER_MAX_BYTES` over the limit and for `LINGER_TIMEOUT`:
/// closing with the body unread would reset the connection, and a client still sending would
/// see the reset instead of the 413. A client that waits for `100 Continue` has sent nothing and
/// is answered at once, and so is one declaring a body too long to drain.
async fn read_publish_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    let too_big = || {
        let mut answer = json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {max} bytes"),
        );
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        answer
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > max as u64) {
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let drainable = (max as u64).saturating_add(LINGER_MAX_BYTES as u64);
        if !expects_continue && declared <= drainable {
            let mut body = req.into_body();
            discard_body(&mut body, max.saturating_add(LINGER_MAX_BYTES)).await;
        }
        return Err(too_big());
    }
    match read_body_limited(req.into_body(), max).await {
        Ok(body) => Ok(body),
        Err(BodyLimitError::TooLarge { .. }) => Err(too_big()),
        Err(error @ BodyLimitError::Read(_)) => {
            Err(json_error(StatusCode::BAD_REQUEST, error.to_string()))
        }
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

    #[test]
    fn publish_errors_keep_their_messages() {
        let message = |body: &[u8]| parse_publish(body, 255).expect_err("refused").to_string();
        assert_eq!(
            message(br#"{"data":1}"#),
            "missing \"event\" (the event name)"
        );
        assert_eq!(message(br#"[]"#), "the array holds no events");
        assert_eq!(
            message(br#"[{"event":"a","data":1},{"event":"a","data":null}]"#),
            "event #1: missing \"data\" (any JSON value but null)"
        );
        assert_eq!(
            message(br#"{"event":"a.*","data":1}"#),
            "bad event name \"a.*\": event name may not contain '*' or '#' (those are subscription wildcards)"
        );
        assert!(message(b"nope").starts_with("invalid JSON: "));
        assert!(matches!(
            parse_publish(br#"{"event":"abcdef","data":1}"#, 5),
            Err(PublishBodyError::Single(PublishItemError::BadName {
                error: EventNameError::TooLong { len: 6, max: 5 },
                ..
            }))
        ));
    }
}
