//! The autoscaling loop's pieces besides the clients: the Prometheus scrape configuration made
//! from the chart's own PodMonitor, the steady publisher, the accept-queue overflow sampler and
//! small readers of the HPA and of Prometheus.

pub mod clients;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventrouter_e2e::rabbitmq::amqp_url;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::Api;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::chart_support::{helm_template, yaml_docs};

/// The `scrape_configs` entry a Prometheus Operator generates for the chart's router PodMonitor
/// (`monitoring.routerPodMonitor`), with discovery through the test API server and limited to
/// `namespace`: the PodMonitor's label selector and port become `keep` rules, the labels the
/// Prometheus Operator always adds (`namespace`, `pod`, `container`, `endpoint`, `job`) are set
/// the same way, and the PodMonitor's own relabelings follow verbatim. So the series carry the
/// labels the operator's KEDA queries select on.
pub fn pod_monitor_scrape_config(kubeconfig: &str, namespace: &str, interval: &str) -> String {
    let rendered = helm_template(
        "loop",
        namespace,
        &[],
        &[
            "monitoring.routerPodMonitor.enabled=true",
            "eventRouter.create=false",
        ],
    );
    let monitor = yaml_docs(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "PodMonitor")
        .expect("the chart renders the router PodMonitor");
    let spec = &monitor["spec"];
    let endpoint = &spec["podMetricsEndpoints"][0];
    let port = endpoint["port"]
        .as_str()
        .expect("the PodMonitor names a port");
    let path = endpoint["path"].as_str().unwrap_or("/metrics");
    let job = format!(
        "podMonitor/{namespace}/{}/0",
        monitor["metadata"]["name"].as_str().unwrap_or("routers")
    );
    let mut relabel = Vec::new();
    // Only running pods, as the Prometheus Operator does.
    relabel.push(serde_json::json!({
        "source_labels": ["__meta_kubernetes_pod_phase"],
        "regex": "(Failed|Succeeded)",
        "action": "drop",
    }));
    let selector = spec["selector"]["matchLabels"]
        .as_mapping()
        .expect("the PodMonitor selects by matchLabels");
    for (key, value) in selector {
        let key = sanitize(key.as_str().unwrap_or_default());
        relabel.push(serde_json::json!({
            "source_labels": [
                format!("__meta_kubernetes_pod_label_{key}"),
                format!("__meta_kubernetes_pod_labelpresent_{key}"),
            ],
            "regex": format!("({});true", value.as_str().unwrap_or_default()),
            "action": "keep",
        }));
    }
    relabel.push(serde_json::json!({
        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": port,
        "action": "keep",
    }));
    for (source, target) in [
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_container_name", "container"),
        ("__meta_kubernetes_pod_name", "pod"),
    ] {
        relabel.push(serde_json::json!({"source_labels": [source], "target_label": target}));
    }
    relabel.push(serde_json::json!({"target_label": "job", "replacement": job}));
    relabel.push(serde_json::json!({"target_label": "endpoint", "replacement": port}));
    for r in endpoint["relabelings"].as_sequence().into_iter().flatten() {
        let mut rule = serde_json::Map::new();
        if let Some(sources) = r["sourceLabels"].as_sequence() {
            rule.insert(
                "source_labels".into(),
                sources
                    .iter()
                    .filter_map(|s| s.as_str().map(|s| Json::from(s.to_owned())))
                    .collect(),
            );
        }
        for (from, to) in [
            ("targetLabel", "target_label"),
            ("action", "action"),
            ("regex", "regex"),
            ("replacement", "replacement"),
        ] {
            if let Some(v) = r[from].as_str() {
                rule.insert(to.into(), v.into());
            }
        }
        relabel.push(Json::Object(rule));
    }
    let config = serde_json::json!({
        "job_name": job,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": path,
        "kubernetes_sd_configs": [{
            "role": "pod",
            "kubeconfig_file": kubeconfig,
            "namespaces": {"names": [namespace]},
        }],
        "relabel_configs": relabel,
    });
    // JSON is YAML: one item of the `scrape_configs:` list, as a flow mapping.
    format!("  - {config}\n")
}

/// Label names as Prometheus's Kubernetes discovery writes them.
fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `{pod: value}` of a query's result.
pub fn by_pod(result: &[Json]) -> BTreeMap<String, f64> {
    result
        .iter()
        .filter_map(|r| {
            let pod = r["metric"]["pod"].as_str()?.to_owned();
            let value = r["value"][1].as_str()?.parse().ok()?;
            Some((pod, value))
        })
        .collect()
}

/// The publisher: `{"seq": N}` on the routing key the clients subscribe to, every `interval`,
/// recording when each was sent (the index is the sequence number).
pub struct Publisher {
    pub sent: Arc<Mutex<Vec<Instant>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn start(exchange: &str, interval: Duration) -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("the publisher's AMQP connection");
        let channel = connection
            .create_channel()
            .await
            .expect("the publisher's channel");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (sent, stop, exchange) = (sent.clone(), stop.clone(), exchange.to_owned());
            async move {
                let mut tick = tokio::time::interval(interval);
                let mut seq: u64 = 0;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Ok(mut sent) = sent.lock() {
                        sent.push(Instant::now());
                    }
                    let body = format!(r#"{{"seq":{seq}}}"#);
                    // What a backend sets for its events to be recoverable: a UUIDv7 id and
                    // the publish time.
                    let id = uuid::Uuid::now_v7().to_string();
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            clients::EVENT.into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default()
                                .with_content_type("application/json".into())
                                .with_message_id(id.as_str().into())
                                .with_timestamp(secs),
                        )
                        .await
                        .expect("publishing an event");
                    seq += 1;
                }
                connection.close(200, "done".into()).await.ok();
            }
        });
        Self { sent, stop, task }
    }

    pub async fn stop(self) -> Vec<Instant> {
        self.stop.cancel();
        self.task.await.expect("the publisher does not panic");
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// `ListenOverflows` (TcpExt) of the network namespace `pid` lives in: accept-queue overflows.
fn listen_overflows(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
}

/// Samples every second, for each process running `binary` (one per pod, each in its pod's
/// network namespace), the namespace's `ListenOverflows`; keeps the highest value per process.
pub fn sample_listen_overflows(
    binary: &Path,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<BTreeMap<u32, u64>> {
    let binary = binary.to_owned();
    tokio::spawn(async move {
        let mut seen = BTreeMap::new();
        while !stop.is_cancelled() {
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if std::fs::read_link(entry.path().join("exe")).ok().as_deref() != Some(&binary) {
                    continue;
                }
                if let Some(overflows) = listen_overflows(pid) {
                    let max = seen.entry(pid).or_insert(0);
                    *max = overflows.max(*max);
                }
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        seen
    })
}

/// The HPA's desired replicas and its current metric values (metric name → value), as the HPA
/// controller wrote them.
pub async fn hpa_status(
    hpas: &Api<HorizontalPodAutoscaler>,
    name: &str,
) -> Option<(i32, BTreeMap<String, String>)> {
    let hpa = hpas.get_opt(name).await.ok()??;
    let status = hpa.status?;
    let metrics = status
        .current_metrics
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let external = m.external?;
            let value = external.current.average_value.or(external.current.value)?.0;
            Some((external.metric.name, value))
        })
        .collect();
    Some((status.desired_replicas, metrics))
}
