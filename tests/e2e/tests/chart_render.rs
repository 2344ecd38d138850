//! The chart renders, lints and validates: `helm lint`/`helm template` with the defaults and every
//! `ci/` values file, the rendered objects against the Kubernetes 1.35 schemas
//! (kubernetes-validate) and the Prometheus Operator CRD schemas, `values.schema.json` rejecting
//! unknown keys (and agreeing with the CRD on the spec fields it repeats), the chart's CRD copy equal to the generated `crds/` file, and the PrometheusRule
//! and adapter ConfigMap embedding exactly the files the other tests check.

mod chart_support;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use chart_support::*;

const CRD_FILE: &str = "eventrouter.io_eventrouters.yaml";

/// (label, values files) for the defaults and each ci/ file.
fn value_sets() -> Vec<(String, Vec<PathBuf>)> {
    let mut sets = vec![("defaults".to_string(), vec![])];
    for f in ci_values_files() {
        sets.push((
            f.file_name().expect("name").to_string_lossy().into_owned(),
            vec![f],
        ));
    }
    sets
}

fn refs(paths: &[PathBuf]) -> Vec<&Path> {
    paths.iter().map(PathBuf::as_path).collect()
}

/// The chart rendered as release `events` in namespace `event-router`, with the given file of
/// `ci/` on top of the defaults (none: the defaults alone).
fn render(ci_values: Option<&str>) -> Vec<serde_yaml::Value> {
    let file = ci_values.map(|name| chart_dir().join("ci").join(name));
    let values: Vec<&Path> = file.iter().map(PathBuf::as_path).collect();
    yaml_docs(&helm_template("events", "event-router", &values, &[]))
}

/// The first rendered document of `kind`.
fn first_of<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| kind_of(d) == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn helm_lint_passes_with_the_defaults_and_every_ci_values_file() {
    for (label, files) in value_sets() {
        let mut cmd = Command::new(tool("helm"));
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        for f in &files {
            cmd.arg("-f").arg(f);
        }
        let out = run(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0 chart(s) failed"), "{label}: {text}");
    }
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_1_35_schemas() {
    let dir = std::env::temp_dir().join(format!("eventrouter-chart-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (label, files) in value_sets() {
        let rendered = helm_template("events", "event-router", &refs(&files), &[]);
        let docs = yaml_docs(&rendered);
        assert!(
            docs.iter().any(|d| kind_of(d) == "Deployment"),
            "{label}: no operator Deployment"
        );
        let path = dir.join(format!("{label}.yaml"));
        std::fs::write(&path, &rendered).expect("write rendered manifests");
        let out = run(Command::new(tool("kubernetes-validate"))
            .args(["-k", "1.35.0", "--strict"])
            .arg(&path));
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // Every built-in kind must have been checked; only custom resources may lack a schema here
        // (the EventRouter is checked against its CRD by the API server in chart_install, the
        // monitoring objects by the next test).
        for d in &docs {
            let api = d["apiVersion"].as_str().unwrap_or_default();
            let custom =
                api.starts_with("eventrouter.io/") || api.starts_with("monitoring.coreos.com/");
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            let needle = format!("passed for resource {}/{name}", kind_of(d).to_lowercase());
            assert!(
                custom || report.contains(&needle),
                "{label}: {}/{name} was not validated:\n{report}",
                kind_of(d)
            );
        }
        assert!(
            !report.contains("ERROR") && !report.contains("failed"),
            "{label}:\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn monitoring_objects_validate_against_the_prometheus_operator_crd_schemas() {
    let modules = eventrouter_e2e::tools_dir().join("chart-node/node_modules");
    assert!(
        modules
            .join("@kubernetes-models/prometheus-operator")
            .is_dir(),
        "the Prometheus Operator schemas are missing: tests/infra/install.sh installs them"
    );
    let docs = render(Some("everything-on-values.yaml"));
    let monitoring: Vec<serde_json::Value> = docs
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("monitoring.coreos.com/"))
        })
        .map(|d| serde_json::to_value(d).expect("YAML converts to JSON"))
        .collect();
    let kinds: Vec<_> = monitoring
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(
            kinds.contains(&kind),
            "everything-on renders no {kind}: {kinds:?}"
        );
    }
    let mut child = Command::new(tool("node"))
        .arg(chart_dir().join("tests/validate-monitoring.mjs"))
        .env("EVENTROUTER_CHART_NODE_MODULES", &modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&monitoring).expect("JSON").as_bytes())
        .expect("write objects");
    let out = child.wait_with_output().expect("node finishes");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("3 valid, 0 invalid"), "{report}");

    // The PodMonitor scrapes the router pods' admin port by the name the operator gives it, and
    // adds the `router` label the dashboards and alerts select on.
    let pm = first_of(&docs, "PodMonitor");
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("metrics"));
    assert_eq!(
        endpoint["path"].as_str(),
        Some(eventrouter_contract::http::METRICS_PATH)
    );
    let relabel = &endpoint["relabelings"][0];
    assert_eq!(
        relabel["targetLabel"].as_str(),
        Some(eventrouter_contract::prometheus::ROUTER_LABEL)
    );
    assert_eq!(
        relabel["sourceLabels"][0].as_str(),
        Some(eventrouter_contract::prometheus::ROUTER_LABEL_SOURCE)
    );
    let selector = &pm["spec"]["selector"]["matchLabels"];
    assert_eq!(
        selector[eventrouter_contract::kube::LABEL_NAME].as_str(),
        Some(eventrouter_contract::kube::APP_NAME)
    );
    assert_eq!(
        selector[eventrouter_contract::kube::LABEL_COMPONENT].as_str(),
        Some(eventrouter_contract::kube::COMPONENT_SERVICE)
    );
}

#[test]
fn values_schema_rejects_unknown_keys_and_bad_values() {
    let unknown = "additional properties";
    let invalid = "values don't meet the specifications of the schema";
    for (set, expected) in [
        ("bogus=1", unknown),
        ("operator.bogus=1", unknown),
        ("monitoring.dashboards.bogus=1", unknown),
        ("crds.instal=false", unknown),
        ("operator.logFormat=xml", invalid),
        ("operator.replicas=0", invalid),
        ("operator.image.pullPolicy=Sometimes", invalid),
        ("eventRouter.spec.rebalance.maxShedrate=5", unknown),
        ("eventRouter.spec.rebalance.tolerancePercent=150", invalid),
        (
            "eventRouter.spec.rebalance.minConnectionAge=1 minute",
            invalid,
        ),
        ("eventRouter.spec.websocket.listenBacklog=0", invalid),
        ("eventRouter.spec.auth.hmacSecret.name=tokens", unknown),
        ("eventRouter.spec.auth.hmacSecretRef.name=tokens", invalid),
        ("eventRouter.spec.auth.hmacSecretRef.bogus=1", unknown),
        (
            "eventRouter.spec.auth.allowedOrigins={https://app.example.com/}",
            invalid,
        ),
        ("eventRouter.spec.auth.anonymousPatterns={order*}", invalid),
        ("eventRouter.spec.limits.maxConnectionsPerIp=5", unknown),
        // A rate is a string: --set makes 2 a number, --set-string is the way.
        ("eventRouter.spec.limits.connectRatePerIP=2", invalid),
        ("eventRouter.spec.limits.frameBurst=0", invalid),
        ("eventRouter.spec.history.maxAgee=7D", unknown),
        ("eventRouter.spec.history.maxAge=24 hours", invalid),
        ("eventRouter.spec.history.maxAge=24d", invalid),
        ("eventRouter.spec.history.maxBytes=1024", invalid),
        ("eventRouter.spec.history.patterns={order*}", invalid),
        (
            "eventRouter.spec.history.recoveryMaxConcurrent=5000",
            invalid,
        ),
    ] {
        let mut cmd = Command::new(tool("helm"));
        cmd.args(["template", "events"])
            .arg(chart_dir())
            .args(["--set", set]);
        let (_, text) = run_failing(&mut cmd);
        assert!(text.contains(expected), "--set {set}: {text}");
    }
}

/// The documented ways to set `spec.auth` and `spec.limits` pass the values schema.
#[test]
fn values_schema_accepts_auth_and_limits_as_documented() {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", "events"])
        .arg(chart_dir())
        .args(["--set", "eventRouter.spec.auth.hmacSecretRef.name=tokens"])
        .args(["--set", "eventRouter.spec.auth.hmacSecretRef.key=secret"])
        .args([
            "--set-json",
            r#"eventRouter.spec.auth.grantTemplates=["user.{sub}.#"]"#,
        ])
        .args([
            "--set",
            "eventRouter.spec.auth.allowedOrigins={https://app.example.com}",
        ])
        .args(["--set-string", "eventRouter.spec.limits.connectRatePerIP=2"])
        .args(["--set", "eventRouter.spec.limits.connectBurstPerIP=5"]);
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The documented ways to set `spec.history` pass the values schema and reach the EventRouter.
#[test]
fn values_schema_accepts_history_as_documented() {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", "events"])
        .arg(chart_dir())
        .args(["--set", "eventRouter.spec.history.enabled=true"])
        .args(["--set", "eventRouter.spec.history.maxAge=7D"])
        .args(["--set", "eventRouter.spec.history.maxBytes=2147483648"])
        .args([
            "--set",
            "eventRouter.spec.history.maxSegmentBytes=268435456",
        ])
        .args([
            "--set-json",
            r#"eventRouter.spec.history.patterns=["order.#","user.*"]"#,
        ])
        .args(["--set", "eventRouter.spec.history.recoveryMaxEvents=5000"])
        .args(["--set", "eventRouter.spec.history.recoveryMaxConcurrent=32"]);
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The spec is passed through as written.
    let docs = render(Some("everything-on-values.yaml"));
    let router = first_of(&docs, "EventRouter");
    let history = &router["spec"]["history"];
    assert_eq!(history["enabled"].as_bool(), Some(true), "{history:?}");
    assert_eq!(history["maxAge"].as_str(), Some("7D"));
    assert_eq!(history["maxBytes"].as_i64(), Some(2_147_483_648));
    assert_eq!(history["recoveryMaxConcurrent"].as_i64(), Some(32));
}

/// The values schema repeats a few EventRouter spec fields (so a typo fails `helm install`, not
/// only the API server later): each must be the CRD's field with the same type and bounds, and
/// `spec.rebalance` (closed in the values schema) must list every field the CRD has.
#[test]
fn the_spec_fields_in_the_values_schema_match_the_crd() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("values schema"),
    )
    .expect("values.schema.json is JSON");
    let crd: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("crds").join(CRD_FILE)).expect("the CRD"),
    )
    .expect("the CRD is YAML");
    let crd_spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let values_spec = &schema["properties"]["eventRouter"]["properties"]["spec"];
    let sections = values_spec["properties"]
        .as_object()
        .expect("the values schema describes spec sections");
    let mut checked = Vec::new();
    for (section, described) in sections {
        let fields = described["properties"].as_object().expect("fields");
        let in_crd = crd_spec["properties"][section]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("the CRD has no spec.{section}"));
        if described["additionalProperties"] == serde_json::json!(false) {
            let ours: Vec<&String> = fields.keys().collect();
            let theirs: Vec<&String> = in_crd.keys().collect();
            assert_eq!(ours, theirs, "spec.{section}: the values schema is closed");
        }
        for (field, ours) in fields {
            let theirs = in_crd
                .get(field)
                .unwrap_or_else(|| panic!("the CRD has no spec.{section}.{field}"));
            assert_eq!(ours["type"], theirs["type"], "spec.{section}.{field}");
            for bound in ["minimum", "maximum"] {
                assert_eq!(
                    ours[bound].as_f64(),
                    theirs[bound].as_f64(),
                    "spec.{section}.{field} {bound}"
                );
            }
            assert_eq!(ours["pattern"], theirs["pattern"], "spec.{section}.{field}");
            checked.push(format!("{section}.{field}"));
        }
    }
    assert!(
        checked.contains(&"rebalance.tolerancePercent".to_string())
            && checked.contains(&"websocket.listenBacklog".to_string())
            && checked.contains(&"history.maxAge".to_string())
            && checked.contains(&"history.maxSegmentBytes".to_string()),
        "{checked:?}"
    );
}

#[test]
fn the_charts_crd_is_the_generated_crd() {
    let generated = repo_root().join("crds").join(CRD_FILE);
    let copy = chart_dir().join("files/crds").join(CRD_FILE);
    let generated_text = std::fs::read_to_string(&generated).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}): `operator crd` generates it",
            generated.display()
        )
    });
    let copy_text =
        std::fs::read_to_string(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
    assert!(
        generated_text == copy_text,
        "the chart's CRD copy is stale: cp crds/{CRD_FILE} charts/event-router/files/crds/{CRD_FILE}"
    );

    // What the chart renders is that CRD plus the release's labels and the keep policy.
    let docs = render(None);
    let mut rendered = docs
        .into_iter()
        .find(|d| kind_of(d) == "CustomResourceDefinition")
        .expect("the CRD is rendered by default");
    assert_eq!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
        Some("keep")
    );
    let mut expected: serde_yaml::Value =
        serde_yaml::from_str(&generated_text).expect("CRD is YAML");
    for doc in [&mut rendered, &mut expected] {
        let meta = doc["metadata"].as_mapping_mut().expect("metadata");
        meta.remove("labels");
        meta.remove("annotations");
    }
    assert_eq!(
        rendered, expected,
        "the rendered CRD differs from crds/{CRD_FILE} beyond labels/annotations"
    );
}

#[test]
fn the_crd_can_be_left_out_or_released_on_uninstall() {
    let off = yaml_docs(&helm_template(
        "events",
        "event-router",
        &[],
        &["crds.install=false"],
    ));
    assert!(!off.iter().any(|d| kind_of(d) == "CustomResourceDefinition"));
    let not_kept = yaml_docs(&helm_template(
        "events",
        "event-router",
        &[],
        &["crds.keep=false"],
    ));
    let crd = first_of(&not_kept, "CustomResourceDefinition");
    assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
}

#[test]
fn the_prometheus_rule_and_adapter_configmap_embed_the_tested_files() {
    let docs = render(Some("everything-on-values.yaml"));

    let rule = first_of(&docs, "PrometheusRule");
    let alerts: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("files/alerts.yaml")).expect("alerts"),
    )
    .expect("alerts.yaml is YAML");
    assert_eq!(
        rule["spec"], alerts,
        "PrometheusRule.spec must be files/alerts.yaml verbatim"
    );

    let adapter = docs
        .iter()
        .find(|d| {
            kind_of(d) == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("adapter-rules"))
        })
        .expect("the adapter rules ConfigMap");
    let file = std::fs::read_to_string(chart_dir().join("files/adapter-rules.yaml"))
        .expect("adapter rules");
    let embedded: serde_yaml::Value = serde_yaml::from_str(
        adapter["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml key"),
    )
    .expect("YAML");
    assert_eq!(
        embedded,
        serde_yaml::from_str::<serde_yaml::Value>(&file).expect("YAML")
    );

    // The adapter exposes exactly the Pods metrics the operator's HPA requests.
    let names: Vec<_> = embedded["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["name"]["as"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            eventrouter_contract::autoscaling::CONNECTIONS_METRIC,
            eventrouter_contract::autoscaling::RECV_QUEUE_METRIC
        ]
    );

    // One ConfigMap per dashboard, labelled for the Grafana sidecar, holding the JSON file as is.
    for name in ["routers.json", "operator.json"] {
        let cm = docs
            .iter()
            .find(|d| kind_of(d) == "ConfigMap" && !d["data"][name].is_null())
            .unwrap_or_else(|| panic!("no dashboard ConfigMap holds {name}"));
        assert_eq!(
            cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
            Some("1")
        );
        let file =
            std::fs::read_to_string(chart_dir().join("dashboards").join(name)).expect("dashboard");
        let a: serde_json::Value =
            serde_json::from_str(cm["data"][name].as_str().expect("string")).expect("JSON");
        let b: serde_json::Value = serde_json::from_str(&file).expect("JSON");
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn rbac_is_cluster_wide_by_default_and_namespaced_when_one_namespace_is_watched() {
    let cluster = render(None);
    let cr = first_of(&cluster, "ClusterRole");
    let rules = serde_json::to_string(&cr["rules"]).expect("JSON");
    for resource in [
        "eventrouters",
        "deployments",
        "horizontalpodautoscalers",
        "scaledobjects",
        "servicemonitors",
    ] {
        assert!(
            rules.contains(resource),
            "ClusterRole lacks {resource}: {rules}"
        );
    }

    let docs = render(Some("single-namespace-values.yaml"));
    let cr = first_of(&docs, "ClusterRole");
    let cr_rules = serde_json::to_string(&cr["rules"]).expect("JSON");
    assert!(
        cr_rules.contains("customresourcedefinitions") && !cr_rules.contains("deployments"),
        "{cr_rules}"
    );
    let role = docs
        .iter()
        .find(|d| kind_of(d) == "Role" && d["metadata"]["namespace"].as_str() == Some("team-a"))
        .expect("a Role in the watched namespace");
    assert!(
        serde_json::to_string(&role["rules"])
            .expect("JSON")
            .contains("eventrouters")
    );
    let deploy = first_of(&docs, "Deployment");
    let args = serde_json::to_string(&deploy["spec"]["template"]["spec"]["containers"][0]["args"])
        .expect("JSON");
    assert!(args.contains("--namespace=team-a"), "{args}");
}
