//! Pod addresses: each running pod gets one address of a /24 — in 127.0.0.0/8 when pods share
//! the host's network (so every pod can listen on the same ports on an address of its own), or
//! the bridge's `10.244.N.0/24` when each pod has a network namespace.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::SpecError;

/// A /24 whose hosts .2 to .254 are handed out to pods.
///
/// Host .1 is left alone (127.0.0.1 is where the control plane and the tests' own services
/// listen; in a bridge's subnet it is the bridge) as is .0. Addresses are handed out round robin, not lowest-free-first: a pod that
/// just ended may leave sockets in TIME_WAIT, and a stale endpoint may still point at it, so a
/// new pod should not inherit its address at once.
#[derive(Debug, Clone)]
pub struct PodAddresses {
    prefix: [u8; 3],
    in_use: BTreeSet<u8>,
    next: u8,
}

const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;

impl PodAddresses {
    pub fn new(subnet: PodSubnet) -> Self {
        Self {
            prefix: subnet.prefix,
            in_use: BTreeSet::new(),
            next: FIRST_HOST,
        }
    }

    /// The next free address, or `None` when all 253 are taken.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let hosts = u16::from(LAST_HOST - FIRST_HOST) + 1;
        for _ in 0..hosts {
            let host = self.next;
            self.next = if host >= LAST_HOST {
                FIRST_HOST
            } else {
                host + 1
            };
            if self.in_use.insert(host) {
                let [a, b, c] = self.prefix;
                return Some(Ipv4Addr::new(a, b, c, host));
            }
        }
        None
    }

    /// Gives an address back; addresses outside the subnet are ignored.
    pub fn release(&mut self, ip: Ipv4Addr) {
        let [a, b, c, host] = ip.octets();
        if [a, b, c] == self.prefix {
            self.in_use.remove(&host);
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }
}

/// A /24 network: parsed from `127.x.y.0/24` (only loopback subnets are accepted from the
/// command line), or a bridge's subnet ([`PodSubnet::from_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSubnet {
    prefix: [u8; 3],
}

impl PodSubnet {
    /// The /24 whose addresses start with `prefix`.
    pub fn from_prefix(prefix: [u8; 3]) -> Self {
        Self { prefix }
    }

    pub fn network(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 0)
    }
}

impl Default for PodSubnet {
    fn default() -> Self {
        Self {
            prefix: [127, 0, 0],
        }
    }
}

impl FromStr for PodSubnet {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || SpecError::PodSubnet(text.to_owned());
        let (network, bits) = text.split_once('/').ok_or_else(invalid)?;
        let network: Ipv4Addr = network.parse().map_err(|_| invalid())?;
        let [a, b, c, d] = network.octets();
        if bits != "24" || a != 127 || d != 0 {
            return Err(invalid());
        }
        Ok(Self { prefix: [a, b, c] })
    }
}

impl std::fmt::Display for PodSubnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/24", self.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_addresses_from_dot_two_round_robin() {
        let mut pool = PodAddresses::new(PodSubnet::default());
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 0, 3)));
        pool.release(Ipv4Addr::new(127, 0, 0, 2));
        // The released .2 is not reused while later addresses are free.
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 0, 0, 4)));
        assert_eq!(pool.in_use(), 2);
    }

    #[test]
    fn wraps_around_and_reports_exhaustion() {
        let subnet: PodSubnet = "127.9.8.0/24".parse().expect("valid subnet");
        let mut pool = PodAddresses::new(subnet);
        let all: Vec<_> = std::iter::from_fn(|| pool.allocate()).collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all[0], Ipv4Addr::new(127, 9, 8, 2));
        assert_eq!(all[252], Ipv4Addr::new(127, 9, 8, 254));
        assert_eq!(pool.allocate(), None);
        pool.release(Ipv4Addr::new(127, 9, 8, 100));
        pool.release(Ipv4Addr::new(10, 0, 0, 100)); // not ours: ignored
        assert_eq!(pool.allocate(), Some(Ipv4Addr::new(127, 9, 8, 100)));
    }

    #[test]
    fn subnets_must_be_a_loopback_slash_24() {
        assert_eq!(
            "127.1.2.0/24".parse::<PodSubnet>().map(|s| s.to_string()),
            Ok("127.1.2.0/24".to_owned())
        );
        for bad in [
            "10.0.0.0/24",
            "127.0.0.0/16",
            "127.0.0.1/24",
            "127.0.0.0",
            "x/24",
        ] {
            assert!(bad.parse::<PodSubnet>().is_err(), "{bad} accepted");
        }
    }
}
