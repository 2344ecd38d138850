//! Benchmark (ignored by default): the built `operator` binary against the test control plane and
//! RabbitMQ. Measures the time from applying an EventRouter to all its children existing, and the
//! operator's RSS and reconcile rate while it converges 200 EventRouters.
//!
//! Run with the services of `tests/run --services` exported:
//!
//! ```text
//! cargo test -p operator --test bench_routers -- --ignored --nocapture
//! ```
//! `EVENTROUTER_BENCH_ROUTERS` changes the count (default 200).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventrouter_test_support::{free_port, http, prom::Scrape, require_env};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use operator::crd::{EventRouter, EventRouterSpec};

const MANAGER: &str = "eventrouter-bench";

async fn client(kubeconfig: &str) -> Client {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig).expect("kubeconfig readable"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig valid");
    Client::try_from(config).expect("client")
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The sum of every series of `name` on the operator's admin port (0 while it does not answer).
async fn metric(port: u16, name: &str) -> f64 {
    match http::get(&format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) if response.status == 200 => Scrape::parse(&response.text()).sum(name),
        _ => 0.0,
    }
}

fn spec() -> EventRouterSpec {
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.replicas = 1;
    spec
}

async fn apply(api: &Api<EventRouter>, name: &str, spec: &EventRouterSpec) {
    let router = EventRouter::new(name, spec.clone());
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&router),
    )
    .await
    .expect("router applied");
}

async fn children_present(client: &Client, ns: &str, name: &str) -> bool {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await;
    let s = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await;
    let m = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(&format!("{name}-metrics"))
        .await;
    let a = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await;
    let p = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await;
    matches!(
        (d, s, m, a, p),
        (
            Ok(Some(_)),
            Ok(Some(_)),
            Ok(Some(_)),
            Ok(Some(_)),
            Ok(Some(_))
        )
    )
}

/// Routers whose status describes their current generation.
async fn converged(api: &Api<EventRouter>) -> usize {
    let list = api
        .list(&ListParams::default())
        .await
        .expect("list routers");
    list.items
        .iter()
        .filter(|r| {
            r.status.as_ref().is_some_and(|s| {
                s.observed_generation == r.metadata.generation
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "BrokerReady" && c.status == "True")
            })
        })
        .count()
}

async fn wait_converged(api: &Api<EventRouter>, count: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if converged(api).await >= count {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "not converged after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: needs the test control plane and RabbitMQ; run explicitly"]
async fn bench_time_to_children_rss_and_reconcile_rate() {
    let kubeconfig = require_env("EVENTROUTER_TEST_KUBECONFIG");
    let amqp = require_env("EVENTROUTER_TEST_AMQP_URL");
    let count: usize = std::env::var("EVENTROUTER_BENCH_ROUTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let client = client(&kubeconfig).await;

    let crd: CustomResourceDefinition = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/eventrouter.io_eventrouters.yaml"
        ))
        .expect("CRD file"),
    )
    .expect("CRD parses");
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            &crd.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applied");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ns = format!("bench-{}", std::process::id());
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(ns.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("amqp".into()),
            ..Default::default()
        },
        string_data: Some([("url".to_string(), amqp)].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");

    let port = free_port().expect("a free port");
    let child = Command::new(env!("CARGO_BIN_EXE_operator"))
        .args([
            "run",
            "--namespace",
            &ns,
            "--lease-namespace",
            &ns,
            "--admin-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--resync-interval", "10m", "--log", "warn"])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .spawn()
        .expect("operator binary starts");
    let pid = child.id();
    let operator = Operator(child);
    while metric(port, "eventrouter_operator_leader").await < 1.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = rss_kib(pid, "VmRSS:");

    // 1. Time from applying one EventRouter to every child present.
    let routers: Api<EventRouter> = Api::namespaced(client.clone(), &ns);
    let mut samples = Vec::new();
    for i in 0..5 {
        let name = format!("probe-{i}");
        let start = Instant::now();
        apply(&routers, &name, &spec()).await;
        while !children_present(&client, &ns, &name).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];

    // 2. Many routers: time to converge, reconcile rate, RSS.
    let before = metric(port, "eventrouter_operator_reconciles_total").await;
    let start = Instant::now();
    for i in 0..count {
        apply(&routers, &format!("router-{i:03}"), &spec()).await;
    }
    let applied_in = start.elapsed();
    let converge = wait_converged(&routers, count + 5, Duration::from_secs(600)).await;
    let reconciles = metric(port, "eventrouter_operator_reconciles_total").await - before;
    let elapsed = start.elapsed();
    let rss_after_create = rss_kib(pid, "VmRSS:");

    // 3. Change every spec: how fast are all re-reconciled (the steady-state reconcile rate).
    let mut changed = spec();
    changed.websocket.max_connections_per_pod = 20_000;
    let before_update = metric(port, "eventrouter_operator_reconciles_total").await;
    let start = Instant::now();
    for i in 0..count {
        apply(&routers, &format!("router-{i:03}"), &changed).await;
    }
    let reconverge = wait_converged(&routers, count + 5, Duration::from_secs(600)).await;
    let update_elapsed = start.elapsed();
    let update_reconciles =
        metric(port, "eventrouter_operator_reconciles_total").await - before_update;
    let rss_final = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    let duration_sum = metric(port, "eventrouter_operator_reconcile_duration_seconds_sum").await;
    let duration_count = metric(
        port,
        "eventrouter_operator_reconcile_duration_seconds_count",
    )
    .await;

    println!(
        "operator benchmark ({count} EventRouters, 1 replica each, shared RabbitMQ, debug build: {})",
        cfg!(debug_assertions)
    );
    println!("  apply -> all 5 children present: median {median:?} (samples {samples:?})");
    println!(
        "  create {count}: applied in {applied_in:?}, all converged after {:?} (+{converge:?} after the last apply)",
        elapsed
    );
    println!(
        "  reconciles during create: {reconciles} => {:.1}/s",
        reconciles / elapsed.as_secs_f64()
    );
    println!(
        "  update {count}: all re-converged after {update_elapsed:?} ({reconverge:?} after the last apply), {update_reconciles} reconciles => {:.1}/s",
        update_reconciles / update_elapsed.as_secs_f64()
    );
    println!(
        "  mean reconcile duration: {:.1} ms",
        1000.0 * duration_sum / duration_count.max(1.0)
    );
    println!(
        "  RSS: idle {idle_rss} KiB, after create {rss_after_create} KiB, final {rss_final} KiB, peak {hwm} KiB"
    );

    // Clean up while the operator still runs (the finalizer needs it), then the namespace.
    routers
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete routers");
    let start = Instant::now();
    while !routers
        .list(&ListParams::default())
        .await
        .map(|l| l.items.is_empty())
        .unwrap_or(false)
        && start.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(operator);
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}
