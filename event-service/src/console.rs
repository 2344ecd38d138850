//! The console: a live page on the main port for watching events flow, served only when enabled
//! (`--console`, on with `--demo`). Everything is embedded in the binary (no CDN, nothing read
//! from disk at run time):
//!
//! - `GET /` — the page (`console/index.html`).
//! - `GET /console/app.js`, `GET /console/style.css` — its script and style.
//! - `GET /console/client.js` — the JavaScript client, the same file as `clients/js/index.js`:
//!   the page is a client like any other.
//! - `GET /console/stats` — the instance's key gauges as JSON, read from the same metrics and
//!   connection registry as the admin port's `/metrics` (which stays private: the page never
//!   needs it).
//!
//! When the console is disabled these paths answer 404 like any unknown path.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus::{IntCounterVec, core::Collector};

use eventrouter_runtime::http::{Body, json, text};

use crate::{config::Config, state::Shared};

/// The page's path.
pub const PAGE_PATH: &str = "/";
/// The stats endpoint's path.
pub const STATS_PATH: &str = "/console/stats";
/// The JavaScript client's path.
pub const CLIENT_PATH: &str = "/console/client.js";

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/style.css");
const CLIENT_JS: &str = include_str!("../clients/js/index.js");

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Scripts, styles and sockets only from this origin; the page cannot be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether the console is served: `--console` when given, else on with `--demo`.
pub fn enabled(config: &Config) -> bool {
    config.console.unwrap_or(config.demo)
}

/// Answers a console path when the console is enabled; `None` for every other request (the
/// caller answers it, usually with 404).
pub(crate) fn route<B>(req: &Request<B>, shared: &Shared) -> Option<Response<Body>> {
    if !enabled(&shared.config) {
        return None;
    }
    let path = req.uri().path();
    let asset = match path {
        PAGE_PATH => Some((INDEX_HTML, HTML)),
        "/console/app.js" => Some((APP_JS, JAVASCRIPT)),
        "/console/style.css" => Some((STYLE_CSS, CSS)),
        CLIENT_PATH => Some((CLIENT_JS, JAVASCRIPT)),
        STATS_PATH => None,
        _ => return None,
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Some(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    Some(match asset {
        Some((body, content_type)) => static_file(body, content_type),
        None => json(StatusCode::OK, &stats(shared)),
    })
}

fn static_file(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidate every time: the files change with the binary, never under one running process,
    // but a browser must not keep last version's page after an upgrade.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// Sum over every series of a labelled counter (reading never creates a series).
fn counter_total(counter: &IntCounterVec) -> u64 {
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().value())
        // Counters hold whole numbers; f64 is exact up to 2^53.
        .map(|v| v as u64)
        .sum()
}

/// The instance's key gauges. Counters are totals: the page turns two readings into a rate.
fn stats(shared: &Shared) -> serde_json::Value {
    let m = &shared.metrics;
    let (mut recv_q, mut recv_q_max, mut send_q, mut outbound) = (0u64, 0u64, 0u64, 0u64);
    shared.conns.for_each(|c| {
        let s = c.sample();
        recv_q += s.recv_q;
        recv_q_max = recv_q_max.max(s.recv_q);
        send_q += s.send_q;
        outbound += s.outbound;
    });
    serde_json::json!({
        "connections": m.connections.get(),
        "max_connections": m.max_connections.get(),
        "subscriptions": m.subscriptions.get(),
        "bindings": m.bindings.get(),
        "events_received_total": counter_total(&m.events_received),
        "deliveries_total": m.deliveries.get(),
        "drops_total": counter_total(&m.drops),
        "recv_q_bytes": recv_q,
        "recv_q_max_bytes": recv_q_max,
        "send_q_bytes": send_q,
        "outbound_queue_bytes": outbound,
        "socket_sample_interval_seconds": shared.config.socket_sample_interval.as_secs_f64(),
        "source": shared.hub.source().map(|s| s.origin().as_str()),
        "ready": shared.readiness.not_ready_reason().is_none(),
        "draining": shared.readiness.is_draining(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn on_with_demo_unless_turned_off() {
        let parse = |args: &[&str]| {
            enabled(&Config::parse_from(
                std::iter::once("event-service").chain(args.iter().copied()),
            ))
        };
        assert!(!parse(&[]));
        assert!(parse(&["--demo"]));
        assert!(parse(&["--console"]));
        assert!(parse(&["--console", "true"]));
        assert!(!parse(&["--demo", "--console", "false"]));
        assert!(!parse(&["--demo", "--console=false"]));
        assert!(parse(&["--console", "--demo"]));
    }

    #[test]
    fn the_page_loads_its_own_files_only() {
        for path in ["/console/app.js", "/console/style.css"] {
            assert!(INDEX_HTML.contains(path), "{path}");
        }
        assert!(APP_JS.contains("./client.js"));
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
