//! The one home of the test helpers, shared by the cross-component tests (`tests/e2e`), the
//! event service's and the operator's integration tests, and the load generator.
//!
//! # Layout
//! - [`require_env`] and [`vars`]: the contract between `tests/run` and the tests — which
//!   environment variable points at which service; [`tool`] finds the pinned tools.
//! - [`free_ports`] and [`unique_name`]: ports for services that cannot bind port 0, names no
//!   other test uses.
//! - [`wait`]: poll until a condition holds, failing with a message after a deadline.
//! - [`http`]: the one HTTP client of the tests (hyper), async and blocking.
//! - [`prom`]: the one reader of the Prometheus text format.
//! - [`rabbitmq`]: management API reads, a confirming publisher, dedicated nodes.
//! - [`command`]: run a program (kubectl, helm, promtool, ...) and capture its output.
//! - [`kernel`]: a socket's kernel queues and this process's resident memory, via `procfs`.
//!
//! This crate depends on neither the event service nor the operator, so both can use it as a
//! dev-dependency without a cycle. A helper that needs a missing service panics naming the
//! service and saying to run the suite with `tests/run`: a test never passes by skipping.

pub mod command;
pub mod http;
pub mod kernel;
pub mod prom;
pub mod rabbitmq;
pub mod wait;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

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

/// The repository's root directory (this crate lives in `tests/support`).
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

/// The tools cache that `tests/infra/install.sh` fills: `$EVENTROUTER_TOOLS`, else
/// `${XDG_CACHE_HOME:-~/.cache}/event-router-tools`, the same default as the scripts.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(vars::TOOLS).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("event-router-tools")
}

/// Path of a tool: `<tools cache>/bin/NAME` first (the pinned versions), then `PATH`.
/// Panics saying what installs it when it is missing: these tests never pass by skipping.
pub fn tool(name: &str) -> PathBuf {
    let cached = tools_dir().join("bin").join(name);
    if cached.is_file() {
        return cached;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "`{name}` is missing: it is neither in {} nor on PATH. tests/infra/install.sh \
             installs every tool the tests use (run the suite with tests/run, which calls it).",
            tools_dir().join("bin").display()
        )
    })
}

/// A TCP port that is free on 127.0.0.1 right now, for services that cannot bind port 0
/// themselves (a RabbitMQ node, Prometheus). Another process may take it before the service
/// binds it, so callers retry a failed start on a new port. Servers under test bind port 0.
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

/// `<prefix>-<pid>-<counter>-<time>` as a DNS label (lowercase, at most 63 characters), unique
/// across the tests of one process and across processes running at the same time: tests share
/// one broker and one API server and run in parallel.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    let suffix = format!("{:x}-{count}-{:x}", std::process::id(), nanos);
    let mut stem: String = prefix
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    stem.truncate(62 - suffix.len());
    let stem = stem.trim_matches('-');
    if stem.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{stem}-{suffix}")
    }
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
    #[should_panic(expected = "tests/infra/install.sh installs every tool")]
    fn a_missing_tool_fails_loudly() {
        tool("eventrouter-no-such-tool");
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

    fn is_dns_label(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn names_are_dns_labels_and_unique() {
        let a = unique_name("Operator_Test");
        let b = unique_name("Operator_Test");
        assert_ne!(a, b);
        assert!(a.starts_with("operator-test-"), "{a}");
        for name in [
            a,
            b,
            unique_name(&"x".repeat(100)),
            unique_name("--"),
            unique_name(""),
        ] {
            assert!(is_dns_label(&name), "{name} is not a DNS label");
        }
    }
}
