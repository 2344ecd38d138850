module github.com/event-router/event-router/charts/event-router/tests/dashboard-lint

go 1.24

require github.com/grafana/grafana-foundation-sdk/go v0.0.22
