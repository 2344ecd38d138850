//! A fleet simulated over one-second ticks: every instance publishes heartbeats through the wire
//! format, keeps its own view, runs [`Rebalancer::plan`] every tick on its own figures, and the
//! clients it sheds reconnect to another instance chosen as a Service would (at random) or as a
//! least-connections balancer would. Checks the promises of the module: connections conserved,
//! no connection shed younger than the minimum age, the shed rate within its bound, and the
//! fleet within ±20 % of the mean after a bounded number of ticks.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use proptest::prelude::*;

use super::{Candidate, FleetSettings, FleetView, Heartbeat, Local, Rebalancer, Settings};

/// How a reconnecting client is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Uniformly over the instances, as kube-proxy does.
    Random,
    /// On the instance with the fewest connections.
    LeastLoaded,
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Connections per instance at the start (all of them old).
    initial: Vec<u64>,
    placement: Placement,
    settings: Settings,
    /// Heartbeat interval, in ticks.
    heartbeat_every: u64,
    /// Ticks a shed client takes to reconnect (1 = on the next tick).
    reconnect_delay: u64,
    ticks: u64,
    seed: u64,
}

impl Scenario {
    fn new(initial: &[u64], placement: Placement) -> Self {
        Self {
            initial: initial.to_vec(),
            placement,
            settings: Settings::default(),
            heartbeat_every: 5,
            reconnect_delay: 1,
            ticks: 600,
            seed: 7,
        }
    }
}

#[derive(Debug)]
struct Report {
    /// First tick from which the fleet stayed within ±20 % of the mean to the end.
    converged_at: Option<u64>,
    /// Last tick anything was shed.
    last_shed_at: Option<u64>,
    /// Connections shed in all.
    moves: u64,
    /// Connections that had to move (the sum of the initial excesses over the mean).
    needed: u64,
    /// Most connections one instance shed in one tick.
    max_per_tick: u64,
}

/// SplitMix64: a small, seedable generator, so a failing case replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    id: u64,
    client: usize,
    accepted: Instant,
}

struct Instance {
    name: String,
    conns: Vec<Conn>,
    view: FleetView,
    rebalancer: Rebalancer,
    seq: u64,
    phase: u64,
    /// Connections shed per tick.
    shed_log: Vec<u64>,
}

fn within(counts: &[u64], fraction: f64) -> bool {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    counts
        .iter()
        .all(|&c| (c as f64 - mean).abs() <= mean * fraction)
}

fn run(sc: &Scenario) -> Report {
    let s = sc.settings;
    let tick = Duration::from_secs(1);
    let base = Instant::now();
    // The simulation starts well after the initial connections were accepted: all are eligible.
    let start = base + s.min_connection_age * 2;
    let at = |t: u64| start + tick * u32::try_from(t).expect("short simulation");
    let fleet_settings = FleetSettings {
        ttl: tick * u32::try_from(sc.heartbeat_every * 3).expect("small interval"),
        max_instances: 64,
    };
    let mut rng = Rng(sc.seed);
    let mut next_id = 0u64;
    let mut clients = 0usize;
    let mut last_shed: Vec<Option<Instant>> = Vec::new();
    let mut fleet: Vec<Instance> = sc
        .initial
        .iter()
        .enumerate()
        .map(|(i, &count)| {
            let name = format!("pod-{i}");
            let conns = (0..count)
                .map(|_| {
                    next_id += 1;
                    clients += 1;
                    last_shed.push(None);
                    Conn {
                        id: next_id,
                        client: clients - 1,
                        accepted: base,
                    }
                })
                .collect();
            Instance {
                view: FleetView::new(name.clone(), fleet_settings, start),
                rebalancer: Rebalancer::new(s, start).expect("valid settings"),
                name,
                conns,
                seq: 0,
                phase: rng.next() % sc.heartbeat_every,
                shed_log: Vec::new(),
            }
        })
        .collect();
    let total = clients as u64;
    let needed = {
        let mean = total as f64 / fleet.len() as f64;
        sc.initial
            .iter()
            .map(|&c| (c as f64 - mean).max(0.0))
            .sum::<f64>()
            .round() as u64
    };
    // (tick due, encoded heartbeat) and (tick due, client).
    let mut wire: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut reconnecting: VecDeque<(u64, usize)> = VecDeque::new();
    let mut balanced = Vec::with_capacity(sc.ticks as usize);
    let (mut moves, mut max_per_tick, mut last_shed_at) = (0u64, 0u64, None);

    for t in 0..sc.ticks {
        let now = at(t);
        while wire.front().is_some_and(|(due, _)| *due <= t) {
            let Some((_, bytes)) = wire.pop_front() else {
                break;
            };
            let hb = Heartbeat::decode(&bytes).expect("own encoding decodes");
            for inst in &mut fleet {
                inst.view.observe(hb.clone(), now);
            }
        }
        while reconnecting.front().is_some_and(|(due, _)| *due <= t) {
            let Some((_, client)) = reconnecting.pop_front() else {
                break;
            };
            let to = match sc.placement {
                Placement::Random => rng.below(fleet.len()),
                Placement::LeastLoaded => (0..fleet.len())
                    .min_by_key(|&i| (fleet[i].conns.len(), rng.next()))
                    .expect("a fleet"),
            };
            next_id += 1;
            fleet[to].conns.push(Conn {
                id: next_id,
                client,
                accepted: now,
            });
        }

        for inst in &mut fleet {
            let candidates: Vec<Candidate> = inst
                .conns
                .iter()
                .map(|c| Candidate {
                    id: c.id,
                    accepted: c.accepted,
                })
                .collect();
            let local = Local {
                connections: inst.conns.len() as u64,
                draining: false,
                candidates: &candidates,
            };
            let decision = inst.rebalancer.plan(now, &local, &inst.view);
            let shed = decision.shed();
            for id in shed {
                let pos = inst
                    .conns
                    .iter()
                    .position(|c| c.id == *id)
                    .expect("plan picks open connections");
                let conn = inst.conns.swap_remove(pos);
                assert!(
                    now - conn.accepted >= s.min_connection_age,
                    "{} shed connection {} at age {:?}",
                    inst.name,
                    conn.id,
                    now - conn.accepted
                );
                if let Some(prev) = last_shed[conn.client] {
                    assert!(
                        now - prev >= s.min_connection_age,
                        "client {} shed twice within {:?}",
                        conn.client,
                        now - prev
                    );
                }
                last_shed[conn.client] = Some(now);
                reconnecting.push_back((t + sc.reconnect_delay, conn.client));
            }
            let n = shed.len() as u64;
            inst.shed_log.push(n);
            moves += n;
            max_per_tick = max_per_tick.max(n);
            if n > 0 {
                last_shed_at = Some(t);
            }
            // The rate bound over every window ending now: `burst + rate × span`.
            let mut sum = 0u64;
            for (w, shed) in inst.shed_log.iter().rev().enumerate().take(120) {
                sum += shed;
                let span = w as f64; // seconds from the window's first tick to this one
                assert!(
                    sum as f64 <= s.burst() as f64 + s.max_shed_rate * span + 1e-9,
                    "{} shed {sum} in {} ticks",
                    inst.name,
                    w + 1
                );
            }
        }

        for inst in &mut fleet {
            if (t + inst.phase) % sc.heartbeat_every == 0 {
                inst.seq += 1;
                let hb = Heartbeat {
                    instance: inst.name.clone(),
                    started_ms: 1,
                    seq: inst.seq,
                    connections: inst.conns.len() as u64,
                    max_connections: 10_000,
                    draining: false,
                };
                wire.push_back((t + 1, hb.encode().expect("valid heartbeat")));
            }
        }

        let counts: Vec<u64> = fleet.iter().map(|i| i.conns.len() as u64).collect();
        assert_eq!(
            counts.iter().sum::<u64>() + reconnecting.len() as u64,
            total,
            "connections conserved at tick {t}"
        );
        balanced.push(reconnecting.is_empty() && within(&counts, 0.20));
    }

    let converged_at = balanced
        .iter()
        .rposition(|b| !b)
        .map_or(Some(0), |last_bad| {
            (last_bad + 1 < balanced.len()).then_some(last_bad as u64 + 1)
        });
    Report {
        converged_at,
        last_shed_at,
        moves,
        needed,
        max_per_tick,
    }
}

/// Ticks the slowest instance needs at the configured rate if every client it sheds lands
/// elsewhere, times the expected share that lands back on it under random placement.
fn bound(sc: &Scenario) -> u64 {
    let n = sc.initial.len() as f64;
    let total: u64 = sc.initial.iter().sum();
    let mean = total as f64 / n;
    let worst = sc
        .initial
        .iter()
        .map(|&c| (c as f64 - mean).max(0.0))
        .fold(0.0, f64::max);
    let returns = match sc.placement {
        Placement::Random => n / (n - 1.0),
        Placement::LeastLoaded => 1.0,
    };
    let warmup = sc.settings.warmup.as_secs();
    // Twice the ideal, plus the warm-up, one minimum age (clients that came back must age before
    // they can leave again) and two heartbeat TTLs of lag.
    warmup
        + sc.settings.min_connection_age.as_secs()
        + 6 * sc.heartbeat_every
        + (2.0 * worst * returns / sc.settings.max_shed_rate).ceil() as u64
}

fn check(sc: &Scenario) -> Report {
    let report = run(sc);
    let limit = bound(sc);
    let converged = report
        .converged_at
        .unwrap_or_else(|| panic!("never balanced within ±20 %: {sc:?} {report:?}"));
    assert!(
        converged <= limit,
        "balanced only at tick {converged}, bound {limit}: {sc:?} {report:?}"
    );
    assert!(report.max_per_tick <= sc.settings.burst());
    // Balanced means quiet: no churn goes on for the last minute of the run.
    if let Some(last) = report.last_shed_at {
        assert!(
            last + 60 < sc.ticks,
            "still shedding at tick {last} of {}: {sc:?} {report:?}",
            sc.ticks
        );
    }
    report
}

#[test]
fn scale_out_scenarios_converge_within_their_bounds() {
    // (initial counts, placement): the end-to-end scenario's scale-out to 4 instances at 1,400
    // connections, a doubling, one hot instance among many, and a fleet at small counts.
    let scenarios = [
        (&[467, 467, 466, 0][..], Placement::Random),
        (&[467, 467, 466, 0][..], Placement::LeastLoaded),
        (&[1400, 0, 0, 0][..], Placement::Random),
        (&[1400, 0, 0, 0][..], Placement::LeastLoaded),
        (&[500, 500, 500, 0, 0, 0][..], Placement::Random),
        (
            &[900, 100, 100, 100, 100, 100, 100, 100][..],
            Placement::Random,
        ),
        (&[60, 0][..], Placement::Random),
    ];
    for (initial, placement) in scenarios {
        let sc = Scenario::new(initial, placement);
        let r = check(&sc);
        // Figures for the design notes; `--nocapture` shows them.
        println!(
            "{initial:?} {placement:?}: balanced ±20 % at tick {:?} (bound {}), last shed at {:?}, \
             {} moves for {} needed",
            r.converged_at,
            bound(&sc),
            r.last_shed_at,
            r.moves,
            r.needed,
        );
        assert!(r.moves >= r.needed.saturating_sub(initial.len() as u64 * 60 / 5));
    }
}

#[test]
fn a_balanced_fleet_sheds_nothing() {
    let sc = Scenario::new(&[400, 380, 420, 410], Placement::Random);
    let r = check(&sc);
    assert_eq!((r.moves, r.converged_at), (0, Some(0)));
}

#[test]
fn a_single_instance_sheds_nothing() {
    let sc = Scenario::new(&[5_000], Placement::Random);
    assert_eq!(run(&sc).moves, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn skewed_fleets_converge(
        old in prop::collection::vec(50u64..600, 1..5),
        new in 1usize..4,
        least_loaded in any::<bool>(),
        seed in any::<u64>(),
        rate in prop::sample::select(vec![2.0, 5.0, 10.0, 25.0]),
        min_age_secs in prop::sample::select(vec![10u64, 30, 60]),
        reconnect_delay in 1u64..4,
    ) {
        let mut initial = old;
        initial.extend(std::iter::repeat_n(0, new));
        let mut sc = Scenario::new(&initial, if least_loaded {
            Placement::LeastLoaded
        } else {
            Placement::Random
        });
        sc.settings.max_shed_rate = rate;
        sc.settings.min_connection_age = Duration::from_secs(min_age_secs);
        sc.seed = seed;
        sc.reconnect_delay = reconnect_delay;
        sc.ticks = bound(&sc) + 120;
        check(&sc);
    }
}
