//! Host ports inside a pod's network namespace: for each `--host-port PORT`, the kubelet
//! listens on `127.0.0.1:PORT` *inside* the pod's namespace and forwards every connection to
//! `127.0.0.1:PORT` on the host, so a pod configured with a loopback URL (RabbitMQ, the API
//! server) reaches the test services, which listen on the host's loopback only.
//!
//! A socket belongs to the namespace of the thread that created it, whatever thread uses it
//! later: each listener is created on a short-lived thread that has entered the pod's
//! namespace, then served from tokio; the outgoing connections are made from the kubelet's own
//! threads, in the host's namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::netns;

/// The forwarders of one pod; they stop (and their sockets close) when this is dropped.
#[derive(Debug, Default)]
pub struct Forwarders {
    tasks: JoinSet<()>,
}

impl Forwarders {
    /// Listens on `127.0.0.1:PORT` in the namespace at `netns` for every port of `ports`.
    pub async fn start(netns: &Path, ports: &[u16], pod: &str) -> std::io::Result<Self> {
        let mut forwarders = Self::default();
        for &port in ports {
            let listener = listen_in(netns.to_owned(), port).await?;
            let pod = pod.to_owned();
            forwarders.tasks.spawn(serve(listener, port, pod));
        }
        Ok(forwarders)
    }
}

/// Binds `127.0.0.1:port` from a thread inside the namespace at `netns`.
async fn listen_in(netns: PathBuf, port: u16) -> std::io::Result<TcpListener> {
    let listener = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        // A thread of its own, not a pooled one: it is left inside the namespace and exits.
        std::thread::spawn(move || {
            let handle = std::fs::File::open(&netns)?;
            netns::enter(handle.as_raw_fd())?;
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    TcpListener::from_std(listener)
}

async fn serve(listener: TcpListener, port: u16, pod: String) {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut connections = JoinSet::new();
    loop {
        let (mut inbound, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%pod, port, %error, "host port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let pod = pod.clone();
        connections.spawn(async move {
            match TcpStream::connect(target).await {
                Ok(mut outbound) => {
                    // Either side closing ends the pair; errors are the peers' business.
                    tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                        .await
                        .ok();
                }
                Err(error) => tracing::debug!(%pod, port, %error, "host port: host refused"),
            }
        });
    }
}
