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
mod tests {
    use super::*;
    use crate::rebalance::{FleetSettings, Heartbeat};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A fleet where this instance (`me`) and its peers have the given counts, heard at `t`,
    /// created long enough before `t` to be warm.
    struct Fixture {
        t0: Instant,
        now: Instant,
        view: FleetView,
        seq: u64,
    }

    impl Fixture {
        fn new(me: u64, peers: &[u64]) -> Self {
            let t0 = Instant::now();
            let now = t0 + secs(100);
            let mut f = Self {
                t0,
                now,
                view: FleetView::new("me", FleetSettings::default(), t0),
                seq: 0,
            };
            f.hear("me", me, 10_000, false);
            for (i, &count) in peers.iter().enumerate() {
                f.hear(&format!("peer-{i}"), count, 10_000, false);
            }
            f
        }

        fn hear(&mut self, name: &str, connections: u64, max: u64, draining: bool) {
            self.seq += 1;
            self.view.observe(
                Heartbeat {
                    instance: name.into(),
                    started_ms: 1,
                    seq: self.seq,
                    connections,
                    max_connections: max,
                    draining,
                },
                self.now,
            );
        }

        /// `n` connections, all accepted at `t0` (100 s before `now`: old enough).
        fn old_connections(&self, n: u64) -> Vec<Candidate> {
            (1..=n)
                .map(|id| Candidate {
                    id,
                    accepted: self.t0,
                })
                .collect()
        }

        /// A rebalancer whose budget has had `seconds` to fill.
        fn rebalancer(&self, settings: Settings, seconds: u64) -> Rebalancer {
            Rebalancer::new(settings, self.now - secs(seconds)).expect("valid settings")
        }

        fn plan(&self, settings: Settings, connections: u64) -> Decision {
            let candidates = self.old_connections(connections);
            self.rebalancer(settings, 10).plan(
                self.now,
                &Local {
                    connections,
                    draining: false,
                    candidates: &candidates,
                },
                &self.view,
            )
        }
    }

    fn held(d: &Decision) -> Option<Hold> {
        match d.outcome {
            Outcome::Hold(h) => Some(h),
            Outcome::Shed { .. } => None,
        }
    }

    #[test]
    fn sheds_the_excess_over_the_mean_once_over_the_band() {
        // 3 old instances at 467 and a new one at 0: mean 350.25, target 351.
        let f = Fixture::new(467, &[467, 467, 0]);
        let settings = Settings {
            max_shed_rate: 1000.0,
            ..Settings::default()
        };
        let d = f.plan(settings, 467);
        assert_eq!(d.figures.fleet_size, 4);
        assert_eq!(d.figures.mean, Some(350.25));
        assert_eq!(d.figures.target, Some(351));
        assert_eq!(d.figures.excess, 116);
        assert_eq!(d.shed().len(), 116);
        assert!(matches!(
            d.outcome,
            Outcome::Shed {
                limited_by: Limit::Excess,
                ..
            }
        ));
    }

    #[test]
    fn within_the_band_nothing_is_shed() {
        // Mean 100, band [85, 115]: 114 is inside, and nobody is under 85.
        let f = Fixture::new(114, &[100, 86]);
        assert_eq!(
            held(&f.plan(Settings::default(), 114)),
            Some(Hold::Balanced)
        );
        // At or under the mean, nothing is shed even with a peer under the band.
        let f = Fixture::new(100, &[150, 50]);
        assert_eq!(
            held(&f.plan(Settings::default(), 100)),
            Some(Hold::Balanced)
        );
    }

    #[test]
    fn a_peer_under_the_band_keeps_instances_over_the_mean_shedding() {
        // Mean 300, band [255, 345]: 340 is inside the band, but 220 is under it.
        let f = Fixture::new(340, &[340, 220]);
        let d = f.plan(Settings::default(), 340);
        assert_eq!(d.figures.excess, 40);
        assert_eq!(d.shed().len(), 10, "the rate allows one second's worth");
    }

    #[test]
    fn the_live_count_decides_how_much_this_instance_sheds() {
        // The last heartbeat said 467; since then 100 went (shed or closed): 367 - 351 = 16 left.
        let f = Fixture::new(467, &[467, 467, 0]);
        let settings = Settings {
            max_shed_rate: 1000.0,
            ..Settings::default()
        };
        assert_eq!(f.plan(settings, 367).shed().len(), 16);
    }

    #[test]
    fn draining_peers_are_left_out_of_the_mean_and_the_headroom() {
        let mut f = Fixture::new(300, &[100]);
        f.hear("leaving", 5_000, 10_000, true);
        let d = f.plan(Settings::default(), 300);
        assert_eq!((d.figures.fleet_size, d.figures.active), (3, 2));
        assert_eq!(d.figures.mean, Some(200.0));
        assert_eq!(d.figures.excess, 100);
        // Only a draining peer besides this one: nobody to shed to.
        let mut f = Fixture::new(300, &[]);
        f.hear("leaving", 0, 10_000, true);
        assert_eq!(
            held(&f.plan(Settings::default(), 300)),
            Some(Hold::SingleInstance)
        );
    }

    #[test]
    fn a_single_instance_never_sheds() {
        let f = Fixture::new(5_000, &[]);
        let d = f.plan(Settings::default(), 5_000);
        assert_eq!(held(&d), Some(Hold::SingleInstance));
        assert_eq!(d.figures.fleet_size, 1);
        assert_eq!(d.figures.mean, Some(5_000.0));
    }

    #[test]
    fn nothing_is_shed_when_every_other_instance_is_full() {
        let mut f = Fixture::new(900, &[]);
        f.hear("full-1", 100, 100, false);
        f.hear("over-2", 120, 100, false);
        assert_eq!(
            held(&f.plan(Settings::default(), 900)),
            Some(Hold::NoHeadroom)
        );
        // Room for 3 somewhere: at most 3 are shed.
        f.hear("full-1", 97, 100, false);
        let d = f.plan(Settings::default(), 900);
        assert_eq!(d.shed().len(), 3);
        assert!(matches!(
            d.outcome,
            Outcome::Shed {
                limited_by: Limit::Headroom,
                ..
            }
        ));
    }

    #[test]
    fn young_connections_are_never_shed_and_the_oldest_go_first() {
        let f = Fixture::new(300, &[100]);
        let young = |id, age: u64| Candidate {
            id,
            accepted: f.now - secs(age),
        };
        let candidates = [
            young(1, 59),
            young(2, 61),
            young(3, 5),
            young(4, 90),
            young(5, 60),
        ];
        let local = Local {
            connections: 300,
            draining: false,
            candidates: &candidates,
        };
        let d = f
            .rebalancer(Settings::default(), 10)
            .plan(f.now, &local, &f.view);
        assert_eq!(d.shed(), [4, 2, 5]);
        assert!(matches!(
            d.outcome,
            Outcome::Shed {
                limited_by: Limit::Eligible,
                ..
            }
        ));
        let all_young = [young(1, 59), young(3, 5)];
        let local = Local {
            candidates: &all_young,
            ..local
        };
        let d = f
            .rebalancer(Settings::default(), 10)
            .plan(f.now, &local, &f.view);
        assert_eq!(held(&d), Some(Hold::NoEligible));
    }

    #[test]
    fn the_rate_is_a_token_bucket_over_simulated_time() {
        let f = Fixture::new(1_000, &[0]);
        let candidates = f.old_connections(1_000);
        let local = Local {
            connections: 1_000,
            draining: false,
            candidates: &candidates,
        };
        let settings = Settings {
            max_shed_rate: 2.5,
            ..Settings::default()
        };
        assert_eq!(settings.burst(), 3);
        let start = f.now;
        let mut r = Rebalancer::new(settings, start).expect("valid");
        // Starts empty.
        assert_eq!(
            held(&r.plan(start, &local, &f.view)),
            Some(Hold::RateLimited)
        );
        // Called every 100 ms for 10 s: 25 in total, never more than 3 at once.
        let mut total = 0;
        for step in 1..=100u64 {
            let d = r.plan(start + Duration::from_millis(step * 100), &local, &f.view);
            assert!(d.shed().len() <= 3);
            total += d.shed().len();
        }
        assert_eq!(total, 25);
        // After a pause (4 s: 10 tokens' worth), one burst of at most `burst`, not the pause's
        // worth. (Within the heartbeats' TTL, so the view is still live.)
        let later = start + secs(14);
        assert_eq!(r.plan(later, &local, &f.view).shed().len(), 3);
        assert_eq!(
            held(&r.plan(later, &local, &f.view)),
            Some(Hold::RateLimited)
        );
    }

    #[test]
    fn rounding_at_small_counts_never_overshoots_the_mean() {
        let settings = Settings::default();
        // (this instance, peers) → connections shed
        let cases: &[(u64, &[u64], usize)] = &[
            (1, &[0], 0),    // mean 0.5, target 1
            (2, &[0], 1),    // mean 1: one each
            (2, &[1], 0),    // mean 1.5, target 2
            (3, &[0], 1),    // mean 1.5, target 2: 2 and 1
            (3, &[0, 0], 2), // mean 1: one each
            (4, &[3, 3], 0), // mean 3.33, target 4
            (5, &[3, 3], 1), // mean 3.67, target 4
        ];
        for &(me, peers, expected) in cases {
            let f = Fixture::new(me, peers);
            let d = f.plan(settings, me);
            assert_eq!(d.shed().len(), expected, "{me} with peers {peers:?}: {d:?}");
            if let Some(target) = d.figures.target {
                assert!(me - d.shed().len() as u64 >= target.min(me));
            }
        }
    }

    #[test]
    fn holds_while_draining_warming_up_unheard_or_overflowing() {
        let f = Fixture::new(900, &[0]);
        let candidates = f.old_connections(900);
        let local = Local {
            connections: 900,
            draining: false,
            candidates: &candidates,
        };
        let mut r = f.rebalancer(Settings::default(), 10);
        let draining = Local {
            draining: true,
            ..local
        };
        assert_eq!(
            held(&r.plan(f.now, &draining, &f.view)),
            Some(Hold::Draining)
        );

        // A view created 10 s ago is still warming up (default 15 s).
        let mut young_view = FleetView::new("me", FleetSettings::default(), f.now - secs(10));
        for hb in f.view.live(f.now) {
            young_view.observe(hb.clone(), f.now);
        }
        assert_eq!(
            held(&r.plan(f.now, &local, &young_view)),
            Some(Hold::WarmingUp)
        );
        assert!(
            !r.plan(f.now + secs(5), &local, &young_view)
                .shed()
                .is_empty()
        );

        // Own heartbeat not heard back: the peer figures cannot be trusted.
        let mut unheard = FleetView::new("me", FleetSettings::default(), f.t0);
        unheard.observe(
            f.view
                .live(f.now)
                .find(|h| h.instance != "me")
                .cloned()
                .expect("peer"),
            f.now,
        );
        assert_eq!(held(&r.plan(f.now, &local, &unheard)), Some(Hold::NotHeard));

        // More instances than the view holds.
        let small = FleetSettings {
            max_instances: 2,
            ..FleetSettings::default()
        };
        let mut full = FleetView::new("me", small, f.t0);
        for hb in f.view.live(f.now) {
            full.observe(hb.clone(), f.now);
        }
        let extra = Heartbeat {
            instance: "extra".into(),
            started_ms: 1,
            seq: 1,
            connections: 0,
            max_connections: 10,
            draining: false,
        };
        full.observe(extra, f.now);
        assert_eq!(
            held(&r.plan(f.now, &local, &full)),
            Some(Hold::ViewOverflow)
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        for bad in [
            Settings {
                tolerance: -0.1,
                ..Settings::default()
            },
            Settings {
                tolerance: f64::NAN,
                ..Settings::default()
            },
            Settings {
                max_shed_rate: 0.0,
                ..Settings::default()
            },
            Settings {
                max_shed_rate: f64::INFINITY,
                ..Settings::default()
            },
        ] {
            assert!(Rebalancer::new(bad, Instant::now()).is_err(), "{bad:?}");
        }
    }
}
