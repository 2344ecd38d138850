//! Load generator for the event service's benchmarks (see `BENCHMARKS.md`).
//!
//! # Layout
//!
//! - [`cli`] — subcommands and flags; every knob has a default; `--peer` picks the server.
//! - [`centrifugo`] — Centrifugo's JSON client protocol and HTTP API (`--peer centrifugo`).
//! - [`frame`] — WebSocket frame headers: the cheap scanner the subscribers count with.
//! - [`ws`] — the raw-socket WebSocket client: upgrade, subscribe, pongs.
//! - [`open`] — opening many subscribed connections at bounded concurrency.
//! - [`http`] — a keep-alive HTTP/1.1 client for `/publish` and `/metrics`.
//! - [`metrics`] — scraping and reading the service's Prometheus text.
//! - [`procfs`] — RSS, CPU time and kernel socket queues from `/proc` (the `procfs` crate).
//! - [`idle`] — the memory-per-idle-connection scenario.
//! - [`fanout`] — the fan-out throughput scenario.
//! - [`report`] — the human summaries.
//! - [`amqp_bench`] — the RabbitMQ benchmark: the service against a bare lapin consumer.
//! - [`recovery_bench`] — many clients recovering missed events from the RabbitMQ stream at once.
//! - [`sys`] — raising `RLIMIT_NOFILE` (the `rlimit` crate).
#![forbid(unsafe_code)]

pub mod amqp_bench;
pub mod auth;
pub mod centrifugo;
pub mod cli;
pub mod fanout;
pub mod frame;
pub mod http;
pub mod idle;
pub mod metrics;
pub mod open;
pub mod procfs;
pub mod recovery_bench;
pub mod report;
pub mod sys;
pub mod ws;
