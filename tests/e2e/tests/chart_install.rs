//! The chart against a real kube-apiserver (`EVENTROUTER_TEST_KUBECONFIG`) and a real RabbitMQ
//! (`EVENTROUTER_TEST_AMQP_URL`):
//!
//! 1. every manifest the chart renders with `ci/everything-on-values.yaml` passes
//!    `kubectl apply --dry-run=server` (the API server's own validation, the EventRouter against
//!    the chart's CRD), except the Prometheus Operator kinds whose CRDs this cluster lacks;
//! 2. `helm install` succeeds; the EventRouter the chart creates appears (one `helm upgrade` when
//!    the install itself created the CRD, as documented);
//! 3. the operator binary, run with the chart's arguments and **the chart's ServiceAccount token**
//!    (so its RBAC is what is tested), reconciles that EventRouter: its children appear;
//! 4. a Prometheus scrapes the operator with the target labels the chart's ServiceMonitor gives
//!    it, and every query of `dashboards/operator.json` returns data; so do the queries of
//!    `dashboards/routers.json` on operator metrics (the *Replicas* panel's current and desired
//!    replicas of the chart's autoscaled EventRouter), with the values kubectl shows in the
//!    Deployment's and the HPA's status, once the cluster's own HPA controller has written that
//!    status and scaled the Deployment up to the HPA's `minReplicas` (it does that without
//!    metrics; the metrics-driven loop is `autoscaling_loop.rs`'s);
//! 5. the documented removal (`eventRouter.create=false`, then `helm uninstall`) leaves nothing
//!    behind but the CRD, which is kept by design, and the operator stops reporting the deleted
//!    routers' replicas.

mod chart_support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use chart_support::*;
use eventrouter_e2e::{require_env, vars};

const RELEASE: &str = "er-chart-test";
const ROUTER: &str = "events";
const CRD: &str = "eventrouters.eventrouter.io";
/// The chart's router's `autoscaling.minReplicas`: the Deployment starts at 1 and the HPA
/// controller raises it to this.
const HPA_DESIRED: i64 = 2;

/// What every stage of the test works with: the cluster, the namespace the release goes to and
/// a scratch directory.
struct Install {
    cluster: Cluster,
    namespace: String,
    dir: PathBuf,
}

struct Cluster {
    kubeconfig: PathBuf,
}

impl Cluster {
    fn kubectl(&self) -> Command {
        let mut cmd = Command::new(tool("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn helm(&self) -> Command {
        let mut cmd = Command::new(tool("helm"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn exists(&self, args: &[&str]) -> bool {
        self.kubectl()
            .args(["get"])
            .args(args)
            .output()
            .expect("run kubectl")
            .status
            .success()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = run(self.kubectl().arg("get").args(args).args(["-o", "json"]));
        serde_json::from_slice(&out.stdout).expect("kubectl prints JSON")
    }

    fn names(&self, args: &[&str]) -> Vec<String> {
        let out = run(self.kubectl().arg("get").args(args).args(["-o", "name"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The chart's router as kubectl shows it: (current, desired) replicas as the dashboard defines
/// them — the Deployment's `status.replicas`; the HPA's `status.desiredReplicas` once the HPA
/// controller wrote its status (it always sets conditions), else the Deployment's `spec.replicas`.
fn kube_replicas(cluster: &Cluster, namespace: &str) -> (i64, i64) {
    let deployment = cluster.json(&["deployment", ROUTER, "-n", namespace]);
    let hpa = cluster.json(&["hpa", ROUTER, "-n", namespace]);
    let current = deployment["status"]["replicas"].as_i64().unwrap_or(0);
    let hpa_written = hpa["status"]["conditions"]
        .as_array()
        .is_some_and(|c| !c.is_empty());
    let desired = hpa["status"]["desiredReplicas"]
        .as_i64()
        .filter(|_| hpa_written)
        .or_else(|| deployment["spec"]["replicas"].as_i64())
        .expect("the API server sets the Deployment's spec.replicas");
    (current, desired)
}

fn sample_value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a sample value")
}

/// A kubeconfig for the same API server that authenticates as the chart's ServiceAccount.
fn service_account_kubeconfig(cluster: &Cluster, namespace: &str, sa: &str, dir: &Path) -> PathBuf {
    let token =
        run(cluster
            .kubectl()
            .args(["create", "token", sa, "-n", namespace, "--duration=1h"]));
    let token = String::from_utf8(token.stdout)
        .expect("token")
        .trim()
        .to_string();
    let admin: serde_json::Value = serde_json::from_slice(
        &run(cluster
            .kubectl()
            .args(["config", "view", "--raw", "--minify", "-o", "json"]))
        .stdout,
    )
    .expect("kubeconfig JSON");
    let server = &admin["clusters"][0]["cluster"];
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa, "namespace": namespace}}],
        "current-context": "sa",
    });
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_json::to_string(&config).expect("JSON")).expect("write kubeconfig");
    path
}

#[test]
fn helm_install_runs_the_operator_which_reconciles_the_charts_event_router_and_uninstall_cleans_up()
{
    let kubeconfig = PathBuf::from(require_env(vars::KUBECONFIG));
    let amqp_url = require_env(vars::AMQP_URL);
    let namespace = format!("chart-install-{}", std::process::id());
    let t = Install {
        cluster: Cluster { kubeconfig },
        dir: std::env::temp_dir().join(format!("eventrouter-{namespace}")),
        namespace,
    };
    let operator_binary = workspace_binary("operator", "operator");
    std::fs::create_dir_all(&t.dir).expect("temp dir");
    run(t
        .cluster
        .kubectl()
        .args(["create", "namespace", &t.namespace]));
    let crd_existed = adopt_an_existing_crd(&t);

    // 1. server-side validation of everything the chart renders
    let dry_run_file = validate_server_side(&t, crd_existed);
    // 2. helm install
    helm_install(&t, &amqp_url, crd_existed, &dry_run_file);
    // 3. the operator, as the chart runs it, with the chart's ServiceAccount
    let mut operator = ChartOperator::start(&t, &operator_binary);
    children_are_reconciled(&t, &operator);
    let broken_file = add_a_router_with_a_dead_broker(&t);
    // 4. the dashboards' queries against a Prometheus scraping the operator
    let prometheus = operator_dashboard_has_data(&t, &operator);
    replicas_panel_follows_the_hpa(&t, &prometheus);
    drop(prometheus);
    // 5. removal
    remove_the_routers(&t, &broken_file, operator.admin_port);
    uninstall(&t, &mut operator);

    run(t
        .cluster
        .kubectl()
        .args(["delete", "namespace", &t.namespace, "--wait=false"]));
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// A CRD left by other tests is adopted by the release (the documented way to hand an existing
/// CRD to Helm); on a fresh cluster the install creates it. Returns whether it existed.
fn adopt_an_existing_crd(t: &Install) -> bool {
    let crd_existed = t.cluster.exists(&["crd", CRD]);
    if crd_existed {
        run(t
            .cluster
            .kubectl()
            .args(["annotate", "--overwrite", "crd", CRD])
            .args([
                format!("meta.helm.sh/release-name={RELEASE}"),
                format!("meta.helm.sh/release-namespace={}", t.namespace),
            ]));
        run(t.cluster.kubectl().args([
            "label",
            "--overwrite",
            "crd",
            CRD,
            "app.kubernetes.io/managed-by=Helm",
        ]));
    }

    crd_existed
}

/// Every manifest the chart renders with `ci/everything-on-values.yaml` passes the API server's
/// dry run; returns the file of those manifests.
fn validate_server_side(t: &Install, crd_existed: bool) -> PathBuf {
    let everything = chart_dir().join("ci/everything-on-values.yaml");
    let rendered = helm_template("dry-run", &t.namespace, &[everything.as_path()], &[]);
    let docs: Vec<_> = yaml_docs(&rendered)
        .into_iter()
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("monitoring.coreos.com/"))
        })
        .collect();
    let kinds: Vec<&str> = docs.iter().map(kind_of).collect();
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ClusterRole",
        "NetworkPolicy",
        "EventRouter",
    ] {
        assert!(
            kinds.contains(&kind),
            "everything-on renders no {kind}: {kinds:?}"
        );
    }
    let dry_run_file = t.dir.join("dry-run.yaml");
    let stream: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML"))
        .collect();
    std::fs::write(&dry_run_file, stream.join("---\n")).expect("write manifests");
    if !crd_existed {
        // The EventRouter can only be validated once its CRD is served: validate the CRD first.
        let crd_doc = docs
            .iter()
            .find(|d| kind_of(d) == "CustomResourceDefinition")
            .expect("CRD");
        let crd_file = t.dir.join("crd.yaml");
        std::fs::write(&crd_file, serde_yaml::to_string(crd_doc).expect("YAML"))
            .expect("write CRD");
        run(t
            .cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&crd_file));
    } else {
        let out = run(t
            .cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-n", &t.namespace, "-f"])
            .arg(&dry_run_file));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("eventrouter.io/events") && text.contains("(server dry run)"),
            "{text}"
        );
    }

    dry_run_file
}

/// Secret `name` in the test namespace whose key `url` holds `url`, as the chart's EventRouter
/// references it.
fn create_url_secret(t: &Install, name: &str, url: &str) {
    run(t
        .cluster
        .kubectl()
        .args(["create", "secret", "generic", name, "-n", &t.namespace])
        .arg(format!("--from-literal=url={url}")));
}

/// `helm install` with the chart's EventRouter, autoscaled; one `helm upgrade` when the install
/// itself created the CRD, as documented.
fn helm_install(t: &Install, amqp_url: &str, crd_existed: bool, dry_run_file: &Path) {
    create_url_secret(t, "rabbitmq", amqp_url);
    let exchange = format!("chart-install-{}", std::process::id());
    let sets = [
        "eventRouter.create=true".to_string(),
        format!("eventRouter.name={ROUTER}"),
        "eventRouter.spec.rabbitmq.secretRef.name=rabbitmq".to_string(),
        "eventRouter.spec.rabbitmq.secretRef.key=url".to_string(),
        format!("eventRouter.spec.rabbitmq.exchange={exchange}"),
        "eventRouter.spec.deletionPolicy=delete".to_string(),
        // Autoscaled, so the routers dashboard's desired replicas come from an HPA.
        "eventRouter.spec.autoscaling.enabled=true".to_string(),
        format!("eventRouter.spec.autoscaling.minReplicas={HPA_DESIRED}"),
        "eventRouter.spec.autoscaling.maxReplicas=4".to_string(),
        // With its history stream, declared under the chart's RBAC like the rest.
        "eventRouter.spec.history.enabled=true".to_string(),
    ];
    let mut install = t.cluster.helm();
    install
        .args(["install", RELEASE])
        .arg(chart_dir())
        .args(["-n", &t.namespace]);
    for s in &sets {
        install.args(["--set", s]);
    }
    let notes = String::from_utf8(run(&mut install).stdout).expect("UTF-8");
    if !t
        .cluster
        .exists(&["eventrouter", ROUTER, "-n", &t.namespace])
    {
        assert!(
            !crd_existed,
            "the CRD was there, yet the install created no EventRouter"
        );
        assert!(
            notes.contains("--reuse-values"),
            "NOTES must say how to create the EventRouter:\n{notes}"
        );
        run(t
            .cluster
            .helm()
            .args(["upgrade", RELEASE])
            .arg(chart_dir())
            .args(["-n", &t.namespace, "--reuse-values"]));
        // Now that the CRD is served, the whole everything-on set validates server-side too.
        let out = run(t
            .cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-n", &t.namespace, "-f"])
            .arg(dry_run_file));
        assert!(String::from_utf8_lossy(&out.stdout).contains("(server dry run)"));
    }
    assert!(
        t.cluster
            .exists(&["eventrouter", ROUTER, "-n", &t.namespace]),
        "the chart's EventRouter exists"
    );
    let crd = t.cluster.json(&["crd", CRD]);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
}

/// The operator binary, run with the chart's arguments, environment and ServiceAccount token.
struct ChartOperator {
    process: Proc,
    admin_port: u16,
    /// The chart's Service in front of the operator's admin port.
    metrics_service: String,
    container_name: String,
}

impl ChartOperator {
    fn start(t: &Install, operator_binary: &Path) -> Self {
        let manifest = String::from_utf8(
            run(t
                .cluster
                .helm()
                .args(["get", "manifest", RELEASE, "-n", &t.namespace]))
            .stdout,
        )
        .expect("UTF-8");
        let manifest_docs = yaml_docs(&manifest);
        let deployment = manifest_docs
            .iter()
            .find(|d| kind_of(d) == "Deployment")
            .expect("operator Deployment");
        let pod_spec = &deployment["spec"]["template"]["spec"];
        let container = &pod_spec["containers"][0];
        let sa = pod_spec["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let admin_port = free_port().expect("a free port");
        let args: Vec<String> = container["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string())
            .map(|a| {
                if a.starts_with("--admin-listen=") {
                    format!("--admin-listen=127.0.0.1:{admin_port}")
                } else {
                    a
                }
            })
            .collect();
        let operator_kubeconfig = service_account_kubeconfig(&t.cluster, &t.namespace, sa, &t.dir);
        let mut cmd = Command::new(operator_binary);
        cmd.args(&args)
            .env("KUBECONFIG", &operator_kubeconfig)
            .env("POD_NAME", "operator-test-0");
        for env in container["env"].as_sequence().into_iter().flatten() {
            if let (Some(name), Some(value)) = (env["name"].as_str(), env["value"].as_str()) {
                cmd.env(name, value);
            }
        }
        let mut process = Proc::spawn(&mut cmd);
        process.wait_for_line("operator starting", Duration::from_secs(30));
        let metrics_service = manifest_docs
            .iter()
            .find(|d| kind_of(d) == "Service" && d["spec"]["ports"][0]["name"] == "admin")
            .and_then(|d| d["metadata"]["name"].as_str())
            .expect("the operator's metrics Service")
            .to_owned();
        let container_name = container["name"]
            .as_str()
            .expect("container name")
            .to_owned();
        Self {
            process,
            admin_port,
            metrics_service,
            container_name,
        }
    }
}

/// The chart's EventRouter gets its children, owned by it, and a broker that is ready.
fn children_are_reconciled(t: &Install, operator: &ChartOperator) {
    // Children of the chart's EventRouter appear, owned by it.
    let deploy = eventually(Duration::from_secs(90), "the router Deployment", || {
        t.cluster
            .exists(&["deployment", ROUTER, "-n", &t.namespace])
            .then(|| t.cluster.json(&["deployment", ROUTER, "-n", &t.namespace]))
    });
    assert_eq!(
        deploy["metadata"]["ownerReferences"][0]["kind"],
        "EventRouter",
        "{}",
        operator.process.output()
    );
    for child in [
        vec!["service", ROUTER],
        vec!["serviceaccount", ROUTER],
        vec!["poddisruptionbudget", ROUTER],
        vec!["horizontalpodautoscaler", ROUTER],
    ] {
        eventually(Duration::from_secs(60), &format!("{child:?}"), || {
            t.cluster
                .exists(&[child[0], child[1], "-n", &t.namespace])
                .then_some(())
        });
    }
    let status = eventually(
        Duration::from_secs(60),
        "EventRouter status conditions",
        || {
            let er = t.cluster.json(&["eventrouter", ROUTER, "-n", &t.namespace]);
            er["status"]["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
                .then_some(er)
        },
    );
    let conditions = status["status"]["conditions"]
        .as_array()
        .expect("conditions");
    let broker = conditions
        .iter()
        .find(|c| c["type"] == "BrokerReady")
        .expect("a BrokerReady condition");
    assert_eq!(
        broker["status"], "True",
        "broker topology declared with the Secret's URL: {broker}"
    );
    let history = eventually(Duration::from_secs(60), "HistoryReady", || {
        let er = t.cluster.json(&["eventrouter", ROUTER, "-n", &t.namespace]);
        er["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "HistoryReady").cloned())
    });
    assert_eq!(
        (&history["status"], &history["reason"]),
        (
            &serde_json::json!("True"),
            &serde_json::json!("StreamDeclared")
        ),
        "the history stream is declared: {history}"
    );
}

/// A second router whose broker is unreachable makes reconciles fail (errors by reason); returns
/// its manifest.
fn add_a_router_with_a_dead_broker(t: &Install) -> PathBuf {
    create_url_secret(t, "dead-broker", "amqp://guest:guest@127.0.0.1:1/%2f");
    let ns = &t.namespace;
    let broken = format!(
        "apiVersion: eventrouter.io/v1alpha1\nkind: EventRouter\nmetadata:\n  name: broken\n  namespace: {ns}\nspec:\n  deletionPolicy: retain\n  rabbitmq:\n    secretRef: {{name: dead-broker, key: url}}\n"
    );
    let broken_file = t.dir.join("broken.yaml");
    std::fs::write(&broken_file, broken).expect("write");
    run(t.cluster.kubectl().args(["apply", "-f"]).arg(&broken_file));

    broken_file
}

/// A Prometheus scrapes the operator with the target labels the chart's ServiceMonitor gives it,
/// and every query and variable of `dashboards/operator.json` returns data.
fn operator_dashboard_has_data(t: &Install, operator: &ChartOperator) -> Prometheus {
    // The target labels the Prometheus Operator gives a ServiceMonitor endpoint (the chart's sets
    // no honorLabels), so a metric label clashing with one of them would be renamed here too.
    let (metrics_service, container_name, admin_port, ns) = (
        &operator.metrics_service,
        &operator.container_name,
        operator.admin_port,
        &t.namespace,
    );
    let prometheus = Prometheus::start(
        "chart-install",
        &format!(
            "  - job_name: {metrics_service}\n    honor_labels: false\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n        labels: {{namespace: {ns}, service: {metrics_service}, endpoint: admin, pod: operator-test-0, container: {container_name}}}\n"
        ),
    );
    prometheus.wait_targets_up(1);
    eventually(
        Duration::from_secs(60),
        "a failed reconcile in the operator's metrics",
        || {
            (!prometheus.query(r#"eventrouter_operator_reconcile_errors_total{reason="broker_unreachable"} > 0"#).is_empty())
            .then_some(())
        },
    );
    let vars = [("namespace", t.namespace.as_str()), ("pod", ".*")];
    let queries = dashboard_queries(&chart_dir().join("dashboards/operator.json"));
    assert!(queries.len() >= 8, "{queries:?}");
    for q in &queries {
        let expr = substitute(&q.expr, &vars);
        prometheus.query_until_data(&expr, &format!("operator panel `{}`", q.panel));
    }
    for (name, q) in dashboard_variable_queries(&chart_dir().join("dashboards/operator.json")) {
        let (query, label) = label_values_query(&substitute(&q, &vars));
        let values: Vec<_> = prometheus
            .query_until_data(&query, &format!("variable {name}"))
            .iter()
            .filter_map(|r| r["metric"][&label].as_str().map(str::to_string))
            .collect();
        assert!(
            !values.is_empty(),
            "variable {name} ({query}) offers nothing"
        );
    }
    let leader = prometheus.query("max(eventrouter_operator_leader)");
    assert_eq!(
        leader[0]["value"][1], "1",
        "the single operator holds the Lease"
    );

    prometheus
}

/// The routers dashboard's queries on operator metrics (the *Replicas* panel) show what kubectl
/// shows in the Deployment's and the HPA's status, as the cluster's HPA controller wrote it.
fn replicas_panel_follows_the_hpa(t: &Install, prometheus: &Prometheus) {
    let routers_vars = [
        ("namespace", t.namespace.as_str()),
        ("router", ROUTER),
        ("pod", ".*"),
    ];
    let replica_queries = routers_queries_on_operator_metrics();
    assert!(
        !replica_queries.is_empty(),
        "the Replicas panel reads the operator's gauges"
    );
    let check_replicas = |when: &str| {
        eventually(
            Duration::from_secs(60),
            &format!("the routers dashboard's replicas {when} to equal kubectl's"),
            || {
                let (current, desired) = kube_replicas(&t.cluster, &t.namespace);
                let mut seen = vec![format!("kubectl: current {current}, desired {desired}")];
                for q in &replica_queries {
                    let expr = substitute(&q.expr, &routers_vars);
                    let result = prometheus.query(&expr);
                    let want = if expr.contains(r#"state="current""#) {
                        Some(current)
                    } else if expr.contains(r#"state="desired""#) {
                        Some(desired)
                    } else {
                        None
                    };
                    let got: Vec<(String, f64)> = result
                        .iter()
                        .map(|r| {
                            (
                                r["metric"]["router"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string(),
                                sample_value(r),
                            )
                        })
                        .collect();
                    seen.push(format!("`{expr}` = {got:?}"));
                    let ok = match want {
                        Some(want) => got == [(ROUTER.to_string(), want as f64)],
                        None => !got.is_empty(),
                    };
                    if !ok {
                        eprintln!("not yet: {}", seen.join("; "));
                        return None;
                    }
                }
                Some(seen)
            },
        )
    };
    // The HPA controller (kube-controller-manager, every 5 s) finds the Deployment below the
    // HPA's minReplicas, scales it up and writes its status; nothing here plays its part.
    let hpa = eventually(
        Duration::from_secs(60),
        "the HPA controller to write the HPA's status and scale the Deployment",
        || {
            let hpa = t.cluster.json(&["hpa", ROUTER, "-n", &t.namespace]);
            let written = hpa["status"]["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty());
            let (current, desired) = kube_replicas(&t.cluster, &t.namespace);
            (written && desired == HPA_DESIRED && current == HPA_DESIRED).then_some(hpa)
        },
    );
    eprintln!("the HPA controller's status: {}", hpa["status"]);
    let seen = check_replicas("once the HPA controller scaled");
    eprintln!("replicas after the HPA controller scaled: {seen:?}");
}

/// The documented removal: the routers go while the operator still runs (its finalizer cleans
/// RabbitMQ), their children are garbage-collected and their replica series disappear.
fn remove_the_routers(t: &Install, broken_file: &Path, admin_port: u16) {
    run(t
        .cluster
        .kubectl()
        .args(["delete", "-f"])
        .arg(broken_file)
        .arg("--wait=true")
        .arg("--timeout=60s"));
    // Remove the chart's EventRouter while the operator still runs (its finalizer cleans RabbitMQ).
    run(t
        .cluster
        .helm()
        .args(["upgrade", RELEASE])
        .arg(chart_dir())
        .args([
            "-n",
            &t.namespace,
            "--reuse-values",
            "--set",
            "eventRouter.create=false",
        ]));
    eventually(
        Duration::from_secs(60),
        "the chart's EventRouter to be finalized and gone",
        || {
            (!t.cluster
                .exists(&["eventrouter", ROUTER, "-n", &t.namespace]))
            .then_some(())
        },
    );
    eventually(
        Duration::from_secs(60),
        "the router's children to be garbage-collected",
        || {
            let left = t.cluster.names(&[
                "deployment,service,serviceaccount,poddisruptionbudget",
                "-n",
                &t.namespace,
                "-l",
                "app.kubernetes.io/instance=events",
            ]);
            left.is_empty().then_some(())
        },
    );

    // The deleted routers' replica series are gone from the operator's metrics.
    let (status, metrics) = http_request(
        format!("127.0.0.1:{admin_port}").parse().expect("address"),
        "GET",
        "/metrics",
        "",
    );
    assert_eq!(status, 200, "{metrics}");
    // Only this test's namespace: the operator watches every namespace, and other tests running
    // at the same time (the autoscaling loop) have routers of their own.
    let ours = format!("router_namespace=\"{}\"", t.namespace);
    let left: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("eventrouter_operator_router_replicas{") && l.contains(&ours))
        .collect();
    assert!(
        left.is_empty(),
        "the deleted routers' replicas are still reported: {left:?}"
    );
}

/// Stops the operator (everything it did ran under the chart's RBAC), then `helm uninstall`
/// leaves nothing behind but the CRD, which is kept by design.
fn uninstall(t: &Install, operator: &mut ChartOperator) {
    // Everything the operator did ran under the chart's RBAC. Stop it before the uninstall takes
    // its rights away (in a t.cluster its Deployment goes in the same step).
    let operator_log = operator.process.output();
    operator.process.stop();
    assert!(
        !operator_log.contains("forbidden"),
        "the chart's RBAC denied the operator something:\n{operator_log}"
    );

    run(t
        .cluster
        .helm()
        .args(["uninstall", RELEASE, "-n", &t.namespace, "--wait"]));
    let release_selector = format!("app.kubernetes.io/instance={RELEASE}");
    let leftovers = t.cluster.names(&[
        "deployment,replicaset,service,serviceaccount,role,rolebinding,configmap,poddisruptionbudget,networkpolicy,eventrouter",
        "-n",
        &t.namespace,
        "-l",
        &release_selector,
    ]);
    assert!(leftovers.is_empty(), "helm uninstall left {leftovers:?}");
    let cluster_scoped =
        t.cluster
            .names(&["clusterrole,clusterrolebinding", "-l", &release_selector]);
    assert!(
        cluster_scoped.is_empty(),
        "helm uninstall left {cluster_scoped:?}"
    );
    assert!(
        t.cluster.exists(&["crd", CRD]),
        "the CRD is kept on uninstall by design"
    );
}
