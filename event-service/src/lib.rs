//! The event service: WebSocket clients subscribe to event patterns and get events pushed.
//!
//! Its origin is a production failure: a WebSocket service that only ever wrote to its sockets.
//! Client pings piled up unread in kernel receive buffers until the node ran out of memory. Here
//! every connection is read for its whole life, outbound queues are bounded, and kernel socket
//! queue depths are metrics.
//!
//! # Layout
//!
//! Layers by role, from the entry point inwards; each imports only layers below it
//! (entry → listeners → sessions → hub → source):
//!
//! - [`server`] — the entry point: [`server::serve`] (listeners + shutdown future, then drain)
//!   and [`server::RunningServer`] (start on port 0 in the background, for tests).
//! - [`state`] — what every task of one server shares (configuration, metrics, hub, connection
//!   registry and slots, readiness); built by `server`, read by the listeners.
//! - [`main_port`] — the main listener: `/ws` upgrades, `POST /publish`, `/healthz`, `/readyz`.
//! - [`access`] — who may use the main port: connection tokens, publish keys, allowed origins,
//!   per-address limits (built from the configuration; re-reads the key files).
//! - [`auth`] — JWT verification, what a token grants (pattern containment), publish keys. Pure
//!   but for reading the key files.
//! - [`client_limits`] — per-address connection caps and rates, per-connection frame rate.
//! - [`console`] — the live page on the main port (`/`, `/console/*`), when `--console` is on.
//! - [`admin_port`] — the admin listener: `/metrics`, `/debug/connections`.
//! - [`session`] — one WebSocket connection's task: always reads, writes in batches, pings, idle
//!   timeout, socket sampling, subscribe/unsubscribe requests.
//! - [`ws`] — the session's WebSocket: tungstenite's protocol over the socket, driven with the
//!   session task's own context (no per-connection waker proxies).
//! - [`ws_close`] — how a session ends: close codes for read errors (1009, 1007, 1002) and the
//!   lingering close that lets the client read the close frame.
//! - [`connection`] — what other tasks see of a connection: its bounded outbound queue (bytes),
//!   socket samples, close requests; the registry of open connections.
//! - [`direct`] — frames written straight into a parked connection's socket by the fan-out
//!   (no task wake-up), and the socket wrapper that finishes a write cut short.
//! - [`hub`] — fan-out of each event (encoded once) to matching connections; per-pattern reference
//!   counts driving `bind`/`unbind` on the source.
//! - [`source`] — where events come from: the embedded bus (`memory`) or RabbitMQ (`amqp`, whose
//!   `link` module keeps the broker connection up). A source holds the hub only weakly.
//! - [`history`] — missed-event recovery: the embedded bus's ring, the RabbitMQ stream reader and
//!   the exact hand-over from history to live (`session::recover` runs one recovery).
//! - [`protocol`] — the client JSON protocol: parse requests with hard limits, encode replies and
//!   event frames. Pure.
//! - [`topics`] — pattern validation and the topic trie (RabbitMQ `*` / `#` semantics). Pure.
//! - [`service_metrics`] — the Prometheus registry's contents (the AMQP source adds its broker
//!   metrics).
//! - [`sockq`] — `SIOCINQ`/`SIOCOUTQ` ioctls; with `direct`'s `sendmsg` and `heap_trim`'s
//!   `malloc_trim`, the crate's only `unsafe`.
//! - [`heap_trim`] — returns the heap that connection churn freed to the system.
//! - [`rebalance`] — rebalancing after scale-out: the heartbeat instances exchange on the control
//!   exchange, the fleet view, and which connections to ask to reconnect (close 4002). Pure.
//! - [`rebalancer`] — the task that runs it: publishes this instance's heartbeat, reads the
//!   others' (from the AMQP source's control channel), closes the chosen connections.
//! - [`fd_budget`] — how many connections the open-files limit holds (`--max-connections` is
//!   clamped to it).
//! - [`config`] — every setting; [`event`] — the in-process event and event-name rules.
//!
//! Process plumbing shared with the operator (logging set-up, signals, the HTTP accept loop,
//! `/metrics` encoding, the open-files limit) lives in the `eventrouter-runtime` crate.
//!
//! ```no_run
//! # async fn example() -> Result<(), event_service::server::ServeError> {
//! use event_service::{config::Config, server::RunningServer};
//! let server = RunningServer::start(Config::for_tests()).await?;
//! println!("clients connect to {}", server.ws_url());
//! server.stop().await?; // drains like SIGTERM
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub(crate) mod access;
pub(crate) mod admin_port;
pub mod auth;
pub(crate) mod client_limits;
pub mod config;
pub(crate) mod connection;
pub(crate) mod console;
pub mod direct;
pub mod event;
pub mod fd_budget;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod heap_trim;
pub(crate) mod history;
pub(crate) mod hub;
pub(crate) mod main_port;
pub(crate) mod protocol;
pub(crate) mod rebalance;
pub(crate) mod rebalancer;
pub mod server;
pub(crate) mod service_metrics;
pub mod session;
pub(crate) mod sockq;
pub mod source;
pub(crate) mod state;
pub(crate) mod topics;
pub(crate) mod ws;
pub(crate) mod ws_close;
