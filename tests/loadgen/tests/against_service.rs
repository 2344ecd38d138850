//! The load generator against the real event service, run in-process on port 0. Small runs whose
//! counts must add up exactly: they prove the header-only frame counting, the handshake and the
//! `/metrics` cross-checks, not performance.

use std::time::Duration;

use clap::Parser as _;
use event_service::{config::Config, server::RunningServer};
use eventrouter_loadgen::{
    cli::{Cli, Scenario},
    fanout, idle,
};

async fn start_service() -> RunningServer {
    RunningServer::start(Config::for_tests())
        .await
        .expect("the event service starts on 127.0.0.1:0")
}

fn parse(args: &[String]) -> Scenario {
    let mut argv = vec!["loadgen".to_owned()];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv)
        .expect("valid loadgen arguments")
        .scenario
}

fn common_flags(server: &RunningServer) -> Vec<String> {
    [
        "--addr",
        &server.addr.to_string(),
        "--admin",
        &server.admin_addr.to_string(),
        "--service-pid",
        &std::process::id().to_string(),
        "--source-ips",
        "2",
        "--connect-concurrency",
        "16",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_established_and_seen_by_the_service() {
    let server = start_service().await;
    let mut args = vec!["idle".to_owned()];
    args.extend(common_flags(&server));
    args.extend(["-n", "40", "--settle", "300ms", "--after-close", "0s"].map(str::to_owned));
    let Scenario::Idle(args) = parse(&args) else {
        panic!("parsed as idle");
    };
    let report = idle::run(&args).await.expect("idle scenario runs");

    assert_eq!(report.established, 40, "failures: {:?}", report.failures);
    assert!(report.failures.is_empty());
    let held = &report.snapshots[1];
    assert_eq!(held.label, "established");
    assert_eq!(
        held.service_connections,
        Some(40.0),
        "the service's own gauge"
    );
    let queues = held.queues.expect("/proc/net/tcp is readable");
    assert_eq!(
        queues.server_side.sockets, 40,
        "server-side sockets on the port"
    );
    assert_eq!(
        queues.client_side.sockets, 40,
        "client-side sockets to the port"
    );
    assert!(held.service_memory.is_some(), "RSS read from /proc");
    assert!(report.rss_per_connection_bytes.is_some());
    assert_eq!(report.closed_by_server, 0);
    assert_eq!(report.unexpected_messages, 0);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_match_what_the_service_delivered() {
    let server = start_service().await;
    let mut args = vec!["fanout".to_owned()];
    args.extend(common_flags(&server));
    args.extend(
        [
            "-s",
            "25",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--batch",
            "5",
            "--publishers",
            "2",
            "--latency-subscribers",
            "3",
            "--drain-timeout",
            "10s",
        ]
        .map(str::to_owned),
    );
    let Scenario::Fanout(args) = parse(&args) else {
        panic!("parsed as fanout");
    };
    let report = tokio::time::timeout(Duration::from_secs(60), fanout::run(&args))
        .await
        .expect("the fan-out run finishes")
        .expect("fan-out scenario runs");

    assert_eq!(report.subscribers, 25);
    assert!(
        report.published_accepted >= 100,
        "published {}",
        report.published_accepted
    );
    assert!(
        report.publish_errors.is_empty(),
        "{:?}",
        report.publish_errors
    );
    assert_eq!(report.received, report.published_accepted * 25);
    assert_eq!(report.missing, 0);
    assert_eq!(report.per_subscriber_min, report.published_accepted);
    assert_eq!(report.per_subscriber_max, report.published_accepted);
    assert!(report.subscribers_closed.is_empty());
    assert!(
        report.latency_samples > 0,
        "latency subscribers read timestamps"
    );
    let service = report.service.expect("metrics scraped before and after");
    assert_eq!(
        service.deliveries, report.received as f64,
        "service deliveries = frames counted"
    );
    assert_eq!(service.events_received, report.published_accepted as f64);
    assert_eq!(service.drops, 0.0);
    assert!(
        report.mean_frame_bytes > 100.0,
        "frames carry the 100-byte data"
    );
    server.stop().await.expect("clean shutdown");
}
