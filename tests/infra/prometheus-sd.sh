#!/usr/bin/env bash
# A Prometheus that can discover targets in Kubernetes, for the autoscaling-loop test.
#
#   prometheus-sd.sh build   build Prometheus $PROMETHEUS_SD_VERSION into
#                            $EVENTROUTER_TOOLS/bin/prometheus-k8s (once; later runs find it at
#                            the wanted version and return at once)
#
# Why a second Prometheus: Debian's package (2.42, used by the chart and dashboard tests) is built
# without `kubernetes_sd_configs`, and the loop test must discover the router's pods the way the
# chart's ServiceMonitor does, through the API server. Prometheus's module has no `replace`
# directive, so `go install pkg@version` builds it straight from the Go module proxy. The build
# tags keep only the discovery mechanisms the test uses (`remove_all_sd` drops all of them but
# file and HTTP, `enable_kubernetes_sd` adds Kubernetes back), which saves most of the build.
# The web UI's assets are not built in; the HTTP API the tests use does not need them.
source "$(dirname "$0")/common.sh"

PROMETHEUS_SD_VERSION="${PROMETHEUS_SD_VERSION:-v0.316.0}" # Prometheus 3.16.0
PROMETHEUS_MODULE=github.com/prometheus/prometheus
bin="$EVENTROUTER_TOOLS/bin"

have_version() {
  [[ -x "$bin/prometheus-k8s" && -f "$bin/prometheus-k8s.version" &&
    "$(cat "$bin/prometheus-k8s.version")" == "$PROMETHEUS_SD_VERSION" ]]
}

cmd_build() {
  command -v go >/dev/null || die "go is required to build Prometheus (Go >= 1.26 on PATH)"
  mkdir -p "$EVENTROUTER_TOOLS/src"
  exec 8>"$EVENTROUTER_TOOLS/src/.prometheus-sd-build.lock"
  flock 8
  have_version && return
  log "building Prometheus $PROMETHEUS_SD_VERSION with Kubernetes discovery from the Go module proxy (first run only)"
  local t0=$SECONDS gobin
  gobin="$(mktemp -d)"
  # Module v0.MMNN.P is Prometheus MM.NN.P (v0.316.0 is 3.16.0).
  local minor="${PROMETHEUS_SD_VERSION#v0.}" release
  release="$((${minor%%.*} / 100)).$((${minor%%.*} % 100)).${minor#*.}"
  GOBIN="$gobin" GOFLAGS=-mod=mod nice go install -trimpath \
    -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release" \
    "$PROMETHEUS_MODULE/cmd/prometheus@$PROMETHEUS_SD_VERSION" ||
    { rm -rf "$gobin"; die "building Prometheus $PROMETHEUS_SD_VERSION failed"; }
  install -m 0755 "$gobin/prometheus" "$bin/prometheus-k8s.tmp"
  mv "$bin/prometheus-k8s.tmp" "$bin/prometheus-k8s"
  rm -rf "$gobin"
  echo "$PROMETHEUS_SD_VERSION" >"$bin/prometheus-k8s.version"
  log "Prometheus $PROMETHEUS_SD_VERSION built in $((SECONDS - t0))s"
}

case "${1:-}" in
  build) cmd_build ;;
  *) die "usage: $0 build" ;;
esac
