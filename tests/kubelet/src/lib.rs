//! A process kubelet for tests: it registers a Node with the API server, keeps it Ready, and
//! runs every Pod the scheduler binds to it as one local process — on a loopback address of its
//! own, or in a network namespace of its own ([`Network`]) — reporting the Pod's IP, container state and readiness (from the Pod's own probes) back,
//! and stopping it the way a kubelet does (preStop sleep, SIGTERM, grace period, SIGKILL).
//!
//! # Layout
//! - [`addresses`]: the addresses handed to pods.
//! - [`netns`]: the bridge and the per-pod network namespaces, their names and cleanup.
//! - [`forward`]: host ports served inside a pod's namespace.
//! - [`env`]: the pure translation of a container spec into a process (environment, arguments,
//!   listen-address and mount-path rewrites, image → program map).
//! - [`volumes`]: Secret, ConfigMap and emptyDir volumes written to a per-pod folder.
//! - [`probe`]: HTTP and TCP probes and their thresholds.
//! - [`status`]: the Pod status reported from what runs.
//! - [`pod`]: one task per Pod: start, probe, restart with backoff, terminate, delete.
//! - [`node`]: the Node object, its Lease and status heartbeats.
//! - [`run`]: the watch over the Pods bound to the Node, tying it together.

pub mod addresses;
pub mod env;
pub mod forward;
pub mod netns;
pub mod node;
pub mod pod;
pub mod probe;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use addresses::{PodAddresses, PodSubnet};
pub use env::ImageMap;
pub use netns::NetError;

/// Taint put on the Node so that only Pods meant for it land there (see [`opt_in_annotations`]).
pub const TAINT_KEY: &str = "eventrouter.test/kubelet";
/// Label carrying the Node's name, for node selectors.
pub const NODE_LABEL: &str = "eventrouter.test/node";

/// A Pod spec that cannot be run as a process here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("secret {0} not found")]
    MissingSecret(String),
    #[error("config map {0} not found")]
    MissingConfigMap(String),
    #[error("key {key} not found in {name}")]
    MissingKey { name: String, key: String },
    #[error("image {0} is not in the image map")]
    UnmappedImage(String),
    #[error("volume {0} is not declared by the pod")]
    UnknownVolume(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid pod subnet {0:?}: expected 127.X.Y.0/24")]
    PodSubnet(String),
    #[error("invalid image map entry {0:?}: expected IMAGE=PATH")]
    ImageMapEntry(String),
}

/// What can go wrong while running Pods.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no free address left in the pod subnet")]
    NoAddress,
    #[error("pod network: {0}")]
    Network(#[from] NetError),
}

/// How pods are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// Pods share the host's network, each on its own address of [`Settings::pod_subnet`]; the
    /// wildcard listen addresses in their env and args are rewritten to that address.
    #[default]
    Loopback,
    /// Each pod gets a network namespace of its own with an address of a `10.244.N.0/24`
    /// bridge created for the run (needs `CAP_NET_ADMIN` and iproute2); it listens on its
    /// wildcard addresses as in a container, and reaches the host's
    /// [`Settings::host_ports`] on its own `127.0.0.1`.
    Namespace,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "loopback" => Ok(Self::Loopback),
            "netns" => Ok(Self::Namespace),
            other => Err(format!("unknown network mode {other:?}: loopback or netns")),
        }
    }
}

/// How the kubelet runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Node's name.
    pub node_name: String,
    /// Which local program plays which image.
    pub images: ImageMap,
    /// How pods are networked.
    pub network: Network,
    /// Where pod addresses come from with [`Network::Loopback`].
    pub pod_subnet: PodSubnet,
    /// With [`Network::Namespace`]: ports of the host's `127.0.0.1` that each pod reaches on
    /// its own `127.0.0.1` (forwarded by the kubelet).
    pub host_ports: Vec<u16>,
    /// Per-pod folders (volumes, logs, working directory) go under `<root>/<namespace>/<pod>`.
    pub root_dir: PathBuf,
    /// Capacity the Node advertises (also its allocatable).
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    /// How often the Lease is renewed and the Node's conditions are re-reported.
    pub heartbeat: Duration,
    /// Restart backoff: doubles from `restart_backoff_base` up to `restart_backoff_max`.
    pub restart_backoff_base: Duration,
    pub restart_backoff_max: Duration,
    /// Grace given to each process when the kubelet itself stops.
    pub shutdown_grace: Duration,
    /// Taint the Node with [`TAINT_KEY`] (NoSchedule), so only Pods tolerating it land here.
    pub taint: bool,
    /// Delete the Node when the kubelet stops.
    pub delete_node_on_exit: bool,
}

impl Settings {
    pub fn new(node_name: impl Into<String>, images: ImageMap, root_dir: PathBuf) -> Self {
        Self {
            node_name: node_name.into(),
            images,
            network: Network::default(),
            pod_subnet: PodSubnet::default(),
            host_ports: Vec::new(),
            root_dir,
            cpu: "16".into(),
            memory: "64Gi".into(),
            max_pods: 110,
            heartbeat: Duration::from_secs(10),
            restart_backoff_base: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            taint: true,
            delete_node_on_exit: true,
        }
    }
}

/// Namespace annotations that send a namespace's Pods to the Node `node` (and only there),
/// through the API server's PodNodeSelector and PodTolerationRestriction admission plugins:
/// every Pod created in the namespace gets a node selector for [`NODE_LABEL`] and a toleration
/// for [`TAINT_KEY`], whoever wrote its spec (a Deployment the operator renders, for example).
pub fn opt_in_annotations(node: &str) -> [(String, String); 2] {
    [
        (
            "scheduler.alpha.kubernetes.io/node-selector".to_owned(),
            format!("{NODE_LABEL}={node}"),
        ),
        (
            "scheduler.alpha.kubernetes.io/defaultTolerations".to_owned(),
            format!(r#"[{{"key":"{TAINT_KEY}","operator":"Exists","effect":"NoSchedule"}}]"#),
        ),
    ]
}

/// State shared by the pod tasks.
pub(crate) struct Shared {
    pub client: Client,
    pub settings: Settings,
    pub addresses: Mutex<PodAddresses>,
    /// The run's bridge with [`Network::Namespace`].
    pub bridge: Option<netns::Bridge>,
}

/// Registers the Node, keeps it Ready, and runs the Pods bound to it until `shutdown` is
/// cancelled; then stops every process (within [`Settings::shutdown_grace`]) and, if asked,
/// deletes the Node.
pub async fn run(
    client: Client,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    std::fs::create_dir_all(&settings.root_dir).map_err(|source| Error::Io {
        path: settings.root_dir.clone(),
        source,
    })?;
    let bridge = match settings.network {
        Network::Loopback => None,
        Network::Namespace => {
            netns::remove_stale().await;
            Some(netns::Bridge::create(netns::RunId::next()).await?)
        }
    };
    let subnet = bridge
        .as_ref()
        .map_or(settings.pod_subnet, netns::Bridge::subnet);
    node::register(&client, &settings).await?;
    tracing::info!(node = %settings.node_name, %subnet, network = ?settings.network, "node registered");
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        settings.clone(),
        shutdown.clone(),
    ));
    let shared = Arc::new(Shared {
        client: client.clone(),
        addresses: Mutex::new(PodAddresses::new(subnet)),
        bridge,
        settings: settings.clone(),
    });

    let pods: Api<Pod> = Api::all(client.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let mut events = watcher(pods, config).boxed();
    let mut running: HashMap<String, watch::Sender<Option<pod::Stop>>> = HashMap::new();
    let mut tasks = JoinSet::new();
    // Uids seen during a (re)list, to find Pods deleted while the watch was down.
    let mut listed: Option<HashSet<String>> = None;

    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.next() => event,
        };
        while tasks.try_join_next().is_some() {}
        let Some(event) = event else { break };
        match event {
            Ok(watcher::Event::Init) => listed = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.uid()) {
                    seen.insert(uid);
                }
                on_apply(&shared, pod, &mut running, &mut tasks);
            }
            Ok(watcher::Event::InitDone) => {
                let seen = listed.take().unwrap_or_default();
                running.retain(|uid, stop| {
                    let keep = seen.contains(uid);
                    if !keep {
                        stop.send_replace(Some(pod::Stop::Gone));
                    }
                    keep
                });
            }
            Ok(watcher::Event::Apply(pod)) => on_apply(&shared, pod, &mut running, &mut tasks),
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(stop) = pod.uid().and_then(|uid| running.remove(&uid)) {
                    stop.send_replace(Some(pod::Stop::Gone));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    tracing::info!(pods = running.len(), "stopping every pod process");
    for stop in running.values() {
        stop.send_replace(Some(pod::Stop::Shutdown));
    }
    while tasks.join_next().await.is_some() {}
    heartbeat.abort();
    // Every pod task has ended, so this is the last reference: the bridge goes with it.
    drop(events);
    drop(shared);
    if settings.delete_node_on_exit {
        node::deregister(&client, &settings.node_name).await;
    }
    Ok(())
}

fn on_apply(
    shared: &Arc<Shared>,
    pod: Pod,
    running: &mut HashMap<String, watch::Sender<Option<pod::Stop>>>,
    tasks: &mut JoinSet<()>,
) {
    let Some(uid) = pod.uid() else { return };
    if let Some(stop) = running.get(&uid) {
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod::deletion_grace(&pod);
            stop.send_if_modified(|current| {
                // The first deletion wins; a later, shorter grace period is not applied.
                if current.is_none() {
                    *current = Some(pod::Stop::Delete { grace });
                    true
                } else {
                    false
                }
            });
        }
        return;
    }
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    if finished {
        return;
    }
    let initial = pod
        .metadata
        .deletion_timestamp
        .is_some()
        .then(|| pod::Stop::Delete {
            grace: pod::deletion_grace(&pod),
        });
    let (stop, stopped) = watch::channel(initial);
    running.insert(uid, stop);
    tasks.spawn(pod::supervise(shared.clone(), pod, stopped));
}
