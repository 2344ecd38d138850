//! The operator with a real RabbitMQ (the shared node; the URL goes in a Secret): the exchange, the
//! control exchange and the upstream bindings exist after reconcile, follow the spec, are removed
//! on deletion with `deletionPolicy: delete` and kept with `retain`; an unreachable broker gives `BrokerReady=False`
//! and the router recovers once the Secret is fixed; the skip annotation releases a deletion that
//! cannot reach the broker. The history stream (`spec.history`) is a stream with the spec's
//! arguments and bindings, follows the patterns, reports arguments RabbitMQ cannot change, and is
//! unbound, deleted or kept by the same rules.

mod operator_support;

use eventrouter_e2e::rabbitmq::{DEFAULT_VHOST, Management, amqp_url, encode_segment};
use eventrouter_e2e::wait::{wait_for, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use operator::crd::{
    DeletionPolicy, EventRouterSpec, HistorySpec, RecordedHistory, SKIP_BROKER_CLEANUP_ANNOTATION,
    StreamArguments, UpstreamBinding,
};
use operator_support::*;

/// Declare (or delete) a test-owned upstream exchange on the shared node.
async fn upstream_exchange(name: &str, present: bool) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("a channel");
    if present {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .expect("declare the upstream exchange");
    } else {
        channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete an exchange");
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Delete queue (stream) `name` on the shared node, as an administrator would by hand.
async fn delete_queue(name: &str) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP connects");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .expect("delete a queue");
    let _ = connection.close(200, "done".into()).await;
}

/// `(source, routing_key)` of every binding into exchange `destination`.
async fn bindings_into(mgmt: &Management, destination: &str) -> Vec<(String, String)> {
    let mut pairs = mgmt
        .exchange_bindings_into(DEFAULT_VHOST, destination)
        .await
        .expect("management API answers");
    pairs.sort();
    pairs
}

/// Whether `name` exists on the shared node (the management API must answer).
async fn exchange_exists(mgmt: &Management, name: &str) -> bool {
    mgmt.exchange_exists(DEFAULT_VHOST, name)
        .await
        .expect("management API answers")
}

/// `(type, durable)` of exchange `name` on the shared node.
async fn exchange_kind(mgmt: &Management, name: &str) -> (String, bool) {
    let details = mgmt
        .get(&format!(
            "exchanges/{}/{}",
            encode_segment(DEFAULT_VHOST),
            encode_segment(name)
        ))
        .await
        .expect("management API answers")
        .unwrap_or_else(|| panic!("exchange {name:?} exists"));
    (
        details["type"].as_str().unwrap_or_default().to_string(),
        details["durable"].as_bool().unwrap_or_default(),
    )
}

/// The history stream of a router whose events exchange is `exchange`.
fn stream_of(exchange: &str) -> String {
    eventrouter_contract::history::default_stream(exchange)
}

/// `(type, durable, arguments)` of queue `name` on the shared node, as the management API shows
/// it (`GET /api/queues/<vhost>/<name>`); `None` when it does not exist.
async fn queue_details(mgmt: &Management, name: &str) -> Option<(String, bool, serde_json::Value)> {
    let details = mgmt
        .queue(DEFAULT_VHOST, name)
        .await
        .expect("management API answers")?;
    Some((
        details["type"].as_str().unwrap_or_default().to_string(),
        details["durable"].as_bool().unwrap_or_default(),
        details["arguments"].clone(),
    ))
}

/// The routing keys binding the history stream of `exchange` to it (sorted).
async fn stream_bindings(mgmt: &Management, exchange: &str) -> Vec<String> {
    mgmt.routing_keys(DEFAULT_VHOST, exchange, &stream_of(exchange))
        .await
        .expect("management API answers")
}

/// The history stream router `name` recorded in its status.
async fn recorded_history(client: &kube::Client, ns: &str, name: &str) -> Option<RecordedHistory> {
    routers(client, ns)
        .get(name)
        .await
        .expect("the router")
        .status
        .and_then(|s| s.topology)
        .and_then(|t| t.history)
}

/// The value of env var `var` in router `chat`'s Deployment, if set.
async fn deployment_env(client: &kube::Client, ns: &str, var: &str) -> Option<String> {
    let deployment = kube::Api::<Deployment>::namespaced(client.clone(), ns)
        .get("chat")
        .await
        .expect("the Deployment");
    deployment
        .spec?
        .template
        .spec?
        .containers
        .first()?
        .env
        .clone()?
        .into_iter()
        .find(|e| e.name == var)
        .and_then(|e| e.value)
}

/// The control exchange of a router whose events exchange is `exchange`.
fn control_of(exchange: &str) -> String {
    eventrouter_contract::control::default_exchange(exchange)
}

/// A watched namespace, the router's exchange name and a declared upstream exchange.
struct WithUpstream {
    watched: Watched,
    mgmt: Management,
    exchange: String,
    upstream: String,
}

async fn with_upstream(prefix: &str) -> WithUpstream {
    let watched = watched_namespace(prefix).await;
    let (exchange, upstream) = (
        format!("{}.router", watched.ns),
        format!("{}.orders", watched.ns),
    );
    upstream_exchange(&upstream, true).await;
    WithUpstream {
        watched,
        mgmt: Management::shared(),
        exchange,
        upstream,
    }
}

fn a_router_spec(
    exchange: &str,
    upstream: &str,
    keys: &[&str],
    policy: DeletionPolicy,
) -> EventRouterSpec {
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.rabbitmq.exchange = Some(exchange.into());
    spec.rabbitmq.upstreams = vec![UpstreamBinding {
        exchange: upstream.into(),
        routing_keys: keys.iter().map(|k| k.to_string()).collect(),
    }];
    spec.deletion_policy = policy;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_declares_bindings_follows_the_spec_and_deletes_exactly_what_it_declared() {
    let WithUpstream {
        watched,
        mgmt,
        exchange,
        upstream,
    } = with_upstream("op-mq-delete").await;
    let (client, ns) = (&watched.client, watched.ns.as_str());

    apply_router(
        client,
        ns,
        "chat",
        &a_router_spec(
            &exchange,
            &upstream,
            &["order.*", "refund.#"],
            DeletionPolicy::Delete,
        ),
    )
    .await;
    wait_topology_declared(client, ns, "chat").await;
    assert!(
        exchange_exists(&mgmt, &exchange).await,
        "the router's exchange exists"
    );
    assert_eq!(
        exchange_kind(&mgmt, &exchange).await,
        ("topic".to_string(), true)
    );
    // The pods' heartbeats go to an exchange of their own, never the events exchange.
    let control = control_of(&exchange);
    assert_eq!(
        exchange_kind(&mgmt, &control).await,
        ("fanout".to_string(), true),
        "the control exchange is a durable fanout"
    );
    let recorded = routers(client, ns)
        .get("chat")
        .await
        .expect("the router")
        .status
        .and_then(|s| s.topology)
        .expect("a recorded topology");
    assert_eq!(recorded.control_exchange.as_deref(), Some(control.as_str()));
    assert_eq!(
        bindings_into(&mgmt, &exchange).await,
        vec![
            (upstream.clone(), "order.*".to_string()),
            (upstream.clone(), "refund.#".to_string())
        ]
    );

    // One pattern fewer in the spec: exactly that binding goes.
    apply_router(
        client,
        ns,
        "chat",
        &a_router_spec(&exchange, &upstream, &["order.*"], DeletionPolicy::Delete),
    )
    .await;
    wait_until("the refund.# binding to be removed", CONVERGE, || async {
        bindings_into(&mgmt, &exchange).await == vec![(upstream.clone(), "order.*".to_string())]
    })
    .await;
    // The status record follows the broker (the operator changes the broker first, then writes
    // the status), so it is awaited too.
    wait_until("the status to record one binding", CONVERGE, || async {
        routers(client, ns)
            .get("chat")
            .await
            .ok()
            .and_then(|r| r.status)
            .and_then(|s| s.topology)
            .is_some_and(|t| t.bindings.len() == 1)
    })
    .await;

    // Drift on the broker (someone deletes the exchange) is repaired by the periodic resync.
    upstream_exchange(&exchange, false).await;
    wait_until(
        "the resync to re-declare the exchange",
        std::time::Duration::from_secs(45),
        || async {
            mgmt.exchange_exists(DEFAULT_VHOST, &exchange)
                .await
                .unwrap_or(false)
        },
    )
    .await;

    delete_router(client, ns, "chat").await;
    wait_until("the router's exchange to be deleted", CONVERGE, || async {
        !mgmt
            .exchange_exists(DEFAULT_VHOST, &exchange)
            .await
            .unwrap_or(true)
    })
    .await;
    wait_absent(&routers(client, ns), "chat").await;
    assert!(
        !exchange_exists(&mgmt, &control).await,
        "the control exchange is deleted with the router's exchange"
    );
    assert!(
        exchange_exists(&mgmt, &upstream).await,
        "the upstream exchange is not ours to delete"
    );
    upstream_exchange(&upstream, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_retain_policy_keeps_the_topology_after_deletion() {
    let WithUpstream {
        watched,
        mgmt,
        exchange,
        upstream,
    } = with_upstream("op-mq-retain").await;
    let (client, ns) = (&watched.client, watched.ns.as_str());

    apply_router(
        client,
        ns,
        "chat",
        &a_router_spec(&exchange, &upstream, &["#"], DeletionPolicy::Retain),
    )
    .await;
    wait_condition(client, ns, "chat", "BrokerReady", "True", None).await;
    delete_router(client, ns, "chat").await;
    wait_absent(&routers(client, ns), "chat").await;
    assert!(
        exchange_exists(&mgmt, &exchange).await,
        "retain keeps the exchange"
    );
    assert_eq!(
        bindings_into(&mgmt, &exchange).await,
        vec![(upstream.clone(), "#".to_string())],
        "and its bindings"
    );
    let control = control_of(&exchange);
    assert_eq!(
        exchange_kind(&mgmt, &control).await,
        ("fanout".to_string(), true),
        "and its control exchange"
    );
    upstream_exchange(&exchange, false).await;
    upstream_exchange(&control, false).await;
    upstream_exchange(&upstream, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reports_an_unreachable_broker_and_recovers_when_the_secret_is_fixed() {
    let (client, namespace) = setup("op-mq-down").await;
    let (client, ns) = (&client, namespace.name());
    let mgmt = Management::shared();
    let exchange = format!("{ns}.router");
    let closed = eventrouter_e2e::free_port().expect("a free port");
    let unreachable = format!("amqp://guest:guest@127.0.0.1:{closed}/%2f");
    put_amqp_secret(client, ns, "amqp", &unreachable).await;
    let operator = RunningOperator::start(client, ns, "op-a", "eventrouter-operator").await;

    let mut spec = a_router_spec(&exchange, "amq.topic", &["order.*"], DeletionPolicy::Delete);
    spec.rabbitmq.upstreams.clear();
    apply_router(client, ns, "chat", &spec).await;
    let broker = wait_condition(
        client,
        ns,
        "chat",
        "BrokerReady",
        "False",
        Some("BrokerUnreachable"),
    )
    .await;
    assert!(
        broker.message.contains("cannot connect to RabbitMQ"),
        "{}",
        broker.message
    );
    wait_condition(client, ns, "chat", "Ready", "False", Some("BrokerNotReady")).await;
    // The Kubernetes side does not wait for the broker.
    wait_present(
        &kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns),
        "chat",
    )
    .await;
    wait_event(client, ns, "chat", "BrokerUnreachable", "Warning").await;
    wait_until("failures to be counted by reason", CONVERGE, || async {
        operator
            .metrics
            .errors
            .with_label_values(&["broker_unreachable"])
            .get()
            >= 2
    })
    .await;

    // Fix the Secret: the backoff retry picks it up.
    put_amqp_secret(client, ns, "amqp", &amqp_url()).await;
    wait_topology_declared(client, ns, "chat").await;
    assert!(exchange_exists(&mgmt, &exchange).await);

    // Break it again, then delete: cleanup cannot reach the broker and keeps retrying...
    put_amqp_secret(client, ns, "amqp", &unreachable).await;
    let before = operator.reconciles();
    delete_router(client, ns, "chat").await;
    // Two cleanup attempts have run (and failed) before the router is checked.
    operator.wait_reconciles(before, 2).await;
    assert!(
        routers(client, ns)
            .get_opt("chat")
            .await
            .expect("get")
            .is_some(),
        "the finalizer holds the router"
    );
    // ...until the documented escape hatch is used.
    let patch =
        serde_json::json!({"metadata": {"annotations": {SKIP_BROKER_CLEANUP_ANNOTATION: "true"}}});
    routers(client, ns)
        .patch("chat", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
    wait_absent(&routers(client, ns), "chat").await;
    let found = wait_for("the skip event", CONVERGE, || async {
        let events = router_events(client, ns, "chat").await;
        if events.iter().any(|(r, _, _)| r == "BrokerCleanupSkipped") {
            Ok(events)
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await;
    assert!(!found.is_empty());
    assert!(
        exchange_exists(&mgmt, &exchange).await,
        "skipped cleanup leaves the exchange"
    );
    assert!(
        exchange_exists(&mgmt, &control_of(&exchange)).await,
        "and the control exchange"
    );
    upstream_exchange(&exchange, false).await;
    upstream_exchange(&control_of(&exchange), false).await;
}

/// A router spec with history on: a day, 64 MiB in segments of 8 MiB, the given patterns.
fn a_history_spec(exchange: &str, patterns: &[&str], policy: DeletionPolicy) -> EventRouterSpec {
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.rabbitmq.exchange = Some(exchange.into());
    spec.deletion_policy = policy;
    spec.history = Some(HistorySpec {
        max_age: "24h".into(),
        max_bytes: 64 * 1_048_576,
        max_segment_bytes: Some(8 * 1_048_576),
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
        ..HistorySpec::enabled()
    });
    spec
}

fn set_history(spec: &mut EventRouterSpec, change: impl FnOnce(&mut HistorySpec)) {
    if let Some(history) = spec.history.as_mut() {
        change(history);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_history_stream_follows_the_spec_reports_arguments_rabbitmq_cannot_change_and_is_deleted()
 {
    let watched = watched_namespace("op-mq-history").await;
    let (client, ns) = (&watched.client, watched.ns.as_str());
    let mgmt = Management::shared();
    let exchange = format!("{ns}.router");
    let stream = stream_of(&exchange);
    let mut spec = a_history_spec(&exchange, &["order.*", "refund.#"], DeletionPolicy::Delete);
    apply_router(client, ns, "chat", &spec).await;
    wait_topology_declared(client, ns, "chat").await;
    wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "True",
        Some("StreamDeclared"),
    )
    .await;

    // A durable stream with exactly the spec's arguments, bound to the router's exchange.
    let (kind, durable, arguments) = queue_details(&mgmt, &stream)
        .await
        .unwrap_or_else(|| panic!("the stream {stream:?} exists"));
    assert_eq!((kind.as_str(), durable), ("stream", true));
    assert_eq!(
        arguments,
        serde_json::json!({
            "x-queue-type": "stream",
            "x-max-age": "24h",
            "x-max-length-bytes": 64 * 1_048_576,
            "x-stream-max-segment-size-bytes": 8 * 1_048_576
        })
    );
    assert_eq!(
        stream_bindings(&mgmt, &exchange).await,
        ["order.*", "refund.#"]
    );
    let declared = StreamArguments {
        max_age: "24h".into(),
        max_bytes: 64 * 1_048_576,
        max_segment_bytes: Some(8 * 1_048_576),
    };
    assert_eq!(
        recorded_history(client, ns, "chat").await,
        Some(RecordedHistory {
            stream: stream.clone(),
            arguments: Some(declared.clone()),
            patterns: vec!["order.*".into(), "refund.#".into()],
        })
    );
    // The pods read that stream.
    wait_until("the pods to be given the stream", CONVERGE, || async {
        deployment_env(client, ns, "EVENTROUTER_HISTORY_STREAM")
            .await
            .as_deref()
            == Some(stream.as_str())
    })
    .await;

    // Patterns follow the spec: one dropped, one added.
    set_history(&mut spec, |h| {
        h.patterns = vec!["order.*".into(), "user.#".into()]
    });
    apply_router(client, ns, "chat", &spec).await;
    wait_until("the stream to be rebound", CONVERGE, || async {
        stream_bindings(&mgmt, &exchange).await == ["order.*", "user.#"]
    })
    .await;
    wait_until(
        "the status to record the new patterns",
        CONVERGE,
        || async {
            recorded_history(client, ns, "chat")
                .await
                .is_some_and(|h| h.patterns == ["order.*", "user.#"])
        },
    )
    .await;

    // A new maxAge: RabbitMQ cannot change the stream's arguments. The stream keeps its
    // retention and history, everything else (here a pattern changed at the same time) is
    // reconciled, and the condition and a Warning event say why.
    set_history(&mut spec, |h| {
        h.max_age = "7D".into();
        h.patterns = vec!["order.*".into(), "user.#".into(), "audit.#".into()];
    });
    apply_router(client, ns, "chat", &spec).await;
    let history = wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "False",
        Some("StreamArgumentsDiffer"),
    )
    .await;
    for expected in [
        "history stream arguments differ from spec; RabbitMQ cannot change them in place",
        "inequivalent arg 'x-max-age'",
        "'7D'",
        "'24h'",
    ] {
        assert!(
            history.message.contains(expected),
            "{expected}: {}",
            history.message
        );
    }
    wait_event(client, ns, "chat", "StreamArgumentsDiffer", "Warning").await;
    wait_condition(
        client,
        ns,
        "chat",
        "BrokerReady",
        "True",
        Some("TopologyDeclared"),
    )
    .await;
    assert_eq!(
        queue_details(&mgmt, &stream)
            .await
            .map(|(_, _, a)| a["x-max-age"].clone()),
        Some(serde_json::json!("24h")),
        "the stream keeps its age"
    );
    assert_eq!(
        stream_bindings(&mgmt, &exchange).await,
        ["audit.#", "order.*", "user.#"],
        "the bindings still follow the spec"
    );
    let recorded = recorded_history(client, ns, "chat")
        .await
        .expect("recorded");
    assert_eq!(
        recorded.arguments, None,
        "arguments RabbitMQ refused are not recorded"
    );
    assert_eq!(recorded.patterns, ["audit.#", "order.*", "user.#"]);

    // The documented way out: delete the stream (its history goes); the operator declares it
    // anew with the spec's arguments at a later reconcile (the resync at the latest).
    delete_queue(&stream).await;
    wait_until(
        "the stream to be declared again with maxAge 7D",
        std::time::Duration::from_secs(45),
        || async {
            queue_details(&mgmt, &stream)
                .await
                .is_some_and(|(_, _, a)| a["x-max-age"] == "7D")
        },
    )
    .await;
    wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "True",
        Some("StreamDeclared"),
    )
    .await;
    assert_eq!(
        stream_bindings(&mgmt, &exchange).await,
        ["audit.#", "order.*", "user.#"]
    );
    wait_until(
        "the status to record the new arguments",
        CONVERGE,
        || async {
            recorded_history(client, ns, "chat")
                .await
                .and_then(|h| h.arguments)
                .is_some_and(|a| a.max_age == "7D")
        },
    )
    .await;

    // History off under deletionPolicy delete: the stream goes, and so does the pods' setting.
    set_history(&mut spec, |h| h.enabled = false);
    apply_router(client, ns, "chat", &spec).await;
    wait_until("the stream to be deleted", CONVERGE, || async {
        queue_details(&mgmt, &stream).await.is_none()
    })
    .await;
    wait_until("the status to drop the stream", CONVERGE, || async {
        recorded_history(client, ns, "chat").await.is_none()
    })
    .await;
    wait_until("the pods to lose the stream", CONVERGE, || async {
        deployment_env(client, ns, "EVENTROUTER_HISTORY_STREAM")
            .await
            .is_none()
    })
    .await;
    let history = condition(client, ns, "chat", "HistoryReady").await;
    assert_eq!(history, None, "no history, no condition");

    // On again, then the router is deleted: the stream goes with the exchanges.
    set_history(&mut spec, |h| h.enabled = true);
    apply_router(client, ns, "chat", &spec).await;
    wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "True",
        Some("StreamDeclared"),
    )
    .await;
    assert!(queue_details(&mgmt, &stream).await.is_some());
    delete_router(client, ns, "chat").await;
    wait_absent(&routers(client, ns), "chat").await;
    assert_eq!(
        queue_details(&mgmt, &stream).await,
        None,
        "deleted with the router"
    );
    assert!(!exchange_exists(&mgmt, &exchange).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_retain_policy_unbinds_a_disabled_history_stream_and_keeps_it() {
    let watched = watched_namespace("op-mq-history-retain").await;
    let (client, ns) = (&watched.client, watched.ns.as_str());
    let mgmt = Management::shared();
    let exchange = format!("{ns}.router");
    let stream = stream_of(&exchange);
    let mut spec = a_history_spec(&exchange, &["#"], DeletionPolicy::Retain);
    apply_router(client, ns, "chat", &spec).await;
    wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "True",
        Some("StreamDeclared"),
    )
    .await;
    assert_eq!(stream_bindings(&mgmt, &exchange).await, ["#"]);

    // Off under retain: unbound (it stops filling), kept with what it holds.
    set_history(&mut spec, |h| h.enabled = false);
    apply_router(client, ns, "chat", &spec).await;
    wait_until("the stream to be unbound", CONVERGE, || async {
        stream_bindings(&mgmt, &exchange).await.is_empty()
    })
    .await;
    assert_eq!(
        queue_details(&mgmt, &stream).await.map(|(kind, _, _)| kind),
        Some("stream".to_string()),
        "retain keeps the stream"
    );

    // On again: the same stream (same arguments) is bound again.
    set_history(&mut spec, |h| h.enabled = true);
    apply_router(client, ns, "chat", &spec).await;
    wait_condition(
        client,
        ns,
        "chat",
        "HistoryReady",
        "True",
        Some("StreamDeclared"),
    )
    .await;
    assert_eq!(stream_bindings(&mgmt, &exchange).await, ["#"]);

    // Deleting the router leaves the stream and its binding.
    delete_router(client, ns, "chat").await;
    wait_absent(&routers(client, ns), "chat").await;
    assert!(
        queue_details(&mgmt, &stream).await.is_some(),
        "retain keeps the stream"
    );
    assert_eq!(stream_bindings(&mgmt, &exchange).await, ["#"]);
    delete_queue(&stream).await;
    upstream_exchange(&exchange, false).await;
    upstream_exchange(&control_of(&exchange), false).await;
}
