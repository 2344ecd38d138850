//! The pod network on this machine's kernel (needs root, as `tests/run` runs): a bridge and a
//! pod namespace are created, the host reaches a server bound to `0.0.0.0` inside the
//! namespace on the pod's address, the pod reaches a host-only service through its own
//! `127.0.0.1`, and nothing is left once they are dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use test_kubelet::forward::Forwarders;
use test_kubelet::netns::{self, Bridge, PodNetwork, RunId};

fn ip_output(args: &[&str]) -> String {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send + 'static>(
    path: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let handle = std::fs::File::open(&path).expect("the namespace handle");
        netns::enter(handle.as_raw_fd()).expect("setns (run as root)");
        f()
    })
    .join()
    .expect("the namespace thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_namespace_is_reachable_reaches_host_ports_and_is_removed() {
    let id = RunId::next();
    let bridge = Bridge::create(id)
        .await
        .expect("creating the bridge (root?)");
    let subnet = bridge.subnet().network().octets();
    assert_eq!(subnet[..2], [10, 244]);
    let address = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 2);
    let network = PodNetwork::create(&bridge, address)
        .await
        .expect("creating the pod's namespace");
    let path = network.path();

    // A server in the pod listening on the wildcard address, as in a container.
    let server = in_netns(path.clone(), || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind in the namespace")
    });
    let port = server.local_addr().expect("local address").port();
    let accepted = std::thread::spawn(move || {
        let (mut stream, peer) = server.accept().expect("accept");
        stream.write_all(b"pod").expect("write");
        peer
    });
    let mut client = tokio::task::spawn_blocking(move || {
        TcpStream::connect_timeout(&(address, port).into(), Duration::from_secs(3))
    })
    .await
    .expect("join")
    .expect("the host reaches the pod's address");
    let mut reply = String::new();
    client.read_to_string(&mut reply).expect("read");
    assert_eq!(reply, "pod");
    let peer = accepted.join().expect("accept thread");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from(bridge.gateway()),
        "the host comes from the bridge"
    );

    // The pod's own 127.0.0.1:PORT is the host's 127.0.0.1:PORT.
    let host_service = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("host service");
    let host_port = host_service.local_addr().expect("local address").port();
    let host_thread = std::thread::spawn(move || {
        let (mut stream, _) = host_service.accept().expect("accept");
        let mut request = [0u8; 4];
        stream.read_exact(&mut request).expect("read");
        stream.write_all(&request).expect("echo");
    });
    let forwarders = Forwarders::start(&path, &[host_port], "test/pod")
        .await
        .expect("host port forwarders");
    let echoed = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            in_netns(path, move || {
                let mut stream =
                    TcpStream::connect((Ipv4Addr::LOCALHOST, host_port)).expect("pod → host port");
                stream.write_all(b"ping").expect("write");
                let mut echoed = String::new();
                stream.read_to_string(&mut echoed).expect("read");
                echoed
            })
        }
    })
    .await
    .expect("join");
    assert_eq!(echoed, "ping");
    host_thread.join().expect("host service thread");

    let name = network.name().to_owned();
    assert!(ip_output(&["netns", "list"]).contains(&name));
    drop(forwarders);
    drop(network);
    assert!(
        !ip_output(&["netns", "list"]).contains(&name),
        "{name} left"
    );
    assert!(
        !ip_output(&["-o", "link", "show"]).contains(&id.veth_host(2)),
        "veth left"
    );
    drop(bridge);
    assert!(
        !ip_output(&["-o", "link", "show"]).contains(&id.bridge()),
        "bridge left"
    );
}

#[tokio::test]
async fn what_a_stopped_kubelet_left_is_removed() {
    let dead = (300_000..400_000u32)
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("a pid no process has");
    let stale = RunId::new(dead, 3);
    let live = RunId::next();
    for id in [stale, live] {
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", &id.netns(9)])
                .status()
                .expect("ip runs")
                .success()
        );
        assert!(
            std::process::Command::new("ip")
                .args(["link", "add", &id.bridge(), "type", "bridge"])
                .status()
                .expect("ip runs")
                .success()
        );
    }
    netns::remove_stale().await;
    let namespaces = ip_output(&["netns", "list"]);
    let links = ip_output(&["-o", "link", "show"]);
    // The live run's are left alone; removed by hand below.
    for args in [
        ["netns", "delete", &live.netns(9)],
        ["link", "delete", &live.bridge()],
    ] {
        std::process::Command::new("ip").args(args).status().ok();
    }
    assert!(!namespaces.contains(&stale.netns(9)), "{namespaces}");
    assert!(!links.contains(&stale.bridge()), "{links}");
    assert!(namespaces.contains(&live.netns(9)), "{namespaces}");
    assert!(links.contains(&live.bridge()), "{links}");
}
