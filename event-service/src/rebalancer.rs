//! Runs rebalancing: the task that publishes this instance's heartbeat, keeps the fleet view from
//! the heartbeats heard on the control exchange, and closes the connections the pure core
//! ([`crate::rebalance`]) picks with code 4002.
//!
//! One task owns the fleet view and the rate budget (no locks); the AMQP source hands it every
//! message of the control queue through a bounded channel. Each heartbeat interval it publishes
//! a heartbeat; every [`DECIDE_EVERY`] it decides, so the shed rate is spread over the interval
//! instead of leaving in one burst per heartbeat.
//!
//! It runs only with the `amqp` source and `--rebalance` on: with the embedded bus there is one
//! instance and nothing to balance. Its metrics are registered either way, so dashboards show a
//! fleet of zero rather than no data.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus::{Gauge, IntCounter, IntGauge, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use eventrouter_contract::metrics as names;

use crate::{
    config::Config,
    connection::CloseRequest,
    rebalance::{
        FleetSettings, FleetView, Heartbeat, Local, Outcome, Rebalancer, Settings, SettingsError,
    },
    source::amqp::AmqpSource,
    state::Shared,
};

/// How often the shedding decision runs (the heartbeat interval when that is shorter).
pub const DECIDE_EVERY: Duration = Duration::from_secs(1);
/// Heartbeats waiting for the task at most; more are dropped (the next ones replace them).
const INBOX: usize = 1024;

/// The `eventrouter_rebalance_*` metrics.
#[derive(Clone)]
pub struct RebalanceMetrics {
    fleet_size: IntGauge,
    fleet_mean: Gauge,
    shed: IntCounter,
    received: IntCounter,
    rejected: IntCounter,
}

impl RebalanceMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            fleet_size: IntGauge::new(
                names::REBALANCE_FLEET_SIZE,
                "Instances heard on the control exchange within the heartbeat TTL, this one included.",
            )?,
            fleet_mean: Gauge::new(
                names::REBALANCE_FLEET_MEAN,
                "Connections per active (not draining) instance, from the heartbeats.",
            )?,
            shed: IntCounter::new(
                names::REBALANCE_SHED,
                "Connections closed with 4002 so their clients reconnect to a less loaded instance.",
            )?,
            received: IntCounter::new(
                names::REBALANCE_HEARTBEATS_RECEIVED,
                "Heartbeats received on the control exchange and accepted.",
            )?,
            rejected: IntCounter::new(
                names::REBALANCE_HEARTBEATS_REJECTED,
                "Messages on the control exchange refused as heartbeats (malformed, too large, other version).",
            )?,
        };
        registry.register(Box::new(m.fleet_size.clone()))?;
        registry.register(Box::new(m.fleet_mean.clone()))?;
        registry.register(Box::new(m.shed.clone()))?;
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        Ok(m)
    }
}

/// The rebalancer's settings, from the configuration.
pub fn settings(config: &Config) -> Result<(Settings, FleetSettings), SettingsError> {
    let interval = config.heartbeat_interval;
    let settings = Settings {
        tolerance: config.rebalance_tolerance,
        max_shed_rate: config.rebalance_rate,
        min_connection_age: config.rebalance_min_age,
        // Every live peer heard at least twice before the first decision.
        warmup: interval * 3,
    };
    settings.validate()?;
    let fleet = FleetSettings {
        ttl: interval * 3,
        ..FleetSettings::default()
    };
    Ok((settings, fleet))
}

/// Starts the task when it has something to do (the `amqp` source with rebalancing on).
pub fn spawn(
    shared: Arc<Shared>,
    source: &Arc<AmqpSource>,
    metrics: RebalanceMetrics,
    stop: CancellationToken,
) -> Result<(), SettingsError> {
    if !shared.config.rebalance || source.control_exchange().is_none() {
        return Ok(());
    }
    let (settings, fleet) = settings(&shared.config)?;
    let (tx, rx) = mpsc::channel(INBOX);
    source.attach_control_inbox(tx);
    let now = Instant::now();
    let task = Task {
        view: FleetView::new(source.instance(), fleet, now),
        rebalancer: Rebalancer::new(settings, now)?,
        started_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        seq: 0,
        shared,
        source: Arc::clone(source),
        metrics,
    };
    info!(
        instance = source.instance(),
        control_exchange = source.control_exchange().unwrap_or_default(),
        tolerance = settings.tolerance,
        max_shed_rate = settings.max_shed_rate,
        min_connection_age = ?settings.min_connection_age,
        "rebalancing on"
    );
    tokio::spawn(task.run(rx, stop));
    Ok(())
}

struct Task {
    view: FleetView,
    rebalancer: Rebalancer,
    started_ms: u64,
    seq: u64,
    shared: Arc<Shared>,
    source: Arc<AmqpSource>,
    metrics: RebalanceMetrics,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::Receiver<Vec<u8>>, stop: CancellationToken) {
        let interval = self.shared.config.heartbeat_interval;
        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut decide = tokio::time::interval(DECIDE_EVERY.min(interval));
        decide.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                Some(body) = inbox.recv() => self.observe(&body),
                _ = heartbeat.tick() => self.publish().await,
                _ = decide.tick() => self.decide(),
            }
        }
    }

    fn observe(&mut self, body: &[u8]) {
        match Heartbeat::decode(body) {
            Ok(heartbeat) => {
                self.metrics.received.inc();
                let instance = heartbeat.instance.clone();
                let observed = self.view.observe(heartbeat, Instant::now());
                debug!(instance, observed = observed.metric_label(), "heartbeat");
            }
            Err(error) => {
                self.metrics.rejected.inc();
                debug!(%error, reason = error.metric_label(), "not a heartbeat");
            }
        }
    }

    async fn publish(&mut self) {
        self.seq += 1;
        let heartbeat = Heartbeat {
            instance: self.view.me().to_owned(),
            started_ms: self.started_ms,
            seq: self.seq,
            connections: self.shared.conns.len() as u64,
            max_connections: self.shared.config.max_connections as u64,
            draining: self.shared.readiness.is_draining(),
        };
        let body = match heartbeat.encode() {
            Ok(body) => body,
            Err(error) => {
                warn!(%error, "this instance's heartbeat is not valid; rebalancing holds");
                return;
            }
        };
        if let Err(error) = self.source.publish_heartbeat(&body).await {
            debug!(%error, "heartbeat not published");
        }
    }

    fn decide(&mut self) {
        let now = Instant::now();
        self.view.expire(now);
        let burst = usize::try_from(self.rebalancer.settings().burst()).unwrap_or(usize::MAX);
        let movable = self.shared.conns.movable(burst);
        let local = Local {
            connections: movable.open as u64,
            draining: self.shared.readiness.is_draining(),
            candidates: &movable.oldest,
        };
        let decision = self.rebalancer.plan(now, &local, &self.view);
        let figures = decision.figures;
        self.metrics
            .fleet_size
            .set(i64::try_from(figures.fleet_size).unwrap_or(i64::MAX));
        self.metrics.fleet_mean.set(figures.mean.unwrap_or(0.0));
        if let Outcome::Hold(hold) = &decision.outcome {
            debug!(
                hold = hold.metric_label(),
                held = local.connections,
                "rebalancing holds"
            );
        }
        if let Outcome::Shed { ids, limited_by } = &decision.outcome {
            let closed = ids
                .iter()
                .filter(|&&id| self.shared.conns.request_close(id, CloseRequest::Rebalance))
                .count();
            self.metrics.shed.inc_by(closed as u64);
            info!(
                closed,
                held = local.connections,
                mean = figures.mean.unwrap_or(0.0),
                target = figures.target.unwrap_or(0),
                fleet = figures.fleet_size,
                limited_by = ?limited_by,
                "rebalancing: asked clients to reconnect elsewhere (4002)"
            );
        }
    }
}
