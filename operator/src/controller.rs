//! The reconciler: fetch → validate → build → apply → status, plus the finalizer and the
//! kube-runtime `Controller` wiring (watches, error policy with per-object backoff, resync).
//!
//! `validate` and `build` are pure; this module gathers their inputs (the Secret, which optional
//! APIs exist), applies their output, declares the broker topology and writes the status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventrouter_contract::kube as names;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::apply::{OptionalApis, apply_children, current_deployment};
use crate::backoff::Backoff;
use crate::broker::{Broker, BrokerError};
use crate::build::{build, selector_string};
use crate::crd::{
    AutoscalingProvider, DeletionPolicy, EventRouter, RecordedTopology,
    SKIP_BROKER_CLEANUP_ANNOTATION,
};
use crate::error::Error;
use crate::metrics::{Metrics, RouterReplicas};
use crate::status::{BrokerState, Observed, conditions};
use crate::validate::{ClusterFacts, SecretLookup, validate};

/// How long the answer to "is KEDA / the ServiceMonitor CRD installed?" is reused.
const OPTIONAL_API_TTL: Duration = Duration::from_secs(30);
/// Retry interval for a spec that is invalid because of something outside it (e.g. the Secret).
const INVALID_SPEC_RETRY: Duration = Duration::from_secs(30);

/// A router's namespace and name.
type RouterKey = (String, String);

/// Tunables of the reconciler (from `operator run` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which namespace to watch; `None` watches all.
    pub namespace: Option<String>,
    /// Re-reconcile every router this often, to repair drift on the broker side.
    pub resync: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// After this long deleting, a broker that still cannot be cleaned up is given up on.
    pub cleanup_timeout: Duration,
    /// Routers reconciled at once.
    pub concurrency: u16,
    /// Names this process in Events (`reportingInstance`).
    pub identity: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            resync: Duration::from_secs(300),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            cleanup_timeout: Duration::from_secs(600),
            concurrency: 8,
            identity: "eventrouter-operator".into(),
        }
    }
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub backoff: Backoff,
    pub recorder: Recorder,
    pub settings: Settings,
    optional_apis: Mutex<Option<(Instant, OptionalApis)>>,
    /// When each router's topology was last declared, and for which generation. Reconciles woken
    /// by child changes (Deployment status updates, mostly) skip the AMQP round trip while this
    /// is recent; the periodic resync still re-declares, which repairs drift on the broker.
    broker_synced: Mutex<HashMap<RouterKey, (Option<i64>, Instant)>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: names::FIELD_MANAGER.into(),
            instance: Some(settings.identity.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            backoff: Backoff::new(settings.backoff_base, settings.backoff_max),
            client,
            metrics,
            settings,
            optional_apis: Mutex::new(None),
            broker_synced: Mutex::new(HashMap::new()),
        }
    }

    async fn optional_apis(&self) -> Result<OptionalApis, Error> {
        if let Some((at, apis)) = *self
            .optional_apis
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            && at.elapsed() < OPTIONAL_API_TTL
        {
            return Ok(apis);
        }
        let apis = OptionalApis {
            keda: serves(&self.client, "keda.sh/v1alpha1", "scaledobjects").await?,
            service_monitor: serves(&self.client, "monitoring.coreos.com/v1", "servicemonitors")
                .await?,
        };
        *self
            .optional_apis
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), apis));
        Ok(apis)
    }

    /// Whether `key`'s topology was declared for `generation` less than 90% of a resync ago.
    fn broker_recently_synced(&self, key: &(String, String), generation: Option<i64>) -> bool {
        let synced = self
            .broker_synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        synced.get(key).is_some_and(|(g, at)| {
            *g == generation && at.elapsed() < self.settings.resync.mul_f64(0.9)
        })
    }

    fn remember_broker_sync(&self, key: (String, String), generation: Option<i64>, ok: bool) {
        let mut synced = self
            .broker_synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            synced.insert(key, (generation, Instant::now()));
        } else {
            synced.remove(&key);
        }
    }

    async fn publish(
        &self,
        router: &EventRouter,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &router.object_ref(&())).await {
            warn!(%error, router = %router.name_any(), reason, "could not record a Kubernetes event");
        }
    }
}

/// Whether the API server serves `resource` in `api_version` (discovery; 404 means no).
async fn serves(client: &Client, api_version: &str, resource: &str) -> Result<bool, Error> {
    match client.list_api_group_resources(api_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == resource)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(Error::Kube {
            action: "discovering optional APIs",
            source,
        }),
    }
}

async fn read_amqp_url(
    client: &Client,
    namespace: &str,
    router: &EventRouter,
) -> Result<SecretLookup, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_ref = &router.spec.rabbitmq.secret_ref;
    let Some(secret) = secrets
        .get_opt(&secret_ref.name)
        .await
        .map_err(Error::kube("reading the AMQP Secret"))?
    else {
        return Ok(SecretLookup::SecretMissing);
    };
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned());
    let from_string = secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .cloned();
    Ok(match from_data.or(from_string) {
        Some(url) => SecretLookup::Found(url.trim().to_string()),
        None => SecretLookup::KeyMissing,
    })
}

/// Server-side apply of the status subresource.
async fn write_status(
    client: &Client,
    router: &EventRouter,
    status: serde_json::Value,
) -> Result<(), Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<EventRouter> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({
        "apiVersion": crate::crd::api_version(),
        "kind": names::KIND,
        "status": status,
    });
    api.patch_status(
        &router.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("writing the status"))?;
    Ok(())
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn status_json(
    router: &EventRouter,
    observed: &Observed<'_>,
    topology: Option<&RecordedTopology>,
) -> Result<serde_json::Value, Error> {
    let previous = router
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = conditions(observed, previous, &now());
    let (replicas, ready) = crate::status::replica_counts(observed.deployment);
    let status = crate::crd::EventRouterStatus {
        observed_generation: router.metadata.generation,
        conditions,
        replicas,
        ready_replicas: ready,
        selector: Some(selector_string(&router.name_any())),
        topology: topology.cloned(),
    };
    serde_json::to_value(status).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })
}

/// Report the router's current and desired replicas in the operator's metrics (the routers
/// dashboard's *Replicas* panel). With autoscaling on, the desired count comes from the HPA's
/// status: the operator's own HPA, or the one KEDA makes for the ScaledObject (`keda-hpa-<name>`).
/// A failed read only loses that detail, so it falls back rather than failing the reconcile.
async fn record_replicas(ctx: &Context, router: &EventRouter, deployment: Option<&Deployment>) {
    let namespace = router.namespace().unwrap_or_default();
    let name = router.name_any();
    let autoscaling = &router.spec.autoscaling;
    let autoscaler = if autoscaling.enabled {
        let hpa_name = match autoscaling.provider {
            AutoscalingProvider::Hpa => name.clone(),
            AutoscalingProvider::Keda => format!("keda-hpa-{name}"),
        };
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &namespace);
        api.get_opt(&hpa_name).await.unwrap_or_else(|error| {
            debug!(%error, router = %name, %namespace, hpa = %hpa_name, "cannot read the autoscaler's status");
            None
        })
    } else {
        None
    };
    ctx.metrics.set_router_replicas(
        &namespace,
        &name,
        RouterReplicas::observe(deployment, autoscaler.as_ref()),
    );
}

/// Status and replica gauges for a router whose children and broker are left as they are: it
/// is paused (`invalid` is `None`) or its spec is invalid. The recorded topology is kept.
async fn report_untouched(
    ctx: &Context,
    router: &EventRouter,
    invalid: Option<String>,
    reason: &'static str,
    message: &str,
) -> Result<(), Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let deployment = current_deployment(&ctx.client, &namespace, &router.name_any()).await?;
    record_replicas(ctx, router, deployment.as_ref()).await;
    let observed = Observed {
        generation: router.metadata.generation,
        paused: invalid.is_none(),
        invalid,
        broker: BrokerState::NotAttempted {
            reason,
            message: message.into(),
        },
        deployment: deployment.as_ref(),
        keda_missing: false,
    };
    let recorded = router.status.as_ref().and_then(|s| s.topology.as_ref());
    write_status(
        &ctx.client,
        router,
        status_json(router, &observed, recorded)?,
    )
    .await
}

/// Declare the topology with the Secret's URL; the new record, or why not.
async fn sync_broker(
    url: &str,
    desired: &crate::broker::DesiredTopology,
    recorded: Option<&RecordedTopology>,
    policy: DeletionPolicy,
) -> Result<RecordedTopology, BrokerError> {
    let mut broker = Broker::connect(url).await?;
    let result = broker
        .sync(desired, recorded, policy == DeletionPolicy::Delete)
        .await;
    broker.close().await;
    result
}

/// Reconcile one live (not deleting) router.
async fn reconcile_live(router: Arc<EventRouter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = router.name_any();
    let uid = router.uid().ok_or(Error::MissingField("uid"))?;
    let previous = router.status.clone().unwrap_or_default();
    let resync = Action::requeue(ctx.settings.resync);

    // Fetch: the facts validate needs.
    let amqp_url = read_amqp_url(client, &namespace, &router).await?;
    let apis = ctx.optional_apis().await?;
    let facts = ClusterFacts {
        amqp_url: amqp_url.clone(),
        keda_installed: apis.keda,
        service_monitor_installed: apis.service_monitor,
    };

    if router.spec.paused {
        report_untouched(&ctx, &router, None, "Paused", "paused").await?;
        if previous
            .conditions
            .iter()
            .all(|c| !(c.type_ == "Paused" && c.status == "True"))
        {
            ctx.publish(
                &router,
                EventType::Normal,
                "Paused",
                "Reconcile",
                "spec.paused is true: children and broker are left as they are".into(),
            )
            .await;
        }
        return Ok(resync);
    }

    // Validate (pure).
    let plan = match validate(&router, &facts) {
        Ok(plan) => plan,
        Err(invalid) => {
            ctx.metrics.invalid_specs.inc();
            warn!(router = %name, %namespace, problems = %invalid, "invalid spec; no child changed");
            report_untouched(
                &ctx,
                &router,
                Some(invalid.to_string()),
                "InvalidSpec",
                "the spec is invalid",
            )
            .await?;
            ctx.publish(
                &router,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                invalid.to_string(),
            )
            .await;
            return Ok(Action::requeue(INVALID_SPEC_RETRY.min(ctx.settings.resync)));
        }
    };

    // Build (pure) and apply.
    let desired = build(&router, &plan);
    let topology = desired.topology.clone();
    let applied = match apply_children(client, &namespace, &name, &uid, desired, apis).await {
        Ok(applied) => applied,
        Err(error) => {
            ctx.publish(
                &router,
                EventType::Warning,
                "ApplyFailed",
                "Apply",
                error.to_string(),
            )
            .await;
            return Err(error);
        }
    };
    record_replicas(&ctx, &router, applied.deployment.as_ref()).await;
    for kind in &applied.deleted {
        ctx.publish(
            &router,
            EventType::Normal,
            "ChildDeleted",
            "Apply",
            format!("deleted the {kind}: the spec no longer asks for it"),
        )
        .await;
    }

    // The broker.
    let SecretLookup::Found(url) = &amqp_url else {
        return Err(Error::MissingField("AMQP URL after validation"));
    };
    let key = (namespace.clone(), name.clone());
    let broker_ready_before = previous
        .conditions
        .iter()
        .any(|c| c.type_ == "BrokerReady" && c.status == "True");
    let unchanged = previous.topology.as_ref() == Some(&topology.record()) && broker_ready_before;
    let broker = if unchanged && ctx.broker_recently_synced(&key, router.metadata.generation) {
        Ok(topology.record())
    } else {
        let result = sync_broker(
            url,
            &topology,
            previous.topology.as_ref(),
            router.spec.deletion_policy,
        )
        .await;
        ctx.remember_broker_sync(key, router.metadata.generation, result.is_ok());
        result
    };
    let (state, record, broker_error) = match broker {
        Ok(record) => (BrokerState::Ready, Some(record), None),
        Err(error) => (
            BrokerState::Failed {
                reason: error.reason(),
                message: error.to_string(),
            },
            previous.topology.clone(),
            Some(error),
        ),
    };

    // Status.
    let observed = Observed {
        generation: router.metadata.generation,
        paused: false,
        invalid: None,
        broker: state,
        deployment: applied.deployment.as_ref(),
        keda_missing: plan.keda_missing,
    };
    write_status(
        client,
        &router,
        status_json(&router, &observed, record.as_ref())?,
    )
    .await?;

    if previous.observed_generation != router.metadata.generation {
        let generation = router.metadata.generation.unwrap_or_default();
        ctx.publish(
            &router,
            EventType::Normal,
            "Reconciled",
            "Apply",
            format!("applied generation {generation} to every child"),
        )
        .await;
    }
    if plan.keda_missing
        && previous
            .conditions
            .iter()
            .all(|c| c.reason != "AutoscalerUnavailable")
    {
        ctx.publish(
            &router,
            EventType::Warning,
            "AutoscalerUnavailable",
            "Apply",
            "provider keda, but keda.sh/v1alpha1 ScaledObjects are not served".into(),
        )
        .await;
    }
    if let Some(error) = broker_error {
        ctx.publish(
            &router,
            EventType::Warning,
            error.reason(),
            "DeclareTopology",
            error.to_string(),
        )
        .await;
        return Err(Error::Broker(error));
    }
    if record != previous.topology
        && let Some(record) = &record
    {
        ctx.publish(
            &router,
            EventType::Normal,
            "TopologyDeclared",
            "DeclareTopology",
            format!(
                "exchange {:?} with {} upstream binding(s)",
                record.exchange,
                record.bindings.len()
            ),
        )
        .await;
    }
    debug!(router = %name, %namespace, "reconciled");
    Ok(resync)
}

/// The finalizer: remove exactly the recorded topology (or nothing, by policy or annotation).
async fn cleanup(router: Arc<EventRouter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let done = Action::await_change();
    let Some(recorded) = router.status.as_ref().and_then(|s| s.topology.clone()) else {
        return Ok(done);
    };
    if router
        .annotations()
        .get(SKIP_BROKER_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        ctx.publish(&router, EventType::Warning, "BrokerCleanupSkipped", "Cleanup", format!("annotation {SKIP_BROKER_CLEANUP_ANNOTATION}=true: exchange {:?} left on the broker", recorded.exchange)).await;
        return Ok(done);
    }
    if router.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.publish(
            &router,
            EventType::Normal,
            "TopologyRetained",
            "Cleanup",
            format!(
                "deletionPolicy retain: exchange {:?} left on the broker",
                recorded.exchange
            ),
        )
        .await;
        return Ok(done);
    }
    let url = match read_amqp_url(&ctx.client, &namespace, &router).await? {
        SecretLookup::Found(url) => url,
        // Without credentials nothing can be removed; blocking deletion forever would not help.
        _ => {
            ctx.publish(
                &router,
                EventType::Warning,
                "BrokerCleanupSkipped",
                "Cleanup",
                format!(
                    "the AMQP Secret is gone: exchange {:?} left on the broker",
                    recorded.exchange
                ),
            )
            .await;
            return Ok(done);
        }
    };
    let result = async {
        let mut broker = Broker::connect(&url).await?;
        let result = broker.remove(&recorded).await;
        broker.close().await;
        result
    }
    .await;
    match result {
        Ok(()) => {
            info!(router = %router.name_any(), %namespace, exchange = %recorded.exchange, "broker topology removed");
            Ok(done)
        }
        Err(error) => {
            let deleting_for = router
                .metadata
                .deletion_timestamp
                .as_ref()
                .and_then(|t| Timestamp::now().duration_since(t.0).try_into().ok())
                .unwrap_or(Duration::ZERO);
            if deleting_for > ctx.settings.cleanup_timeout {
                ctx.publish(
                    &router,
                    EventType::Warning,
                    "BrokerCleanupAbandoned",
                    "Cleanup",
                    format!(
                        "gave up removing exchange {:?} after {}: {error}",
                        recorded.exchange,
                        humantime::format_duration(ctx.settings.cleanup_timeout)
                    ),
                )
                .await;
                return Ok(done);
            }
            ctx.publish(
                &router,
                EventType::Warning,
                error.reason(),
                "Cleanup",
                format!(
                    "{error}; retrying (annotate {SKIP_BROKER_CLEANUP_ANNOTATION}=true to skip)"
                ),
            )
            .await;
            Err(Error::Broker(error))
        }
    }
}

/// One reconcile of one router: the finalizer decides between live reconcile and cleanup.
pub async fn reconcile(router: Arc<EventRouter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = router.name_any();
    let api: Api<EventRouter> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, names::FINALIZER, router, |event| async {
        match event {
            FinalizerEvent::Apply(router) => reconcile_live(router, ctx.clone()).await,
            FinalizerEvent::Cleanup(router) => {
                // The router is going: its replica series go with it.
                ctx.metrics.forget_router(&namespace, &name);
                cleanup(router, ctx.clone()).await
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.metrics.record_success();
    ctx.backoff.succeeded(&namespace, &name);
    Ok(action)
}

/// After a failed reconcile: count it and retry with this object's exponential backoff.
pub fn error_policy(router: Arc<EventRouter>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.record_failure(error);
    let namespace = router.namespace().unwrap_or_default();
    let delay = ctx.backoff.failed(&namespace, &router.name_any());
    warn!(router = %router.name_any(), %namespace, %error, reason = error.metric_label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Removes every router's replica series when the controller stops or is dropped (leadership
/// lost): only the leader reports routers, so a standby never shows stale counts beside the
/// leader's.
struct ForgetRoutersOnDrop(Metrics);

impl Drop for ForgetRoutersOnDrop {
    fn drop(&mut self) {
        self.0.forget_routers();
    }
}

/// Run the controller until `shutdown` resolves (then in-flight reconciles finish).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let _forget_routers = ForgetRoutersOnDrop(ctx.metrics.clone());
    let metrics = ctx.metrics.clone();
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.clone();
    let ns = ns.as_deref();
    let routers: Api<EventRouter> = api_for(&client, ns);
    // Children are found by their managed-by label, so unrelated objects never wake the controller.
    let children = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::MANAGED_BY
    ));
    let config = ControllerConfig::default().concurrency(ctx.settings.concurrency);
    Controller::new(routers, watcher::Config::default().any_semantic())
        .owns(api_for::<Deployment>(&client, ns), children.clone())
        .owns(api_for::<Service>(&client, ns), children.clone())
        .owns(api_for::<ServiceAccount>(&client, ns), children.clone())
        .owns(
            api_for::<PodDisruptionBudget>(&client, ns),
            children.clone(),
        )
        .owns(api_for::<HorizontalPodAutoscaler>(&client, ns), children)
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            // A wake-up for a router no longer in the cache: it was deleted (e.g. without the
            // finalizer running); drop its replica series.
            if let Err(kube::runtime::controller::Error::ObjectNotFound(object)) = &result {
                metrics.forget_router(
                    object.namespace.as_deref().unwrap_or_default(),
                    &object.name,
                );
            }
            async move {
                match result {
                    Ok((object, _)) => {
                        debug!(router = %object.name, namespace = ?object.namespace, "reconcile done")
                    }
                    Err(error) => debug!(%error, "controller event"),
                }
            }
        })
        .await;
}
