//! Shared by the chart tests (`chart_*.rs`): where the chart and its files are, how to run the
//! real tools (helm, kubectl, promtool, prometheus, kubernetes-validate, the dashboard linter)
//! with a clear failure when one is missing, a Prometheus started on a free loopback port, and
//! the PromQL the dashboards and adapter rules contain.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    env,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value as Json;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/event-router")
}

/// The tools cache the test command prepares (`tests/infra/install.sh`).
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("EVENTROUTER_TOOLS") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").expect("HOME is set")).join(".cache"));
    cache.join("event-router-tools")
}

/// Path of a tool: `$EVENTROUTER_TOOLS/bin/NAME` first (the pinned versions), then `PATH`.
/// Panics with what to run when it is missing: these tests never pass by skipping.
pub fn tool(name: &str) -> PathBuf {
    let cached = tools_dir().join("bin").join(name);
    if cached.is_file() {
        return cached;
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "`{name}` is missing: it is neither in {} nor on PATH. Run tests/infra/install.sh \
         (helm, kubectl, kubernetes-validate, prometheus, promtool) or \
         charts/event-router/tests/install-tools.sh (dashboard-lint), or run the suite with tests/run.",
        tools_dir().join("bin").display()
    );
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

/// Runs a command expected to fail; returns its combined output.
pub fn run_failing(cmd: &mut Command) -> String {
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
    text
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

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A minimal HTTP/1.0 request to a loopback server; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set timeout");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A Prometheus server started by a test, on a free loopback port, with its own TSDB directory.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (YAML, indented as a list under `scrape_configs:`),
    /// scraping and evaluating every second.
    pub fn start(name: &str, scrape_configs: &str) -> Self {
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
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .expect("literal address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let child = Command::new(tool("prometheus"))
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
        let prometheus = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(addr).is_ok() && http(addr, "GET", "/-/ready", "").0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not become ready: {}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; returns the `data.result` array. Panics when Prometheus rejects it.
    pub fn query(&self, expr: &str) -> Vec<Json> {
        let (status, body) = http(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={}", urlencode(expr)),
            "",
        );
        let v: Json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("bad JSON from Prometheus ({e}): {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "Prometheus rejected `{expr}`: {body}"
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until every target is up; returns the targets.
    pub fn wait_targets_up(&self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = self.query("up == 1").len();
            if up >= expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {up} of {expected} targets are up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
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

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Builds a binary of the workspace (`cargo build -p PACKAGE --bin BIN`, the debug profile the
/// tests are built with) and returns its path.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(repo_root()));
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                repo_root().join(t)
            }
        })
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(bin);
    assert!(
        path.is_file(),
        "cargo built {bin} but {} does not exist",
        path.display()
    );
    path
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

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `charts/event-router/tests/install-tools.sh` once per test process: it builds
/// `dashboard-lint` and installs the Prometheus Operator schemas into the tools cache, and does
/// nothing when they are current. Panics with its output when it fails.
pub fn ensure_chart_tools() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let script = chart_dir().join("tests/install-tools.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("EVENTROUTER_TOOLS", tools_dir())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (it needs go and npm):\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
