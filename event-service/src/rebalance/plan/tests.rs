//! Unit tests of the shedding decision: every rule and edge, over simulated time.

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
