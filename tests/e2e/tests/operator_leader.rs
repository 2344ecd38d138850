//! Two operator instances share one Lease: only the leader reconciles and writes; when it shuts
//! down (releasing the Lease) the other takes over, and when it crashes (never releasing) the
//! other takes over once the Lease has gone unrenewed for its duration.

mod operator_support;

use std::time::{Duration, Instant};

use eventrouter_e2e::rabbitmq::amqp_url;
use eventrouter_e2e::wait::{wait_for, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use operator::crd::EventRouterSpec;
use operator_support::*;

/// Managers that have written fields of the Deployment.
async fn deployment_writers(client: &kube::Client, ns: &str) -> Vec<String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let d = api.get("chat").await.expect("deployment");
    d.metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_only_the_leader_reconciles_and_the_standby_takes_over() {
    let (client, ns) = setup("op-leader").await;
    let ns = ns.name().to_string();
    put_amqp_secret(&client, &ns, "amqp", &amqp_url()).await;
    let first = RunningOperator::start(&client, &ns, "replica-one", "eventrouter-operator").await;
    wait_until("replica-one to lead", CONVERGE, || async {
        first.is_leader()
    })
    .await;
    let second = RunningOperator::start(&client, &ns, "replica-two", "eventrouter-operator").await;

    apply_router(&client, &ns, "chat", &EventRouterSpec::with_secret("amqp")).await;
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;
    // Let the standby campaign a few times while the leader works.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        first.is_leader() && !second.is_leader(),
        "exactly one leader"
    );
    let reconciles = |op: &RunningOperator| {
        op.metrics.reconciles.with_label_values(&["ok"]).get()
            + op.metrics.reconciles.with_label_values(&["error"]).get()
    };
    assert!(reconciles(&first) > 0, "the leader reconciled");
    assert_eq!(reconciles(&second), 0, "the standby never reconciled");
    let events = router_events(&client, &ns, "chat").await;
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|(_, _, instance)| instance == "replica-one"),
        "only the leader wrote events: {events:?}"
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get("eventrouter-operator")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("replica-one"));
    assert_eq!(
        deployment_writers(&client, &ns)
            .await
            .iter()
            .filter(|m| m.as_str() == "eventrouter-operator")
            .count(),
        1
    );

    // The leader shuts down and releases the Lease: the standby leads and acts on changes.
    first.shutdown().await;
    wait_until("replica-two to lead", CONVERGE, || async {
        second.is_leader()
    })
    .await;
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.replicas = 5;
    apply_router(&client, &ns, "chat", &spec).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for("the new leader to apply replicas 5", CONVERGE, || async {
        let d = deployments.get("chat").await.map_err(|e| e.to_string())?;
        match d.spec.and_then(|s| s.replicas) {
            Some(5) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The Deployment is applied inside the reconcile; the counter moves when it ends.
    wait_until(
        "the new leader to count a finished reconcile",
        CONVERGE,
        || async { reconciles(&second) > 0 },
    )
    .await;
    let holder = leases
        .get("eventrouter-operator")
        .await
        .expect("lease")
        .spec
        .expect("spec");
    assert_eq!(holder.holder_identity.as_deref(), Some("replica-two"));
    assert!(holder.lease_transitions.unwrap_or(0) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_a_leader_that_loses_its_lease_stops_reconciling() {
    let (client, ns) = setup("op-lease-lost").await;
    let ns = ns.name().to_string();
    put_amqp_secret(&client, &ns, "amqp", &amqp_url()).await;
    let op = RunningOperator::start(&client, &ns, "replica-one", "eventrouter-operator").await;
    wait_until("replica-one to lead", CONVERGE, || async { op.is_leader() }).await;

    // Someone else takes the Lease (as a replica on a partitioned node would after expiry).
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let mut lease = leases.get("eventrouter-operator").await.expect("lease");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        spec.lease_duration_seconds = Some(3600);
    }
    leases
        .replace("eventrouter-operator", &Default::default(), &lease)
        .await
        .expect("take the Lease");
    wait_until("replica-one to step down", CONVERGE, || async {
        !op.is_leader()
    })
    .await;

    let before = op.metrics.reconciles.with_label_values(&["ok"]).get();
    apply_router(&client, &ns, "chat", &EventRouterSpec::with_secret("amqp")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        op.metrics.reconciles.with_label_values(&["ok"]).get(),
        before,
        "a non-leader does not reconcile"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "and writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_a_standby_takes_over_after_a_crashed_leaders_lease_expires() {
    let (client, ns) = setup("op-lease-crash").await;
    let ns = ns.name().to_string();
    put_amqp_secret(&client, &ns, "amqp", &amqp_url()).await;
    let lease_duration = Duration::from_secs(6);

    // The leader runs as a bare task so it can crash: aborting it drops every future at once,
    // without the release a graceful shutdown does.
    let crashed_metrics = operator::Metrics::new();
    let crashed = tokio::spawn(operator::run(
        client.clone(),
        operator::ControllerSettings {
            namespace: Some(ns.clone()),
            identity: "replica-crashed".into(),
            ..operator::ControllerSettings::default()
        },
        operator::LeaseSettings::new(
            "eventrouter-operator",
            &ns,
            "replica-crashed",
            lease_duration,
        ),
        crashed_metrics.clone(),
        operator::Readiness::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    wait_until("replica-crashed to lead", CONVERGE, || async {
        crashed_metrics.leader.get() == 1
    })
    .await;
    crashed.abort();
    let _ = crashed.await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let before = leases
        .get("eventrouter-operator")
        .await
        .expect("lease")
        .spec
        .expect("spec");
    assert_eq!(
        before.holder_identity.as_deref(),
        Some("replica-crashed"),
        "a crash does not release the Lease"
    );

    let standby_started = Instant::now();
    let standby =
        RunningOperator::start(&client, &ns, "replica-standby", "eventrouter-operator").await;
    wait_until("replica-standby to lead", CONVERGE, || async {
        standby.is_leader()
    })
    .await;
    let waited = standby_started.elapsed();
    assert!(
        waited >= lease_duration,
        "the standby waited {waited:?}, less than the Lease's {lease_duration:?} without renewal"
    );
    let after = leases
        .get("eventrouter-operator")
        .await
        .expect("lease")
        .spec
        .expect("spec");
    assert_eq!(after.holder_identity.as_deref(), Some("replica-standby"));
    assert_eq!(
        after.lease_transitions.unwrap_or(0),
        before.lease_transitions.unwrap_or(0) + 1
    );

    // The new leader acts: it reconciles a router created after the takeover.
    apply_router(&client, &ns, "chat", &EventRouterSpec::with_secret("amqp")).await;
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;
    assert!(
        standby.metrics.reconciles.with_label_values(&["ok"]).get() > 0,
        "the new leader reconciled"
    );
    let events = router_events(&client, &ns, "chat").await;
    assert!(
        events
            .iter()
            .all(|(_, _, instance)| instance == "replica-standby"),
        "only the new leader wrote events: {events:?}"
    );
}
