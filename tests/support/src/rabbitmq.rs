//! RabbitMQ for tests: the shared node's URLs, reads through the management HTTP API (AMQP
//! itself cannot list bindings), a publisher that is not the service (plain lapin with
//! confirms), and dedicated nodes that a test may stop, restart or pause without disturbing the
//! tests that share the common node.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use http::header::AUTHORIZATION;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use crate::command::{run_async, run_ok_async};
use crate::{free_ports, infra_script, require_env, unique_name, vars};

/// The default virtual host, as the management API spells it in paths.
pub const DEFAULT_VHOST: &str = "/";

/// AMQP URL of the shared node; panics (see [`require_env`]) when no node runs.
pub fn amqp_url() -> String {
    require_env(vars::AMQP_URL)
}

/// The port of the shared node's AMQP URL (`amqp://user:pass@host:PORT/vhost`; 5672 when the URL
/// names none): what a pod in a network namespace of its own gets forwarded to the host.
pub fn amqp_port() -> u16 {
    let url = amqp_url();
    let authority = url
        .split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    host_port
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(5672)
}

/// Everything but RFC 3986's unreserved characters is encoded: a vhost `/` must become `%2F`.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one URL path segment or query value (a vhost, queue or exchange name, a
/// PromQL expression).
pub fn encode_segment(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
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
    authorization: String,
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
    pub fn shared() -> Self {
        Self::new(&require_env(vars::RABBITMQ_MGMT_URL), "guest", "guest")
    }

    pub fn new(base_url: &str, user: &str, password: &str) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization: format!("Basic {token}"),
        }
    }

    /// GETs `/api/<path>` and parses the JSON answer; `None` when the object does not exist (404).
    /// Path segments must be encoded with [`encode_segment`]. A 5xx answer is asked again a few
    /// times: the API answers 500 for a moment while a stream queue's members are being set up.
    pub async fn get(&self, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let url = format!("{}/api/{}", self.base_url, path.trim_start_matches('/'));
        let mut retries = 5;
        loop {
            let response = crate::http::request(
                Method::GET,
                &url,
                &[(AUTHORIZATION, &self.authorization)],
                Bytes::new(),
            )
            .await
            .context("is the RabbitMQ node (with the management plugin) running?")?;
            match response.status {
                404 => return Ok(None),
                200..=299 => return response.json().map(Some),
                500..=599 if retries > 0 => {
                    retries -= 1;
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                status => bail!("GET {url} answered {status}: {}", response.text()),
            }
        }
    }

    /// The node's `/api/overview` (version, node name, message rates).
    pub async fn overview(&self) -> anyhow::Result<serde_json::Value> {
        self.get("overview")
            .await?
            .context("/api/overview answered 404")
    }

    /// The queue as the broker reports it (`None` when it does not exist).
    pub async fn queue(
        &self,
        vhost: &str,
        queue: &str,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let path = format!("queues/{}/{}", encode_segment(vhost), encode_segment(queue));
        self.get(&path).await
    }

    pub async fn queue_exists(&self, vhost: &str, queue: &str) -> anyhow::Result<bool> {
        Ok(self.queue(vhost, queue).await?.is_some())
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

    /// `(source, routing key)` of every binding whose destination is the exchange `exchange`.
    pub async fn exchange_bindings_into(
        &self,
        vhost: &str,
        exchange: &str,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let path = format!(
            "exchanges/{}/{}/bindings/destination",
            encode_segment(vhost),
            encode_segment(exchange)
        );
        let bindings: Vec<Binding> = match self.get(&path).await? {
            Some(value) => serde_json::from_value(value).context("parsing bindings")?,
            None => Vec::new(),
        };
        Ok(bindings
            .into_iter()
            .map(|b| (b.source, b.routing_key))
            .collect())
    }

    /// Routing keys binding `queue` to `exchange` in `vhost`, sorted (empty when there are none
    /// or either side does not exist).
    pub async fn routing_keys(
        &self,
        vhost: &str,
        exchange: &str,
        queue: &str,
    ) -> anyhow::Result<Vec<String>> {
        let path = format!(
            "bindings/{}/e/{}/q/{}",
            encode_segment(vhost),
            encode_segment(exchange),
            encode_segment(queue)
        );
        let bindings: Vec<Binding> = match self.get(&path).await? {
            Some(value) => serde_json::from_value(value).context("parsing bindings")?,
            None => Vec::new(),
        };
        let mut keys: Vec<String> = bindings.into_iter().map(|b| b.routing_key).collect();
        keys.sort();
        Ok(keys)
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

/// An AMQP client that is not the service: a plain lapin connection with publisher confirms,
/// publishing to one durable topic exchange (declared as the operator would).
pub struct Publisher {
    _connection: Connection,
    channel: Channel,
    exchange: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("exchange", &self.exchange)
            .finish()
    }
}

impl Publisher {
    /// Connects, declares `exchange` (durable topic) and turns on confirms.
    pub async fn connect(url: &str, exchange: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("the test publisher connects to RabbitMQ")?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        declare_topic_exchange(&channel, exchange).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("turning on publisher confirms")?;
        Ok(Self {
            _connection: connection,
            channel,
            exchange: exchange.into(),
        })
    }

    /// Publishes and waits for the broker's confirm; a nack is an error.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .with_context(|| format!("publishing {routing_key} to {}", self.exchange))?
            .await
            .context("waiting for the broker's confirm")?;
        if !confirm.is_ack() {
            bail!("the broker nacked {routing_key}");
        }
        Ok(())
    }

    /// Publishes each `(routing key, JSON body)` in order, each confirmed before the next.
    pub async fn publish_all(&self, messages: &[(&str, &str)]) -> anyhow::Result<()> {
        for (routing_key, body) in messages {
            self.publish_json(routing_key, body).await?;
        }
        Ok(())
    }

    /// Publishes a JSON body with default properties.
    pub async fn publish_json(&self, routing_key: &str, body: &str) -> anyhow::Result<()> {
        self.publish(routing_key, body.as_bytes(), BasicProperties::default())
            .await
    }
}

/// Declares `exchange` as a durable topic exchange, as the operator does.
pub async fn declare_topic_exchange(channel: &Channel, exchange: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {exchange}"))
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

/// Starts tried before giving up: a port found free can be taken by another process before the
/// node binds it (the machine runs many tests at once), so a failed start moves to new ports.
const START_ATTEMPTS: usize = 3;

impl RabbitNode {
    /// Starts a fresh node named `<prefix>-<unique suffix>` and waits until it serves AMQP and
    /// HTTP (several seconds).
    pub async fn start(prefix: &str) -> anyhow::Result<Self> {
        let script = infra_script("rabbitmq.sh");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let name = unique_name(prefix);
            let [amqp_port, management_port] =
                free_ports::<2>().context("finding free AMQP and management ports")?;
            let started = run_ok_async(
                tokio::process::Command::new(&script)
                    .arg("start")
                    .arg(&name)
                    .arg(amqp_port.to_string())
                    .arg(management_port.to_string()),
            )
            .await;
            match started {
                Ok(stdout) => {
                    return Ok(Self {
                        amqp_url: exported(&stdout, vars::AMQP_URL)?,
                        management_url: exported(&stdout, vars::RABBITMQ_MGMT_URL)?,
                        name,
                        script,
                    });
                }
                Err(error) => {
                    // Clean up whatever half-started before trying new ports.
                    let _ = run_async(tokio::process::Command::new(&script).arg("stop").arg(&name))
                        .await;
                    last_error = Some(error);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("no start attempted"))
            .context(format!(
                "starting a RabbitMQ node failed {START_ATTEMPTS} times (is rabbitmq-server \
                 installed? tests/infra/install.sh installs it)"
            )))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    pub fn management(&self) -> Management {
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

/// Reads `export NAME=value` from a script's output (the value may be single-quoted).
fn exported(stdout: &str, name: &str) -> anyhow::Result<String> {
    let prefix = format!("export {name}=");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.trim_matches('\'').to_owned())
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
        assert_eq!(encode_segment("up == 1"), "up%20%3D%3D%201");
    }

    #[test]
    fn reads_exported_values() {
        let out = "export EVENTROUTER_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:1/%2f\n\
                   export EVENTROUTER_TEST_RABBITMQ_MGMT_URL='http://127.0.0.1:2'\n";
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
