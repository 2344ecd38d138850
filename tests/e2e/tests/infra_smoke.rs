//! Proves that every service the test command provides is there and answers: the shared
//! RabbitMQ node (AMQP and management API), the Kubernetes control plane (API server, and the
//! controller manager reconciling), and the command-line tools on PATH.
//!
//! Run with `tests/run --only infra_` (needs the services `tests/run` starts).

use std::time::Duration;

use eventrouter_e2e::cluster::{TestNamespace, kube_client};
use eventrouter_e2e::command::{run, run_ok};
use eventrouter_e2e::rabbitmq::{DEFAULT_VHOST, Management, amqp_url};
use eventrouter_e2e::unique_name;
use eventrouter_e2e::wait::{wait_for, wait_until};
use eventrouter_e2e::{require_env, vars};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn rabbitmq_serves_amqp_and_the_management_api() {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP connection to the shared RabbitMQ node");
    let channel = connection.create_channel().await.expect("AMQP channel");
    let exchange = unique_name("infra-smoke-x");
    let queue = unique_name("infra-smoke-q");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declaring a topic exchange");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declaring an exclusive queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "orders.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binding the queue");

    let management = Management::shared();
    let overview = management.overview().await.expect("GET /api/overview");
    let version = overview["rabbitmq_version"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3."),
        "unexpected RabbitMQ version in {overview}"
    );

    assert!(
        management
            .queue_exists(DEFAULT_VHOST, &queue)
            .await
            .expect("queue lookup"),
        "queue {queue} declared over AMQP is not visible in the management API"
    );
    assert!(
        management
            .exchange_exists(DEFAULT_VHOST, &exchange)
            .await
            .expect("exchange lookup")
    );
    assert!(
        management
            .queue_names(DEFAULT_VHOST)
            .await
            .expect("queue list")
            .contains(&queue)
    );
    let bindings = management
        .queue_bindings(DEFAULT_VHOST, &queue)
        .await
        .expect("bindings of the queue");
    assert!(
        bindings
            .iter()
            .any(|b| b.source == exchange && b.routing_key == "orders.*"),
        "binding {exchange} -> {queue} (orders.*) missing from {bindings:?}"
    );
    assert!(
        !management
            .queue_exists(DEFAULT_VHOST, "eventrouter-no-such-queue")
            .await
            .expect("lookup of a missing queue"),
        "a queue that was never declared is reported as existing"
    );

    connection
        .close(200, "infra smoke test done".into())
        .await
        .expect("closing the AMQP connection");
    // Exclusive queues go with their connection: the management API must see that too.
    wait_until(
        "the exclusive queue to disappear",
        RECONCILE_TIMEOUT,
        || async {
            !management
                .queue_exists(DEFAULT_VHOST, &queue)
                .await
                .unwrap_or(true)
        },
    )
    .await;
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                // Never pulled: there is no kubelet in the test control plane.
                "spec": { "containers": [{ "name": "main", "image": "registry.invalid/none:1" }] }
            }
        }
    }))
    .expect("a valid Deployment")
}

#[tokio::test]
async fn control_plane_serves_the_api_and_runs_controllers() {
    let client = kube_client().await.expect("Kubernetes client");
    let version = client
        .apiserver_version()
        .await
        .expect("kube-apiserver answers /version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "35"),
        "{version:?}"
    );

    let namespace = TestNamespace::create(&client, "infra-smoke")
        .await
        .expect("creating a test namespace");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace.name());
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace.name());
    let created = deployments
        .create(&PostParams::default(), &deployment("web"))
        .await
        .expect("creating a Deployment");
    let deployment_uid = created.metadata.uid.expect("the API server assigns a uid");

    // The deployment controller (kube-controller-manager) makes a ReplicaSet owned by it.
    let owned = wait_for(
        "a ReplicaSet owned by the Deployment",
        RECONCILE_TIMEOUT,
        || async {
            let list = replica_sets
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find(|rs| {
                    rs.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|owner| owner.uid == deployment_uid)
                })
                .ok_or_else(|| "no ReplicaSet yet".to_owned())
        },
    )
    .await;
    assert!(owned.metadata.name.is_some());

    // The garbage collector removes what the deleted Deployment owned.
    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("deleting the Deployment");
    wait_until(
        "the garbage collector to delete the ReplicaSet",
        RECONCILE_TIMEOUT,
        || async {
            replica_sets
                .list(&ListParams::default())
                .await
                .is_ok_and(|list| list.items.is_empty())
        },
    )
    .await;
}

#[test]
fn command_line_tools_are_on_path_at_the_expected_versions() {
    let tools = require_env(vars::TOOLS);
    let kubectl = run_ok(std::process::Command::new("kubectl").args(["version", "--client"]))
        .expect("kubectl");
    assert!(kubectl.contains("Client Version: v1.35."), "{kubectl}");
    let helm =
        run_ok(std::process::Command::new("helm").args(["version", "--short"])).expect("helm");
    assert!(helm.starts_with("v4."), "{helm}");
    for binary in ["kube-apiserver", "kube-controller-manager"] {
        let path = format!("{tools}/bin/{binary}");
        let version = run_ok(std::process::Command::new(&path).arg("--version")).expect(binary);
        assert!(
            version.starts_with("Kubernetes v1.35."),
            "{path}: {version}"
        );
    }
    let etcd = run_ok(std::process::Command::new(format!("{tools}/bin/etcd")).arg("--version"))
        .expect("etcd");
    assert!(etcd.contains("etcd Version: 3.6."), "{etcd}");
    // Prometheus and promtool print their version on stderr.
    for binary in ["prometheus", "promtool"] {
        let output = run(std::process::Command::new(binary).arg("--version")).expect(binary);
        let text = format!("{}{}", output.stdout, output.stderr);
        assert!(
            output.success() && text.contains("version 2."),
            "{binary}: {text}"
        );
    }
    // rabbitmqctl (the harness's shim) reaches the shared node with the same Erlang cookie.
    let node = require_env(vars::RABBITMQ_NODE);
    run_ok(std::process::Command::new("rabbitmqctl").args(["-q", "-n", &node, "await_startup"]))
        .expect("rabbitmqctl reaches the shared node");
}

#[test]
fn kubernetes_validate_accepts_valid_and_rejects_invalid_manifests() {
    let dir = std::env::temp_dir().join(unique_name("infra-validate"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let valid = dir.join("valid.yaml");
    let invalid = dir.join("invalid.yaml");
    let mut manifest = serde_json::to_value(deployment("web")).expect("serializes");
    std::fs::write(&valid, manifest.to_string()).expect("write valid manifest");
    manifest["spec"]["replicas"] = serde_json::json!("one");
    std::fs::write(&invalid, manifest.to_string()).expect("write invalid manifest");

    let validate = |file: &std::path::Path| {
        run(std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", "1.35.0"])
            .arg(file))
        .expect("kubernetes-validate runs")
    };
    let accepted = validate(&valid);
    assert!(accepted.success(), "valid manifest rejected: {accepted:?}");
    let rejected = validate(&invalid);
    assert!(
        !rejected.success(),
        "invalid manifest accepted: {rejected:?}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
