//! The real binary under a low open-files limit: an oversized `--max-connections` is clamped
//! (and says so), and once `accept` fails for lack of descriptors new clients get a 503 answer
//! instead of hanging in the accept queue, and the accept counters move.

mod support;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use event_service::fd_budget::FD_HEADROOM;
use serde_json::Value;
use support::{WAIT, get, metric_value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

/// The open-files limit (soft and hard) the service runs with.
const OPEN_FILES: u64 = 200;

struct Service {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Log lines up to the "started" line.
    startup_log: Vec<Value>,
}

/// Starts the binary through `sh` with `ulimit -n`, and reads its JSON log until it has started.
async fn start_limited(args: &[&str]) -> Service {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {OPEN_FILES} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_event-service"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--source",
            "memory",
            "--log-format",
            "json",
            "--log",
            "info",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run the event-service binary");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut startup_log = Vec::new();
    let started = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the service starts in time")
            .expect("read the log")
            .expect("the service exited before starting");
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let fields = entry["fields"].clone();
        startup_log.push(entry);
        if fields["message"] == "event service started" {
            break fields;
        }
    };
    // Keep draining the log so the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = |key: &str| {
        started[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {key} address in {started}"))
    };
    Service {
        addr: addr("listen"),
        admin: addr("admin"),
        child,
        startup_log,
    }
}

/// Reads what the server sends on `stream` until it closes, within `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn out_of_file_descriptors_clamps_max_connections_and_answers_503() {
    let mut service =
        start_limited(&["--max-connections", "200000", "--handshake-timeout", "60s"]).await;
    let effective = OPEN_FILES - FD_HEADROOM;

    // The clamp is logged loudly and the gauge shows what the instance really serves.
    let clamp = service
        .startup_log
        .iter()
        .find(|e| e["level"] == "WARN" && e["fields"]["effective"] == effective)
        .unwrap_or_else(|| panic!("no clamp warning in {:#?}", service.startup_log));
    let message = clamp["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--max-connections 200000") && message.contains(&effective.to_string()),
        "{message}"
    );
    let (status, metrics) = get(&format!("http://{}/metrics", service.admin)).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&metrics, "eventrouter_max_connections", ""),
        Some(effective as f64)
    );

    // Idle connections (no request yet) each hold a descriptor until the process runs out.
    let mut idle = Vec::new();
    for _ in 0..OPEN_FILES + 50 {
        idle.push(TcpStream::connect(service.addr).await.expect("connect"));
    }
    // The ones past the limit are answered 503 and closed; the others wait for their request.
    let mut shed = 0;
    for stream in &mut idle {
        if let Some(answer) = read_answer(stream, Duration::from_millis(20)).await {
            assert!(
                answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{answer:?}"
            );
            shed += 1;
        }
    }
    assert!(shed > 0, "no connection was answered 503");

    // A new client gets its 503 promptly, with Retry-After, rather than hanging.
    let mut client = TcpStream::connect(service.addr).await.expect("connect");
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let answer = read_answer(&mut client, Duration::from_secs(5))
        .await
        .expect("a new client is answered, not left hanging");
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");

    // Free descriptors: the service serves again and its counters show what happened.
    drop(idle);
    let scrape = format!("http://{}/metrics", service.admin);
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        match eventrouter_test_support::http::get(&scrape).await {
            Ok(response) if response.status == 200 => break response.text(),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "the admin port does not answer again: {:?}",
                other.map(|r| r.status)
            ),
        }
    };
    let value = |name, labels| metric_value(&metrics, name, labels).unwrap_or(-1.0);
    assert!(
        value("eventrouter_accept_errors_total", r#"kind="no_fd""#) >= 1.0,
        "{metrics}"
    );
    assert!(
        value("eventrouter_accept_shed_total", "") >= f64::from(shed + 1),
        "{metrics}"
    );
    let (status, _) = get(&format!("http://{}/healthz", service.addr)).await;
    assert_eq!(status, 200);

    service.child.kill().await.expect("stop the service");
}
