#!/usr/bin/env bash
# Runs isolated RabbitMQ nodes for the tests, side by side, without touching the system service.
#
#   rabbitmq.sh start NODE AMQP_PORT [MGMT_PORT]   start a fresh node (old data of NODE is wiped)
#   rabbitmq.sh stop NODE                          stop the node (the Erlang VM exits)
#   rabbitmq.sh restart NODE                       stop, then start again keeping its data
#   rabbitmq.sh stop_app NODE                      stop the RabbitMQ application, keep the VM
#   rabbitmq.sh start_app NODE                     start the application again and wait for it
#   rabbitmq.sh wait NODE                          wait until the node serves AMQP and HTTP
#   rabbitmq.sh env NODE                           print `export` lines for the node's URLs
#   rabbitmq.sh status NODE                        exit 0 when the node runs, 1 otherwise
#
# Each node gets its own Erlang node name (NODE@localhost), AMQP port, distribution port,
# management port, data and log directories under $EVENTROUTER_RABBITMQ_DIR/NODE (default
# ${TMPDIR:-/tmp}/eventrouter-rabbitmq/NODE), and listens on 127.0.0.1 only. The management
# plugin is enabled offline for that node alone; guest/guest may log in from loopback.
#
# The server and CLI are called from Debian's rabbitmq-server package directly
# (/usr/lib/rabbitmq/bin), as the current user: the /usr/sbin wrappers switch to the
# `rabbitmq` user, whose Erlang cookie and environment would differ from the node's.
# `start` prints the same lines as `env` on stdout; everything else goes to stderr.
source "$(dirname "$0")/common.sh"

RABBITMQ_BIN="${EVENTROUTER_RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
RABBITMQ_BASE="${EVENTROUTER_RABBITMQ_DIR:-${TMPDIR:-/tmp}/eventrouter-rabbitmq}"
# Seconds to wait for a node to boot; a cold node boots in ~5 s on 2 busy cores.
RABBITMQ_START_TIMEOUT="${EVENTROUTER_RABBITMQ_START_TIMEOUT:-120}"

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ -x "$RABBITMQ_BIN/rabbitmq-server" ]] ||
  die "RabbitMQ is not installed ($RABBITMQ_BIN/rabbitmq-server missing): run tests/infra/install.sh (apt-get install rabbitmq-server)"

node_dir() { printf '%s/%s' "$RABBITMQ_BASE" "$1"; }
node_name() { if [[ "$1" == *@* ]]; then printf '%s' "$1"; else printf '%s@localhost' "$1"; fi; }

# The CLI and the VM find each other through the Erlang cookie in $HOME. Create it up front so
# that two nodes started at the same moment do not race to create it.
ensure_cookie() {
  local cookie="$HOME/.erlang.cookie"
  if [[ ! -s "$cookie" ]]; then
    local value
    value="$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Z')"
    (umask 077 && printf '%s' "$value" >"$cookie.$$")
    # mv -n: if another node won the race, keep its cookie.
    mv -n "$cookie.$$" "$cookie"
    rm -f "$cookie.$$"
    chmod 400 "$cookie"
  fi
}

# Exports everything the server and the CLI need to address NODE; values come from node.env,
# written by `start`.
load_node() {
  local node="$1"
  local dir; dir="$(node_dir "$node")"
  [[ -f "$dir/node.env" ]] || die "no RabbitMQ node '$node' was started here (missing $dir/node.env); use: rabbitmq.sh start $node AMQP_PORT"
  # shellcheck disable=SC1091
  source "$dir/node.env"
}

ctl() { "$RABBITMQ_BIN/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@"; }

vm_running() {
  [[ -f "$RABBITMQ_PID_FILE" ]] && kill -0 "$(cat "$RABBITMQ_PID_FILE")" 2>/dev/null
}

print_env() {
  printf 'export EVENTROUTER_TEST_AMQP_URL=%q\n' "amqp://guest:guest@127.0.0.1:$RABBITMQ_NODE_PORT/%2f"
  printf 'export EVENTROUTER_TEST_RABBITMQ_MGMT_URL=%q\n' "http://127.0.0.1:$EVENTROUTER_RABBITMQ_MGMT_PORT"
  printf 'export EVENTROUTER_TEST_RABBITMQ_NODE=%q\n' "$RABBITMQ_NODENAME"
}

# Waits until the application has booted and both listeners accept connections.
wait_node() {
  local node="$1"
  local deadline=$((SECONDS + RABBITMQ_START_TIMEOUT))
  # await_startup fails at once while the VM is not reachable yet, so retry it until it connects.
  until ctl -q await_startup --timeout 10 >/dev/null 2>&1; do
    if ! vm_running; then
      tail -n 30 "$RABBITMQ_LOG_BASE/stdout.log" >&2 2>/dev/null || true
      die "RabbitMQ node $node exited during startup; logs in $RABBITMQ_LOG_BASE"
    fi
    ((SECONDS < deadline)) || die "RabbitMQ node $node did not start within ${RABBITMQ_START_TIMEOUT}s; logs in $RABBITMQ_LOG_BASE"
    sleep 1
  done
  for port in "$RABBITMQ_NODE_PORT" "$EVENTROUTER_RABBITMQ_MGMT_PORT"; do
    retry_for $((deadline - SECONDS > 0 ? deadline - SECONDS : 1)) port_in_use "$port" ||
      die "RabbitMQ node $node booted but nothing listens on 127.0.0.1:$port; logs in $RABBITMQ_LOG_BASE"
  done
}

launch_vm() {
  local node="$1"
  ensure_cookie
  # setsid: the node outlives this script and is not hit by the caller's Ctrl-C / process group.
  setsid "$RABBITMQ_BIN/rabbitmq-server" </dev/null >>"$RABBITMQ_LOG_BASE/stdout.log" 2>&1 &
  # rabbitmq-server execs the Erlang VM, so this is the VM's PID.
  echo $! >"$RABBITMQ_PID_FILE"
  wait_node "$node"
}

cmd_start() {
  local node="$1" amqp_port="$2" mgmt_port="${3:-}"
  [[ "$amqp_port" =~ ^[0-9]+$ ]] || die "AMQP_PORT must be a number, got '$amqp_port'"
  local dir; dir="$(node_dir "$node")"
  if [[ -f "$dir/node.env" ]]; then
    (load_node "$node"; ! vm_running) || die "RabbitMQ node '$node' is already running; stop it first"
  fi
  port_in_use "$amqp_port" && die "port $amqp_port is already in use on 127.0.0.1; choose another AMQP_PORT"
  [[ -n "$mgmt_port" ]] || mgmt_port="$(free_port)"
  port_in_use "$mgmt_port" && die "port $mgmt_port is already in use on 127.0.0.1; choose another MGMT_PORT"
  local dist_port; dist_port="$(free_port)"
  # Erlang node names are global on the machine (registered with epmd): a second VM with the
  # same name would fail to boot, and the CLI would talk to the first one.
  local registered; registered="$(epmd -names 2>/dev/null || true)"
  if [[ "$registered" == *"name ${node%@*} at port "* ]]; then
    die "an Erlang node named ${node%@*} already runs on this machine; choose another NODE name"
  fi

  rm -rf "$dir"
  mkdir -p "$dir/mnesia" "$dir/log"
  # A node of our own must not read the machine-wide /etc/rabbitmq/rabbitmq-env.conf.
  : >"$dir/rabbitmq-env.conf"
  cat >"$dir/rabbitmq.conf" <<CONF
# Generated by tests/infra/rabbitmq.sh for node $node.
listeners.tcp.default = 127.0.0.1:$amqp_port
management.tcp.ip = 127.0.0.1
management.tcp.port = $mgmt_port
# guest/guest may log in, from loopback only (RabbitMQ's default, stated for the reader).
loopback_users.guest = true
log.file.level = info
log.console = false
CONF
  # Offline enable: the node reads this file at boot, nothing needs to be running.
  echo '[rabbitmq_management].' >"$dir/enabled_plugins"
  cat >"$dir/node.env" <<ENV
export RABBITMQ_NODENAME=$(node_name "$node")
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$amqp_port
export RABBITMQ_DIST_PORT=$dist_port
export EVENTROUTER_RABBITMQ_MGMT_PORT=$mgmt_port
export RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
export RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config
export RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
export RABBITMQ_MNESIA_BASE=$dir/mnesia
export RABBITMQ_MNESIA_DIR=$dir/mnesia/node
export RABBITMQ_LOG_BASE=$dir/log
export RABBITMQ_LOGS=$dir/log/rabbit.log
export RABBITMQ_PID_FILE=$dir/pid
# Distribution (node-to-CLI traffic) and epmd on loopback only.
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export ERL_EPMD_ADDRESS=127.0.0.1
# A VM that dies at boot writes its crash dump here, not into the caller's working directory.
export ERL_CRASH_DUMP=$dir/log/erl_crash.dump
ENV
  load_node "$node"
  log "starting RabbitMQ node $RABBITMQ_NODENAME (AMQP 127.0.0.1:$amqp_port, management 127.0.0.1:$mgmt_port, data $dir)"
  launch_vm "$node"
  log "RabbitMQ node $RABBITMQ_NODENAME is up"
  print_env
}

cmd_stop() {
  local node="$1"
  load_node "$node"
  if ! vm_running; then
    log "RabbitMQ node $RABBITMQ_NODENAME is not running"
    rm -f "$RABBITMQ_PID_FILE"
    return 0
  fi
  local pid; pid="$(cat "$RABBITMQ_PID_FILE")"
  log "stopping RabbitMQ node $RABBITMQ_NODENAME (pid $pid)"
  # `stop PIDFILE` returns once the VM process has exited, not merely when the app stopped.
  if ! ctl -q stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1; then
    log "rabbitmqctl stop failed; terminating pid $pid"
    kill "$pid" 2>/dev/null || true
  fi
  await_exit "$pid" 30 "RabbitMQ node $RABBITMQ_NODENAME"
  rm -f "$RABBITMQ_PID_FILE"
}

cmd_restart() {
  local node="$1"
  cmd_stop "$node"
  load_node "$node"
  port_in_use "$RABBITMQ_NODE_PORT" && die "port $RABBITMQ_NODE_PORT was taken while node $node was down"
  log "starting RabbitMQ node $RABBITMQ_NODENAME again with its data"
  launch_vm "$node"
  log "RabbitMQ node $RABBITMQ_NODENAME is up"
}

cmd_stop_app() {
  load_node "$1"
  ctl -q stop_app >/dev/null || die "rabbitmqctl stop_app failed for $RABBITMQ_NODENAME"
  # Wait until clients really lose the AMQP listener, so a test sees the outage it asked for.
  retry_for 30 bash -c "! (exec 3<>/dev/tcp/127.0.0.1/$RABBITMQ_NODE_PORT) 2>/dev/null" ||
    die "AMQP port $RABBITMQ_NODE_PORT still open after stop_app on $RABBITMQ_NODENAME"
  log "RabbitMQ application stopped on $RABBITMQ_NODENAME (VM still running)"
}

cmd_start_app() {
  load_node "$1"
  ctl -q start_app >/dev/null || die "rabbitmqctl start_app failed for $RABBITMQ_NODENAME"
  wait_node "$1"
  log "RabbitMQ application started on $RABBITMQ_NODENAME"
}

[[ $# -ge 2 ]] || usage
action="$1"; shift
case "$action" in
  start) [[ $# -ge 2 && $# -le 3 ]] || usage; cmd_start "$@" ;;
  stop) cmd_stop "$1" ;;
  restart) cmd_restart "$1" ;;
  stop_app) cmd_stop_app "$1" ;;
  start_app) cmd_start_app "$1" ;;
  wait) load_node "$1"; wait_node "$1" ;;
  env) load_node "$1"; print_env ;;
  status) load_node "$1"; vm_running && ctl -q status >/dev/null 2>&1 ;;
  *) usage ;;
esac
