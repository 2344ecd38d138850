//! The Node: registered with its capacity, address and a Ready condition, then kept alive by
//! renewing its Lease in `kube-node-lease` and re-reporting its conditions every heartbeat, so
//! the node lifecycle controller never marks it NotReady or evicts its Pods.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::{Error, NODE_LABEL, Settings, TAINT_KEY};

const MANAGER: &str = "test-kubelet";
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;
/// The address the Node reports and every Pod's `hostIP`.
pub const HOST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::LOCALHOST;

/// The Node's conditions; `transition` also stamps their transition time (at registration only,
/// as they never change afterwards).
fn conditions(transition: bool) -> Vec<NodeCondition> {
    let now = Time(Timestamp::now());
    let condition = |type_: &str, status: &str, reason: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: transition.then(|| now.clone()),
        ..NodeCondition::default()
    };
    vec![
        condition("Ready", "True", "KubeletReady"),
        condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        condition("PIDPressure", "False", "KubeletHasSufficientPID"),
    ]
}

fn node(settings: &Settings) -> Node {
    let resources = [
        ("cpu".to_owned(), Quantity(settings.cpu.clone())),
        ("memory".to_owned(), Quantity(settings.memory.clone())),
        ("pods".to_owned(), Quantity(settings.max_pods.to_string())),
        ("ephemeral-storage".to_owned(), Quantity("100Gi".into())),
    ];
    let name = &settings.node_name;
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", name.as_str()),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", std::env::consts::ARCH),
                    (NODE_LABEL, name.as_str()),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: settings.taint.then(|| {
                vec![Taint {
                    key: TAINT_KEY.into(),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                }]
            }),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(resources.clone().into()),
            allocatable: Some(resources.into()),
            conditions: Some(conditions(true)),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: HOST_IP.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.clone(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: std::env::consts::ARCH.into(),
                operating_system: "linux".into(),
                os_image: "processes on the host".into(),
                kernel_version: String::new(),
                container_runtime_version: "process://test-kubelet".into(),
                kubelet_version: format!("v1.35.0-test-kubelet-{}", env!("CARGO_PKG_VERSION")),
                kube_proxy_version: String::new(),
                boot_id: String::new(),
                machine_id: String::new(),
                system_uuid: String::new(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
    }
}

/// Creates the Node, or takes over an existing one of the same name.
pub async fn register(client: &Client, settings: &Settings) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let desired = node(settings);
    match nodes.create(&PostParams::default(), &desired).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::info!(node = %settings.node_name, "node exists; taking it over");
            let status = serde_json::json!({ "status": desired.status });
            nodes
                .patch_status(
                    &settings.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await?;
        }
        Err(error) => return Err(error.into()),
    }
    renew_lease(client, settings).await
}

async fn renew_lease(client: &Client, settings: &Settings) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let uid = nodes.get(&settings.node_name).await?.metadata.uid;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(settings.node_name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: settings.node_name.clone(),
                    uid,
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.node_name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    leases
        .patch(
            &settings.node_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// Every `settings.heartbeat`: renew the Lease and re-report the Node's conditions.
pub async fn heartbeat(client: Client, settings: Settings, shutdown: CancellationToken) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut ticks = tokio::time::interval(settings.heartbeat);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(error) = renew_lease(&client, &settings).await {
            tracing::warn!(%error, "renewing the node lease failed");
        }
        let status = serde_json::json!({ "status": { "conditions": conditions(false) } });
        if let Err(error) = nodes
            .patch_status(
                &settings.node_name,
                &PatchParams::default(),
                &Patch::Strategic(&status),
            )
            .await
        {
            tracing::warn!(%error, "reporting the node status failed");
        }
    }
}

/// Deletes the Node (its Lease goes with it, by owner reference).
pub async fn deregister(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.delete(name, &DeleteParams::default()).await {
        Ok(_) => tracing::info!(node = name, "node deleted"),
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => tracing::warn!(%error, node = name, "deleting the node failed"),
    }
}
