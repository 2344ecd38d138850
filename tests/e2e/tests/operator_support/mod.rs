//! Shared fixtures of the operator tests: the CRD installed from `crds/`, an operator running
//! in-process against the test API server (scoped to one namespace, with its own Lease), and
//! readers for children, conditions and events.

#![allow(dead_code)] // Each operator_*.rs test binary uses a different subset.

use std::time::Duration;

use eventrouter_e2e::cluster::{TestNamespace, kube_client};
use eventrouter_e2e::wait::wait_for;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use operator::crd::{EventRouter, EventRouterSpec};
use tokio_util::sync::CancellationToken;

/// How long a test waits for the operator to converge.
pub const CONVERGE: Duration = Duration::from_secs(30);
/// The field manager the tests write with (never the operator's).
pub const TEST_MANAGER: &str = "eventrouter-e2e";

/// Apply the committed CRD and wait until it is served.
pub async fn install_crd(client: &Client) {
    let path = eventrouter_e2e::repo_root()
        .join("crds")
        .join("eventrouter.io_eventrouters.yaml");
    let text = std::fs::read_to_string(&path).expect("the committed CRD is readable");
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&text).expect("the committed CRD parses");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &crd.name_any(),
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the API server accepts the CRD");
    wait_for(
        "the EventRouter CRD to be established",
        CONVERGE,
        || async {
            let crd = api.get(&crd.name_any()).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                Ok(())
            } else {
                Err("not established yet".to_string())
            }
        },
    )
    .await;
}

/// A namespace with the CRD installed and a client.
pub async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let client = kube_client()
        .await
        .expect("a client for the test API server");
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, prefix)
        .await
        .expect("a test namespace");
    (client, ns)
}

/// A test namespace whose Secret `amqp` points at the shared RabbitMQ node, with one operator
/// (`op-a`) watching it: the start of most operator tests.
pub struct Watched {
    pub client: Client,
    pub ns: String,
    /// Declared before the namespace so that it stops before the namespace goes.
    pub operator: RunningOperator,
    _namespace: TestNamespace,
}

/// See [`Watched`].
pub async fn watched_namespace(prefix: &str) -> Watched {
    let (client, namespace) = setup(prefix).await;
    let ns = namespace.name().to_string();
    put_amqp_secret(&client, &ns, "amqp", &eventrouter_e2e::rabbitmq::amqp_url()).await;
    let operator = RunningOperator::start(&client, &ns, "op-a", "eventrouter-operator").await;
    Watched {
        client,
        ns,
        operator,
        _namespace: namespace,
    }
}

/// Create (or replace) Secret `name` whose key `url` holds `url`.
pub async fn put_amqp_secret(client: &Client, ns: &str, name: &str, url: &str) {
    put_secret(client, ns, name, "url", url).await;
}

/// Create (or replace) Secret `name` whose key `key` holds `value`.
pub async fn put_secret(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some([(key.to_string(), value.to_string())].into()),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await
    .expect("the Secret is written");
}

/// An operator running in this process, watching one namespace; stops when dropped.
pub struct RunningOperator {
    pub identity: String,
    pub metrics: operator::Metrics,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningOperator {
    /// Start an operator on `ns` whose Lease is `lease` in `ns`.
    pub async fn start(client: &Client, ns: &str, identity: &str, lease: &str) -> Self {
        let settings = operator::ControllerSettings {
            namespace: Some(ns.to_string()),
            resync: Duration::from_secs(20),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
            cleanup_timeout: Duration::from_secs(60),
            concurrency: 4,
            identity: identity.to_string(),
        };
        let lease = operator::LeaseSettings::new(lease, ns, identity, Duration::from_secs(6));
        let metrics = operator::Metrics::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(operator::run(
            client.clone(),
            settings,
            lease,
            metrics.clone(),
            operator::Readiness::default(),
            stop.clone(),
        ));
        Self {
            identity: identity.to_string(),
            metrics,
            stop,
            task: Some(task),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// Reconciles finished so far, whatever their result.
    pub fn reconciles(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|result| self.metrics.reconciles.with_label_values(&[result]).get())
            .sum()
    }

    /// Waits until `more` reconciles have finished since the count was `before`: the positive
    /// sign that the operator has looked at the cluster again since a change, before a test
    /// asserts that the change made it do nothing.
    pub async fn wait_reconciles(&self, before: u64, more: u64) {
        wait_for(&format!("{more} more reconciles"), CONVERGE, || async {
            let now = self.reconciles();
            if now >= before + more {
                Ok(())
            } else {
                Err(format!("{} of {more}", now - before))
            }
        })
        .await;
    }

    /// Stop gracefully (the Lease is released) and wait for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("the operator stops within 15s")
                .expect("the operator task does not panic");
        }
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn routers(client: &Client, ns: &str) -> Api<EventRouter> {
    Api::namespaced(client.clone(), ns)
}

/// Create `name` with `spec` (server-side apply with the tests' field manager).
pub async fn apply_router(client: &Client, ns: &str, name: &str, spec: &EventRouterSpec) {
    let router = EventRouter::new(name, spec.clone());
    routers(client, ns)
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&router),
        )
        .await
        .expect("the EventRouter is accepted");
}

/// POST `router` as raw JSON (so fixtures may hold what the Rust types cannot); returns the
/// API server's error, if any.
pub async fn create_router(
    client: &Client,
    ns: &str,
    router: &serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let resource = ApiResource::erase::<EventRouter>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let object: DynamicObject =
        serde_json::from_value(router.clone()).expect("fixture has apiVersion, kind, metadata");
    api.create(&PostParams::default(), &object).await
}

/// The condition `type_` of router `name`, if the operator wrote it.
pub async fn condition(client: &Client, ns: &str, name: &str, type_: &str) -> Option<Condition> {
    let router = routers(client, ns).get(name).await.ok()?;
    router
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
}

/// Wait until the broker side of router `name` is declared (`BrokerReady=True`, `TopologyDeclared`).
pub async fn wait_topology_declared(client: &Client, ns: &str, name: &str) -> Condition {
    wait_condition(
        client,
        ns,
        name,
        "BrokerReady",
        "True",
        Some("TopologyDeclared"),
    )
    .await
}

/// Delete router `name` (its finalizer may still hold it).
pub async fn delete_router(client: &Client, ns: &str, name: &str) {
    routers(client, ns)
        .delete(name, &kube::api::DeleteParams::default())
        .await
        .expect("delete the router");
}

/// Wait until condition `type_` of `name` has `status` (and, if given, `reason`) for the current generation.
pub async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Condition {
    let what = format!("{type_}={status} ({reason:?}) on EventRouter {ns}/{name}");
    wait_for(&what, CONVERGE, || async {
        let router = routers(client, ns)
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let generation = router.metadata.generation;
        let found = router
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == type_));
        match found {
            Some(c)
                if c.status == status
                    && reason.is_none_or(|r| c.reason == r)
                    && c.observed_generation == generation =>
            {
                Ok(c)
            }
            other => Err(format!("{other:?} (generation {generation:?})")),
        }
    })
    .await
}

/// Wait until `get` finds object `name` through `api`, and return it.
pub async fn wait_present<K>(api: &Api<K>, name: &str) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let what = format!("{} {name} to exist", std::any::type_name::<K>());
    wait_for(&what, CONVERGE, || async {
        match api.get_opt(name).await {
            Ok(Some(object)) => Ok(object),
            Ok(None) => Err("absent".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Wait until object `name` is gone.
pub async fn wait_absent<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let what = format!("{} {name} to be gone", std::any::type_name::<K>());
    wait_for(&what, CONVERGE, || async {
        match api.get_opt(name).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still present".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// `(reason, type, reportingInstance)` of every events.k8s.io Event about router `name`.
pub async fn router_events(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&Default::default())
        .await
        .expect("events can be listed");
    list.items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("EventRouter") && r.name.as_deref() == Some(name)
            })
        })
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect()
}

/// Wait until an Event with `reason` and `type_` about router `name` exists (events are recorded
/// right after the status they explain, so a test must not race them).
pub async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str, type_: &str) {
    let what = format!("a {type_} event {reason} on EventRouter {ns}/{name}");
    wait_for(&what, CONVERGE, || async {
        let events = router_events(client, ns, name).await;
        if events.iter().any(|(r, t, _)| r == reason && t == type_) {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await;
}
