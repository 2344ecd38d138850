//! The `EventRouter` custom resource: its spec, status and the generated CRD.
//!
//! Every field carries a doc comment because it becomes the `description` that `kubectl explain`
//! shows. Defaults live here (as serde defaults, which schemars writes into the schema so the API
//! server fills them in) and so do the CEL rules that the schema alone cannot express. Rules that
//! need the cluster (does the Secret exist?) or that compare durations live in `validate`.
//!
//! | module | holds |
//! |---|---|
//! | this one | the spec types and the generated CRD |
//! | `status` | `EventRouterStatus` and the recorded broker topology |
//! | `defaults` | every default value of the spec |
//! | `access` | `spec.auth` (client and publisher authentication) and `spec.limits` (per-client limits) |
//! | `history` | `spec.history` (missed-event recovery from a RabbitMQ stream) |

/// A topic pattern as the CEL rules check it: words separated by `.`, each `*`, `#`, or other
/// characters except `.`, `,` and whitespace. `validate` repeats the check word by word with
/// precise messages. A macro (defined before the modules that use it) so that `concat!` can
/// build the rules from it.
macro_rules! pattern_regex {
    () => {
        "^([*]|#|[^.,*#[:space:]]+)([.]([*]|#|[^.,*#[:space:]]+))*$"
    };
}

mod access;
mod defaults;
mod history;
mod status;

use std::collections::BTreeMap;

use eventrouter_contract::kube as names;
use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::access::{AuthSpec, KeyFile, LimitsSpec, SecretFileRef};
use self::defaults::*;
pub use self::history::{HistorySpec, MAX_AGE_PATTERN, MAX_SEGMENT_BYTES, MIN_HISTORY_BYTES};
pub use self::status::{
    EventRouterStatus, RecordedBinding, RecordedHistory, RecordedTopology, StreamArguments,
};

/// Annotation that lets a stuck deletion finish without touching the broker (see the README).
pub const SKIP_BROKER_CLEANUP_ANNOTATION: &str = "eventrouter.io/skip-broker-cleanup";

/// A regular expression for the duration strings the event service accepts (`20s`, `1m30s`, `500ms`).
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// An event router: a Deployment of the event service, its Service, its RabbitMQ topology and an
/// autoscaler that scales on connections and on kernel receive-queue bytes per pod.
// Several printcolumn(...) entries repeat keys by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eventrouter.io",
    version = "v1alpha1",
    kind = "EventRouter",
    namespaced,
    status = "EventRouterStatus",
    shortname = "er",
    category = "eventrouter",
    doc = "An event router: WebSocket clients subscribe to events that arrive from RabbitMQ.",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the router is fully reconciled and available"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Pods of the event service"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Pods that are ready"
    ),
    printcolumn(
        name = "Exchange",
        type_ = "string",
        json_path = ".status.topology.exchange",
        description = "The RabbitMQ exchange the operator declared",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the router is (not) ready",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EventRouterSpec {
    /// Container image of the event service.
    #[serde(default = "default_image")]
    pub image: String,

    /// When to pull the image: `Always`, `IfNotPresent` or `Never` (Kubernetes' default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,

    /// Number of pods when autoscaling is off. Ignored (never applied) while autoscaling is on, so
    /// the autoscaler and the operator never fight over it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// CPU and memory requests and limits of the event-service container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Where events come from: the RabbitMQ connection, the router's exchange and its upstreams.
    pub rabbitmq: RabbitMqSpec,

    /// WebSocket behaviour of every pod.
    #[serde(default)]
    pub websocket: WebSocketSpec,

    /// Horizontal autoscaling on connections and receive-queue bytes per pod.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,

    /// Rebalancing after scale-out: pods holding more than their share of the router's
    /// connections ask some clients to reconnect (close code 4002), so new pods take load.
    #[serde(default)]
    pub rebalance: RebalanceSpec,

    /// The Service in front of the pods.
    #[serde(default)]
    pub service: ServiceSpec,

    /// The PodDisruptionBudget that keeps voluntary evictions from dropping every connection at once.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,

    /// Prometheus scraping of the pods' admin port.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Authentication of WebSocket clients (JWT connection tokens) and of publishers
    /// (`POST /publish`), and the browser origins allowed to connect. Unset: anyone reaching the
    /// Service may subscribe to any event and publish.
    ///
    /// Token authentication is on when at least one of `hmacSecretRef`, `publicKeysRef` and
    /// `jwksRef` is set: a client then presents a token whose claim (`subscribeClaim`) lists the
    /// patterns it may subscribe to, and clients without a token may subscribe only to
    /// `anonymousPatterns`. Each `*Ref` names a key of a Secret in this namespace; the pods mount
    /// it as a file and re-read it when it changes, so rotating a key is updating its Secret, with
    /// no restart. Only the main port is authenticated: the admin port (metrics, debug endpoints)
    /// never is and must stay unreachable from outside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// Per-client limits: connections and new connections per client IP address, and frames per
    /// connection. Unset: the event service's defaults (only the frame rate is limited). Each pod
    /// enforces them on its own, so a client spread over several pods gets each pod's allowance.
    /// Rates are decimal strings (quote them in YAML, e.g. `"0.5"`): what you write is exactly
    /// what is stored and passed to the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,

    /// Missed-event recovery: a client that reconnects subscribes with `since` (its last event's
    /// id) and gets the events it missed, read from the router's RabbitMQ stream
    /// `<exchange>.history`, which the operator declares, binds and bounds. Unset or not
    /// `enabled`: no stream, and the pods recover nothing from RabbitMQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,

    /// What happens to the RabbitMQ exchanges, bindings and history stream when this EventRouter
    /// is deleted: `delete` removes exactly what the operator declared; `retain` leaves the broker
    /// untouched.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Log filter of the event service (tracing `EnvFilter` syntax), e.g. `info`.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 256))]
    pub log_level: String,

    /// While true the operator changes nothing: no child is applied or deleted and the broker is
    /// not touched. Deletion still runs the finalizer.
    #[serde(default)]
    pub paused: bool,
}

/// The RabbitMQ side of a router.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.exchange) || self.upstreams.all(u, u.exchange != self.exchange)",
        "message": "an upstream exchange must differ from the router's own exchange"
    }
]))]
pub struct RabbitMqSpec {
    /// The Secret (in this namespace) holding the AMQP URL, e.g. `amqp://user:pass@rabbitmq:5672/%2f`.
    /// The operator reads it to declare the topology; the pods mount it as a file.
    pub secret_ref: SecretKeyRef,

    /// Name of the router's durable topic exchange. Defaults to the EventRouter's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!self.startsWith('amq.')", "message": "exchange names starting with 'amq.' are reserved by RabbitMQ"}
    ]))]
    pub exchange: Option<String>,

    /// Exchanges whose events flow into the router's exchange (exchange-to-exchange bindings).
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub upstreams: Vec<UpstreamBinding>,

    /// Most messages waiting in each pod's queue; beyond it RabbitMQ drops the oldest.
    #[serde(default = "default_queue_max_length")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub queue_max_length: u32,

    /// How long a message may wait in a pod's queue (e.g. `60s`).
    #[serde(default = "default_queue_message_ttl")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub queue_message_ttl: String,

    /// How long a pod's queue survives unused after its pod is gone (e.g. `5m`).
    #[serde(default = "default_queue_expires")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub queue_expires: String,

    /// Unacknowledged messages RabbitMQ may push to each pod at once (basic.qos prefetch).
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 65535))]
    pub prefetch: u16,
}

/// A key of a Secret in the EventRouter's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret whose value is the AMQP URL.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Events published to `exchange` whose routing key matches one of `routingKeys` also reach the
/// router's exchange.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamBinding {
    /// The source exchange (it must already exist; the operator does not create it).
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub exchange: String,
    /// Binding patterns in RabbitMQ topic syntax (`order.*`, `user.#`); `#` forwards everything.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(inner(length(min = 1, max = 255)))]
    pub routing_keys: Vec<String>,
}

/// WebSocket settings of every pod (each maps to one event-service flag).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketSpec {
    /// How often the server pings each client (e.g. `20s`). Must be shorter than `idleTimeout`.
    #[serde(default = "default_ping_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ping_interval: String,
    /// Close a connection when nothing was received from it for this long (e.g. `60s`).
    #[serde(default = "default_idle_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub idle_timeout: String,
    /// Time a client has to complete the WebSocket upgrade.
    #[serde(default = "default_handshake_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub handshake_timeout: String,
    /// Largest frame a client may send, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 256, max = 16_777_216))]
    pub max_frame_bytes: u32,
    /// Bound on each connection's outbound queue, in bytes.
    #[serde(default = "default_send_queue_bytes")]
    #[schemars(range(min = 1024, max = 1_073_741_824))]
    pub send_queue_bytes: u32,
    /// What happens to a client whose outbound queue is full.
    #[serde(default)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Most subscription patterns per connection.
    #[serde(default = "default_max_subscriptions")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_subscriptions: u32,
    /// Most concurrent connections per pod; further upgrades get HTTP 503.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections_per_pod: u32,
    /// On shutdown, clients are closed spread over this long (e.g. `10s`). The pod's termination
    /// grace period is derived from it.
    #[serde(default = "default_drain_duration")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub drain_duration: String,
    /// Accept backlog of each pod's listening socket: room for a burst of reconnects after a
    /// drain, a rebalance or a scale-in. The node's `net.core.somaxconn` caps it.
    #[serde(default = "default_listen_backlog")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_backlog: u32,
}

/// What happens to a slow consumer. `as_ref()` is the event service's `--slow-consumer-policy` value.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, strum::AsRefStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with code 4000.
    #[default]
    Disconnect,
    /// Drop the oldest queued events until the new one fits.
    DropOldest,
}

/// Horizontal autoscaling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"},
    {
        "rule": "!self.enabled || self.provider != 'keda' || has(self.prometheusAddress)",
        "message": "the keda provider needs prometheusAddress"
    }
]))]
pub struct AutoscalingSpec {
    /// Turn autoscaling on. While on, `spec.replicas` is not applied to the Deployment.
    #[serde(default)]
    pub enabled: bool,
    /// `hpa`: an autoscaling/v2 HorizontalPodAutoscaler on Pods metrics (served by a metrics
    /// adapter); `keda`: a KEDA ScaledObject with Prometheus triggers.
    #[serde(default)]
    pub provider: AutoscalingProvider,
    /// Fewest pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most pods.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target open connections per pod (metric `eventrouter_connections`).
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub target_connections_per_pod: u32,
    /// Target bytes waiting in kernel receive queues per pod (metric
    /// `eventrouter_socket_recv_queue_bytes`); growth means clients send faster than pods read.
    #[serde(default = "default_target_recv_queue_bytes")]
    #[schemars(range(min = 1024, max = 17_179_869_184_i64))]
    pub target_recv_queue_bytes_per_pod: i64,
    /// Prometheus base URL KEDA queries (e.g. `http://prometheus.monitoring:9090`); keda only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub prometheus_address: Option<String>,
    /// Scale-up behaviour.
    #[serde(default = "default_scale_up")]
    pub scale_up: ScalingRules,
    /// Scale-down behaviour. Connections are long-lived: scale down slowly.
    #[serde(default = "default_scale_down")]
    pub scale_down: ScalingRules,
}

/// Rebalancing after scale-out. The pods learn each other's connection counts from heartbeats on
/// the router's control exchange (`<exchange>.control`, declared by the operator); a pod over the
/// fleet's mean plus the tolerance closes some of its older connections with code 4002, and
/// their clients reconnect through the Service, mostly to the less loaded pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Turn rebalancing on or off. When unset it is on exactly when `spec.autoscaling.enabled`
    /// is true: scale-out is when new pods need the old pods' clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How far over the fleet's mean connections per pod (in percent) still counts as balanced;
    /// a pod sheds only its excess over the mean plus this.
    #[serde(default = "default_rebalance_tolerance_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub tolerance_percent: u32,
    /// Most connections one pod closes per second to rebalance, so clients move gradually.
    #[serde(default = "default_rebalance_max_shed_rate")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_shed_rate: u32,
    /// A connection younger than this is never closed to rebalance, so no client is moved twice
    /// in a row (e.g. `60s`).
    #[serde(default = "default_rebalance_min_connection_age")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub min_connection_age: String,
    /// How often each pod publishes its connection count on the control exchange (at least
    /// `100ms`); a pod not heard from for three intervals leaves the fleet's view.
    #[serde(default = "default_rebalance_heartbeat_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub heartbeat_interval: String,
}

/// The autoscaler.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingProvider {
    /// A HorizontalPodAutoscaler (autoscaling/v2) on Pods metrics.
    #[default]
    Hpa,
    /// A KEDA ScaledObject with Prometheus triggers.
    Keda,
}

/// How fast the autoscaler may move in one direction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Seconds of past recommendations considered before scaling (smooths flapping).
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: i32,
    /// Most pods added or removed per minute.
    #[schemars(range(min = 1, max = 1000))]
    pub pods_per_minute: i32,
}

/// The Service in front of the pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port the Service exposes (it forwards to the pods' main port, 8080).
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations on the Service (e.g. for a cloud load balancer).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service types the router supports. `as_ref()` is the Service's `spec.type`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema, strum::AsRefStr,
)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

/// The PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Create a PodDisruptionBudget.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Pods that may be voluntarily evicted at once.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_unavailable: i32,
}

/// Prometheus scraping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Put `prometheus.io/scrape`, `/port`, `/path` annotations on the pods.
    #[serde(default = "default_true")]
    pub scrape_annotations: bool,
    /// Create a ServiceMonitor (monitoring.coreos.com/v1) when its CRD exists in the cluster.
    #[serde(default = "default_true")]
    pub service_monitor: bool,
    /// Scrape interval of the ServiceMonitor (e.g. `30s`).
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: String,
}

/// What the finalizer does with the broker topology.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeletionPolicy {
    /// Delete the exchanges, the bindings and the history stream the operator recorded in status.
    Delete,
    /// Leave the broker as it is (publishers keep their exchange).
    #[default]
    Retain,
}

impl EventRouter {
    /// The exchange this router uses: `spec.rabbitmq.exchange` or the EventRouter's name.
    pub fn exchange_name(&self) -> String {
        match &self.spec.rabbitmq.exchange {
            Some(exchange) => exchange.clone(),
            None => self.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// The router's control exchange (the pods' load heartbeats): `<exchange>.control`.
    pub fn control_exchange_name(&self) -> String {
        eventrouter_contract::control::default_exchange(&self.exchange_name())
    }

    /// The router's history stream (missed-event recovery): `<exchange>.history`.
    pub fn history_stream_name(&self) -> String {
        eventrouter_contract::history::default_stream(&self.exchange_name())
    }
}

impl EventRouterSpec {
    /// Whether the pods rebalance: `spec.rebalance.enabled`, else whether autoscaling is on.
    pub fn rebalance_enabled(&self) -> bool {
        self.rebalance.enabled.unwrap_or(self.autoscaling.enabled)
    }

    /// `spec.history` when it is enabled.
    pub fn enabled_history(&self) -> Option<&HistorySpec> {
        self.history.as_ref().filter(|history| history.enabled)
    }
}

/// The CRD as YAML, exactly as committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let crd = EventRouter::crd();
    Ok(format!(
        "# Generated by `operator crd`; do not edit. A test fails when this file is stale.\n{}",
        serde_yaml::to_string(&crd)?
    ))
}

/// The group/version the CRD registers (kept equal to the shared contract by a unit test).
pub fn api_version() -> String {
    format!("{}/{}", names::GROUP, names::VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn the_crd_uses_the_contract_group_and_kind() {
        assert_eq!(EventRouter::api_version(&()), api_version());
        assert_eq!(EventRouter::kind(&()), names::KIND);
    }

    /// Every string property of `schema` (recursively) whose default is a duration, by JSON path,
    /// with its `pattern`.
    fn duration_fields(
        schema: &serde_json::Value,
        path: &str,
        found: &mut Vec<(String, Option<String>)>,
    ) {
        let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
            return;
        };
        for (name, property) in properties {
            let path = format!("{path}.{name}");
            let default = property.get("default").and_then(|d| d.as_str());
            if property.get("type").and_then(|t| t.as_str()) == Some("string")
                && default.is_some_and(|d| humantime::parse_duration(d).is_ok())
            {
                let pattern = property.get("pattern").and_then(|p| p.as_str());
                found.push((path.clone(), pattern.map(str::to_string)));
            }
            duration_fields(property, &path, found);
        }
    }

    #[test]
    fn every_duration_field_carries_the_duration_pattern() {
        let crd = serde_json::to_value(EventRouter::crd()).expect("crd serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut found = Vec::new();
        duration_fields(spec, "spec", &mut found);
        let paths: Vec<&str> = found.iter().map(|(path, _)| path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.history.maxAge",
                "spec.monitoring.interval",
                "spec.rabbitmq.queueExpires",
                "spec.rabbitmq.queueMessageTtl",
                "spec.rebalance.heartbeatInterval",
                "spec.rebalance.minConnectionAge",
                "spec.websocket.drainDuration",
                "spec.websocket.handshakeTimeout",
                "spec.websocket.idleTimeout",
                "spec.websocket.pingInterval",
            ],
            "the duration fields of the spec"
        );
        for (path, pattern) in &found {
            // RabbitMQ reads the stream's age, in its own syntax (`24h`, `7D`), not the service.
            let expected = if path == "spec.history.maxAge" {
                MAX_AGE_PATTERN
            } else {
                DURATION_PATTERN
            };
            assert_eq!(pattern.as_deref(), Some(expected), "{path}");
        }
    }

    #[test]
    fn history_uses_the_documented_field_names_defaults_and_rules() {
        let json = serde_json::json!({
            "rabbitmq": {"secretRef": {"name": "amqp"}},
            "history": {"enabled": true}
        });
        let spec: EventRouterSpec = serde_json::from_value(json).expect("parses");
        assert_eq!(spec.history, Some(HistorySpec::enabled()));
        let back = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(
            back["history"],
            serde_json::json!({
                "enabled": true,
                "maxAge": "24h",
                "maxBytes": 1_073_741_824_i64,
                "patterns": ["#"],
                "recoveryMaxEvents": 10_000,
                "recoveryMaxConcurrent": 64
            })
        );
        assert!(spec.enabled_history().is_some());
        let off: EventRouterSpec = serde_json::from_value(serde_json::json!({
            "rabbitmq": {"secretRef": {"name": "amqp"}},
            "history": {}
        }))
        .expect("parses");
        assert_eq!(off.history, Some(HistorySpec::default()));
        assert!(off.enabled_history().is_none());

        let crd = serde_json::to_value(EventRouter::crd()).expect("crd serializes");
        let history = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["history"];
        let fields = &history["properties"];
        assert_eq!(fields["maxAge"]["default"], "24h");
        assert_eq!(fields["maxBytes"]["minimum"], MIN_HISTORY_BYTES as f64);
        assert_eq!(
            fields["maxSegmentBytes"]["maximum"],
            MAX_SEGMENT_BYTES as f64
        );
        assert_eq!(fields["patterns"]["maxItems"], 64);
        assert_eq!(fields["patterns"]["minItems"], 1);
        assert_eq!(fields["patterns"]["x-kubernetes-list-type"], "set");
        assert_eq!(fields["recoveryMaxConcurrent"]["maximum"], 4096.0);
        let rules = history["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("self.maxSegmentBytes <= self.maxBytes"),
            "{rules}"
        );
    }

    #[test]
    fn the_crd_carries_cel_rules_printer_columns_scale_and_short_name() {
        let yaml = crd_yaml().expect("crd serializes");
        assert!(yaml.contains("self.minReplicas <= self.maxReplicas"));
        assert!(yaml.contains("x-kubernetes-validations"));
        assert!(yaml.contains("shortNames"));
        assert!(yaml.contains("- er"));
        assert!(yaml.contains("labelSelectorPath: .status.selector"));
        assert!(yaml.contains("name: Ready"));
    }

    #[test]
    fn auth_and_limits_use_the_documented_field_names_and_round_trip() {
        let json = serde_json::json!({
            "rabbitmq": {"secretRef": {"name": "amqp"}},
            "auth": {
                "hmacSecretRef": {"name": "tokens", "key": "secret"},
                "publicKeysRef": {"name": "tokens", "key": "public.pem"},
                "jwksRef": {"name": "idp", "key": "jwks.json"},
                "publishKeysRef": {"name": "publishers", "key": "keys.json"},
                "issuer": "https://idp.example.com/",
                "audience": "events",
                "leeway": "30s",
                "subscribeClaim": "topics",
                "grantTemplates": ["user.{sub}.#"],
                "anonymousPatterns": ["public.#"],
                "allowedOrigins": ["https://app.example.com"],
                "maxTokenBytes": 4096,
                "reloadInterval": "1m"
            },
            "limits": {
                "maxConnectionsPerIP": 10,
                "connectRatePerIP": "0.5",
                "connectBurstPerIP": 5,
                "trustedProxyHeader": "X-Forwarded-For",
                "frameRate": "20",
                "frameBurst": 40
            }
        });
        let spec: EventRouterSpec = serde_json::from_value(json.clone()).expect("parses");
        let key_files: Vec<_> = spec
            .key_files()
            .map(|(file, r)| (file, r.name.as_str()))
            .collect();
        assert_eq!(
            key_files,
            [
                (KeyFile::HmacSecret, "tokens"),
                (KeyFile::PublicKeys, "tokens"),
                (KeyFile::Jwks, "idp"),
                (KeyFile::PublishKeys, "publishers"),
            ]
        );
        let back = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(back["auth"], json["auth"]);
        assert_eq!(back["limits"], json["limits"]);
        // Unset sections stay absent rather than becoming empty objects.
        let plain = serde_json::to_value(EventRouterSpec::with_secret("amqp")).expect("serializes");
        assert!(
            plain.get("auth").is_none() && plain.get("limits").is_none(),
            "{plain}"
        );
    }

    #[test]
    fn the_auth_durations_carry_the_duration_pattern_and_key_refs_need_a_key() {
        let crd = serde_json::to_value(EventRouter::crd()).expect("crd serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let auth = &spec["properties"]["auth"]["properties"];
        for field in ["leeway", "reloadInterval"] {
            assert_eq!(auth[field]["pattern"], DURATION_PATTERN, "{field}");
        }
        for field in [
            "hmacSecretRef",
            "publicKeysRef",
            "jwksRef",
            "publishKeysRef",
        ] {
            assert_eq!(
                auth[field]["required"],
                serde_json::json!(["key", "name"]),
                "{field}"
            );
        }
    }

    #[test]
    fn a_spec_with_only_a_secret_deserializes_with_every_default() {
        let spec: EventRouterSpec = serde_json::from_value(
            serde_json::json!({"rabbitmq": {"secretRef": {"name": "amqp"}}}),
        )
        .expect("minimal spec parses");
        assert_eq!(spec, EventRouterSpec::with_secret("amqp"));
    }
}
