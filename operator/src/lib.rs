//! The EventRouter operator: turns an `EventRouter` resource into a running, autoscaled event
//! service and its RabbitMQ topology.
//!
//! # Layout
//!
//! | module | role | I/O |
//! |---|---|---|
//! | `crd` | the `EventRouter` types, defaults, CEL rules, the generated CRD | none |
//! | `topology` | the broker topology a router wants, as data | none |
//! | `validate` | spec + cluster facts → `Plan` or every problem at once | none |
//! | `build` | `Plan` → `Desired`, every child object (workload, autoscaling, monitoring) | none |
//! | `status` | observations → conditions (types and reasons as enums) | none |
//! | `reconcile_backoff` | per-router retry delays after failed reconciles (`backon`) | none |
//! | `apply` | server-side apply of `Desired`, deletion of undesired children | API server |
//! | `broker` | exchange and upstream bindings over AMQP | RabbitMQ |
//! | `controller` | fetch → validate → build → apply → status; finalizer; Events; watches | both |
//! | `leader` | Lease-based leader election | API server |
//! | `metrics`, `admin` | the operator's metrics and `/healthz` `/readyz` `/metrics` | HTTP |
//!
//! `run` is the entry point the binary and the tests call: it elects a leader, and only while
//! this process leads does it run the controller.

pub mod admin;
pub(crate) mod apply;
pub(crate) mod broker;
pub mod build;
pub(crate) mod controller;
pub mod crd;
pub(crate) mod error;
pub(crate) mod leader;
pub(crate) mod metrics;
pub(crate) mod reconcile_backoff;
pub(crate) mod status;
pub(crate) mod topology;
pub(crate) mod validate;

use std::sync::Arc;

use kube::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::admin::Readiness;
pub use crate::controller::ControllerSettings;
pub use crate::leader::LeaseSettings;
pub use crate::metrics::Metrics;

/// Run the operator until `shutdown` is cancelled: campaign for the Lease, run the controller
/// while leading, stop it the moment leadership is lost, release the Lease on shutdown.
pub async fn run(
    client: Client,
    settings: ControllerSettings,
    lease: LeaseSettings,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut elector = leader::LeaderElector::new(client.clone(), lease.clone());
    let ctx = Arc::new(controller::Context::new(client, metrics.clone(), settings));
    loop {
        // Candidate: retry until this process holds the Lease.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => readiness.set(true),
                Err(error) => warn!(%error, lease = %lease.name, "cannot reach the Lease"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(lease.retry_period) => {}
            }
        }
        readiness.set(true);
        metrics.leader.set(1);
        info!(identity = %lease.identity, "leading: starting the controller");

        let stop = CancellationToken::new();
        let stop_signal = stop.clone();
        let controller = controller::run(ctx.clone(), async move { stop_signal.cancelled().await });
        // Boxed so it can be dropped (cancelling every in-flight reconcile) the moment leadership ends.
        let mut controller = Box::pin(controller);
        let mut last_renewal = tokio::time::Instant::now();
        let released = loop {
            tokio::select! {
                () = &mut controller => {
                    warn!("the controller stopped while leading");
                    break false;
                }
                () = shutdown.cancelled() => {
                    stop.cancel();
                    // Let in-flight reconciles finish briefly; the Lease is still ours meanwhile.
                    let _ = tokio::time::timeout(lease.retry_period, &mut controller).await;
                    elector.release().await;
                    break true;
                }
                () = tokio::time::sleep(lease.retry_period) => {
                    match elector.try_acquire_or_renew().await {
                        Ok(true) => last_renewal = tokio::time::Instant::now(),
                        Ok(false) => {
                            warn!(identity = %lease.identity, "another replica took the Lease");
                            break false;
                        }
                        Err(error) if last_renewal.elapsed() > lease.renew_deadline => {
                            warn!(%error, "could not renew the Lease before the deadline");
                            break false;
                        }
                        Err(error) => warn!(%error, "Lease renewal failed; retrying"),
                    }
                }
            }
        };
        // Dropping the controller cancels every in-flight reconcile: a non-leader must not write.
        drop(controller);
        metrics.leader.set(0);
        if released {
            info!("shut down");
            return;
        }
        info!(identity = %lease.identity, "no longer leading: controller stopped");
    }
}
