//! Harness for the cross-component tests: reaches the real services that `tests/run` starts.
//!
//! # Layout
//! - [`require_env`] and [`vars`]: the contract between `tests/run` and the tests — which
//!   environment variable points at which service.
//! - [`cluster`]: a `kube` client for the test API server; namespaces that delete themselves.
//! - [`rabbitmq`]: the shared node's AMQP URL, management API reads (queues, bindings), and
//!   dedicated nodes that a test may stop and restart without disturbing other tests.
//! - [`command`]: run a program (kubectl, helm, promtool, ...) and capture its output.
//! - [`wait`]: poll until a condition holds, failing with a message after a timeout.
//!
//! A test that needs a service asks for it through these helpers. When the service is missing,
//! the helper panics naming the service and saying to run the suite with `tests/run`: a test
//! never passes by skipping.

pub mod cluster;
pub mod command;
pub mod rabbitmq;
pub mod wait;

use std::path::PathBuf;

/// Environment variables that `tests/run` sets for the tests.
pub mod vars {
    /// AMQP URL of the shared RabbitMQ node, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub const AMQP_URL: &str = "EVENTROUTER_TEST_AMQP_URL";
    /// Base URL of the shared node's management API (user guest, password guest).
    pub const RABBITMQ_MGMT_URL: &str = "EVENTROUTER_TEST_RABBITMQ_MGMT_URL";
    /// Erlang node name of the shared RabbitMQ node, for `rabbitmqctl -n`.
    pub const RABBITMQ_NODE: &str = "EVENTROUTER_TEST_RABBITMQ_NODE";
    /// Admin kubeconfig of the test control plane (etcd, kube-apiserver, kube-controller-manager).
    pub const KUBECONFIG: &str = "EVENTROUTER_TEST_KUBECONFIG";
    /// The tools cache; its `bin/` (kubectl, helm, etcd, kube-apiserver, ...) is first on PATH.
    pub const TOOLS: &str = "EVENTROUTER_TOOLS";
}

/// What each variable stands for, so a missing one can be explained.
fn service_behind(name: &str) -> &'static str {
    match name {
        vars::AMQP_URL | vars::RABBITMQ_NODE => "a running RabbitMQ node",
        vars::RABBITMQ_MGMT_URL => "RabbitMQ's management API",
        vars::KUBECONFIG => {
            "a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)"
        }
        vars::TOOLS => "the tools cache (kubectl, helm, kube-apiserver, kubernetes-validate)",
        _ => "a service that the test command provides",
    }
}

/// Returns the value of `name`, or panics explaining which service is missing and how to get it.
///
/// Tests call this (directly or through the other helpers) instead of skipping when a service
/// is absent: in CI a missing service must fail the run.
pub fn require_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{}", missing_message(name)),
    }
}

fn missing_message(name: &str) -> String {
    format!(
        "{name} is not set: this test needs {}. Run the suite with `tests/run` \
         (or `tests/run --only <test name>`), which installs and starts the services and sets \
         {name}; `tests/run --services` starts them for running cargo test by hand.",
        service_behind(name)
    )
}

/// The repository's root directory (this crate lives in `tests/e2e`).
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// Path of a script in `tests/infra/`.
pub fn infra_script(name: &str) -> PathBuf {
    repo_root().join("tests").join("infra").join(name)
}

/// A TCP port that is free on 127.0.0.1 right now, for services that cannot bind port 0
/// themselves (a RabbitMQ node). Servers under test should bind port 0 instead.
pub fn free_port() -> std::io::Result<u16> {
    let [port] = free_ports::<1>()?;
    Ok(port)
}

/// `N` distinct free ports: all probe sockets are held open together, so none repeats.
pub fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "Run the suite with `tests/run`")]
    fn missing_variable_panics_with_the_command_to_run() {
        require_env("EVENTROUTER_TEST_VARIABLE_THAT_IS_NEVER_SET");
    }

    #[test]
    fn missing_message_names_the_service() {
        let message = missing_message(vars::KUBECONFIG);
        assert!(
            message.starts_with("EVENTROUTER_TEST_KUBECONFIG is not set"),
            "{message}"
        );
        assert!(message.contains("kube-apiserver"), "{message}");
        assert!(missing_message(vars::AMQP_URL).contains("a running RabbitMQ node"));
    }

    #[test]
    fn repo_root_holds_the_test_command() {
        assert!(
            repo_root().join("tests").join("run").is_file(),
            "tests/run not found under {}",
            repo_root().display()
        );
        assert!(infra_script("rabbitmq.sh").is_file());
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().expect("a free port");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports::<3>().expect("three free ports");
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
    }
}
