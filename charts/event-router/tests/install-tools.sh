#!/usr/bin/env bash
# Installs the tools the chart tests need beyond tests/infra/install.sh, into the tools cache:
#   $EVENTROUTER_TOOLS/bin/dashboard-lint   built from ./dashboard-lint (Go module proxy: the
#                                           Grafana Foundation SDK's schema-generated decoder)
#   $EVENTROUTER_TOOLS/chart-node/node_modules/@kubernetes-models/prometheus-operator
#                                           (npm: JSON schemas of the Prometheus Operator CRDs)
# Idempotent: does nothing when both are present and current. Needs go and npm.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
EVENTROUTER_TOOLS="${EVENTROUTER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/event-router-tools}"
bin="$EVENTROUTER_TOOLS/bin"
node_dir="$EVENTROUTER_TOOLS/chart-node"
PROMETHEUS_OPERATOR_MODELS_VERSION="${PROMETHEUS_OPERATOR_MODELS_VERSION:-6.0.0}"
mkdir -p "$bin" "$node_dir"

log() { printf '[chart-tools] %s\n' "$*" >&2; }
die() { printf '[chart-tools] ERROR: %s\n' "$*" >&2; exit 1; }

for dir in /usr/local/go/bin "$HOME/go/bin"; do
  [[ -d "$dir" && ":$PATH:" != *":$dir:"* ]] && PATH="$PATH:$dir"
done

# dashboard-lint: rebuilt when its source changed (the stamp is a hash of the source files).
stamp="$(cat "$here/dashboard-lint/go.mod" "$here/dashboard-lint/go.sum" "$here/dashboard-lint/main.go" | sha256sum | cut -c1-16)"
if [[ -x "$bin/dashboard-lint" && "$(cat "$bin/.dashboard-lint.stamp" 2>/dev/null)" == "$stamp" ]]; then
  log "dashboard-lint is current"
else
  command -v go >/dev/null || die "go is required to build dashboard-lint"
  log "building dashboard-lint"
  (cd "$here/dashboard-lint" && go build -trimpath -o "$bin/dashboard-lint" .) || die "building dashboard-lint failed"
  echo "$stamp" >"$bin/.dashboard-lint.stamp"
fi

pkg="$node_dir/node_modules/@kubernetes-models/prometheus-operator/package.json"
if [[ -f "$pkg" ]] && grep -q "\"version\": \"$PROMETHEUS_OPERATOR_MODELS_VERSION\"" "$pkg"; then
  log "@kubernetes-models/prometheus-operator $PROMETHEUS_OPERATOR_MODELS_VERSION is current"
else
  command -v npm >/dev/null || die "npm is required to install @kubernetes-models/prometheus-operator"
  log "installing @kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION"
  npm install --prefix "$node_dir" --no-audit --no-fund --silent \
    "@kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION" ||
    die "npm install @kubernetes-models/prometheus-operator failed"
fi
log "chart tools ready: $bin/dashboard-lint, $node_dir/node_modules"
