#!/usr/bin/env bash
# Runs a real Kubernetes control plane for the tests: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler, all on 127.0.0.1, from the binaries built by
# build-control-plane.sh.
#
#   control-plane.sh start    start them all (fails if they already run), wait until ready,
#                             print `export EVENTROUTER_TEST_KUBECONFIG=...` on stdout
#   control-plane.sh stop     stop them (reverse order) and delete etcd's data
#   control-plane.sh env      print the export line again
#   control-plane.sh status   exit 0 when the API server answers /readyz
#
# Everything lives in $EVENTROUTER_CONTROL_PLANE_DIR (default ${TMPDIR:-/tmp}/eventrouter-control-plane);
# point it elsewhere to run a second control plane side by side. Certificates and service-account
# keys are generated with openssl on first use and kept in that directory; etcd's data is not.
#
# There is no kubelet: objects are stored, validated, admitted and reconciled by the controllers
# (deployments make replica sets, replica sets make pods, the garbage collector follows owner
# references, namespaces are finalized), and the scheduler binds pods to whatever Nodes exist —
# none, unless a test runs the process kubelet (tests/kubelet), whose Node is tainted so that
# only pods of namespaces that opt in land there (PodNodeSelector and PodTolerationRestriction
# are enabled for that). The apiserver's aggregation layer is configured (front-proxy CA, client
# certificate, requestheader flags), so an APIService such as KEDA's external metrics works.
#
# KEDA (operator and external metrics API server, keda.sh) starts with the control plane when
# its binaries are built (install.sh builds them); EVENTROUTER_CONTROL_PLANE_KEDA=0 leaves it out.
#
# The horizontal pod autoscaler controller is off, so tests can play the autoscaler themselves;
# EVENTROUTER_CONTROL_PLANE_HPA_SYNC_PERIOD=5s turns it on with that sync period.
source "$(dirname "$0")/common.sh"

RUN="${EVENTROUTER_CONTROL_PLANE_DIR:-${TMPDIR:-/tmp}/eventrouter-control-plane}"
PKI="$RUN/pki"
PROCESS_DIR="$RUN"
BIN="$EVENTROUTER_TOOLS/bin"
START_TIMEOUT="${EVENTROUTER_CONTROL_PLANE_START_TIMEOUT:-180}"
HPA_SYNC_PERIOD="${EVENTROUTER_CONTROL_PLANE_HPA_SYNC_PERIOD:-}"
WITH_KEDA="${EVENTROUTER_CONTROL_PLANE_KEDA:-1}"
KEDA_SCRIPT="$(dirname "$0")/keda.sh"
# Service IPs are only allocated, never routed; the first one names the `kubernetes` service.
SERVICE_CIDR=10.96.0.0/16
SERVICE_FIRST_IP=10.96.0.1
ADMIN_KUBECONFIG="$RUN/admin.kubeconfig"

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_binaries() {
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing: run tests/infra/build-control-plane.sh (or tests/infra/install.sh)"
  done
  command -v openssl >/dev/null || die "openssl is missing: apt-get install -y openssl"
  command -v curl >/dev/null || die "curl is missing: apt-get install -y curl"
}

# --- certificates -------------------------------------------------------------------------------

# Makes a self-signed CA NAME.key, NAME.crt. Args: NAME COMMON_NAME.
make_ca() {
  local name="$1" cn="$2"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$name.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/$name.key" -subj "/CN=$cn" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/$name.crt"
}

# Makes a key pair NAME.key and a certificate NAME.crt signed by CA (default: the test CA).
# Args: NAME SUBJECT EXTENSIONS [CA].
sign_cert() {
  local name="$1" subject="$2" extensions="$3" ca="${4:-ca}"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr"
  printf '%s\n' "$extensions" >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

ensure_pki() {
  [[ -f "$PKI/complete-v3" ]] && return
  log "generating a test CA, serving and client certificates, service-account keys in $PKI"
  rm -rf "$PKI"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  make_ca ca eventrouter-test-ca
  # A CA of its own for the front proxy: an aggregated API server trusts the user names in
  # request headers only from clients of this CA, never from any client of the cluster CA.
  make_ca front-proxy-ca eventrouter-test-front-proxy-ca
  sign_cert apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:::1,IP:$SERVICE_FIRST_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  local client="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  # Group system:masters is bound to cluster-admin by the API server's bootstrap policy.
  sign_cert admin "/O=system:masters/CN=eventrouter-test-admin" "$client"
  # The controller manager's own identity; RBAC's bootstrap roles grant it what it needs, and it
  # mints a service-account token per controller (--use-service-account-credentials).
  sign_cert controller-manager "/CN=system:kube-controller-manager" "$client"
  sign_cert scheduler "/CN=system:kube-scheduler" "$client"
  # The API server's identity when it proxies to aggregated API servers (e.g. a metrics adapter).
  sign_cert front-proxy-client "/CN=front-proxy-client" "$client" front-proxy-ca
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub"
  touch "$PKI/complete-v3"
}

# Writes a kubeconfig with embedded credentials, so it can be copied or read by any client.
write_kubeconfig() { # FILE USER PORT
  local file="$1" user="$2" port="$3"
  local ca cert key
  ca="$(base64 -w0 "$PKI/ca.crt")"
  cert="$(base64 -w0 "$PKI/$user.crt")"
  key="$(base64 -w0 "$PKI/$user.key")"
  (umask 077 && cat >"$file" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: eventrouter-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca
users:
- name: $user
  user:
    client-certificate-data: $cert
    client-key-data: $key
contexts:
- name: eventrouter-test
  context:
    cluster: eventrouter-test
    user: $user
current-context: eventrouter-test
YAML
  )
}

# --- processes (spawn, alive, wait_for, stop_process: common.sh) ----------------------------------

apiserver_ready() {
  curl -fsS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$(cat "$RUN/apiserver.port")/readyz"
}

print_env() {
  printf 'export EVENTROUTER_TEST_KUBECONFIG=%q\n' "$ADMIN_KUBECONFIG"
}

cmd_start() {
  need_binaries
  mkdir -p "$RUN"
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    alive "$name" && die "$name already runs from $RUN (pid $(cat "$RUN/$name.pid")); run: tests/infra/control-plane.sh stop"
  done
  ensure_pki
  # Anything that fails below (die exits) leaves no half-started control plane behind.
  trap 'cmd_stop >/dev/null 2>&1 || true' EXIT

  local etcd_port etcd_peer_port api_port kcm_port scheduler_port
  read -r etcd_port etcd_peer_port api_port kcm_port scheduler_port <<<"$(free_ports 5)"
  echo "$api_port" >"$RUN/apiserver.port"

  rm -rf "$RUN/etcd-data"
  log "starting etcd on 127.0.0.1:$etcd_port"
  # --unsafe-no-fsync: the data is thrown away after the run; fsync would only slow tests down.
  spawn etcd "$BIN/etcd" \
    --name=eventrouter-test \
    --data-dir="$RUN/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster="eventrouter-test=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync \
    --log-level=warn
  wait_for etcd "health" curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health"

  log "starting kube-apiserver on https://127.0.0.1:$api_port"
  # The requestheader/proxy-client flags let aggregated API servers (metrics adapters) be
  # registered. Aggregator routing is off: an APIService's Service is of type ExternalName
  # (127.0.0.1) here, which only the Service-based resolver follows (see keda.sh).
  spawn kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --cert-dir="$RUN/apiserver-certs" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --enable-admission-plugins=PodNodeSelector,PodTolerationRestriction \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=false \
    --profiling=false
  wait_for kube-apiserver "/readyz" apiserver_ready

  write_kubeconfig "$ADMIN_KUBECONFIG" admin "$api_port"
  write_kubeconfig "$RUN/controller-manager.kubeconfig" controller-manager "$api_port"
  write_kubeconfig "$RUN/scheduler.kubeconfig" scheduler "$api_port"

  local controllers='*,-horizontalpodautoscaling' hpa_flags=()
  if [[ -n "$HPA_SYNC_PERIOD" ]]; then
    controllers='*'
    hpa_flags=(--horizontal-pod-autoscaler-sync-period="$HPA_SYNC_PERIOD")
    log "starting kube-controller-manager (all controllers; horizontal pod autoscaler every $HPA_SYNC_PERIOD)"
  else
    log "starting kube-controller-manager (all controllers but the horizontal pod autoscaler)"
  fi
  spawn kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$RUN/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$RUN/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$RUN/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$kcm_port" \
    --cert-dir="$RUN/controller-manager-certs" \
    --controllers="$controllers" \
    "${hpa_flags[@]}" \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" \
    --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --leader-elect=false \
    --profiling=false
  wait_for kube-controller-manager "/healthz" curl -fsSk --max-time 2 "https://127.0.0.1:$kcm_port/healthz"

  log "starting kube-scheduler"
  spawn kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$RUN/scheduler.kubeconfig" \
    --authentication-kubeconfig="$RUN/scheduler.kubeconfig" \
    --authorization-kubeconfig="$RUN/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$scheduler_port" \
    --cert-dir="$RUN/scheduler-certs" \
    --leader-elect=false \
    --profiling=false
  wait_for kube-scheduler "/healthz" curl -fsSk --max-time 2 "https://127.0.0.1:$scheduler_port/healthz"

  if [[ "$WITH_KEDA" != 0 ]]; then
    if [[ -x "$BIN/keda-operator" && -x "$BIN/keda-adapter" ]]; then
      "$KEDA_SCRIPT" start >&2
    else
      log "KEDA is not built (tests/infra/keda.sh build): starting without it"
    fi
  fi
  trap - EXIT
  log "control plane ready: kubeconfig $ADMIN_KUBECONFIG, logs in $RUN"
  print_env
}

cmd_stop() {
  [[ -d "$RUN" ]] || return 0
  "$KEDA_SCRIPT" stop || true
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_process "$name"
  done
  rm -rf "$RUN/etcd-data" "$RUN/apiserver.port"
}

[[ $# -eq 1 ]] || usage
case "$1" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) [[ -f "$ADMIN_KUBECONFIG" ]] || die "no control plane was started in $RUN"; print_env ;;
  status) [[ -f "$RUN/apiserver.port" ]] && apiserver_ready >/dev/null 2>&1 ;;
  *) usage ;;
esac
