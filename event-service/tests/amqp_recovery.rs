//! Broker outages, on a RabbitMQ node of this test's own (never the shared one): the service stays
//! up, readiness goes false and comes back, `POST /publish` answers 503 while the broker is gone,
//! every binding is restored on the new queue and delivery resumes.
//!
//! Starts its node with `tests/infra/rabbitmq.sh` (RabbitMQ must be installed: `tests/run` does).

mod amqp_support;
mod support;

use std::time::Duration;

use amqp_support::{DEFAULT_VHOST, Publisher, RabbitNode, WAIT, amqp_config, unique, until};
use event_service::server::RunningServer;
use serde_json::json;
use support::Client;

/// Generous: a RabbitMQ restart on two busy cores takes several seconds, and the reconnect
/// backoff adds up to its cap on top.
const OUTAGE_WAIT: Duration = Duration::from_secs(90);

async fn readyz(server: &RunningServer) -> u16 {
    support::get(&format!("{}/readyz", server.http_url()))
        .await
        .0
}

/// Waits (as long as an outage may take) until the service answers `/readyz` with 200 again.
async fn ready_again(server: &RunningServer, what: &str) {
    until(what, OUTAGE_WAIT, || async { readyz(server).await == 200 }).await;
}

/// A RabbitMQ node of the test's own, which it may stop and restart.
async fn dedicated_node(name: &str) -> RabbitNode {
    RabbitNode::start(name)
        .await
        .expect("a dedicated RabbitMQ node")
}

#[tokio::test]
async fn a_broker_restart_mid_test_is_survived_and_bindings_come_back() {
    let node = dedicated_node("amqp-recovery").await;
    let exchange = unique("recovery");
    let pod = unique("router");
    let queue = format!("{exchange}.{pod}");
    let mut config = amqp_config(node.amqp_url(), &exchange, &pod);
    // The test's clients stay silent through the outages; don't let the idle rule close them.
    config.idle_timeout = Duration::from_secs(600);
    let server = RunningServer::start(config)
        .await
        .expect("the service starts");
    until("ready", WAIT, || async { readyz(&server).await == 200 }).await;

    let mut orders = Client::connect(&server).await;
    let mut users = Client::connect(&server).await;
    orders.subscribe(1, &["order.*", "audit.#"]).await;
    users.subscribe(1, &["user.*.notification"]).await;
    let want = vec!["audit.#", "order.*", "user.*.notification"];
    assert_eq!(
        node.management()
            .routing_keys(DEFAULT_VHOST, &exchange, &queue)
            .await
            .expect("bindings"),
        want
    );

    let publisher = Publisher::connect(node.amqp_url(), &exchange)
        .await
        .expect("the test publisher connects");
    publisher
        .publish_json("order.created", r#"{"before":true}"#)
        .await
        .expect("the broker confirms");
    assert_eq!(orders.recv_json().await["event"], "order.created");
    drop(publisher);

    // The whole broker goes away (the Erlang VM stops), then comes back with its data.
    let restart = tokio::spawn({
        let name = node.name().to_owned();
        async move {
            let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/infra/rabbitmq.sh");
            let out = tokio::process::Command::new(script)
                .args(["restart", &name])
                .output()
                .await
                .expect("run rabbitmq.sh restart");
            assert!(
                out.status.success(),
                "restart failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });

    // While it is down: not ready, and the process keeps serving (liveness unaffected).
    until("readiness to go false", OUTAGE_WAIT, || async {
        readyz(&server).await == 503
    })
    .await;
    assert_eq!(
        support::get(&format!("{}/healthz", server.http_url()))
            .await
            .0,
        200,
        "liveness is unaffected by the broker"
    );
    restart.await.expect("the restart task");

    // Back: ready again, every binding restored on the re-declared queue, delivery resumes.
    ready_again(&server, "readiness to come back").await;
    assert_eq!(
        node.management()
            .routing_keys(DEFAULT_VHOST, &exchange, &queue)
            .await
            .expect("bindings"),
        want,
        "the queue was re-declared with every binding"
    );
    let publisher = Publisher::connect(node.amqp_url(), &exchange)
        .await
        .expect("the test publisher connects");
    publisher
        .publish_all(&[
            ("order.shipped", r#"{"after":true}"#),
            ("user.9.notification", r#"{"after":true}"#),
        ])
        .await
        .expect("the broker confirms");
    assert_eq!(orders.recv_json().await["event"], "order.shipped");
    assert_eq!(users.recv_json().await["event"], "user.9.notification");
    support::publish_event(&server, "audit.login", json!({"via": "http"})).await;
    assert_eq!(orders.recv_json().await["event"], "audit.login");

    assert!(support::metric(&server, "eventrouter_broker_reconnects_total", "").await >= 1.0);
    assert_eq!(
        support::metric(&server, "eventrouter_broker_up", "").await,
        1.0
    );

    // A subscription made after the outage is bound on the new queue too. Then the
    // application-only stop RabbitMQ operators use for maintenance: while it lasts, publishing is
    // refused with 503 and a new subscription is refused (never silently half-made).
    users.subscribe(2, &["late.*"]).await;
    node.stop_app().await.expect("rabbitmq.sh stop_app");
    until("readiness to go false (stop_app)", OUTAGE_WAIT, || async {
        readyz(&server).await == 503
    })
    .await;
    let (status, body) = support::publish(
        &server,
        json!({"event": "order.created", "data": {"during": true}}).to_string(),
    )
    .await;
    assert_eq!(status, 503, "publish while the broker is down: {body}");
    orders
        .send_json(json!({"op": "subscribe", "id": 7, "events": ["down.*"]}))
        .await;
    let refused = orders.recv_json().await;
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(refused["id"], 7);
    assert_eq!(refused["code"], "unavailable", "{refused}");
    node.start_app().await.expect("rabbitmq.sh start_app");
    ready_again(&server, "readiness to come back (start_app)").await;
    assert_eq!(
        node.management()
            .routing_keys(DEFAULT_VHOST, &exchange, &queue)
            .await
            .expect("bindings"),
        vec!["audit.#", "late.*", "order.*", "user.*.notification"]
    );
    let publisher = Publisher::connect(node.amqp_url(), &exchange)
        .await
        .expect("the test publisher connects");
    publisher
        .publish_json("late.arrival", "{}")
        .await
        .expect("the broker confirms");
    assert_eq!(users.recv_json().await["event"], "late.arrival");
    assert!(
        support::metric(
            &server,
            "eventrouter_publish_failures_total",
            r#"reason="unavailable""#
        )
        .await
            >= 1.0
    );

    server.stop().await.expect("the service stops");
}

/// Binds and unbinds keep arriving while the broker restarts: afterwards the broker holds exactly
/// the patterns the source reports as bound — none was lost or left over between two
/// connections — and every pattern whose bind eventually succeeded is among them.
#[tokio::test]
async fn bindings_made_during_a_restart_are_neither_lost_nor_left_over() {
    use amqp_support::{Collector, metric};
    use event_service::source::amqp::AmqpSource;
    use tokio_util::sync::CancellationToken;

    let node = dedicated_node("amqp-churn").await;
    let exchange = unique("churn");
    let config = amqp_config(node.amqp_url(), &exchange, &unique("router"));
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let sink = Collector::new();
    let source = AmqpSource::start(
        &config,
        std::sync::Arc::<Collector>::downgrade(&sink),
        &registry,
        shutdown,
    )
    .await
    .expect("valid configuration");
    until("up", WAIT, || async { source.is_up() }).await;

    // Four workers each bind their own patterns (retrying until the broker confirms) and unbind
    // every third one again, while the broker restarts underneath them.
    let mut workers = Vec::new();
    for w in 0..4 {
        let source = source.clone();
        workers.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for i in 0..40 {
                let pattern = format!("w{w}.p{i}.*");
                // Retries while the broker is down, with a deadline like every other wait.
                tokio::time::timeout(OUTAGE_WAIT, async {
                    while source.bind(&pattern).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("binding {pattern} within {OUTAGE_WAIT:?}"));
                if i % 3 == 0 {
                    let _ = source.unbind(&pattern).await;
                } else {
                    kept.push(pattern);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            kept
        }));
    }
    // Restart once the workers are binding, so the restart falls in the middle of their work.
    until("the workers' first bindings", WAIT, || async {
        source.bound_patterns().len() >= 4
    })
    .await;
    node.restart().await.expect("rabbitmq.sh restart");
    let mut want = Vec::new();
    for worker in workers {
        want.extend(worker.await.expect("a worker"));
    }
    want.sort();

    until("up after the restart", OUTAGE_WAIT, || async {
        source.is_up()
    })
    .await;
    let mut recorded = source.bound_patterns();
    recorded.sort();
    assert_eq!(
        recorded, want,
        "the source's record is what the workers kept"
    );
    let queue = source.queue_name().to_owned();
    until(
        "the broker to hold exactly the recorded bindings",
        WAIT,
        || async {
            node.management()
                .routing_keys(DEFAULT_VHOST, &exchange, &queue)
                .await
                .expect("bindings")
                == want
        },
    )
    .await;
    assert!(metric(&registry, "eventrouter_broker_reconnects_total", None) >= 1.0);
}
