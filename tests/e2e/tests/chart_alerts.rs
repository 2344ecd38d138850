//! The chart's alerts (`files/alerts.yaml`, embedded verbatim in the PrometheusRule) pass
//! `promtool check rules`, and `promtool test rules` proves every alert fires on its failure and
//! stays quiet on healthy series. A further check makes sure no alert is left without a unit test
//! or a runbook entry in the chart README.

mod chart_support;

use std::process::Command;

use chart_support::*;

fn alert_names() -> Vec<String> {
    let text = std::fs::read_to_string(chart_dir().join("files/alerts.yaml")).expect("alerts.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yaml is YAML");
    doc["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn promtool_checks_the_alert_rules() {
    let out = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(chart_dir().join("files/alerts.yaml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", alert_names().len())),
        "{text}"
    );
}

#[test]
fn promtool_unit_tests_every_alert() {
    let test_file = chart_dir().join("tests/alerts.test.yaml");
    let out = run(Command::new(tool("promtool"))
        .args(["test", "rules"])
        .arg(&test_file));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");

    // Each alert is expected to fire somewhere (non-empty exp_alerts) and to be quiet somewhere.
    let tests: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&test_file).expect("test file"))
            .expect("YAML");
    for alert in alert_names() {
        let cases: Vec<&serde_yaml::Value> = tests["tests"]
            .as_sequence()
            .expect("tests")
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
            .filter(|c| c["alertname"].as_str() == Some(alert.as_str()))
            .collect();
        let fires = cases
            .iter()
            .any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()));
        let quiet = cases
            .iter()
            .any(|c| c["exp_alerts"].as_sequence().is_some_and(Vec::is_empty));
        assert!(
            fires && quiet,
            "{alert} needs a case where it fires and one where it stays quiet"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_entry_in_the_readme() {
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    for alert in alert_names() {
        assert!(
            readme.contains(&format!("### {alert}")),
            "README has no runbook section `### {alert}`"
        );
    }
}
