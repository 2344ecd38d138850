//! Network namespaces for pods: one bridge per kubelet run (`er<run id>`, host side
//! `10.244.N.1/24`) and, per pod, a network namespace joined to it by a veth pair, with
//! `10.244.N.k/24` on its `eth0`, `lo` up and a default route via `.1`.
//!
//! Everything is named after the run's id, which carries the kubelet's process id, so what a
//! killed run left behind is recognisable and removed by the next kubelet that starts
//! ([`remove_stale`]). The names and the choice of N are pure and unit-tested; the rest runs
//! `ip` (iproute2) and needs `CAP_NET_ADMIN`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::addresses::PodSubnet;

/// The second octet pair every bridge subnet lives in: `10.244.N.0/24`.
const PREFIX: [u8; 2] = [10, 244];
/// Where `ip netns add` puts the namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Serialises the choice of N between kubelets starting at the same time on this machine.
const LOCK_FILE: &str = "eventrouter-test-kubelet-net.lock";

/// A network command that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
    #[error("running `ip {args}`: {source} (is iproute2 installed?)")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("no free 10.244.N.0/24 left for a bridge")]
    NoSubnet,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The id a kubelet run names its bridge, namespaces and veths with: its process id (6 hex
/// digits: Linux pids stay below 2^22) and a per-process sequence digit, so two kubelets in one
/// process (tests) differ too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunId {
    pid: u32,
    seq: u8,
}

static SEQUENCE: AtomicU8 = AtomicU8::new(0);

impl RunId {
    pub fn new(pid: u32, seq: u8) -> Self {
        Self {
            pid: pid & 0xff_ffff,
            seq: seq & 0xf,
        }
    }

    /// A fresh id for this process.
    pub fn next() -> Self {
        Self::new(std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The bridge: `er<id>` (9 characters; interface names may have 15).
    pub fn bridge(&self) -> String {
        format!("er{self}")
    }

    /// Pod `host`'s network namespace.
    pub fn netns(&self, host: u8) -> String {
        format!("er{self}-{host}")
    }

    /// The host side of pod `host`'s veth pair, attached to the bridge.
    pub fn veth_host(&self, host: u8) -> String {
        format!("er{self}v{host}")
    }

    /// The pod side, under this name until it is moved into the namespace and renamed `eth0`.
    pub fn veth_pod(&self, host: u8) -> String {
        format!("er{self}p{host}")
    }

    /// The run that owns a bridge, namespace or veth named by [`RunId`], if `name` is one.
    pub fn owner_of(name: &str) -> Option<RunId> {
        let rest = name.strip_prefix("er")?;
        let id = rest.get(..7)?;
        let tail = &rest[7..];
        if !id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        let valid_tail = tail.is_empty()
            || tail
                .strip_prefix(['-', 'v', 'p'])
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !valid_tail {
            return None;
        }
        let pid = u32::from_str_radix(&id[..6], 16).ok()?;
        let seq = u8::from_str_radix(&id[6..], 16).ok()?;
        Some(RunId { pid, seq })
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06x}{:x}", self.pid, self.seq)
    }
}

/// The N of every `10.244.N.*` address in `ip` output (routes, addresses).
pub fn used_octets(ip_output: &str) -> BTreeSet<u8> {
    let prefix = format!("{}.{}.", PREFIX[0], PREFIX[1]);
    ip_output
        .split(|c: char| c.is_whitespace())
        .filter_map(|word| word.strip_prefix(&prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// The first N from `start` on (wrapping) that is not in `used`.
pub fn free_octet(used: &BTreeSet<u8>, start: u8) -> Option<u8> {
    (0..=u8::MAX)
        .map(|offset| start.wrapping_add(offset))
        .find(|n| !used.contains(n))
}

/// Names in `ip netns list` output (`NAME` or `NAME (id: 3)` per line).
pub fn netns_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Interface names in `ip -o link show` output (`3: NAME@PEER: <...> ...` per line).
pub fn link_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// Runs `ip ARGS`; its output on success.
async fn ip(args: &[&str]) -> Result<String, NetError> {
    let joined = args.join(" ");
    let output = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| NetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetError::Command {
            args: joined,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `ip ARGS`, blocking, its failure only logged: for cleanup in `Drop`.
fn ip_blocking(args: &[&str]) {
    match std::process::Command::new("ip").args(args).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => tracing::warn!(
            command = %args.join(" "),
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "network cleanup failed"
        ),
        Err(error) => tracing::warn!(command = %args.join(" "), %error, "network cleanup failed"),
    }
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the namespaces, veths and bridges of runs whose kubelet process is gone.
pub async fn remove_stale() {
    let stale = |name: &str| RunId::owner_of(name).is_some_and(|id| !process_alive(id.pid));
    if let Ok(list) = ip(&["netns", "list"]).await {
        for name in netns_names(&list).into_iter().filter(|n| stale(n)) {
            tracing::info!(netns = %name, "removing a namespace a stopped kubelet left");
            ip(&["netns", "delete", &name]).await.ok();
        }
    }
    if let Ok(links) = ip(&["-o", "link", "show"]).await {
        for name in link_names(&links).into_iter().filter(|n| stale(n)) {
            tracing::info!(link = %name, "removing a link a stopped kubelet left");
            // A veth may already be gone with its peer or its bridge.
            ip(&["link", "delete", &name]).await.ok();
        }
    }
}

/// The run's bridge; deleted when dropped.
#[derive(Debug)]
pub struct Bridge {
    id: RunId,
    subnet: PodSubnet,
}

impl Bridge {
    /// Creates `er<id>` with `10.244.N.1/24` for an N no route or address of this machine uses.
    pub async fn create(id: RunId) -> Result<Self, NetError> {
        // Held while N is chosen and taken, so two kubelets starting together differ.
        let lock_path = std::env::temp_dir().join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| NetError::Io {
                what: lock_path.display().to_string(),
                source,
            })?;
        let fd = lock.as_raw_fd();
        // flock blocks; another kubelet holds it only for a few `ip` commands.
        tokio::task::spawn_blocking(move || {
            // SAFETY: flock(2) on a descriptor `lock` keeps open until this function returns.
            unsafe { libc::flock(fd, libc::LOCK_EX) }
        })
        .await
        .ok();
        let mut used = used_octets(&ip(&["-4", "-o", "route", "show", "table", "all"]).await?);
        used.extend(used_octets(&ip(&["-4", "-o", "addr", "show"]).await?));
        let [_, _, b, c] = id.pid.to_be_bytes();
        let n = free_octet(&used, b ^ c ^ id.seq).ok_or(NetError::NoSubnet)?;
        let bridge = Self {
            id,
            subnet: PodSubnet::from_prefix([PREFIX[0], PREFIX[1], n]),
        };
        let name = id.bridge();
        ip(&["link", "add", &name, "type", "bridge"]).await?;
        // From here on, Drop removes it whatever fails.
        let gateway = format!("{}/24", bridge.gateway());
        ip(&["addr", "add", &gateway, "dev", &name]).await?;
        ip(&["link", "set", &name, "up"]).await?;
        drop(lock);
        tracing::info!(bridge = %name, subnet = %bridge.subnet, "pod network bridge created");
        Ok(bridge)
    }

    pub fn id(&self) -> RunId {
        self.id
    }

    /// Where pod addresses come from (`.2` to `.254`; `.1` is the bridge).
    pub fn subnet(&self) -> PodSubnet {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.network().octets();
        Ipv4Addr::new(a, b, c, 1)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        ip_blocking(&["link", "delete", &self.id.bridge()]);
        tracing::info!(bridge = %self.id.bridge(), "pod network bridge deleted");
    }
}

/// One pod's namespace and veth pair; both deleted when dropped.
#[derive(Debug)]
pub struct PodNetwork {
    netns: String,
    veth_host: String,
}

impl PodNetwork {
    /// Creates the namespace for the pod with address `address` (in the bridge's subnet).
    pub async fn create(bridge: &Bridge, address: Ipv4Addr) -> Result<Self, NetError> {
        let host = address.octets()[3];
        let id = bridge.id;
        let network = Self {
            netns: id.netns(host),
            veth_host: id.veth_host(host),
        };
        let pod_side = id.veth_pod(host);
        let ns = network.netns.as_str();
        ip(&["netns", "add", ns]).await?;
        ip(&[
            "link",
            "add",
            &network.veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &pod_side,
        ])
        .await?;
        ip(&["link", "set", &pod_side, "netns", ns]).await?;
        ip(&[
            "link",
            "set",
            &network.veth_host,
            "master",
            &id.bridge(),
            "up",
        ])
        .await?;
        ip(&["-n", ns, "link", "set", &pod_side, "name", "eth0"]).await?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        let gateway = bridge.gateway().to_string();
        ip(&["-n", ns, "route", "add", "default", "via", &gateway]).await?;
        Ok(network)
    }

    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The namespace's handle, for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.netns)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        // Deleting the host side destroys the pair even while a socket still holds the
        // namespace open; the namespace itself goes with its last user.
        ip_blocking(&["link", "delete", &self.veth_host]);
        ip_blocking(&["netns", "delete", &self.netns]);
    }
}

/// Moves the calling thread (or forked child) into the network namespace `fd` refers to.
/// Only setns(2) is called, which is async-signal-safe, so this may run in `pre_exec`.
pub fn enter(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setns(2) only reads the descriptor; a wrong one is an error, not undefined
    // behaviour.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_run_id_and_fit_interface_names() {
        let id = RunId::new(0x3f_ffff, 0xa);
        assert_eq!(id.to_string(), "3fffffa");
        assert_eq!(id.bridge(), "er3fffffa");
        assert_eq!(id.netns(254), "er3fffffa-254");
        assert_eq!(id.veth_host(254), "er3fffffav254");
        assert_eq!(id.veth_pod(2), "er3fffffap2");
        assert!(id.veth_host(254).len() <= 15 && id.veth_pod(254).len() <= 15);
        for name in [id.bridge(), id.netns(7), id.veth_host(7), id.veth_pod(7)] {
            assert_eq!(RunId::owner_of(&name), Some(id), "{name}");
        }
        assert_eq!(RunId::new(42, 17).to_string(), "00002a1", "seq wraps at 16");
    }

    #[test]
    fn only_our_names_have_an_owner() {
        for other in [
            "eth0",
            "lo",
            "erXYZ",
            "er00002a",
            "er00002a1x3",
            "er00002a1-",
            "er00002A1",
            "er00002a1-3a",
            "bridge0",
        ] {
            assert_eq!(RunId::owner_of(other), None, "{other}");
        }
        assert_eq!(RunId::owner_of("er00002a1p12").map(|id| id.pid()), Some(42));
    }

    #[test]
    fn used_subnets_come_from_routes_and_addresses() {
        let routes = "default via 192.0.2.1 dev eth0\n\
                      10.244.7.0/24 dev er0000011 proto kernel scope link src 10.244.7.1 linkdown\n\
                      10.2.0.0/16 dev x\n";
        let addrs = "5: er0000021    inet 10.244.9.1/24 scope global er0000021\\ valid_lft forever";
        let mut used = used_octets(routes);
        used.extend(used_octets(addrs));
        assert_eq!(used, BTreeSet::from([7, 9]));
        assert_eq!(free_octet(&used, 7), Some(8));
        assert_eq!(free_octet(&used, 9), Some(10));
        assert_eq!(free_octet(&used, 0), Some(0));
        let all: BTreeSet<u8> = (0..=u8::MAX).collect();
        assert_eq!(free_octet(&all, 3), None);
        let almost: BTreeSet<u8> = (0..u8::MAX).collect();
        assert_eq!(free_octet(&almost, 3), Some(255), "wraps around");
    }

    #[test]
    fn ip_listings_parse() {
        assert_eq!(
            netns_names("er00002a1-3 (id: 1)\ner00002a1-2\n"),
            ["er00002a1-3", "er00002a1-2"]
        );
        let links = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536\n\
                     7: er00002a1v3@if6: <BROADCAST> mtu 1500 master er00002a1\n\
                     8: er00002a1: <BROADCAST,MULTICAST> mtu 1500\n";
        assert_eq!(link_names(links), ["lo", "er00002a1v3", "er00002a1"]);
    }
}
