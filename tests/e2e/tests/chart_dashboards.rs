//! The Grafana dashboards are valid dashboard JSON by Grafana's own schema (strictly decoded by
//! `dashboard-lint`, built from `charts/event-router/tests/dashboard-lint` by tests/infra/install.sh) and
//! follow the chart's conventions (datasource variable, namespace/router/pod variables,
//! `$__rate_interval`, a description on every panel). The README documents every panel.

mod chart_support;

use std::process::Command;

use chart_support::*;

/// Each dashboard and the template variables it must offer.
const DASHBOARDS: &[(&str, &str)] = &[
    ("routers.json", "namespace,router,pod"),
    ("operator.json", "namespace,pod"),
];

#[test]
fn dashboards_pass_the_schema_and_convention_linter() {
    for (file, vars) in DASHBOARDS {
        let out = run(Command::new(tool("dashboard-lint"))
            .args(["-vars", vars])
            .arg(chart_dir().join("dashboards").join(file)));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": ok"),
            "{file}"
        );
    }
}

/// A named change that breaks a dashboard, and the report the linter prints for it after
/// `<file>: ` (the whole line, as the pinned linter prints it).
type Mutation = (&'static str, fn(&mut serde_json::Value), &'static str);

#[test]
fn the_linter_rejects_what_grafana_would_reject() {
    // The linter is only worth something if it fails for the right reason: an unknown field, a
    // wrong type and a panel query on a hard-coded datasource each make it report that problem
    // on the file's line and exit 1 (2 would be a usage error, anything else a crash).
    let good: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/operator.json")).expect("dashboard"),
    )
    .expect("JSON");
    let dir =
        std::env::temp_dir().join(format!("eventrouter-dashboard-lint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mutations: [Mutation; 3] = [
        (
            "unknown field",
            |d| d["panelz"] = serde_json::json!([]),
            "schema: Dashboard: unexpected field 'panelz'",
        ),
        (
            "wrong type",
            |d| d["refresh"] = serde_json::json!(30),
            "schema: refresh: json: cannot unmarshal number into Go value of type string",
        ),
        (
            "fixed datasource",
            |d| {
                d["panels"][1]["targets"][0]["datasource"] =
                    serde_json::json!({"type": "prometheus", "uid": "prod"})
            },
            r#"panel 2 "Leader": query A datasource must be ${datasource}"#,
        ),
    ];
    for (what, mutate, expected) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        let path = dir.join("bad.json");
        std::fs::write(&path, serde_json::to_string(&bad).expect("JSON")).expect("write");
        let (code, output) = run_failing(
            Command::new(tool("dashboard-lint"))
                .args(["-vars", "namespace,pod"])
                .arg(&path),
        );
        assert_eq!(
            code,
            Some(1),
            "{what}: the linter did not report a problem:\n{output}"
        );
        let report = format!("{}: {expected}", path.display());
        assert!(
            output.lines().any(|line| line == report),
            "{what}: expected the line `{report}`, got:\n{output}"
        );
        // The untouched dashboard passes, so the failure above is the mutation's.
        assert!(!output.contains(": ok"), "{what}: {output}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_panel_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    for (file, _) in DASHBOARDS {
        let mut titles: Vec<String> = dashboard_queries(&chart_dir().join("dashboards").join(file))
            .into_iter()
            .map(|q| q.panel)
            .collect();
        titles.dedup();
        for title in titles {
            assert!(
                readme.contains(&format!("**{title}**")),
                "README does not document panel `{title}` of {file}"
            );
        }
    }
}
