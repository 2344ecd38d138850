//! The process kubelet (`tests/kubelet`) for one test namespace: its Node is tainted and the
//! namespace opts in, so only that namespace's pods run there, each as a process in a network
//! namespace of its own with the shared RabbitMQ node's port forwarded into it.

#![allow(dead_code)] // Each test binary uses a different subset (`node`: infra_loop only).

use std::path::PathBuf;
use std::time::Duration;

use eventrouter_e2e::rabbitmq::amqp_port;
use eventrouter_e2e::unique_name;
use eventrouter_e2e::wait::wait_for;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use test_kubelet::{ImageMap, Network, Settings};
use tokio_util::sync::CancellationToken;

/// A kubelet started by [`NamespaceKubelet::start`]; stop it with [`NamespaceKubelet::stop`].
pub struct NamespaceKubelet {
    /// The Node's name.
    pub node: String,
    root: PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), test_kubelet::Error>>,
}

impl NamespaceKubelet {
    /// Opts namespace `ns` in, starts a kubelet that runs image `image` (any tag) as `binary`,
    /// and returns once its Node is Ready.
    pub async fn start(client: &Client, ns: &str, image: &str, binary: PathBuf) -> Self {
        let node = unique_name("kubelet");
        let annotations: serde_json::Map<String, serde_json::Value> =
            test_kubelet::opt_in_annotations(&node)
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect();
        Api::<Namespace>::all(client.clone())
            .patch(
                ns,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "metadata": { "annotations": annotations } })),
            )
            .await
            .expect("annotating the namespace");
        let root = std::env::temp_dir().join(&node);
        let mut settings = Settings::new(
            node.clone(),
            ImageMap::new([(image.to_owned(), binary)]),
            root.clone(),
        );
        // A network namespace per pod; RabbitMQ (on the host's loopback) on the pods' own.
        settings.network = Network::Namespace;
        settings.host_ports = vec![amqp_port()];
        let stop = CancellationToken::new();
        let task = tokio::spawn(test_kubelet::run(client.clone(), settings, stop.clone()));
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for(
            "the kubelet's Node to be Ready",
            Duration::from_secs(60),
            || async {
                let node = nodes.get(&node).await.map_err(|e| e.to_string())?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                ready.then_some(()).ok_or_else(|| "not Ready".to_owned())
            },
        )
        .await;
        Self {
            node,
            root,
            stop,
            task,
        }
    }

    /// Stops every pod process and the kubelet (which deletes its Node), then removes its folder.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the kubelet task ends")
            .expect("the kubelet stops cleanly");
        std::fs::remove_dir_all(&self.root).ok();
    }
}
