//! Proves the dedicated-node helper that broker-outage tests rely on: a node of the test's own
//! runs beside the shared one, loses and regains its AMQP listener on stop_app/start_app, keeps
//! durable queues across a restart, and is gone after it is stopped.
//!
//! Run with `tests/run --only infra_` (needs RabbitMQ installed; `tests/run` installs it).

use std::net::TcpStream;
use std::time::Duration;

use eventrouter_e2e::rabbitmq::{DEFAULT_VHOST, RabbitNode, amqp_url};
use eventrouter_e2e::wait::wait_until;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// host:port of an amqp://user:pass@host:port/vhost URL.
fn address(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let after_at = without_scheme
        .rsplit_once('@')
        .map_or(without_scheme, |(_, rest)| rest);
    after_at.split('/').next().unwrap_or(after_at).to_owned()
}

fn accepts_connections(url: &str) -> bool {
    TcpStream::connect(address(url)).is_ok()
}

#[tokio::test]
async fn dedicated_node_stops_restarts_and_keeps_durable_queues() {
    let node = RabbitNode::start("infra-node")
        .await
        .expect("starting a dedicated node");
    assert_ne!(
        address(node.amqp_url()),
        address(&amqp_url()),
        "the dedicated node must not be the shared node"
    );

    let connection = Connection::connect(node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP connection to the dedicated node");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            "durable-probe".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declaring a durable queue");

    node.stop_app().await.expect("stop_app");
    assert!(
        !accepts_connections(node.amqp_url()),
        "AMQP port still open after stop_app"
    );
    wait_until(
        "the client to notice the broker went away",
        Duration::from_secs(30),
        || async { !connection.status().connected() },
    )
    .await;

    node.start_app().await.expect("start_app");
    assert!(
        accepts_connections(node.amqp_url()),
        "AMQP port closed after start_app"
    );

    node.restart().await.expect("restart");
    let management = node.management();
    assert!(
        management
            .queue_exists(DEFAULT_VHOST, "durable-probe")
            .await
            .expect("queue lookup"),
        "durable queue lost across a restart"
    );
    let again = Connection::connect(node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("AMQP connection after the restart");
    drop(again);

    let url = node.amqp_url().to_owned();
    node.stop().await.expect("stopping the node");
    assert!(
        !accepts_connections(&url),
        "AMQP port still open after stop"
    );
}

#[test]
fn address_is_taken_from_the_url() {
    assert_eq!(
        address("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "127.0.0.1:5672"
    );
    assert_eq!(address("amqp://127.0.0.1:1234"), "127.0.0.1:1234");
}
