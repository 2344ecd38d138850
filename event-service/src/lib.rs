//! The event service: WebSocket clients subscribe to event patterns and get events pushed.
//!
//! # Layout
//!
//! - [`config`] — every setting (clap flags with `EVENTROUTER_*` env vars).
//! - [`event`] — the in-process event and event-name rules.
//! - [`source`] — where events come from: the embedded bus or RabbitMQ; bind/unbind/publish.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod event;
pub mod protocol;
pub mod source;
pub mod topics;
