//! The reconciler: fetch → validate → build → apply → status, plus the finalizer and the
//! kube-runtime `Controller` wiring (watches, error policy with per-object backoff, resync).
//!
//! `validate` and `build` are pure; the reconciler gathers their inputs (the Secret, which
//! optional APIs exist), applies their output, declares the broker topology and writes the status.
//!
//! | module | role |
//! |---|---|
//! | this one | settings, shared context, the finalizer switch, error policy, watches |
//! | `live` | the reconcile of a live router, step by step |
//! | `cleanup` | the finalizer's broker cleanup |
//! | `events` | Event reasons and actions as types; which Events an outcome owes |

mod cleanup;
mod events;
mod live;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use eventrouter_contract::kube as names;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Config as RuntimeConfig, Controller};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

use self::events::Note;
use crate::apply::OptionalApis;
use crate::crd::EventRouter;
use crate::error::{Error, is_not_found};
use crate::metrics::Metrics;
use crate::reconcile_backoff::ReconcileBackoff;

/// How long the answer to "is KEDA / the ServiceMonitor CRD installed?" is reused.
const OPTIONAL_API_TTL: Duration = Duration::from_secs(30);
/// Retry interval for a spec that is invalid because of something outside it (e.g. the Secret).
const INVALID_SPEC_RETRY: Duration = Duration::from_secs(30);

/// A router's namespace and name.
type RouterKey = (String, String);

/// Tunables of the reconciler (from `operator run` flags).
#[derive(Clone, Debug)]
pub struct ControllerSettings {
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

impl Default for ControllerSettings {
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
    client: Client,
    metrics: Metrics,
    backoff: ReconcileBackoff,
    recorder: Recorder,
    settings: ControllerSettings,
    optional_apis: Mutex<Option<(Instant, OptionalApis)>>,
    /// When each router's topology was last declared, and for which generation. Reconciles woken
    /// by child changes (Deployment status updates, mostly) skip the AMQP round trip while this
    /// is recent; the periodic resync still re-declares, which repairs drift on the broker.
    broker_synced: Mutex<HashMap<RouterKey, (Option<i64>, Instant)>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, settings: ControllerSettings) -> Self {
        let reporter = Reporter {
            controller: names::FIELD_MANAGER.into(),
            instance: Some(settings.identity.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            backoff: ReconcileBackoff::new(settings.backoff_base, settings.backoff_max),
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
            .unwrap_or_else(PoisonError::into_inner)
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
            .unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), apis));
        Ok(apis)
    }

    /// Whether `key`'s topology was declared for `generation` less than 90% of a resync ago.
    fn broker_recently_synced(&self, key: &RouterKey, generation: Option<i64>) -> bool {
        let synced = self
            .broker_synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        synced.get(key).is_some_and(|(g, at)| {
            *g == generation && at.elapsed() < self.settings.resync.mul_f64(0.9)
        })
    }

    fn remember_broker_sync(&self, key: RouterKey, generation: Option<i64>, ok: bool) {
        let mut synced = self
            .broker_synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if ok {
            synced.insert(key, (generation, Instant::now()));
        } else {
            synced.remove(&key);
        }
    }

    /// Record `note` as a Kubernetes Event about `router`; a failure only loses the Event.
    async fn publish(&self, router: &EventRouter, note: Note) {
        let reason = note.reason.as_str();
        let event = Event {
            type_: note.type_,
            reason: reason.into(),
            note: Some(note.text),
            action: <&str>::from(note.action).into(),
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
        Err(error) if is_not_found(&error) => Ok(false),
        Err(source) => Err(Error::Kube {
            action: "discovering optional APIs",
            source,
        }),
    }
}

/// One reconcile of one router: the finalizer decides between live reconcile and cleanup.
async fn reconcile(router: Arc<EventRouter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    let namespace = router.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = router.name_any();
    let api: Api<EventRouter> = Api::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, names::FINALIZER, router, |event| async {
        match event {
            FinalizerEvent::Apply(router) => live::reconcile_live(router, ctx.clone()).await,
            FinalizerEvent::Cleanup(router) => {
                // The router is going: its replica series go with it.
                ctx.metrics.forget_router(&namespace, &name);
                cleanup::cleanup(router, ctx.clone()).await
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
fn error_policy(router: Arc<EventRouter>, error: &Error, ctx: Arc<Context>) -> Action {
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
    let config = RuntimeConfig::default().concurrency(ctx.settings.concurrency);
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
