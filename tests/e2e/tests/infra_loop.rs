//! Proves the pieces of the autoscaling loop run for real: a Deployment of two `event-service`
//! replicas is scheduled by kube-scheduler onto the process kubelet's Node, started as processes
//! in network namespaces of their own (env, a mounted Secret, listening on `0.0.0.0` as in a
//! container, reaching RabbitMQ on their own `127.0.0.1` through the kubelet's host port),
//! probed Ready by the kubelet, which reports their pod IPs; the real EndpointSlice controller
//! publishes exactly the Ready pods behind the Service, and the endpoints answer; a deleted
//! pod's process gets SIGTERM and drains, its endpoint goes away, and the ReplicaSet's
//! replacement appears. Then KEDA: its external metrics APIService is Available, a
//! ScaledObject gets its `keda-hpa-*` HPA, and the external metric that HPA names is served
//! through the API server's aggregation layer (API server → KEDA metrics server → KEDA
//! operator → scaler).
//!
//! Needs root (network namespaces), as `tests/run` has.
//!
//! Run with `tests/run --only infra_loop`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod kubelet_support;
use kubelet_support::NamespaceKubelet;

use eventrouter_e2e::cluster::{TestNamespace, kube_client};
use eventrouter_e2e::command::{run_ok, workspace_binary};
use eventrouter_e2e::rabbitmq::amqp_url;
use eventrouter_e2e::unique_name;
use eventrouter_e2e::wait::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::{Api, Client, ResourceExt};

const APP: &str = "web";
const IMAGE: &str = "eventrouter/event-service";
/// Pods and endpoints come up within this (scheduling, process start, AMQP connect, probes).
const CONVERGE: Duration = Duration::from_secs(60);
/// The pod's grace period; the service drains in 2 s, so a SIGTERM ends it long before this.
const GRACE_SECONDS: i64 = 30;

/// Builds the workspace's `event-service` binary (a no-op when it is fresh) and returns its path.
fn event_service_binary() -> PathBuf {
    workspace_binary("event-service", "event-service").expect("cargo builds event-service")
}

fn deployment(exchange: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": APP },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": APP } },
            "template": {
                "metadata": { "labels": { "app": APP } },
                "spec": {
                    "terminationGracePeriodSeconds": GRACE_SECONDS,
                    // As the operator renders it; the kubelet mints no service-account tokens.
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "event-service",
                        "image": format!("{IMAGE}:test"),
                        // Wildcard listen addresses, as the operator renders them: each pod has
                        // a network namespace of its own.
                        "env": [
                            { "name": "EVENTROUTER_LISTEN", "value": "0.0.0.0:8080" },
                            { "name": "EVENTROUTER_ADMIN_LISTEN", "value": "0.0.0.0:9090" },
                            { "name": "EVENTROUTER_SOURCE", "value": "amqp" },
                            { "name": "EVENTROUTER_AMQP_URL_FILE", "value": "/etc/eventrouter/amqp/url" },
                            { "name": "EVENTROUTER_EXCHANGE", "value": exchange },
                            { "name": "EVENTROUTER_DECLARE_EXCHANGE", "value": "true" },
                            { "name": "EVENTROUTER_QUEUE_EXPIRES", "value": "20s" },
                            { "name": "EVENTROUTER_DRAIN_DURATION", "value": "2s" },
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }
                        ],
                        "ports": [
                            { "name": "http", "containerPort": 8080 },
                            { "name": "metrics", "containerPort": 9090 }
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/readyz", "port": "http" },
                            "periodSeconds": 1,
                            "failureThreshold": 2
                        },
                        "livenessProbe": {
                            "httpGet": { "path": "/healthz", "port": "http" },
                            "periodSeconds": 5
                        },
                        "volumeMounts": [{ "name": "amqp", "mountPath": "/etc/eventrouter/amqp", "readOnly": true }]
                    }],
                    "volumes": [{ "name": "amqp", "secret": { "secretName": "amqp" } }]
                }
            }
        }
    }))
    .expect("a valid Deployment")
}

/// Ready pods of the app: name → IP.
async fn ready_pods(pods: &Api<Pod>, node: &str) -> Result<Vec<(String, String)>, String> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .map_err(|e| e.to_string())?;
    let mut ready = Vec::new();
    let mut seen = Vec::new();
    for pod in list.items {
        let name = pod.name_any();
        let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let status = pod.status.clone().unwrap_or_default();
        let is_ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        seen.push(format!(
            "{name}: node={spec_node:?} phase={:?} ip={:?} ready={is_ready} deleting={}",
            status.phase,
            status.pod_ip,
            pod.metadata.deletion_timestamp.is_some()
        ));
        if is_ready && pod.metadata.deletion_timestamp.is_none() {
            if spec_node.as_deref() != Some(node) {
                return Err(format!("pod {name} runs on {spec_node:?}, not {node}"));
            }
            let ip = status
                .pod_ip
                .ok_or_else(|| format!("{name} is Ready without an IP"))?;
            ready.push((name, ip));
        }
    }
    if ready.len() == 2 {
        Ok(ready)
    } else {
        Err(seen.join("; "))
    }
}

fn service() -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": APP },
        "spec": {
            "selector": { "app": APP },
            "ports": [
                { "name": "http", "port": 80, "targetPort": "http" },
                { "name": "metrics", "port": 9090, "targetPort": "metrics" }
            ]
        }
    }))
    .expect("a valid Service")
}

/// The Service's endpoints as the EndpointSlice controller published them: address → ready,
/// and the ports (name → number) every slice lists.
async fn published_endpoints(
    slices: &Api<EndpointSlice>,
) -> Result<(BTreeMap<String, bool>, BTreeSet<(String, i32)>), String> {
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={APP}")))
        .await
        .map_err(|e| e.to_string())?;
    let mut endpoints = BTreeMap::new();
    let mut ports = BTreeSet::new();
    for slice in list.items {
        if slice.address_type != "IPv4" {
            return Err(format!(
                "slice {} is {}",
                slice.name_any(),
                slice.address_type
            ));
        }
        for port in slice.ports.iter().flatten() {
            ports.insert((
                port.name.clone().unwrap_or_default(),
                port.port.unwrap_or_default(),
            ));
        }
        for endpoint in slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(false);
            for address in endpoint.addresses {
                endpoints.insert(address, ready);
            }
        }
    }
    Ok((endpoints, ports))
}

/// Waits until the Service's EndpointSlices list exactly `pods`' IPs, all ready, with the
/// container ports; returns the addresses.
async fn wait_for_endpoints(
    slices: &Api<EndpointSlice>,
    pods: &[(String, String)],
) -> BTreeSet<String> {
    let expected: BTreeMap<String, bool> = pods.iter().map(|(_, ip)| (ip.clone(), true)).collect();
    let expected_ports: BTreeSet<(String, i32)> =
        [("http".to_owned(), 8080), ("metrics".to_owned(), 9090)].into();
    wait_for(
        "the EndpointSlices to list exactly the Ready pods",
        CONVERGE,
        || async {
            let (endpoints, ports) = published_endpoints(slices).await?;
            if endpoints == expected && ports == expected_ports {
                Ok(endpoints.into_keys().collect())
            } else {
                Err(format!(
                    "published {endpoints:?} on {ports:?}, want {expected:?} on {expected_ports:?}"
                ))
            }
        },
    )
    .await
}

fn curl(url: &str) -> anyhow::Result<String> {
    run_ok(std::process::Command::new("curl").args(["-fsS", "--max-time", "3", url]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infra_loop_pods_run_in_namespaces_are_published_and_keda_serves_external_metrics() {
    let started = Instant::now();
    let client = kube_client().await.expect("Kubernetes client");
    let binary = event_service_binary();
    let namespace = TestNamespace::create(&client, "infra-loop")
        .await
        .expect("a test namespace");
    let ns = namespace.name().to_owned();

    let kubelet_started = Instant::now();
    let kubelet = NamespaceKubelet::start(&client, &ns, IMAGE, binary).await;
    let node = kubelet.node.clone();
    let nodes: Api<Node> = Api::all(client.clone());
    let node_ready = kubelet_started.elapsed();

    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "amqp" },
        "stringData": { "url": amqp_url() }
    }))
    .expect("a valid Secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
    let exchange = unique_name("infra-loop");
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service())
        .await
        .expect("creating the Service");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let created = Instant::now();
    deployments
        .create(&PostParams::default(), &deployment(&exchange))
        .await
        .expect("creating the Deployment");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let first = wait_for("two Ready pods on the kubelet's Node", CONVERGE, || {
        ready_pods(&pods, &node)
    })
    .await;
    let pods_ready = created.elapsed();
    let ips: BTreeSet<String> = first.iter().map(|(_, ip)| ip.clone()).collect();
    assert_eq!(
        ips.len(),
        2,
        "each pod has an address of its own: {first:?}"
    );
    for ip in &ips {
        let ip: std::net::Ipv4Addr = ip.parse().expect("an IPv4 pod IP");
        assert!(
            !ip.is_loopback() && ip.octets()[..2] == [10, 244],
            "{ip} is not a pod network address"
        );
    }

    // The real EndpointSlice controller publishes them (the API server refuses loopback
    // addresses there, which is why pods have namespaces of their own).
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let published = wait_for_endpoints(&slices, &first).await;
    let endpoints_published = created.elapsed();
    assert_eq!(published, ips);

    let port = 8080;
    for address in &published {
        // curl -f fails on any status but 2xx/3xx.
        curl(&format!("http://{address}:{port}/readyz")).expect("the endpoint answers /readyz");
        let metrics =
            curl(&format!("http://{address}:9090/metrics")).expect("the admin port answers");
        assert!(metrics.contains("eventrouter_"), "{metrics}");
    }
    websocket_connects(&published).await;

    // Deleting a pod: SIGTERM, the service drains (2 s) and exits, the kubelet removes the pod,
    // long before the 30 s grace period would end in SIGKILL.
    let (victim, victim_ip) = first[0].clone();
    let deleted = Instant::now();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("deleting a pod");
    wait_for(
        "the deleted pod to be removed by the kubelet",
        CONVERGE,
        || async {
            match pods.get_opt(&victim).await {
                Ok(None) => Ok(()),
                Ok(Some(pod)) => Err(format!(
                    "still there: {:?}",
                    pod.status.and_then(|s| s.phase)
                )),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let terminated_in = deleted.elapsed();
    assert!(
        terminated_in < Duration::from_secs(u64::try_from(GRACE_SECONDS).unwrap_or(30) / 2),
        "the process took {terminated_in:?} to stop: SIGTERM did not end it"
    );
    assert!(
        curl(&format!("http://{victim_ip}:8080/readyz")).is_err(),
        "the deleted pod's process still answers on {victim_ip}"
    );
    let second = wait_for("a replacement pod to become Ready", CONVERGE, || async {
        let ready = ready_pods(&pods, &node).await?;
        if ready.iter().any(|(name, _)| *name == victim) {
            Err(format!("{victim} is still listed"))
        } else {
            Ok(ready)
        }
    })
    .await;
    let replaced_in = deleted.elapsed();
    assert!(
        second.iter().all(|(_, ip)| *ip != victim_ip),
        "the replacement got a fresh address: {second:?}"
    );
    let republished = wait_for_endpoints(&slices, &second).await;
    let endpoints_replaced = deleted.elapsed();
    assert!(
        !republished.contains(&victim_ip),
        "{victim_ip} still published"
    );
    for ip in &republished {
        curl(&format!("http://{ip}:{port}/readyz")).expect("the replacement answers /readyz");
    }

    keda_serves_external_metrics(&client, &ns).await;

    kubelet.stop().await;
    for (_, ip) in &second {
        assert!(
            curl(&format!("http://{ip}:8080/readyz")).is_err(),
            "{ip} still answers after the kubelet stopped"
        );
    }
    assert!(
        nodes.get_opt(&node).await.expect("node lookup").is_none(),
        "the kubelet deletes its Node when it stops"
    );
    let addresses = ip_output(&["-4", "-o", "addr", "show"]);
    let bridge_address = {
        let [a, b, c, _] = ips
            .iter()
            .next()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .expect("a pod IP")
            .octets();
        format!(" {a}.{b}.{c}.1/24 ")
    };
    assert!(
        !addresses.contains(&bridge_address),
        "the kubelet's bridge is left: {addresses}"
    );
    delete_exchange(&exchange).await;
    eprintln!(
        "infra_loop timings: node Ready {node_ready:?}; Deployment → 2 Ready pods {pods_ready:?}, \
         → EndpointSlices {endpoints_published:?}; pod delete → removed {terminated_in:?}, \
         → replacement Ready {replaced_in:?}, → EndpointSlices {endpoints_replaced:?}; \
         whole test {:?}",
        started.elapsed()
    );
}

fn ip_output(args: &[&str]) -> String {
    run_ok(std::process::Command::new("ip").args(args)).expect("ip runs")
}

/// A WebSocket handshake on the main port of every published endpoint succeeds.
async fn websocket_connects(endpoints: &BTreeSet<String>) {
    for address in endpoints {
        let url = format!("ws://{address}:8080{}", eventrouter_contract::http::WS_PATH);
        let (mut socket, response) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: handshake timed out"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
        socket.close(None).await.ok();
    }
}

/// KEDA's half: the APIService is Available, a ScaledObject (a cron trigger, which KEDA
/// evaluates itself) gets its HPA, and the HPA's external metric is served through the API
/// server's aggregation layer.
async fn keda_serves_external_metrics(client: &Client, ns: &str) {
    let apiservice = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let apiservices: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::from_gvk(&apiservice));
    wait_for(
        "KEDA's external metrics APIService to be Available",
        CONVERGE,
        || async {
            let object = apiservices
                .get("v1beta1.external.metrics.k8s.io")
                .await
                .map_err(|e| format!("{e} (is KEDA running? tests/infra/keda.sh)"))?;
            let available = object.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Available" && c["status"] == "True");
            if available {
                Ok(())
            } else {
                Err(object.data["status"].to_string())
            }
        },
    )
    .await;

    let gvk = GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject");
    let scaled_objects: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
    let scaled: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": { "name": APP },
        "spec": {
            "scaleTargetRef": { "name": APP },
            "minReplicaCount": 2,
            "maxReplicaCount": 3,
            "pollingInterval": 5,
            "triggers": [{
                "type": "cron",
                "metadata": {
                    "timezone": "Etc/UTC",
                    "start": "0 0 * * *",
                    "end": "59 23 * * *",
                    "desiredReplicas": "2"
                }
            }]
        }
    }))
    .expect("a valid ScaledObject");
    scaled_objects
        .create(&PostParams::default(), &scaled)
        .await
        .expect("creating the ScaledObject");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    let hpa = wait_for("KEDA to create the keda-hpa-* HPA", CONVERGE, || async {
        hpas.get_opt(&format!("keda-hpa-{APP}"))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no HPA yet".to_owned())
    })
    .await;
    let spec = hpa.spec.expect("the HPA has a spec");
    assert_eq!(spec.scale_target_ref.name, APP);
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 3));
    let external = spec
        .metrics
        .iter()
        .flatten()
        .find_map(|m| m.external.clone())
        .expect("the HPA reads an external metric");
    let metric = external.metric.name.clone();
    let selector = external
        .metric
        .selector
        .and_then(|s| s.match_labels)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    // The HPA controller's own read, made by hand: through the aggregation layer to KEDA.
    let path = format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric}");
    let value = wait_for(
        "the external metric through the API server",
        CONVERGE,
        || async {
            let request = http::Request::get(format!(
                "{path}?labelSelector={}",
                eventrouter_e2e::rabbitmq::encode_segment(&selector)
            ))
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
            let list: serde_json::Value =
                client.request(request).await.map_err(|e| e.to_string())?;
            list["items"][0]["value"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| list.to_string())
        },
    )
    .await;
    eprintln!("external metric {metric} ({selector}) = {value}");
}

/// The pods declared the exchange; nothing else removes it.
async fn delete_exchange(exchange: &str) {
    let connection =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("AMQP connection");
    let channel = connection.create_channel().await.expect("AMQP channel");
    channel
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .expect("deleting the test exchange");
    connection.close(200, "done".into()).await.ok();
}
