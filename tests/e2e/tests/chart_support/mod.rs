//! Shared by the chart tests (`chart_*.rs`): where the chart and its files are, how to run the
//! real tools (helm, kubectl, promtool, prometheus, kubernetes-validate, the dashboard linter;
//! all installed by `tests/infra/install.sh`, found with the harness's `tool`, which fails loudly
//! when one is missing), a Prometheus started on a free loopback port, and the PromQL the
//! dashboards and adapter rules contain. Generic helpers (HTTP, polling, encoding) come from the
//! harness.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    env,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub use eventrouter_e2e::rabbitmq::encode_segment;
pub use eventrouter_e2e::wait::wait_for_blocking;
pub use eventrouter_e2e::{free_port, http, repo_root, tool};

use serde_json::Value as Json;

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/event-router")
}

/// Runs a command and returns its output; panics with both streams when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command expected to fail; returns its exit code and combined output.
pub fn run_failing(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{cmd:?} was expected to fail but succeeded:\n{text}"
    );
    (out.status.code(), text)
}

/// The values files of the chart's `ci/` folder (sorted).
pub fn ci_values_files() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/event-router/ci exists")
        .map(|e| e.expect("readable ci entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "charts/event-router/ci holds no values files"
    );
    files
}

/// `helm template` of the chart with the given values files and `--set` pairs, rendered as for a
/// cluster that already serves the EventRouter kind (so `eventRouter.create` renders one).
pub fn helm_template(release: &str, namespace: &str, values: &[&Path], sets: &[&str]) -> String {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    cmd.args(["--api-versions", "eventrouter.io/v1alpha1/EventRouter"]);
    for v in values {
        cmd.arg("-f").arg(v);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    String::from_utf8(run(&mut cmd).stdout).expect("helm prints UTF-8")
}

/// The non-empty documents of a multi-document YAML stream.
pub fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn kind_of(doc: &serde_yaml::Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

/// An instant query against the Prometheus at `url` (`http://host:port`): the `data.result`
/// array, or why Prometheus could not answer or refused.
pub async fn instant_query(url: &str, expr: &str) -> Result<Vec<Json>, String> {
    let response = http::get(&format!(
        "{url}/api/v1/query?query={}",
        encode_segment(expr)
    ))
    .await
    .map_err(|error| format!("querying Prometheus: {error:#}"))?;
    let v = response
        .json()
        .map_err(|error| format!("bad JSON from Prometheus: {error:#}"))?;
    if response.status != 200 || v["status"] != "success" {
        return Err(response.text());
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// A Prometheus server started by a test, on a free loopback port, with its own TSDB directory.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// Prometheus cannot report a port it picked itself, so it is started on a port found free; if
/// another process takes that port first, Prometheus exits and is started again on a new one.
const PROMETHEUS_START_ATTEMPTS: usize = 3;

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (YAML, indented as a list under `scrape_configs:`),
    /// scraping and evaluating every second.
    pub fn start(name: &str, scrape_configs: &str) -> Self {
        Self::start_program(&tool("prometheus"), name, scrape_configs)
    }

    /// [`Prometheus::start`] with another Prometheus binary (the autoscaling loop's, built with
    /// Kubernetes discovery).
    pub fn start_program(program: &Path, name: &str, scrape_configs: &str) -> Self {
        let dir = env::temp_dir().join(format!(
            "eventrouter-{name}-prometheus-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Prometheus directory");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{scrape_configs}"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        for _ in 0..PROMETHEUS_START_ATTEMPTS {
            let port = free_port().expect("a free port");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
            let child = Command::new(program)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-lifecycle")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut prometheus = Self {
                child,
                addr,
                dir: dir.clone(),
            };
            let ready = wait_for_blocking(
                "Prometheus to become ready",
                Duration::from_secs(30),
                || {
                    if let Ok(Some(status)) = prometheus.child.try_wait() {
                        return Ok(Some(status));
                    }
                    match http::blocking_get(&format!("{}/-/ready", prometheus.url())) {
                        Ok(response) if response.status == 200 => Ok(None),
                        Ok(response) => Err(format!("status {}", response.status)),
                        Err(error) => Err(error.to_string()),
                    }
                },
            );
            match ready {
                None => return prometheus,
                Some(status) => {
                    eprintln!(
                        "Prometheus exited ({status}) on {addr}, retrying on another port:\n{}",
                        prometheus.log()
                    );
                    // It has exited; dropping it would delete the directory the next attempt uses.
                    std::mem::forget(prometheus);
                }
            }
        }
        panic!("Prometheus did not start in {PROMETHEUS_START_ATTEMPTS} attempts");
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; returns the `data.result` array. Panics when Prometheus rejects it.
    pub fn query(&self, expr: &str) -> Vec<Json> {
        http::block_on(instant_query(&self.url(), expr))
            .unwrap_or_else(|error| panic!("Prometheus rejected `{expr}`: {error}"))
    }

    /// Runs `expr` until it returns data (rates need a few scrapes after the first sample) and
    /// returns the result; panics naming `what` after 30 s.
    pub fn query_until_data(&self, expr: &str, what: &str) -> Vec<Json> {
        wait_for_blocking(
            &format!("{what} to return data for `{expr}`"),
            Duration::from_secs(30),
            || {
                let result = self.query(expr);
                if result.is_empty() {
                    Err("an empty result")
                } else {
                    Ok(result)
                }
            },
        )
    }

    /// Waits until at least `expected` targets are up.
    pub fn wait_targets_up(&self, expected: usize) {
        wait_for_blocking(
            &format!("{expected} Prometheus targets to be up"),
            Duration::from_secs(30),
            || {
                let up = self.query("up == 1").len();
                if up >= expected {
                    Ok(())
                } else {
                    Err(format!("{up} up; log:\n{}", self.log()))
                }
            },
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One PromQL expression of a dashboard panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

/// Every query of every panel (rows included) of a dashboard file.
pub fn dashboard_queries(file: &Path) -> Vec<PanelQuery> {
    let d: Json = serde_json::from_str(&std::fs::read_to_string(file).expect("read dashboard"))
        .expect("dashboard is JSON");
    let name = file
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let mut out = Vec::new();
    fn walk(panels: &[Json], name: &str, out: &mut Vec<PanelQuery>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(PanelQuery {
                        dashboard: name.to_string(),
                        panel: p["title"].as_str().unwrap_or_default().to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
            walk(
                p["panels"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                name,
                out,
            );
        }
    }
    walk(
        d["panels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
        &name,
        &mut out,
    );
    out
}

/// The prefix of the operator's own metrics. The routers dashboard reads one of them (the
/// *Replicas* panel's current/desired replicas): `chart_promql` has no operator and cannot
/// produce them, so those queries are run against the real operator by `chart_install`.
pub const OPERATOR_METRIC_PREFIX: &str = "eventrouter_operator_";

/// The routers-dashboard queries that read operator metrics: exactly the ones `chart_install`
/// runs and `chart_promql` leaves to it.
pub fn routers_queries_on_operator_metrics() -> Vec<PanelQuery> {
    dashboard_queries(&chart_dir().join("dashboards/routers.json"))
        .into_iter()
        .filter(|q| q.expr.contains(OPERATOR_METRIC_PREFIX))
        .collect()
}

/// Every template variable query (`label_values(...)`) of a dashboard, by variable name.
pub fn dashboard_variable_queries(file: &Path) -> BTreeMap<String, String> {
    let d: Json = serde_json::from_str(&std::fs::read_to_string(file).expect("read dashboard"))
        .expect("dashboard is JSON");
    d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                q.to_string(),
            )
        })
        .collect()
}

/// Replaces Grafana's variables the way Grafana would for the given selections.
pub fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut out = expr
        .replace("$__rate_interval", "15s")
        .replace("${__rate_interval}", "15s");
    // Longest names first so `$pod` never eats part of `$podname`.
    let mut sorted = vars.to_vec();
    sorted.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in sorted {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    assert!(!out.contains('$'), "unsubstituted variable left in `{out}`");
    out
}

/// Turns `label_values(selector, label)` into a PromQL query returning that label's values.
pub fn label_values_query(q: &str) -> (String, String) {
    let inner = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values() query: {q}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(selector, label)");
    (
        format!("group by ({}) ({})", label.trim(), selector.trim()),
        label.trim().to_string(),
    )
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout` (the harness's
/// blocking poll, for probes that have nothing to say while they wait).
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for_blocking(what, timeout, || f().ok_or("not yet"))
}

/// One request to a loopback server through the harness's HTTP client; returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let method: http::Method = method.parse().expect("an HTTP method");
    let url = format!("http://{addr}{path}");
    let response = http::block_on(http::request(
        method,
        &url,
        &[(http::CONTENT_TYPE, "application/json")],
        body.to_owned().into(),
    ))
    .unwrap_or_else(|error| panic!("{url}: {error:#}"));
    (response.status, response.text())
}

/// Builds a binary of the workspace and returns its path.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    eventrouter_e2e::command::workspace_binary(package, bin)
        .unwrap_or_else(|error| panic!("building {bin}: {error:#}"))
}

/// A child process whose output is collected by a thread (so its pipe never fills up) and which
/// is killed on drop.
pub struct Proc {
    pub child: Child,
    pub output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in streams {
            let sink = output.clone();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut s = sink.lock().expect("output lock");
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Self { child, output }
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits for an output line containing `needle`; returns that line.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "process exited ({status}) before printing `{needle}`:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Proc {
    /// Kills the process and waits for it (also done on drop).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
