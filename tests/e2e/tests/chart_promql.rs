//! Every PromQL expression the chart ships runs against a real Prometheus that scraped real event
//! services while this test drove traffic through them, and returns data:
//!
//! - two event-service processes ("pods" A and B) on the RabbitMQ of `EVENTROUTER_TEST_AMQP_URL`,
//!   with WebSocket clients subscribed on each, events published through `POST /publish`, one
//!   upgrade rejected at the connection cap and one client closing;
//! - a Prometheus scraping both admin ports every second, with the `namespace`, `router` and `pod`
//!   target labels the PodMonitor relabeling would add;
//! - every panel query and variable query of `dashboards/routers.json` (variables substituted as
//!   Grafana would) — except the ones on the operator's own metrics, which only have to be
//!   accepted here because `chart_install` runs them against the real operator —, both
//!   prometheus-adapter rules (series query, and metrics query returning one
//!   sample per pod with the right value) and the KEDA trigger queries the operator generates.

mod chart_support;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use chart_support::*;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

const NAMESPACE: &str = "eventrouter-test";
const ROUTER: &str = "events";
/// Pod names shaped like a Deployment's (`<router>-<replicaset hash>-<suffix>`), as KEDA's
/// query pattern expects.
const POD_A: &str = "events-7c9d5b8f6d-abcde";
const POD_B: &str = "events-7c9d5b8f6d-fghij";
/// Clients kept open on each pod (A is capped one above this, so one extra upgrade is rejected).
const CLIENTS_A: usize = 5;
const CLIENTS_B: usize = 3;

struct Router {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn start_router(
    binary: &std::path::Path,
    amqp_url: &str,
    exchange: &str,
    pod: &str,
    max_connections: usize,
) -> Router {
    let mut proc = Proc::spawn(
        Command::new(binary)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args([
                "--source",
                "amqp",
                "--exchange",
                exchange,
                "--declare-exchange",
                "true",
            ])
            .args([
                "--socket-sample-interval",
                "1s",
                "--log-format",
                "json",
                "--log",
                "info",
            ])
            .args([
                "--max-connections",
                &max_connections.to_string(),
                "--drain-duration",
                "1s",
            ])
            .env("EVENTROUTER_AMQP_URL", amqp_url)
            .env("POD_NAME", pod),
    );
    let line = proc.wait_for_line("event service started", Duration::from_secs(30));
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    let addr = |field: &str| -> SocketAddr {
        v["fields"][field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no `{field}` address in {line}"))
    };
    let (listen, admin) = (addr("listen"), addr("admin"));
    eventually(
        Duration::from_secs(30),
        "the router to be ready (broker connected)",
        || {
            (http_request(listen, "GET", eventrouter_contract::http::READYZ_PATH, "").0 == 200)
                .then_some(())
        },
    );
    Router {
        proc,
        listen,
        admin,
    }
}

/// A subscribed client that reads everything it is sent until aborted; returns its task.
async fn subscribed_client(listen: SocketAddr) -> tokio::task::JoinHandle<()> {
    let url = format!("ws://{listen}{}", eventrouter_contract::http::WS_PATH);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket upgrade");
    ws.send(Message::text(
        r#"{"op":"subscribe","id":1,"events":["order.*"]}"#,
    ))
    .await
    .expect("subscribe");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the subscription is acknowledged in time")
            .expect("stream open")
            .expect("a frame");
        if msg
            .to_text()
            .is_ok_and(|t| t.contains(r#""op":"subscribed""#))
        {
            break;
        }
    }
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

#[test]
fn every_dashboard_and_adapter_query_returns_data_from_a_scraped_event_service() {
    let amqp_url = std::env::var("EVENTROUTER_TEST_AMQP_URL").expect(
        "EVENTROUTER_TEST_AMQP_URL is not set: run the suite with tests/run (it starts RabbitMQ)",
    );
    let binary = workspace_binary("event-service", "event-service");
    let exchange = format!("eventrouter-chart-promql-{}", std::process::id());
    let a = start_router(&binary, &amqp_url, &exchange, POD_A, CLIENTS_A + 1);
    let b = start_router(&binary, &amqp_url, &exchange, POD_B, 100);

    let target = |r: &Router, pod: &str| {
        format!(
            "      - targets: ['{}']\n        labels: {{namespace: {NAMESPACE}, router: {ROUTER}, pod: {pod}}}\n",
            r.admin
        )
    };
    let prometheus = Prometheus::start(
        "chart-promql",
        &format!(
            "  - job_name: routers\n    metrics_path: {}\n    static_configs:\n{}{}",
            eventrouter_contract::http::METRICS_PATH,
            target(&a, POD_A),
            target(&b, POD_B)
        ),
    );
    prometheus.wait_targets_up(2);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS_A {
        clients.push(rt.block_on(subscribed_client(a.listen)));
    }
    for _ in 0..CLIENTS_B {
        clients.push(rt.block_on(subscribed_client(b.listen)));
    }
    // One more on A fills its cap; the next upgrade is refused with 503; then the extra one leaves.
    rt.block_on(async {
        let url = format!("ws://{}{}", a.listen, eventrouter_contract::http::WS_PATH);
        let (mut extra, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("the last free slot");
        // Wait until the server counts it (the upgrade completes before the slot is taken).
        extra
            .send(Message::text(r#"{"op":"ping","id":7}"#))
            .await
            .expect("ping");
        while let Some(Ok(m)) = extra.next().await {
            if m.to_text().is_ok_and(|t| t.contains("pong")) {
                break;
            }
        }
        let refused = tokio_tungstenite::connect_async(&url).await;
        assert!(
            refused.is_err(),
            "an upgrade over --max-connections must be refused"
        );
        extra.close(None).await.expect("close");
        while let Some(Ok(_)) = extra.next().await {}
    });

    // Publish for a while through both pods; RabbitMQ routes every event to both pods' queues.
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(12) {
        for r in [&a, &b] {
            let body = format!(
                r#"[{{"event":"order.created","data":{{"n":{n}}}}},{{"event":"order.paid","data":{{"n":{n}}}}}]"#
            );
            let (status, text) = http_request(
                r.listen,
                "POST",
                eventrouter_contract::http::PUBLISH_PATH,
                &body,
            );
            assert!(
                (200..300).contains(&status),
                "publish answered {status}: {text}"
            );
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Deliveries show in Prometheus.
    eventually(
        Duration::from_secs(20),
        "deliveries to show in Prometheus",
        || {
            let r = prometheus.query(r#"sum(rate(eventrouter_deliveries_total[15s])) > 0"#);
            (!r.is_empty()).then_some(())
        },
    );

    let value = |sample: &serde_json::Value| -> f64 {
        sample["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("a sample value")
    };
    // Prometheus has scraped the final state once it counts every published event as received.
    eventually(
        Duration::from_secs(20),
        "Prometheus to count every published event as received",
        || {
            let received =
                prometheus.query(r#"sum(eventrouter_events_received_total{source="amqp"})"#);
            received
                .first()
                .is_some_and(|sample| value(sample) >= n as f64)
                .then_some(())
        },
    );

    // --- every panel query of the routers dashboard ---------------------------------------------
    let dashboard = chart_dir().join("dashboards/routers.json");
    let vars = [
        ("namespace", NAMESPACE),
        ("router", ROUTER),
        ("pod", ".*"),
        ("datasource", "prometheus"),
    ];
    let mut checked = 0;
    let mut on_operator_metrics = Vec::new();
    for q in dashboard_queries(&dashboard) {
        let expr = substitute(&q.expr, &vars);
        if q.expr.contains(OPERATOR_METRIC_PREFIX) {
            // Accepted by Prometheus (`query` panics otherwise); no operator runs here, so these
            // are proven to return data in chart_install.
            prometheus.query(&expr);
            on_operator_metrics.push((q.panel.clone(), q.expr.clone()));
            continue;
        }
        prometheus.query_until_data(&expr, &format!("panel `{}`", q.panel));
        checked += 1;
    }
    eprintln!(
        "{checked} routers-dashboard queries returned data; {} on operator metrics are run by chart_install",
        on_operator_metrics.len()
    );
    let run_by_chart_install: Vec<(String, String)> = routers_queries_on_operator_metrics()
        .into_iter()
        .map(|q| (q.panel, q.expr))
        .collect();
    assert_eq!(
        on_operator_metrics, run_by_chart_install,
        "the routers-dashboard queries left to chart_install must be exactly the ones it runs"
    );
    let panels: Vec<&str> = on_operator_metrics
        .iter()
        .map(|(panel, _)| panel.as_str())
        .collect();
    assert_eq!(
        panels,
        ["Replicas", "Replicas"],
        "only the Replicas panel's current/desired queries read operator metrics"
    );

    // A few values prove the traffic, not just the presence of series.
    let s = |e: &str| substitute(e, &vars);
    let total = prometheus.query(&s(
        r#"sum(eventrouter_connections{namespace=~"$namespace", router=~"$router", pod=~"$pod"})"#,
    ));
    assert_eq!(
        value(&total[0]),
        (CLIENTS_A + CLIENTS_B) as f64,
        "connections over both pods"
    );
    let p50 = prometheus.query(&s(
        r#"histogram_quantile(0.5, sum by (le) (rate(eventrouter_delivery_latency_seconds_bucket{namespace=~"$namespace", router=~"$router", pod=~"$pod"}[1m])))"#,
    ));
    assert!(
        value(&p50[0]).is_finite() && value(&p50[0]) > 0.0,
        "delivery latency p50: {p50:?}"
    );
    let rejected =
        prometheus.query(r#"eventrouter_connections_rejected_total{reason="max_connections"}"#);
    assert!(
        rejected.iter().any(|r| value(r) >= 1.0),
        "the rejected upgrade is counted: {rejected:?}"
    );
    let closed = prometheus.query(r#"sum(eventrouter_disconnects_total{reason="client_closed"})"#);
    assert!(
        value(&closed[0]) >= 1.0,
        "the closing client is counted: {closed:?}"
    );
    let received = prometheus.query(r#"sum(eventrouter_events_received_total{source="amqp"})"#);
    assert!(
        value(&received[0]) >= n as f64,
        "every published event came back from RabbitMQ: {received:?} < {n}"
    );

    // --- the dashboard's variable queries offer our namespace, router and pods ---------------------
    for (name, q) in dashboard_variable_queries(&dashboard) {
        let (query, label) = label_values_query(&substitute(&q, &vars));
        let values: Vec<String> = prometheus
            .query(&query)
            .iter()
            .filter_map(|r| r["metric"][&label].as_str().map(str::to_string))
            .collect();
        let want: &[&str] = match name.as_str() {
            "namespace" => &[NAMESPACE],
            "router" => &[ROUTER],
            "pod" => &[POD_A, POD_B],
            other => panic!("unexpected variable {other}"),
        };
        for w in want {
            assert!(
                values.iter().any(|v| v == w),
                "variable {name} ({query}) lacks {w}: {values:?}"
            );
        }
    }

    // --- prometheus-adapter rules: one sample per pod, with the pod's own value --------------------
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("files/adapter-rules.yaml"))
            .expect("adapter rules"),
    )
    .expect("YAML");
    for rule in rules["rules"].as_sequence().expect("rules") {
        let series_query = rule["seriesQuery"].as_str().expect("seriesQuery");
        let (status, body) = http_request(
            prometheus.addr,
            "GET",
            &format!("/api/v1/series?match[]={}", encode_segment(series_query)),
            "",
        );
        assert_eq!(status, 200, "{body}");
        let series: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let found: Vec<&str> = series["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|s| s["pod"].as_str())
            .collect();
        assert!(
            found.contains(&POD_A) && found.contains(&POD_B),
            "{series_query} finds {found:?}"
        );
        let metric = series["data"][0]["__name__"]
            .as_str()
            .expect("a series name")
            .to_string();
        assert_eq!(
            Some(metric.as_str()),
            rule["name"]["as"].as_str(),
            "the adapter exposes the series under its own name"
        );

        // What prometheus-adapter sends for `kubectl get --raw .../namespaces/NS/pods/*/<metric>`.
        let metrics_query = rule["metricsQuery"]
            .as_str()
            .expect("metricsQuery")
            .replace("<<.Series>>", &metric)
            .replace(
                "<<.LabelMatchers>>",
                &format!(r#"namespace="{NAMESPACE}",pod=~"{POD_A}|{POD_B}""#),
            )
            .replace("<<.GroupBy>>", "pod");
        let result = prometheus.query(&metrics_query);
        let mut pods: Vec<&str> = result
            .iter()
            .filter_map(|r| r["metric"]["pod"].as_str())
            .collect();
        pods.sort_unstable();
        assert_eq!(
            pods,
            [POD_A, POD_B],
            "`{metrics_query}` must return exactly one sample per pod: {result:?}"
        );
        if metric == eventrouter_contract::autoscaling::CONNECTIONS_METRIC {
            for r in &result {
                let want = if r["metric"]["pod"] == POD_A {
                    CLIENTS_A
                } else {
                    CLIENTS_B
                };
                assert_eq!(
                    value(r),
                    want as f64,
                    "connections of {}",
                    r["metric"]["pod"]
                );
            }
        }
    }

    // --- the KEDA triggers' queries (as the operator builds them) ----------------------------------
    for metric in [
        eventrouter_contract::autoscaling::CONNECTIONS_METRIC,
        eventrouter_contract::autoscaling::RECV_QUEUE_METRIC,
    ] {
        let query = format!(
            r#"sum({metric}{{namespace="{NAMESPACE}",pod=~"{ROUTER}-[a-z0-9]+-[a-z0-9]+"}})"#
        );
        let result = prometheus.query(&query);
        assert_eq!(result.len(), 1, "`{query}`: {result:?}");
        if metric == eventrouter_contract::autoscaling::CONNECTIONS_METRIC {
            assert_eq!(value(&result[0]), (CLIENTS_A + CLIENTS_B) as f64);
        }
    }

    for c in clients {
        c.abort();
    }
    drop(rt);
    drop(prometheus);
    for r in [a, b] {
        let out = r.proc.output();
        drop(r);
        assert!(
            !out.contains(r#""level":"ERROR""#),
            "the router logged errors:\n{out}"
        );
    }
}
