//! RabbitMQ for tests: the shared node's URLs, reads through the management HTTP API (AMQP
//! itself cannot list bindings), and dedicated nodes that a test may stop, restart or pause
//! without disturbing the tests that share the common node.

use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::command::{run_async, run_ok_async};
use crate::{free_ports, infra_script, require_env, vars};

/// The default virtual host, as the management API spells it in paths.
pub const DEFAULT_VHOST: &str = "/";

/// AMQP URL of the shared node; panics (see [`require_env`]) when no node runs.
pub fn amqp_url() -> String {
    require_env(vars::AMQP_URL)
}

/// One binding as the management API reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Binding {
    /// Exchange name; empty for the default exchange.
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub routing_key: String,
    #[serde(default)]
    pub arguments: serde_json::Value,
}

/// A client for a node's management API (read-only helpers plus a generic GET).
#[derive(Clone)]
pub struct Management {
    base_url: String,
    authorization: HeaderValue,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl Management {
    /// The shared node's management API, as guest/guest.
    pub fn shared() -> anyhow::Result<Self> {
        Self::new(&require_env(vars::RABBITMQ_MGMT_URL), "guest", "guest")
    }

    pub fn new(base_url: &str, user: &str, password: &str) -> anyhow::Result<Self> {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization: HeaderValue::from_str(&format!("Basic {token}"))
                .context("building the Authorization header")?,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// GETs `/api/<path>` and parses the JSON answer; `None` when the object does not exist (404).
    /// Path segments must be encoded with [`encode_segment`].
    pub async fn get(&self, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let url = format!("{}/api/{}", self.base_url, path.trim_start_matches('/'));
        let request = Request::get(&url)
            .header(AUTHORIZATION, self.authorization.clone())
            .body(Empty::new())
            .with_context(|| format!("building GET {url}"))?;
        let response = self
            .http
            .request(request)
            .await
            .with_context(|| format!("GET {url}: is the RabbitMQ node running?"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to GET {url}"))?
            .to_bytes();
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => serde_json::from_slice(&body)
                .map(Some)
                .with_context(|| format!("GET {url} did not return JSON")),
            status => bail!(
                "GET {url} answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// The node's `/api/overview` (version, node name, message rates).
    pub async fn overview(&self) -> anyhow::Result<serde_json::Value> {
        self.get("overview")
            .await?
            .context("/api/overview answered 404")
    }

    pub async fn queue_exists(&self, vhost: &str, queue: &str) -> anyhow::Result<bool> {
        let path = format!("queues/{}/{}", encode_segment(vhost), encode_segment(queue));
        Ok(self.get(&path).await?.is_some())
    }

    pub async fn exchange_exists(&self, vhost: &str, exchange: &str) -> anyhow::Result<bool> {
        let path = format!(
            "exchanges/{}/{}",
            encode_segment(vhost),
            encode_segment(exchange)
        );
        Ok(self.get(&path).await?.is_some())
    }

    /// Every binding whose destination is `queue`, including the default exchange's implicit
    /// one (source `""`, routing key = queue name). Fails when the queue does not exist.
    pub async fn queue_bindings(&self, vhost: &str, queue: &str) -> anyhow::Result<Vec<Binding>> {
        let path = format!(
            "queues/{}/{}/bindings",
            encode_segment(vhost),
            encode_segment(queue)
        );
        let value = self
            .get(&path)
            .await?
            .with_context(|| format!("queue {queue:?} does not exist in vhost {vhost:?}"))?;
        serde_json::from_value(value).with_context(|| format!("parsing the bindings of {queue}"))
    }

    /// Names of all queues in `vhost`.
    pub async fn queue_names(&self, vhost: &str) -> anyhow::Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Queue {
            name: String,
        }
        let path = format!("queues/{}?columns=name", encode_segment(vhost));
        let value = self.get(&path).await?.unwrap_or_default();
        let queues: Vec<Queue> = serde_json::from_value(value).context("parsing the queue list")?;
        Ok(queues.into_iter().map(|queue| queue.name).collect())
    }
}

/// Percent-encodes one path segment (a vhost, queue or exchange name) for the management API.
pub fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A RabbitMQ node of the test's own, run by `tests/infra/rabbitmq.sh` on free loopback ports.
/// Use it for anything that stops or restarts the broker. Stopped when dropped.
#[derive(Debug)]
pub struct RabbitNode {
    name: String,
    amqp_url: String,
    management_url: String,
    script: PathBuf,
}

impl RabbitNode {
    /// Starts a fresh node named `<prefix>-<unique suffix>` and waits until it serves AMQP and
    /// HTTP (several seconds).
    pub async fn start(prefix: &str) -> anyhow::Result<Self> {
        let name = crate::cluster::unique_name(prefix);
        let script = infra_script("rabbitmq.sh");
        let [amqp_port, management_port] =
            free_ports::<2>().context("finding free AMQP and management ports")?;
        let stdout = run_ok_async(
            tokio::process::Command::new(&script)
                .arg("start")
                .arg(&name)
                .arg(amqp_port.to_string())
                .arg(management_port.to_string()),
        )
        .await
        .with_context(|| format!("starting RabbitMQ node {name}"))?;
        let amqp_url = exported(&stdout, vars::AMQP_URL)?;
        let management_url = exported(&stdout, vars::RABBITMQ_MGMT_URL)?;
        Ok(Self {
            name,
            amqp_url,
            management_url,
            script,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    pub fn management(&self) -> anyhow::Result<Management> {
        Management::new(&self.management_url, "guest", "guest")
    }

    /// Stops the Erlang VM and starts it again with the same data and ports; clients see their
    /// connections drop and the port refuse connections meanwhile.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.script_action("restart").await
    }

    /// Stops the RabbitMQ application (connections close, the AMQP port closes) but keeps the VM.
    pub async fn stop_app(&self) -> anyhow::Result<()> {
        self.script_action("stop_app").await
    }

    /// Starts the application again after [`stop_app`](Self::stop_app) and waits for it.
    pub async fn start_app(&self) -> anyhow::Result<()> {
        self.script_action("start_app").await
    }

    async fn script_action(&self, action: &str) -> anyhow::Result<()> {
        run_ok_async(
            tokio::process::Command::new(&self.script)
                .arg(action)
                .arg(&self.name),
        )
        .await
        .with_context(|| format!("rabbitmq.sh {action} {}", self.name))?;
        Ok(())
    }

    /// Stops the node now (also done on drop).
    pub async fn stop(self) -> anyhow::Result<()> {
        let output = run_async(
            tokio::process::Command::new(&self.script)
                .arg("stop")
                .arg(&self.name),
        )
        .await?;
        if !output.success() {
            bail!(
                "stopping RabbitMQ node {} failed: {}",
                self.name,
                output.stderr
            );
        }
        Ok(())
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        // Stopping an already stopped node is a no-op, so this is safe after `stop`.
        let result = std::process::Command::new(&self.script)
            .arg("stop")
            .arg(&self.name)
            .output();
        if let Err(error) = result {
            eprintln!(
                "warning: could not stop RabbitMQ node {}: {error}",
                self.name
            );
        }
    }
}

/// Reads `export NAME=value` from a script's output.
fn exported(stdout: &str, name: &str) -> anyhow::Result<String> {
    let prefix = format!("export {name}=");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(str::to_owned)
        .with_context(|| format!("rabbitmq.sh printed no {name}: {stdout}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("router.q-1_~"), "router.q-1_~");
        assert_eq!(encode_segment("a b/c#"), "a%20b%2Fc%23");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn reads_exported_values() {
        let out = "export EVENTROUTER_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:1/%2f\n\
                   export EVENTROUTER_TEST_RABBITMQ_MGMT_URL=http://127.0.0.1:2\n";
        assert_eq!(
            exported(out, vars::AMQP_URL).expect("present"),
            "amqp://guest:guest@127.0.0.1:1/%2f"
        );
        assert_eq!(
            exported(out, vars::RABBITMQ_MGMT_URL).expect("present"),
            "http://127.0.0.1:2"
        );
        assert!(exported(out, vars::KUBECONFIG).is_err());
    }

    #[test]
    fn bindings_parse_from_the_management_api_shape() {
        let json = serde_json::json!([{
            "source": "", "vhost": "/", "destination": "q", "destination_type": "queue",
            "routing_key": "q", "arguments": {}, "properties_key": "q"
        }]);
        let bindings: Vec<Binding> = serde_json::from_value(json).expect("parses");
        assert_eq!(bindings[0].destination_type, "queue");
        assert_eq!(bindings[0].routing_key, "q");
    }
}
