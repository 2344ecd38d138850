//! The test Kubernetes control plane: a client built from `EVENTROUTER_TEST_KUBECONFIG`, and
//! namespaces that tests create for themselves and that are deleted when the test ends.
//!
//! The control plane runs the scheduler, the controller-manager and KEDA but no kubelet: Pods
//! stay Pending unless a test starts the process kubelet (`tests/kubelet`) and opts its
//! namespace in to the kubelet's Node.

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{require_env, unique_name, vars};

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
