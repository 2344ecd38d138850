//! Specs the CRD rejects (schema and CEL rules) are refused by the real API server with a clear
//! message; specs it cannot reject (a missing Secret, nonsense durations) get `Ready=False`,
//! reason `InvalidSpec`, a Warning event, and no child.

mod operator_support;

use eventrouter_e2e::rabbitmq::amqp_url;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use operator::crd::EventRouterSpec;
use operator_support::*;
use serde_json::json;

fn a_router(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "eventrouter.io/v1alpha1", "kind": "EventRouter", "metadata": {"name": name}, "spec": spec})
}

async fn rejection(client: &kube::Client, ns: &str, spec: serde_json::Value) -> String {
    match create_router(client, ns, &a_router("bad", spec.clone())).await {
        Ok(_) => panic!("the API server accepted {spec}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_crd_rejects_impossible_specs_with_clear_messages() {
    let (client, ns) = setup("op-crd-rules").await;
    let ns = ns.name();
    let secret = json!({"secretRef": {"name": "amqp"}});

    let message = rejection(&client, ns, json!({"rabbitmq": secret, "autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 2}})).await;
    assert!(
        message.contains("minReplicas must not exceed maxReplicas"),
        "{message}"
    );

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": {"secretRef": {"name": "amqp"}, "exchange": "amq.mine"}}),
    )
    .await;
    assert!(message.contains("reserved by RabbitMQ"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": {"secretRef": {"name": "amqp"}, "exchange": "chat", "upstreams": [{"exchange": "chat", "routingKeys": ["#"]}]}}),
    )
    .await;
    assert!(
        message.contains("must differ from the router's own exchange"),
        "{message}"
    );

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "autoscaling": {"enabled": true, "provider": "keda"}}),
    )
    .await;
    assert!(
        message.contains("the keda provider needs prometheusAddress"),
        "{message}"
    );

    let message = rejection(&client, ns, json!({"rabbitmq": secret, "replicas": -1})).await;
    assert!(message.contains("spec.replicas"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "websocket": {"pingInterval": "twenty seconds"}}),
    )
    .await;
    assert!(message.contains("spec.websocket.pingInterval"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "service": {"type": "ExternalName"}}),
    )
    .await;
    assert!(message.contains("spec.service.type"), "{message}");

    let message = rejection(&client, ns, json!({"replicas": 2})).await;
    assert!(message.contains("spec.rabbitmq"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_invalid_spec_sets_ready_false_emits_a_warning_and_creates_nothing() {
    let (client, ns) = setup("op-invalid").await;
    let ns = ns.name().to_string();
    let operator = RunningOperator::start(&client, &ns, "op-a", "eventrouter-operator").await;

    // The Secret does not exist: the API server cannot know, the operator can.
    let before = operator.reconciles();
    apply_router(
        &client,
        &ns,
        "chat",
        &EventRouterSpec::with_secret("nowhere"),
    )
    .await;
    let ready = wait_condition(&client, &ns, "chat", "Ready", "False", Some("InvalidSpec")).await;
    assert!(
        ready.message.contains(r#"Secret "nowhere""#),
        "{}",
        ready.message
    );
    wait_event(&client, &ns, "chat", "InvalidSpec", "Warning").await;
    // The reconcile that judged the spec has finished, and made no child.
    operator.wait_reconciles(before, 1).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "no child for an invalid spec"
    );

    // A ping interval not shorter than the idle timeout: valid to the schema, not to the operator.
    put_amqp_secret(&client, &ns, "amqp", &amqp_url()).await;
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.websocket.ping_interval = "90s".into();
    apply_router(&client, &ns, "chat", &spec).await;
    let ready = wait_condition(&client, &ns, "chat", "Ready", "False", Some("InvalidSpec")).await;
    assert!(ready.message.contains("pingInterval"), "{}", ready.message);
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "still no child"
    );

    // Fixed: the children appear.
    spec.websocket.ping_interval = "20s".into();
    apply_router(&client, &ns, "chat", &spec).await;
    wait_present(&deployments, "chat").await;
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;
}
