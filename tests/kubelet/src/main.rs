//! `test-kubelet`: the process kubelet as a command (see the crate's README).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use test_kubelet::{ImageMap, Network, PodSubnet, Settings};
use tokio_util::sync::CancellationToken;

/// Registers a Node and runs the Pods bound to it as local processes, on loopback addresses or
/// in network namespaces of their own.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Kubeconfig to reach the API server with.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The Node's name.
    #[arg(long, default_value = "test-kubelet")]
    node_name: String,
    /// IMAGE=PROGRAM: run PROGRAM for containers of IMAGE (a repository without a tag stands
    /// for every tag). Repeat for several images.
    #[arg(long = "image-map", value_name = "IMAGE=PROGRAM", required = true)]
    image_map: Vec<String>,
    /// How pods are networked: `loopback` (an address of --pod-subnet each, the host's network)
    /// or `netns` (a network namespace each on a 10.244.N.0/24 bridge; needs root and `ip`).
    #[arg(long, default_value = "loopback")]
    network: Network,
    /// With `--network loopback`: the /24 in 127.0.0.0/8 whose .2 to .254 are given to pods.
    #[arg(long, default_value = "127.0.0.0/24")]
    pod_subnet: PodSubnet,
    /// With `--network netns`: a port of the host's 127.0.0.1 that pods reach on their own
    /// 127.0.0.1 (forwarded). Repeat for several ports.
    #[arg(long = "host-port", value_name = "PORT")]
    host_ports: Vec<u16>,
    /// Folder for the pods' volumes, logs and working directories.
    #[arg(long)]
    root_dir: PathBuf,
    /// CPU capacity advertised.
    #[arg(long, default_value = "16")]
    cpu: String,
    /// Memory capacity advertised.
    #[arg(long, default_value = "64Gi")]
    memory: String,
    /// Pod capacity advertised.
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// How often the node Lease is renewed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Register the Node without the taint that keeps other Pods away.
    #[arg(long)]
    no_taint: bool,
    /// Keep the Node when stopping.
    #[arg(long)]
    keep_node: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let images = args
        .image_map
        .iter()
        .map(|entry| ImageMap::parse_entry(entry))
        .collect::<Result<Vec<_>, _>>()?;
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;

    let mut settings = Settings::new(args.node_name, ImageMap::new(images), args.root_dir);
    settings.network = args.network;
    settings.pod_subnet = args.pod_subnet;
    settings.host_ports = args.host_ports;
    settings.cpu = args.cpu;
    settings.memory = args.memory;
    settings.max_pods = args.max_pods;
    settings.heartbeat = args.heartbeat;
    settings.taint = !args.no_taint;
    settings.delete_node_on_exit = !args.keep_node;

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    test_kubelet::run(client, settings, shutdown).await?;
    Ok(())
}
