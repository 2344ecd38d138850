//! Rebalancing after scale-out: instances holding more than their share of connections ask some
//! clients to reconnect, paced, until the fleet is balanced. This module is the pure core: the
//! heartbeat format, the fleet view and the shedding decision. No I/O, no clock, no tasks: every
//! function takes the `now` it decides at, so the rules are tested over simulated time.
//!
//! # Why
//!
//! A Kubernetes Service spreads *new* connections over the pods; it never moves an open one. After
//! a scale-out the new pods only get new clients while the old pods keep theirs, for as long as
//! those clients stay connected — hours for a WebSocket. Closing some of the old pods' connections
//! with a "reconnect now" code lets the Service place them again, mostly on the new pods.
//!
//! # What is exchanged, and over what
//!
//! Every instance publishes a [`Heartbeat`] (its name, its open connections, its
//! `--max-connections`, whether it drains, an incarnation and a sequence number; versioned JSON
//! under 1 KiB) every few seconds to the router's **control exchange**, and keeps the latest
//! heartbeat of every instance it hears — its own included — in a [`FleetView`], forgetting
//! instances silent for longer than a TTL (three intervals by default).
//!
//! The exchange is on RabbitMQ because RabbitMQ is the one thing every instance already shares:
//! pods get no RBAC for the Kubernetes API (no listing pods or EndpointSlices), and there is no
//! other channel between them. It is a separate exchange of the router's own, declared by the
//! operator with the rest of the topology, and never the events exchange: a client subscribed to
//! `#` would receive every heartbeat. With the embedded bus there is one instance and no
//! exchange, and nothing is ever shed.
//!
//! # What is decided
//!
//! [`Rebalancer::plan`] (rules in [`plan`]) picks the connections to close now: only while this
//! instance is over the fleet mean plus a tolerance (or over the mean while another instance is
//! under it minus the tolerance), only down to the mean, only into free places on other
//! instances, at most at a configured rate, and never a connection younger than a minimum age.
//!
//! # Guarantees
//!
//! - **No ping-pong.** An instance at or under the mean never sheds, and a shed stops at the
//!   mean, so no instance is pushed into shedding by what it received. A moved client holds a new
//!   connection, younger than the minimum age, so it cannot be shed again for that long — no
//!   client is bounced twice in a row, whatever the Service does with it.
//! - **Bounded reconnect rate.** Each instance sheds at most `burst + rate × t` connections in
//!   any `t` seconds (a token bucket), so a fleet of `n` instances causes at most `n × rate`
//!   reconnects per second.
//! - **Nothing on a blind view.** Nothing is shed during the warm-up after start, while the
//!   instance does not hear its own heartbeat back (control channel down), while the view holds
//!   fewer than two active instances, or when the other instances have no free place.
//!
//! # Close code
//!
//! The task in [`crate::rebalancer`] closes each chosen connection with 4002
//! ([`eventrouter_contract::close::REBALANCE`]): clients reconnect right away, without backoff,
//! and the load balancer places them again.
//!
//! # Layout
//!
//! - [`heartbeat`] — [`Heartbeat`] and its wire format (`"v": 1`), bounded and strictly decoded.
//! - [`fleet`] — [`FleetView`]: latest heartbeat per instance, expiry, stale and overflow rules.
//! - [`plan`] — [`Rebalancer`], [`Settings`] and the [`Decision`] with its [`Figures`].

pub mod fleet;
pub mod heartbeat;
pub mod plan;
#[cfg(test)]
mod simulation;

pub use fleet::{FleetSettings, FleetView};
pub use heartbeat::Heartbeat;
pub use plan::{Candidate, Local, Outcome, Rebalancer, Settings, SettingsError};
