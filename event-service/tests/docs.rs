//! The README's configuration and metrics tables are checked against the code, so they cannot
//! drift: the configuration table must equal the one generated from clap's arguments, and the
//! metrics table must list exactly the metrics `/metrics` exports (plus the AMQP source's).

mod support;

use clap::CommandFactory;
use event_service::config::Config;

const README: &str = include_str!("../README.md");

fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let from = text
        .find(&start)
        .unwrap_or_else(|| panic!("README lacks {start}"))
        + start.len();
    let to = text[from..]
        .find(&end)
        .unwrap_or_else(|| panic!("README lacks {end}"))
        + from;
    text[from..to].trim()
}

/// The configuration table as generated from `Config`'s clap arguments.
fn config_table() -> String {
    let cmd = Config::command();
    let mut out =
        String::from("| Flag | Environment variable | Default | Meaning |\n|---|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let flag = format!(
            "`--{}`",
            arg.get_long().expect("every setting has a long flag")
        );
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "—".into());
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "—".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('|', "\\|");
        out.push_str(&format!("| {flag} | {env} | {default} | {help} |\n"));
    }
    out.trim().to_string()
}

#[test]
fn configuration_table_matches_the_flags() {
    let expected = config_table();
    let actual = section(README, "config-table");
    assert!(
        actual == expected,
        "event-service/README.md's configuration table is stale; replace it with:\n\n{expected}\n"
    );
}

#[test]
fn every_setting_has_an_eventrouter_env_var() {
    for arg in Config::command().get_arguments() {
        let id = arg.get_id().as_str();
        if ["help", "version"].contains(&id) {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{id} has no env var"));
        let env = env.to_string_lossy();
        assert!(
            env.starts_with("EVENTROUTER_") || env == "POD_NAME",
            "{env}"
        );
    }
}

/// Metrics the AMQP source registers (absent with the embedded bus).
const AMQP_ONLY: [&str; 6] = [
    eventrouter_contract::metrics::BROKER_UP,
    eventrouter_contract::metrics::BROKER_RECONNECTS,
    eventrouter_contract::metrics::BROKER_CONNECT_FAILURES,
    eventrouter_contract::metrics::PUBLISH_CONFIRMS,
    eventrouter_contract::metrics::PUBLISH_FAILURES,
    eventrouter_contract::metrics::MALFORMED_MESSAGES,
];

#[tokio::test]
async fn metrics_table_lists_exactly_the_exported_metrics() {
    let server = support::start(|_| {}).await;
    let text = support::metrics_text(&server).await;
    server.stop().await.expect("stop");
    let exported: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with("eventrouter_"))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let table = section(README, "metrics-table");
    let documented: Vec<(String, String)> = table
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cols.get(1)?.trim_matches('`');
            name.starts_with("eventrouter_")
                .then(|| (name.to_string(), cols.get(2).unwrap_or(&"").to_string()))
        })
        .collect();
    for (name, kind) in &exported {
        assert!(
            documented.iter().any(|(n, k)| n == name && k == kind),
            "{name} ({kind}) is exported but not documented with that type"
        );
    }
    for (name, _) in &documented {
        assert!(
            exported.iter().any(|(n, _)| n == name) || AMQP_ONLY.contains(&name.as_str()),
            "{name} is documented but not exported"
        );
    }
}
