//! The operator against the real kube-apiserver: children appear with the right fields and owner
//! references, follow spec changes, leave an autoscaler's replicas alone, come back when deleted,
//! and nothing changes while paused.

mod operator_support;

use eventrouter_contract::kube as names;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use operator::crd::{EventRouterSpec, UpstreamBinding};
use operator_support::*;

fn a_router_spec_reading(secret: &str) -> EventRouterSpec {
    let mut spec = EventRouterSpec::with_secret(secret);
    spec.image = "registry.example/event-service:1.0".into();
    spec.replicas = 3;
    spec.rabbitmq.upstreams = vec![UpstreamBinding {
        exchange: "amq.topic".into(),
        routing_keys: vec!["order.*".into()],
    }];
    spec
}

fn container_image(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

fn replicas(d: &Deployment) -> Option<i32> {
    d.spec.as_ref()?.replicas
}

fn assert_owned_by(meta: &kube::api::ObjectMeta, uid: &str, what: &str) {
    let owners = meta.owner_references.clone().unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.uid == uid && o.kind == "EventRouter" && o.controller == Some(true)),
        "{what} is not controlled by the EventRouter: {owners:?}"
    );
    assert_eq!(
        meta.labels
            .as_ref()
            .and_then(|l| l.get(names::LABEL_MANAGED_BY))
            .map(String::as_str),
        Some(names::MANAGED_BY)
    );
}

async fn wait_deployment<F: Fn(&Deployment) -> bool>(
    client: &Client,
    ns: &str,
    what: &str,
    check: F,
) -> Deployment {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    eventrouter_e2e::wait::wait_for(what, CONVERGE, || async {
        match api.get_opt("chat").await {
            Ok(Some(d)) if check(&d) => Ok(d),
            Ok(Some(d)) => Err(format!(
                "image {:?}, replicas {:?}",
                container_image(&d),
                replicas(&d)
            )),
            Ok(None) => Err("no Deployment".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_children_appear_follow_the_spec_respect_the_autoscaler_and_come_back() {
    let watched = watched_namespace("op-children").await;
    let (client, ns) = (watched.client.clone(), watched.ns.clone());

    let started = std::time::Instant::now();
    apply_router(&client, &ns, "chat", &a_router_spec_reading("amqp")).await;
    let uid = routers(&client, &ns)
        .get("chat")
        .await
        .expect("router")
        .uid()
        .expect("uid");

    // Every child, with owner references and the fields the spec asks for.
    let deployment =
        wait_present(&Api::<Deployment>::namespaced(client.clone(), &ns), "chat").await;
    let service = wait_present(&Api::<Service>::namespaced(client.clone(), &ns), "chat").await;
    let metrics_service = wait_present(
        &Api::<Service>::namespaced(client.clone(), &ns),
        "chat-metrics",
    )
    .await;
    let account = wait_present(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        "chat",
    )
    .await;
    let budget = wait_present(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        "chat",
    )
    .await;
    eprintln!(
        "all children present {:?} after the EventRouter was applied",
        started.elapsed()
    );
    assert_owned_by(&deployment.metadata, &uid, "Deployment");
    assert_owned_by(&service.metadata, &uid, "Service");
    assert_owned_by(&metrics_service.metadata, &uid, "metrics Service");
    assert_owned_by(&account.metadata, &uid, "ServiceAccount");
    assert_owned_by(&budget.metadata, &uid, "PodDisruptionBudget");
    assert_eq!(replicas(&deployment), Some(3));
    assert_eq!(
        container_image(&deployment).as_deref(),
        Some("registry.example/event-service:1.0")
    );
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let env: Vec<_> = pod.containers[0].env.clone().unwrap_or_default();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value(eventrouter_contract::env::EXCHANGE).as_deref(),
        Some("chat")
    );
    assert_eq!(
        value(eventrouter_contract::env::SOURCE).as_deref(),
        Some("amqp")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("chat"));
    assert_eq!(
        service.spec.and_then(|s| s.ports).map(|p| p[0].port),
        Some(80)
    );

    // Status: the broker side is declared, the pods never become ready (no kubelet here).
    wait_topology_declared(&client, &ns, "chat").await;
    wait_condition(&client, &ns, "chat", "Ready", "False", Some("NotAvailable")).await;
    wait_condition(&client, &ns, "chat", "Paused", "False", None).await;
    // Replicas come from the Deployment's status, which its controller fills in shortly after.
    let status = eventrouter_e2e::wait::wait_for("status.replicas = 3", CONVERGE, || async {
        let status = routers(&client, &ns)
            .get("chat")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        if status.replicas == Some(3) {
            Ok(status)
        } else {
            Err(format!("{:?}", status.replicas))
        }
    })
    .await;
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=chat,app.kubernetes.io/name=event-router")
    );
    assert_eq!(
        status.topology.expect("topology recorded").bindings.len(),
        1
    );
    wait_event(&client, &ns, "chat", "TopologyDeclared", "Normal").await;

    // Change the spec: new image, HPA autoscaling, no disruption budget.
    let mut spec = a_router_spec_reading("amqp");
    spec.image = "registry.example/event-service:1.1".into();
    spec.autoscaling.enabled = true;
    spec.autoscaling.min_replicas = 2;
    spec.autoscaling.max_replicas = 8;
    spec.disruption_budget.enabled = false;
    apply_router(&client, &ns, "chat", &spec).await;
    wait_deployment(&client, &ns, "the new image", |d| {
        container_image(d).as_deref() == Some("registry.example/event-service:1.1")
    })
    .await;
    let hpa = wait_present(
        &Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns),
        "chat",
    )
    .await;
    assert_owned_by(&hpa.metadata, &uid, "HorizontalPodAutoscaler");
    let hpa_spec = hpa.spec.expect("hpa spec");
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(2), 8));
    let metric_names: Vec<_> = hpa_spec
        .metrics
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.pods.map(|p| p.metric.name))
        .collect();
    assert_eq!(
        metric_names,
        vec![
            "eventrouter_connections",
            "eventrouter_socket_recv_queue_bytes"
        ]
    );
    wait_absent(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        "chat",
    )
    .await;

    // The operator no longer owns replicas: scale as the HPA would, through the scale subresource.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .patch_scale(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 6}})),
        )
        .await
        .expect("the scale subresource accepts replicas");
    // Force reconciles: change the spec (a new generation) and wait for the operator to see it.
    spec.websocket.max_connections_per_pod = 9000;
    apply_router(&client, &ns, "chat", &spec).await;
    let generation = routers(&client, &ns)
        .get("chat")
        .await
        .expect("router")
        .metadata
        .generation;
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;
    let d = deployments.get("chat").await.expect("deployment");
    let env = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == eventrouter_contract::env::MAX_CONNECTIONS
                && e.value.as_deref() == Some("9000"))
    );
    assert_eq!(
        replicas(&d),
        Some(6),
        "the reconcile of generation {generation:?} left the autoscaler's replicas alone"
    );

    // A deleted child comes back.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let old_uid = services.get("chat").await.expect("service").uid();
    services
        .delete("chat", &DeleteParams::default())
        .await
        .expect("delete the Service");
    eventrouter_e2e::wait::wait_for("the Service to be recreated", CONVERGE, || async {
        match services.get_opt("chat").await {
            Ok(Some(s)) if s.uid() != old_uid => Ok(()),
            other => Err(format!("{:?}", other.map(|o| o.map(|s| s.uid())))),
        }
    })
    .await;

    // Autoscaling off again: the HPA goes and spec.replicas is applied once more.
    spec.autoscaling.enabled = false;
    spec.replicas = 4;
    apply_router(&client, &ns, "chat", &spec).await;
    wait_absent(
        &Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns),
        "chat",
    )
    .await;
    wait_deployment(&client, &ns, "replicas 4 from the spec", |d| {
        replicas(d) == Some(4)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_paused_router_changes_nothing_until_resumed() {
    let watched = watched_namespace("op-paused").await;
    let (client, ns) = (watched.client.clone(), watched.ns.clone());
    let operator = &watched.operator;

    let mut spec = a_router_spec_reading("amqp");
    apply_router(&client, &ns, "chat", &spec).await;
    wait_deployment(&client, &ns, "the first Deployment", |d| {
        replicas(d) == Some(3)
    })
    .await;

    spec.paused = true;
    spec.image = "registry.example/event-service:2.0".into();
    apply_router(&client, &ns, "chat", &spec).await;
    wait_condition(&client, &ns, "chat", "Paused", "True", Some("PausedBySpec")).await;
    wait_condition(&client, &ns, "chat", "Ready", "False", Some("Paused")).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let before = operator.reconciles();
    services
        .delete("chat", &DeleteParams::default())
        .await
        .expect("delete the Service");
    // Two reconciles have finished since the delete (its children watch fires on it; a
    // reconcile already running when it happened counts as only one).
    operator.wait_reconciles(before, 2).await;
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("chat")
        .await
        .expect("deployment");
    assert_eq!(
        container_image(&d).as_deref(),
        Some("registry.example/event-service:1.0"),
        "paused: image untouched"
    );
    assert!(
        services.get_opt("chat").await.expect("get").is_none(),
        "paused: the deleted Service stays deleted"
    );

    spec.paused = false;
    apply_router(&client, &ns, "chat", &spec).await;
    wait_condition(&client, &ns, "chat", "Paused", "False", Some("Running")).await;
    wait_deployment(&client, &ns, "the image applied after resuming", |d| {
        container_image(d).as_deref() == Some("registry.example/event-service:2.0")
    })
    .await;
    wait_present(&services, "chat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_keda_provider_follows_whether_the_cluster_serves_scaled_objects() {
    let watched = watched_namespace("op-keda").await;
    let (client, ns) = (watched.client.clone(), watched.ns.clone());

    let mut spec = a_router_spec_reading("amqp");
    spec.autoscaling.enabled = true;
    spec.autoscaling.provider = operator::crd::AutoscalingProvider::Keda;
    spec.autoscaling.prometheus_address = Some("http://prometheus.monitoring:9090".into());
    apply_router(&client, &ns, "chat", &spec).await;
    let deployment =
        wait_present(&Api::<Deployment>::namespaced(client.clone(), &ns), "chat").await;
    // The API server defaults replicas to 1; what matters is that the operator does not own it.
    let operator_fields: Vec<String> = deployment
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.manager.as_deref() == Some(names::FIELD_MANAGER))
        .map(|m| serde_json::to_string(&m.fields_v1).expect("fields serialize"))
        .collect();
    assert_eq!(
        operator_fields.len(),
        1,
        "the operator applied the Deployment"
    );
    assert!(
        !operator_fields[0].contains("\"f:replicas\""),
        "the autoscaler owns replicas, even one that is missing: {}",
        operator_fields[0]
    );
    let keda_served = match client.list_api_group_resources("keda.sh/v1alpha1").await {
        Ok(list) => list.resources.iter().any(|r| r.name == "scaledobjects"),
        Err(_) => false,
    };
    if keda_served {
        let resource = operator::build::scaled_object_resource();
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &resource);
        wait_present(&api, "chat").await;
    } else {
        let ready = wait_condition(
            &client,
            &ns,
            "chat",
            "Ready",
            "False",
            Some("AutoscalerUnavailable"),
        )
        .await;
        assert!(ready.message.contains("keda.sh"), "{}", ready.message);
        wait_event(&client, &ns, "chat", "AutoscalerUnavailable", "Warning").await;
    }
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    assert!(
        hpas.get_opt("chat").await.expect("get").is_none(),
        "no HPA with provider keda"
    );
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;
}
