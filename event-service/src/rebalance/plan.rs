//! The shedding decision: given this instance's connections and its view of the fleet, which
//! connections (if any) to ask to reconnect now.
//!
//! The rules, in the order [`Rebalancer::plan`] applies them:
//!
//! 1. Nothing while this instance drains (the drain moves everything anyway), during the warm-up
//!    after start, while its own heartbeat is not heard back (the control channel is down, so the
//!    view is stale), or while the view overflows (the mean would be computed on part of the
//!    fleet).
//! 2. Nothing with fewer than two active instances: one instance (the embedded bus, or a fleet of
//!    one) has nowhere to send anyone.
//! 3. The band: with `mean` the connections per active instance (draining ones left out) and
//!    `target = ceil(mean)`, an instance sheds when it holds more than `mean × (1 + tolerance)`,
//!    or when it holds more than `target` while some other instance holds fewer than
//!    `mean × (1 − tolerance)`. It sheds down to `target`, never below: an instance at or under
//!    the mean never sheds, so moved clients never push a receiver into shedding them back.
//!    (Shedding only down to `mean × (1 + tolerance)` cannot balance a fleet: with four instances
//!    and one new, the three old ones stop at 1.15 × mean and the new one stays at 0.55 × mean.)
//! 4. Nothing when the other active instances have no free place (every one at or above its
//!    `--max-connections`), and never more than their free places.
//! 5. Never a connection younger than the minimum age: a moved client cannot be moved again
//!    before that, so no client bounces twice in a row and no two instances trade the same
//!    clients back and forth.
//! 6. At most `max_shed_rate` per second: a token bucket holding at most one second's worth
//!    (at least one), refilled from the `now` each call passes in.
//!
//! The mean is computed from heartbeats only, this instance's own included, so every instance
//! works from the same figures and a move in flight (closed here, not yet reconnected elsewhere)
//! counts at most one heartbeat interval. This instance's own connections come from its live
//! count, so it never sheds past the target on a stale figure of its own.

use std::time::{Duration, Instant};

use super::fleet::{DEFAULT_HEARTBEAT_INTERVAL, FleetView};

/// The rebalancer's knobs (each becomes a flag, an env var and a CRD field).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Fraction over (and under) the fleet mean that counts as balanced.
    pub tolerance: f64,
    /// Most connections shed per second by one instance.
    pub max_shed_rate: f64,
    /// A connection younger than this is never shed.
    pub min_connection_age: Duration,
    /// Nothing is shed for this long after the fleet view is created, so every live peer has
    /// been heard at least twice before the first decision.
    pub warmup: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tolerance: 0.15,
            max_shed_rate: 10.0,
            min_connection_age: Duration::from_secs(60),
            warmup: DEFAULT_HEARTBEAT_INTERVAL * 3,
        }
    }
}

impl Settings {
    /// Checks the values a flag parser lets through but the rules cannot use.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(self.tolerance.is_finite() && (0.0..=1.0).contains(&self.tolerance)) {
            return Err(SettingsError::Tolerance(self.tolerance));
        }
        if !(self.max_shed_rate.is_finite() && self.max_shed_rate > 0.0) {
            return Err(SettingsError::Rate(self.max_shed_rate));
        }
        Ok(())
    }

    /// Most connections shed in one go: one second's worth of the rate, at least one. Over any
    /// interval of `t` seconds an instance sheds at most `burst + max_shed_rate × t`.
    pub fn burst(&self) -> u64 {
        (self.max_shed_rate.ceil() as u64).max(1)
    }
}

/// A setting the rebalancer cannot work with.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("rebalance tolerance must be between 0 and 1 (a fraction of the mean), got {0}")]
    Tolerance(f64),
    #[error("rebalance shed rate must be a positive number of connections per second, got {0}")]
    Rate(f64),
}

/// A connection that may be shed: its id in the connection registry and when it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub accepted: Instant,
}

/// This instance as it is now.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    /// Open connections now (the live count, not the last heartbeat's).
    pub connections: u64,
    /// This instance is draining.
    pub draining: bool,
    /// Connections that may be shed. The registry passes its oldest ones, at least
    /// [`Settings::burst`] of them when it has that many; any order, younger ones are filtered
    /// out here.
    pub candidates: &'a [Candidate],
}

/// Why nothing is shed this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// This instance drains.
    Draining,
    /// Within the warm-up after start.
    WarmingUp,
    /// This instance's own heartbeat is not in the view: the control channel is not working.
    NotHeard,
    /// The view refused an instance within the last TTL: the fleet is larger than the view.
    ViewOverflow,
    /// Fewer than two active instances.
    SingleInstance,
    /// Within the band.
    Balanced,
    /// The other active instances are all at or above their `--max-connections`.
    NoHeadroom,
    /// Every connection is younger than the minimum age.
    NoEligible,
    /// The shed rate is used up.
    RateLimited,
}

impl Hold {
    /// A bounded label for metrics and logs.
    pub fn metric_label(self) -> &'static str {
        match self {
            Hold::Draining => "draining",
            Hold::WarmingUp => "warming_up",
            Hold::NotHeard => "not_heard",
            Hold::ViewOverflow => "view_overflow",
            Hold::SingleInstance => "single_instance",
            Hold::Balanced => "balanced",
            Hold::NoHeadroom => "no_headroom",
            Hold::NoEligible => "no_eligible",
            Hold::RateLimited => "rate_limited",
        }
    }
}

/// Which bound decided how many connections are shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// All of the excess.
    Excess,
    /// The shed rate.
    Rate,
    /// The other instances' free places.
    Headroom,
    /// The connections old enough to be shed.
    Eligible,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Hold(Hold),
    /// Close these connections with code 4002 (oldest first).
    Shed {
        ids: Vec<u64>,
        limited_by: Limit,
    },
}

/// The figures behind a decision, for the `eventrouter_rebalance_*` metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    /// Instances heard within the TTL, this one and draining ones included.
    pub fleet_size: usize,
    /// Of those, the ones sharing the load (not draining).
    pub active: usize,
    /// Connections per active instance, from their heartbeats.
    pub mean: Option<f64>,
    /// What an instance over the band sheds down to: `ceil(mean)`.
    pub target: Option<u64>,
    /// Connections this instance holds over the target while out of the band (0 when balanced
    /// or holding for any reason before the band is checked).
    pub excess: u64,
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub figures: Figures,
}

impl Decision {
    /// The connections to close now (empty when holding).
    #[cfg(test)]
    pub fn shed(&self) -> &[u64] {
        match &self.outcome {
            Outcome::Shed { ids, .. } => ids,
            Outcome::Hold(_) => &[],
        }
    }
}

/// A token bucket driven by the `now` its caller passes: no clock of its own.
#[derive(Debug, Clone)]
struct Budget {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Budget {
    /// Starts empty, so nothing can be shed in a burst the moment the instance starts.
    fn new(rate: f64, capacity: u64, now: Instant) -> Self {
        Self {
            rate,
            capacity: capacity as f64,
            tokens: 0.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    fn available(&self) -> u64 {
        self.tokens.floor() as u64
    }

    fn take(&mut self, n: u64) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }
}

/// Decides, call after call, what this instance sheds. Holds the settings and the rate budget;
/// everything else comes in through [`Rebalancer::plan`]'s arguments.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    settings: Settings,
    budget: Budget,
}

impl Rebalancer {
    pub fn new(settings: Settings, now: Instant) -> Result<Self, SettingsError> {
        settings.validate()?;
        Ok(Self {
            budget: Budget::new(settings.max_shed_rate, settings.burst(), now),
            settings,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The decision at `now`. The connections returned are charged to the rate budget: the
    /// caller closes them (with code 4002), ideally spread over the interval until its next call.
    pub fn plan(&mut self, now: Instant, local: &Local<'_>, fleet: &FleetView) -> Decision {
        self.budget.refill(now);
        let s = &self.settings;
        let summary = fleet.summary(now);
        let mean = summary.mean();
        let target = mean.map(|m| m.ceil() as u64);
        let mut figures = Figures {
            fleet_size: summary.seen,
            active: summary.active,
            mean,
            target,
            excess: 0,
        };
        let hold = |hold, figures| Decision {
            outcome: Outcome::Hold(hold),
            figures,
        };

        if local.draining {
            return hold(Hold::Draining, figures);
        }
        if now.saturating_duration_since(fleet.created()) < s.warmup {
            return hold(Hold::WarmingUp, figures);
        }
        if fleet.own(now).is_none() {
            return hold(Hold::NotHeard, figures);
        }
        if fleet.overflowing(now) {
            return hold(Hold::ViewOverflow, figures);
        }
        let (Some(mean), Some(target)) = (mean, target) else {
            return hold(Hold::SingleInstance, figures);
        };
        if summary.active < 2 {
            return hold(Hold::SingleInstance, figures);
        }

        let held = local.connections as f64;
        let over_band = held > mean * (1.0 + s.tolerance);
        let someone_under_band = summary
            .lowest_peer
            .is_some_and(|low| (low as f64) < mean * (1.0 - s.tolerance));
        let excess = local.connections.saturating_sub(target);
        if excess == 0 || !(over_band || someone_under_band) {
            return hold(Hold::Balanced, figures);
        }
        figures.excess = excess;

        if summary.peer_headroom == 0 {
            return hold(Hold::NoHeadroom, figures);
        }
        let mut eligible: Vec<Candidate> = local
            .candidates
            .iter()
            .filter(|c| now.saturating_duration_since(c.accepted) >= s.min_connection_age)
            .copied()
            .collect();
        if eligible.is_empty() {
            return hold(Hold::NoEligible, figures);
        }
        let tokens = self.budget.available();
        if tokens == 0 {
            return hold(Hold::RateLimited, figures);
        }

        let eligible_count = eligible.len() as u64;
        let (count, limited_by) = [
            (excess, Limit::Excess),
            (tokens, Limit::Rate),
            (summary.peer_headroom, Limit::Headroom),
            (eligible_count, Limit::Eligible),
        ]
        .into_iter()
        .min_by_key(|(n, _)| *n)
        .unwrap_or((0, Limit::Excess));
        // `count` is at most `eligible.len()`, a usize.
        let count = usize::try_from(count).unwrap_or(eligible.len());

        let oldest_first = |c: &Candidate| (c.accepted, c.id);
        if count < eligible.len() {
            eligible.select_nth_unstable_by_key(count, oldest_first);
            eligible.truncate(count);
        }
        eligible.sort_unstable_by_key(oldest_first);
        self.budget.take(count as u64);
        Decision {
            outcome: Outcome::Shed {
                ids: eligible.into_iter().map(|c| c.id).collect(),
                limited_by,
            },
            figures,
        }
    }
}

#[cfg(test)]
mod tests;
