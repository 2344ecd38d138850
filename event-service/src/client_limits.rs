//! Per-client limits: open connections and new connections per second for each source address,
//! and a frame rate for each connection (token buckets).
//!
//! Source addresses are grouped the way one client holds them: an IPv4 address alone, an IPv6
//! address by its /64 prefix (one host usually gets a whole /64). The table of addresses is
//! bounded: an entry lives while the address has open connections or its rate bucket is still
//! refilling, idle entries are swept out, and when [`MAX_TRACKED_ADDRESSES`] are tracked at once
//! a new address is refused rather than letting the table grow.
//!
//! The client address is the TCP peer's, or, only when `--trusted-proxy-header` names a header,
//! the last address in that header (the one the trusted proxy itself saw; earlier entries are
//! whatever the client claimed).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Instant,
};

use http::HeaderMap;

/// Most source addresses tracked at once.
pub const MAX_TRACKED_ADDRESSES: usize = 200_000;

/// A token bucket: `rate` tokens per second up to `burst`. Starts full.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: burst as f32,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens as f64 + elapsed * rate).min(burst as f64) as f32;
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// True when the bucket has refilled completely by `now` (it can be forgotten).
    fn full_by(&self, now: Instant, rate: f64, burst: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens as f64 + elapsed * rate >= burst as f64
    }
}

/// The per-address settings.
#[derive(Clone, Copy, Debug)]
pub struct IpLimitSettings {
    /// Most open connections per address (0: no limit).
    pub max_connections: u32,
    /// New connections per second per address (0: no limit).
    pub rate: f64,
    pub burst: u32,
}

impl IpLimitSettings {
    pub fn enabled(&self) -> bool {
        self.max_connections > 0 || self.rate > 0.0
    }
}

/// Why an address may not open another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// It holds the most connections allowed.
    TooMany(u32),
    /// It opens connections too fast.
    TooFast,
    /// The table of addresses is full.
    Busy,
}

struct Entry {
    open: u32,
    bucket: TokenBucket,
}

/// The per-address table.
pub struct IpLimits {
    settings: IpLimitSettings,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// Held by a connection for its life: gives its address's slot back on drop.
pub struct IpSlot {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.limits.lock();
        if let Some(e) = table.get_mut(&self.ip) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// The address a client is counted under (IPv6 by its /64).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client's address: the last entry of `header` when one is configured and parses, else the
/// TCP peer's.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, header: Option<&str>) -> IpAddr {
    let Some(name) = header else {
        return peer;
    };
    headers
        .get_all(name)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| parse_forwarded_ip(v.trim()))
        .unwrap_or(peer)
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:5678`.
fn parse_forwarded_ip(v: &str) -> Option<IpAddr> {
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    v.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

impl IpLimits {
    pub fn new(settings: IpLimitSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            table: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `ip`, or says why it may not open one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        let ip = client_key(ip);
        let s = self.settings;
        let now = Instant::now();
        let mut table = self.lock();
        if !table.contains_key(&ip) && table.len() >= MAX_TRACKED_ADDRESSES {
            table.retain(|_, e| e.open > 0 || !e.bucket.full_by(now, s.rate, s.burst));
            if table.len() >= MAX_TRACKED_ADDRESSES {
                return Err(IpRefusal::Busy);
            }
        }
        let entry = table.entry(ip).or_insert_with(|| Entry {
            open: 0,
            bucket: TokenBucket::full(s.burst, now),
        });
        if s.max_connections > 0 && entry.open >= s.max_connections {
            return Err(IpRefusal::TooMany(s.max_connections));
        }
        if s.rate > 0.0 && !entry.bucket.take(now, s.rate, s.burst) {
            return Err(IpRefusal::TooFast);
        }
        entry.open += 1;
        drop(table);
        Ok(IpSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Forgets addresses with no connection and a full bucket (called periodically).
    pub fn sweep(&self) {
        let s = self.settings;
        let now = Instant::now();
        self.lock()
            .retain(|_, e| e.open > 0 || (s.rate > 0.0 && !e.bucket.full_by(now, s.rate, s.burst)));
    }

    /// Addresses tracked now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(2, t0);
        assert!(b.take(t0, 10.0, 2));
        assert!(b.take(t0, 10.0, 2));
        assert!(!b.take(t0, 10.0, 2));
        assert!(b.take(t0 + Duration::from_millis(100), 10.0, 2));
        assert!(!b.take(t0 + Duration::from_millis(100), 10.0, 2));
        // Never above the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.take(later, 10.0, 2));
        assert!(b.take(later, 10.0, 2));
        assert!(!b.take(later, 10.0, 2));
    }

    #[test]
    fn connections_per_address_and_slots_come_back() {
        let limits = IpLimits::new(IpLimitSettings {
            max_connections: 2,
            rate: 0.0,
            burst: 1,
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = limits.admit(a).expect("first");
        let _s2 = limits.admit(a).expect("second");
        assert_eq!(limits.admit(a).err(), Some(IpRefusal::TooMany(2)));
        let _other = limits.admit(b).expect("another address");
        drop(s1);
        let _s3 = limits.admit(a).expect("a slot came back");
    }

    #[test]
    fn connect_rate_per_address() {
        let limits = IpLimits::new(IpLimitSettings {
            max_connections: 0,
            rate: 1.0,
            burst: 3,
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let slots: Vec<_> = (0..3).map(|_| limits.admit(a).expect("burst")).collect();
        assert_eq!(limits.admit(a).err(), Some(IpRefusal::TooFast));
        drop(slots);
        assert_eq!(
            limits.admit(a).err(),
            Some(IpRefusal::TooFast),
            "closing does not refill"
        );
        limits.sweep();
        assert_eq!(limits.tracked(), 1, "a refilling bucket is remembered");
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_v4_as_v4() {
        let limits = IpLimits::new(IpLimitSettings {
            max_connections: 1,
            rate: 0.0,
            burst: 1,
        });
        let _s = limits
            .admit("2001:db8:1:2::1".parse().expect("ip"))
            .expect("first");
        assert!(
            limits
                .admit("2001:db8:1:2::99".parse().expect("ip"))
                .is_err()
        );
        let _t = limits
            .admit("2001:db8:1:3::1".parse().expect("ip"))
            .expect("another /64");
        let _u = limits
            .admit("::ffff:10.1.1.1".parse().expect("ip"))
            .expect("v4");
        assert!(limits.admit("10.1.1.1".parse().expect("ip")).is_err());
        drop((_s, _t, _u));
        limits.sweep();
        assert_eq!(limits.tracked(), 0, "idle addresses are forgotten");
    }

    #[test]
    fn the_proxy_header_is_read_only_when_configured() {
        let peer: IpAddr = "10.9.9.9".parse().expect("ip");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.1.1.1, 203.0.113.7".parse().expect("header"),
        );
        assert_eq!(client_ip(peer, &h, None), peer);
        assert_eq!(
            client_ip(peer, &h, Some("x-forwarded-for")),
            "203.0.113.7".parse::<IpAddr>().expect("ip")
        );
        h.insert("x-real-ip", "[2001:db8::1]:443".parse().expect("header"));
        assert_eq!(
            client_ip(peer, &h, Some("X-Real-IP")),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        h.insert("x-bad", "not an address".parse().expect("header"));
        assert_eq!(client_ip(peer, &h, Some("x-bad")), peer);
    }
}
