//! The test Kubernetes control plane: a client built from `EVENTROUTER_TEST_KUBECONFIG`, and
//! namespaces that tests create for themselves and that are deleted when the test ends.
//!
//! The control plane has no kubelet or scheduler: controllers create ReplicaSets and Pods, the
//! garbage collector follows owner references, namespaces are finalized, but Pods stay Pending.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{require_env, vars};

/// Label put on every namespace the harness creates, to find strays.
pub const TEST_NAMESPACE_LABEL: &str = "eventrouter.test/e2e";

/// Path of the admin kubeconfig; panics (see [`require_env`]) when no control plane runs.
pub fn kubeconfig_path() -> String {
    require_env(vars::KUBECONFIG)
}

/// A client with cluster-admin rights on the test API server.
pub async fn kube_client() -> anyhow::Result<Client> {
    let path = kubeconfig_path();
    let kubeconfig =
        Kubeconfig::read_from(&path).with_context(|| format!("reading kubeconfig {path}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {path}"))?;
    Client::try_from(config).context("building a Kubernetes client")
}

/// A namespace of its own for one test; deleted (without waiting) when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: String,
}

impl TestNamespace {
    /// Creates a namespace named `<prefix>-<unique suffix>`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            kubeconfig: kubeconfig_path(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be single-threaded and busy ending, so
        // a kube client cannot be driven here; kubectl does the delete from its own process.
        let result = std::process::Command::new("kubectl")
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "namespace",
                &self.name,
            ])
            .args(["--wait=false", "--ignore-not-found"])
            .output();
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: deleting test namespace {} failed: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!(
                "warning: could not run kubectl to delete test namespace {}: {error}",
                self.name
            ),
        }
    }
}

/// `<prefix>-<pid>-<counter>-<time>` as a DNS label (lowercase, at most 63 characters), unique
/// across the tests of one process and across processes running at the same time.
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
