//! The Pod's readiness and liveness probes, run by the kubelet against the pod's own address:
//! HTTP GET (2xx/3xx is success) and TCP connect, with Kubernetes' timing and thresholds.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::SpecError;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Http { port: u16, path: String },
    Tcp { port: u16 },
}

/// A probe with its schedule and thresholds, and its running tally.
#[derive(Debug, Clone)]
pub struct ProbeRunner {
    check: Check,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    next_due: Instant,
    successes: u32,
    failures: u32,
    healthy: bool,
}

impl ProbeRunner {
    /// The runner for `probe` of `container`; `healthy` is the result before the first probe
    /// (false for readiness, true for liveness).
    pub fn new(
        probe: &Probe,
        container: &Container,
        started: Instant,
        healthy: bool,
    ) -> Result<Self, SpecError> {
        let port_of = |port: &IntOrString| resolve_port(port, container);
        let check = if let Some(http) = &probe.http_get {
            if http.scheme.as_deref().is_some_and(|s| s != "HTTP") || http.host.is_some() {
                return Err(SpecError::Unsupported(
                    "httpGet probes with a host or HTTPS".into(),
                ));
            }
            Check::Http {
                port: port_of(&http.port)?,
                path: http.path.clone().unwrap_or_else(|| "/".into()),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Check::Tcp {
                port: port_of(&tcp.port)?,
            }
        } else {
            return Err(SpecError::Unsupported(
                "probes other than httpGet and tcpSocket".into(),
            ));
        };
        let seconds = |value: Option<i32>, default: u64| {
            Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
        };
        let count = |value: Option<i32>| value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        Ok(Self {
            check,
            period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: count(probe.success_threshold).max(1),
            failure_threshold: match count(probe.failure_threshold) {
                0 => 3,
                n => n,
            },
            next_due: started + seconds(probe.initial_delay_seconds, 0),
            successes: 0,
            failures: 0,
            healthy,
        })
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_due
    }

    /// Runs the check against `ip` and returns the (possibly changed) result.
    pub async fn run(&mut self, ip: IpAddr) -> bool {
        self.next_due = Instant::now() + self.period;
        let ok = match &self.check {
            Check::Http { port, path } => http_get(SocketAddr::new(ip, *port), path, self.timeout)
                .await
                .is_ok_and(|code| (200..400).contains(&code)),
            Check::Tcp { port } => {
                tokio::time::timeout(self.timeout, TcpStream::connect(SocketAddr::new(ip, *port)))
                    .await
                    .is_ok_and(|connected| connected.is_ok())
            }
        };
        self.record(ok)
    }

    /// Counts one result; the probe flips after `success_threshold` successes or
    /// `failure_threshold` failures in a row.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= self.success_threshold {
                self.healthy = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= self.failure_threshold {
                self.healthy = false;
            }
        }
        self.healthy
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, SpecError> {
    let number = match port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    };
    number
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| SpecError::Unsupported(format!("probe port {port:?}")))
}

/// One HTTP/1.1 GET; returns the status code.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test-kubelet\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        parse_status(&head).ok_or_else(|| std::io::Error::other("malformed HTTP status line"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "probe timed out"))?
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    use super::*;

    fn container() -> Container {
        Container {
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }
    }

    fn probe(success: i32, failure: i32) -> Probe {
        Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            }),
            success_threshold: Some(success),
            failure_threshold: Some(failure),
            initial_delay_seconds: Some(3),
            ..Probe::default()
        }
    }

    #[test]
    fn named_ports_resolve_through_the_container() {
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &container()),
            Ok(8080)
        );
        assert_eq!(
            resolve_port(&IntOrString::Int(9090), &container()),
            Ok(9090)
        );
        assert!(resolve_port(&IntOrString::String("nope".into()), &container()).is_err());
    }

    #[test]
    fn results_flip_only_after_their_thresholds_and_wait_for_the_initial_delay() {
        let start = Instant::now();
        let mut runner = ProbeRunner::new(&probe(2, 3), &container(), start, false).expect("valid");
        assert_eq!(
            runner.check,
            Check::Http {
                port: 8080,
                path: "/readyz".into()
            }
        );
        assert!(!runner.due(start));
        assert!(runner.due(start + Duration::from_secs(3)));
        assert!(!runner.record(true), "one success of two");
        assert!(runner.record(true));
        assert!(
            runner.record(false) && runner.record(false),
            "two failures of three"
        );
        assert!(!runner.record(false));
        assert!(!runner.record(true));
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\nx"), Some(200));
        assert_eq!(parse_status(b"garbage"), None);
    }
}
