//! Process plumbing shared by the two binaries of the project (the event service and the
//! operator), so each concern is written once:
//!
//! - [`logging`] — the `--log-format` enum and the `tracing` subscriber set-up.
//! - [`signal`] — the shutdown future: first SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
//! - [`http`] — one accept/serve loop for hyper HTTP/1.1 servers (pauses on accept errors,
//!   graceful shutdown), the plain-text/JSON response helpers and the `/metrics` encoder.
//! - [`amqp`] — reading a `lapin` error (the broker's "not found" reply).
//! - [`limits`] — raising the open-files soft limit (every connection is a file descriptor).
//! - [`linger`] — closing a connection so the peer reads the last answer before any reset.

pub mod amqp;
pub mod http;
pub mod limits;
pub mod linger;
pub mod logging;
pub mod signal;
