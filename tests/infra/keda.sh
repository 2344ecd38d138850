#!/usr/bin/env bash
# KEDA (operator + metrics API server) for the tests: built from the Go module proxy, started
# against the test control plane on 127.0.0.1, registered as the external metrics API.
#
#   keda.sh build     build keda-operator and keda-adapter $KEDA_VERSION into $EVENTROUTER_TOOLS/bin
#                     (once; later runs find them at the wanted version and return at once)
#   keda.sh start     install KEDA's CRDs, start the operator and the metrics API server, register
#                     the APIService v1beta1.external.metrics.k8s.io, wait until it is Available
#   keda.sh stop      unregister the APIService, stop both processes
#   keda.sh status    exit 0 when both processes run and the APIService is Available
#
# start/stop work on the control plane of control-plane.sh (same $EVENTROUTER_CONTROL_PLANE_DIR),
# which calls them itself when the binaries are built. Logs, certificates and PIDs live in
# $EVENTROUTER_CONTROL_PLANE_DIR/keda. Everything listens on 127.0.0.1 on free ports, except the
# metrics API server's own /metrics endpoint, which KEDA binds on all interfaces (its --port flag
# takes no address); nothing sends traffic to it.
#
# How KEDA is wired without a cluster network:
# - both processes use the control plane's admin kubeconfig (POD_NAMESPACE and
#   KEDA_CLUSTER_OBJECT_NAMESPACE=keda, which in a pod come from the service-account mount);
# - the operator serves its gRPC metrics service on 127.0.0.1, the metrics API server reaches it
#   there (--metrics-service-address); their mutual TLS uses one certificate, signed by the
#   control plane's CA for 127.0.0.1, in the cert dir both read (ca.crt, tls.crt, tls.key);
#   certificate rotation is off;
# - the APIService v1beta1.external.metrics.k8s.io points at Service keda/keda-metrics-apiserver
#   of type ExternalName 127.0.0.1 and at the metrics API server's port: the API server proxies
#   to https://127.0.0.1:PORT (verifying the certificate for keda-metrics-apiserver.keda.svc).
#   An ordinary Service with an EndpointSlice cannot do it: EndpointSlice validation refuses
#   loopback addresses, and a ClusterIP has no kube-proxy behind it here.
#
# Why a wrapper module: KEDA's go.mod carries a `replace` directive, which `go install pkg@version`
# refuses. The wrapper requires github.com/kedacore/keda/v2 and repeats its replace lines, then
# builds cmd/operator and cmd/adapter (main packages, so they are added with `go get`, not
# imported). The CRDs come from the same module in Go's module cache (config/crd/bases).
source "$(dirname "$0")/common.sh"

KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
KEDA_MODULE=github.com/kedacore/keda/v2
bin="$EVENTROUTER_TOOLS/bin"
work="$EVENTROUTER_TOOLS/src"

keda_have_version() { # BINARY
  # The operator and the adapter print nothing useful on --version; the build stamps a file.
  [[ -x "$bin/$1" && -f "$bin/$1.version" && "$(cat "$bin/$1.version")" == "$KEDA_VERSION" ]]
}

# Prints the module's folder in Go's module cache (downloading it when needed).
keda_module_dir() {
  local dir
  dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$KEDA_MODULE@$KEDA_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  [[ -d "$dir" ]] || die "could not download $KEDA_MODULE@$KEDA_VERSION"
  printf '%s\n' "$dir"
}

cmd_build() {
  command -v go >/dev/null || die "go is required to build KEDA (Go >= 1.26 on PATH)"
  mkdir -p "$work"
  exec 8>"$work/.keda-build.lock"
  flock 8
  keda_have_version keda-operator && keda_have_version keda-adapter && return
  log "building KEDA $KEDA_VERSION (operator, metrics API server) from the Go module proxy (first run only; long on 2 cores)"
  local t0=$SECONDS
  local dir="$work/keda-$KEDA_VERSION"
  local moddir
  moddir="$(keda_module_dir)"
  rm -rf "$dir"
  mkdir -p "$dir"
  {
    echo "module eventrouter.test/keda"
    echo
    echo "go $(sed -n 's/^go //p' "$moddir/go.mod")"
    echo
    # KEDA's own replace and exclude lines: a dependency's are ignored, the main module's apply.
    grep -E '^(replace|exclude) ' "$moddir/go.mod"
  } >"$dir/go.mod"
  local ldflags="-s -w -X $KEDA_MODULE/version.Version=$KEDA_VERSION"
  (
    cd "$dir"
    GOFLAGS=-mod=mod go get "$KEDA_MODULE/cmd/operator@$KEDA_VERSION" "$KEDA_MODULE/cmd/adapter@$KEDA_VERSION"
    for cmd in operator adapter; do
      log "go build $KEDA_MODULE/cmd/$cmd"
      GOFLAGS=-mod=mod nice go build -trimpath -ldflags "$ldflags" -o "$bin/keda-$cmd.tmp" "$KEDA_MODULE/cmd/$cmd"
    done
  ) || die "building KEDA $KEDA_VERSION failed"
  for cmd in operator adapter; do
    mv "$bin/keda-$cmd.tmp" "$bin/keda-$cmd"
    echo "$KEDA_VERSION" >"$bin/keda-$cmd.version"
  done
  log "KEDA $KEDA_VERSION built in $((SECONDS - t0))s"
}


RUN="${EVENTROUTER_CONTROL_PLANE_DIR:-${TMPDIR:-/tmp}/eventrouter-control-plane}"
DIR="$RUN/keda"
PROCESS_DIR="$DIR"
KEDA_NAMESPACE=keda
APISERVICE=v1beta1.external.metrics.k8s.io
START_TIMEOUT="${EVENTROUTER_CONTROL_PLANE_START_TIMEOUT:-180}"

kube() { "$bin/kubectl" --kubeconfig "$RUN/admin.kubeconfig" "$@"; }

# One certificate for both KEDA processes: serving (metrics API, gRPC) and client (gRPC) on
# 127.0.0.1, signed by the control plane's CA, which the APIService's caBundle names.
ensure_certs() {
  local certs="$DIR/certs" pki="$RUN/pki"
  [[ -f "$certs/tls.crt" ]] && return
  mkdir -p "$certs"
  chmod 700 "$certs"
  cp "$pki/ca.crt" "$certs/ca.crt"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$certs/tls.key" 2>/dev/null
  openssl req -new -key "$certs/tls.key" -subj "/CN=keda" -out "$certs/tls.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:keda-operator.$KEDA_NAMESPACE.svc,DNS:keda-operator.$KEDA_NAMESPACE.svc.cluster.local,DNS:keda-metrics-apiserver.$KEDA_NAMESPACE.svc" >"$certs/tls.ext"
  openssl x509 -req -in "$certs/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$certs/tls.ext" -out "$certs/tls.crt" 2>/dev/null
  rm -f "$certs/tls.csr" "$certs/tls.ext"
}

install_crds() {
  local moddir
  moddir="$(keda_module_dir)"
  kube apply --server-side --force-conflicts -f "$moddir/config/crd/bases" >/dev/null ||
    die "applying KEDA's CRDs from $moddir/config/crd/bases failed"
  # kubectl wait fails at once (not waiting) on a CRD that has no conditions yet: retry it.
  retry_for "$START_TIMEOUT" kube wait --for=condition=Established --timeout=5s \
    crd/scaledobjects.keda.sh crd/scaledjobs.keda.sh crd/triggerauthentications.keda.sh \
    crd/clustertriggerauthentications.keda.sh >/dev/null 2>&1 || die "KEDA's CRDs were not established"
}

register_apiservice() { # ADAPTER_PORT
  local port="$1" ca
  ca="$(base64 -w0 "$DIR/certs/ca.crt")"
  kube apply --server-side --force-conflicts -f - >/dev/null <<YAML || die "registering $APISERVICE failed"
apiVersion: v1
kind: Service
metadata:
  name: keda-metrics-apiserver
  namespace: $KEDA_NAMESPACE
spec:
  type: ExternalName
  externalName: 127.0.0.1
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $APISERVICE
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service:
    name: keda-metrics-apiserver
    namespace: $KEDA_NAMESPACE
    port: $port
  caBundle: $ca
YAML
}

cmd_start() {
  [[ -f "$RUN/admin.kubeconfig" && -f "$RUN/pki/ca.key" ]] || die "no control plane in $RUN: run tests/infra/control-plane.sh start first"
  for b in keda-operator keda-adapter kubectl; do
    [[ -x "$bin/$b" ]] || die "$bin/$b is missing: run tests/infra/keda.sh build (or tests/infra/install.sh)"
  done
  mkdir -p "$DIR"
  for name in keda-operator keda-adapter; do
    alive "$name" && die "$name already runs from $DIR (pid $(cat "$DIR/$name.pid")); run: tests/infra/keda.sh stop"
  done
  local t0=$SECONDS
  trap 'cmd_stop >/dev/null 2>&1 || true' EXIT
  ensure_certs
  install_crds
  kube create namespace "$KEDA_NAMESPACE" --dry-run=client -o yaml | kube apply -f - >/dev/null

  local metrics_port health_port grpc_port adapter_port adapter_metrics_port
  read -r metrics_port health_port grpc_port adapter_port adapter_metrics_port <<<"$(free_ports 5)"
  # Out of a pod, the namespaces KEDA would read from the service-account mount are given.
  local env=(env "KUBECONFIG=$RUN/admin.kubeconfig" "POD_NAMESPACE=$KEDA_NAMESPACE"
    "KEDA_CLUSTER_OBJECT_NAMESPACE=$KEDA_NAMESPACE" "WATCH_NAMESPACE=")

  log "starting keda-operator (gRPC metrics service on 127.0.0.1:$grpc_port)"
  spawn keda-operator "${env[@]}" "$bin/keda-operator" \
    --leader-elect=false \
    --metrics-bind-address="127.0.0.1:$metrics_port" \
    --health-probe-bind-address="127.0.0.1:$health_port" \
    --metrics-service-bind-address="127.0.0.1:$grpc_port" \
    --cert-dir="$DIR/certs" \
    --enable-cert-rotation=false \
    --enable-webhook-patching=false \
    --enable-apiservice-patching=false \
    --ca-dir="$DIR/certs" \
    --zap-log-level=info
  wait_for keda-operator "/readyz" curl -fsS --max-time 2 "http://127.0.0.1:$health_port/readyz"

  log "starting keda-adapter (external metrics API on https://127.0.0.1:$adapter_port)"
  spawn keda-adapter "${env[@]}" "$bin/keda-adapter" \
    --secure-port="$adapter_port" \
    --bind-address=127.0.0.1 \
    --cert-dir="$DIR/certs" \
    --tls-cert-file="$DIR/certs/tls.crt" \
    --tls-private-key-file="$DIR/certs/tls.key" \
    --lister-kubeconfig="$RUN/admin.kubeconfig" \
    --authentication-kubeconfig="$RUN/admin.kubeconfig" \
    --authorization-kubeconfig="$RUN/admin.kubeconfig" \
    --metrics-service-address="127.0.0.1:$grpc_port" \
    --port="$adapter_metrics_port" \
    --zap-log-level=info
  wait_for keda-adapter "/readyz" curl -fsS --max-time 2 --cacert "$DIR/certs/ca.crt" "https://127.0.0.1:$adapter_port/readyz"

  register_apiservice "$adapter_port"
  wait_for keda-adapter "$APISERVICE Available" \
    kube wait --for=condition=Available --timeout=2s "apiservice/$APISERVICE"
  trap - EXIT
  log "KEDA $KEDA_VERSION ready in $((SECONDS - t0))s: $APISERVICE Available, logs in $DIR"
}

cmd_stop() {
  [[ -d "$DIR" ]] || return 0
  # First the APIService: while it points at a stopped server, API discovery (helm, kubectl)
  # reports the whole external.metrics.k8s.io group as failing.
  if [[ -f "$RUN/admin.kubeconfig" ]] && [[ -f "$RUN/apiserver.port" ]]; then
    kube delete apiservice "$APISERVICE" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  stop_process keda-adapter
  stop_process keda-operator
}

cmd_status() {
  alive keda-operator && alive keda-adapter &&
    kube wait --for=condition=Available --timeout=1s "apiservice/$APISERVICE" >/dev/null 2>&1
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
