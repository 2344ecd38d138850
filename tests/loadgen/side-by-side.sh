#!/usr/bin/env bash
# Side by side: the event service against Centrifugo and a Bun (uWebSockets) pub/sub server.
# The same scenarios and the same load generator run against each, one server at a time on
# loopback, a fresh server per run, the servers alternating within each round (round 1: ours,
# bun, centrifugo; round 2: ...). Prints each figure per peer as the median and range of the
# rounds, with the ratio of medians to our service. Documented in tests/loadgen/README.md.
#
# Usage: tests/loadgen/side-by-side.sh [idle|broadcast|latency|all]      (default: all)
#
#   idle       CONNECTIONS subscribed connections, each to its own channel, held IDLE_HOLD while
#              answering pings; the server's RSS per connection (VmRSS and RssAnon from /proc).
#   broadcast  SUBSCRIBERS subscribers of one event; publish as fast as the server accepts for
#              DURATION over PUBLISHERS connections, batched (BATCH events per request) and then
#              unbatched (one event per request); deliveries/s.
#   latency    SUBSCRIBERS subscribers; one event per request at each of RATES events/s;
#              publish -> receive latency p50/p99 (8 subscribers timestamp every event on a
#              thread of their own) and the server's CPU per delivery.
#   Every fan-out run also reports what is missing (accepted events x subscribers - received)
#   and the server's CPU per delivery: utime+stime of the server process (/proc/<pid>/stat)
#   over the run / deliveries received.
#
# Needs: cargo, jq, curl, ss; go (Centrifugo) and npm (Bun) the first time. Installs, once, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/event-router-tools/peers/ (later runs reuse it):
#   centrifugo-v6.9.1/bin/centrifugo  built from the Go module proxy like a release build:
#       CGO_ENABLED=0 go install -ldflags "-s -w -X .../internal/build.Version=6.9.1" \
#         github.com/centrifugal/centrifugo/v6@v6.9.1
#   bun-1.4.4/  npm install --ignore-scripts bun@1.4.4: the binary comes in the package's optional
#       dependency @oven/bun-<os>-<arch> (bun-linux-x64-baseline is added on x86-64 without
#       AVX2); its postinstall step, which only moves that binary into node_modules/bun/bin, is
#       skipped and the binary is run from where npm put it, so the server's pid is bun's own.
#
# Knobs (environment variables, with defaults):
#   PEERS="eventrouter bun centrifugo"   servers to compare, in this order within each round
#   RUNS=3                rounds; each runs every scenario once against every peer
#   CONNECTIONS=10000     idle: connections to hold (our service's default --max-connections)
#   IDLE_HOLD=25s         idle: keep them open this long after measuring (spans a server ping)
#   SUBSCRIBERS=2000      broadcast, latency: subscribers of one event
#   DURATION=10s          broadcast, latency: publishing time per run
#   PAYLOAD_BYTES=100     size of each event's data
#   BATCH=25              broadcast, batched: events per publish request (Centrifugo: commands
#                         per /api/batch; one event per request goes to /api/publish)
#   PUBLISHERS=2          broadcast: concurrent keep-alive publisher connections
#   THROUGHPUT_RATE=0     broadcast: target events/s (0 = as fast as accepted)
#   RATES="10 50"         latency: events/s to run, one event per request, one publisher
#   LOADGEN_THREADS=1     worker threads of the load generator
#   LOADGEN_ARGS=""       extra flags for every loadgen run (e.g. --source-ips 4)
#   PORT=18080            loopback port of the server under test (each peer in turn)
#   ADMIN_PORT=19090      our service's admin port (/metrics cross-checks)
#   EVENTROUTER_ARGS="--history-max-events 0"   extra flags for event-service; by default its
#                         missed-event history is off, as Centrifugo's history and recovery are
#                         and as the Bun server has none (bench.sh measures the defaults)
#   SERVICE_BIN=""        run this event-service binary instead of this checkout's release build
#   MAX_LOAD=""           wait before each run until the 1-minute load average is at most this
#   RESULTS_DIR=<tmp>     where each run's JSON report and logs are kept
#
# The peers' settings are stated in tests/loadgen/peers/bun-pubsub.js (its header) and below
# (Centrifugo's config is JSON, which has no comments); tests/loadgen/README.md has both.
#
# Centrifugo, tests/loadgen/peers/centrifugo.json; everything not listed is Centrifugo's default
# (memory engine, JSON protocol over WebSocket, no compression, GOMAXPROCS = all cores):
#   http_server.address 127.0.0.1; the port is given on the command line (--http_server.port)
#   log.level warn
#   usage_stats.disabled true          no anonymous usage reports
#   health.enabled true                GET /health, polled until the server is up
#   http_api.key                       the X-API-Key of /api/publish and /api/batch
#   client.allow_anonymous_connect_without_token true
#                                      clients connect without a token, as they connect to our
#                                      service and the Bun server with authentication off
#                                      (client.insecure would also drop permission checks)
#   client.ping_interval 20s, client.pong_timeout 8s
#                                      an application-level {} ping every 20 s (our service sends
#                                      a WebSocket ping every 20 s); no {} answer within 8 s closes
#   client.queue_max_size 1048576      a client with more than 1 MiB unsent is disconnected (our
#                                      --send-queue-bytes, Bun's backpressureLimit)
#   client.channel_limit 100           subscriptions per connection (our --max-subscriptions)
#   channel.without_namespace.allow_subscribe_for_client true and allow_subscribe_for_anonymous
#                                      true: any client may subscribe to any channel (token-less
#                                      clients need both)
#   channel.without_namespace.presence, join_leave false; history_size 0; force_recovery,
#   allow_recovery, force_positioning false
#                                      no presence, no join/leave messages, no history, no recovery
#                                      (Centrifugo's defaults, stated so the comparison's terms
#                                      are in the file)
set -euo pipefail
shopt -s inherit_errexit

scenario="${1:-all}"
case "$scenario" in idle|broadcast|latency|all) ;; *) echo "usage: $0 [idle|broadcast|latency|all]" >&2; exit 2 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/loadgen/bench-lib.sh
source "$root/tests/loadgen/bench-lib.sh"

PEERS="${PEERS:-eventrouter bun centrifugo}"
RUNS="${RUNS:-3}"
CONNECTIONS="${CONNECTIONS:-10000}"
IDLE_HOLD="${IDLE_HOLD:-25s}"
SUBSCRIBERS="${SUBSCRIBERS:-2000}"
DURATION="${DURATION:-10s}"
PAYLOAD_BYTES="${PAYLOAD_BYTES:-100}"
BATCH="${BATCH:-25}"
PUBLISHERS="${PUBLISHERS:-2}"
THROUGHPUT_RATE="${THROUGHPUT_RATE:-0}"
RATES="${RATES:-10 50}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"
PORT="${PORT:-18080}"
ADMIN_PORT="${ADMIN_PORT:-19090}"
if [ -z "${EVENTROUTER_ARGS+set}" ]; then EVENTROUTER_ARGS="--history-max-events 0"; fi
MAX_LOAD="${MAX_LOAD:-}"
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t eventrouter-side-by-side.XXXXXX)}"
mkdir -p "$RESULTS_DIR"

CENTRIFUGO_VERSION=6.9.1
BUN_VERSION=1.4.4
peers_dir="${XDG_CACHE_HOME:-$HOME/.cache}/event-router-tools/peers"
centrifugo_config="$root/tests/loadgen/peers/centrifugo.json"
bun_server="$root/tests/loadgen/peers/bun-pubsub.js"

for peer in $PEERS; do
  case "$peer" in eventrouter|bun|centrifugo) ;; *) echo "unknown peer $peer in PEERS" >&2; exit 2 ;; esac
done
has_peer() { case " $PEERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

bench_require jq curl ss cargo

# --- binaries --------------------------------------------------------------------------------

echo "building release binaries ..." >&2
(cd "$root" && cargo build --release --quiet -p event-service -p eventrouter-loadgen)
target_dir="${CARGO_TARGET_DIR:-$root/target}"
service_bin="${SERVICE_BIN:-$target_dir/release/event-service}"
loadgen_bin="$target_dir/release/loadgen"

# Centrifugo, built once from the Go module proxy.
ensure_centrifugo() {
  local dir="$peers_dir/centrifugo-v$CENTRIFUGO_VERSION"
  local bin="$dir/bin/centrifugo"
  if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q "^Centrifugo v$CENTRIFUGO_VERSION "; then
    echo "$bin"
    return
  fi
  bench_require go
  echo "building Centrifugo v$CENTRIFUGO_VERSION from the Go module proxy into $dir (once; a few minutes) ..." >&2
  mkdir -p "$dir/bin"
  GOBIN="$dir/bin" CGO_ENABLED=0 go install \
    -ldflags "-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version=$CENTRIFUGO_VERSION" \
    "github.com/centrifugal/centrifugo/v6@v$CENTRIFUGO_VERSION" >&2
  "$bin" version | grep -q "^Centrifugo v$CENTRIFUGO_VERSION " || {
    echo "$bin does not report v$CENTRIFUGO_VERSION" >&2
    exit 1
  }
  echo "$bin"
}

# The Bun binary that runs on this machine, from the npm packages installed in $1.
working_bun() {
  local b
  for b in "$1"/node_modules/@oven/bun-*/bin/bun; do
    if [ -x "$b" ] && [ "$("$b" --version 2>/dev/null)" = "$BUN_VERSION" ]; then
      echo "$b"
      return 0
    fi
  done
  return 1
}

# Bun, installed once from the npm registry without running its postinstall step.
ensure_bun() {
  local dir="$peers_dir/bun-$BUN_VERSION"
  working_bun "$dir" && return
  bench_require npm
  echo "installing Bun $BUN_VERSION from npm into $dir (once) ..." >&2
  mkdir -p "$dir"
  printf '{ "private": true, "dependencies": { "bun": "%s" } }\n' "$BUN_VERSION" >"$dir/package.json"
  (cd "$dir" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error) >&2
  working_bun "$dir" && return
  if [ "$(uname -m)" = x86_64 ]; then
    # The default x64 build needs AVX2; the baseline build does not.
    (cd "$dir" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error --no-save \
      "@oven/bun-linux-x64-baseline@$BUN_VERSION") >&2
    working_bun "$dir" && return
  fi
  echo "no Bun $BUN_VERSION binary under $dir/node_modules/@oven runs here" >&2
  exit 1
}

centrifugo_bin=""
bun_bin=""
centrifugo_key=""
if has_peer centrifugo; then
  centrifugo_bin="$(ensure_centrifugo)"
  centrifugo_key="$(jq -er '.http_api.key' "$centrifugo_config")"
fi
if has_peer bun; then
  bun_bin="$(ensure_bun)"
fi

# The server and the load generator each hold one descriptor per connection; the servers
# inherit the raised limit.
bench_raise_nofile "$CONNECTIONS"

# --- one server at a time --------------------------------------------------------------------

peer_pid=""
stop_peer() {
  bench_stop "$peer_pid"
  peer_pid=""
}
trap stop_peer EXIT

# start_peer PEER LOG : starts the peer on 127.0.0.1:$PORT and waits until it answers.
start_peer() {
  local peer="$1" log="$2" health bin
  case "$peer" in
    eventrouter)
      bench_ports_free "$PORT" "$ADMIN_PORT"
      bin="$service_bin"
      # shellcheck disable=SC2086 # EVENTROUTER_ARGS is a list of flags
      "$bin" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
        --log warn --drain-duration 1s $EVENTROUTER_ARGS >"$log" 2>&1 &
      health=/healthz
      ;;
    bun)
      bench_ports_free "$PORT"
      bin="$bun_bin"
      "$bin" "$bun_server" "$PORT" 127.0.0.1 >"$log" 2>&1 &
      health=/healthz
      ;;
    centrifugo)
      bench_ports_free "$PORT"
      bin="$centrifugo_bin"
      "$bin" --config "$centrifugo_config" --http_server.port "$PORT" >"$log" 2>&1 &
      health=/health
      ;;
  esac
  peer_pid=$!
  bench_wait_healthy "http://127.0.0.1:$PORT$health" "$peer_pid" "$log" "$peer"
  # CPU and RSS are read from /proc/<pid>: make sure the pid is the server itself.
  if [ "$(readlink -f "/proc/$peer_pid/exe")" != "$(readlink -f "$bin")" ]; then
    echo "pid $peer_pid is $(readlink -f "/proc/$peer_pid/exe"), not $bin" >&2
    exit 1
  fi
}

# The load generator's flags for PEER.
peer_flags() {
  case "$1" in
    eventrouter) echo "--peer eventrouter --admin 127.0.0.1:$ADMIN_PORT" ;;
    bun) echo "--peer bun" ;;
    centrifugo) echo "--peer centrifugo --publish-key $centrifugo_key" ;;
  esac
}

failed_runs=0

# run_once NAME PEER SCENARIO [FLAGS...] : a fresh PEER, one loadgen SCENARIO run, the peer
# stopped; the report goes to $RESULTS_DIR/NAME-PEER-<round>.json (round: $round).
run_once() {
  local name="$1" peer="$2" what="$3"; shift 3
  local base="$RESULTS_DIR/$name-$peer-$round"
  bench_wait_load "$MAX_LOAD"
  start_peer "$peer" "$base.server.log"
  local status=0
  # shellcheck disable=SC2046,SC2086 # flag lists
  "$loadgen_bin" --threads "$LOADGEN_THREADS" --json "$what" --addr "127.0.0.1:$PORT" \
    --service-pid "$peer_pid" $(peer_flags "$peer") $LOADGEN_ARGS "$@" \
    >"$base.json.part" 2>"$base.log" || status=$?
  stop_peer
  if [ "$status" -ne 0 ] || ! jq -e . "$base.json.part" >/dev/null 2>&1; then
    failed_runs=$((failed_runs + 1))
    echo "  $peer: FAILED (exit $status); last lines of $base.log:" >&2
    tail -n 5 "$base.log" | sed 's/^/    /' >&2
    rm -f "$base.json.part"
    return
  fi
  mv "$base.json.part" "$base.json"
  if [ "$what" = idle ]; then
    jq -r --arg p "$peer" '"  \($p): \(.established) established, RSS \(.rss_per_connection_bytes // "n/a" | if type == "number" then round else . end) B/connection, \(.pongs_sent) pings answered, \(.closed_by_server) closed by server"' "$base.json" >&2
  else
    jq -r --arg p "$peer" 'def f(d): if type == "number" then (. * pow(10; d) | round) / pow(10; d) else "n/a" end;
      "  \($p): \(.deliveries_per_second | f(0)) deliveries/s, missing \(.missing), p50 \(.latency_p50_ms | f(2)) ms, p99 \(.latency_p99_ms | f(2)) ms, server \(.service_cpu_us_per_delivery | f(2)) µs CPU/delivery"' "$base.json" >&2
  fi
}

# A fan-out run: run_fanout NAME PEER RATE BATCH PUBLISHERS.
run_fanout() {
  local name="$1" peer="$2" rate="$3" batch="$4" publishers="$5"
  run_once "$name" "$peer" fanout --subscribers "$SUBSCRIBERS" --rate "$rate" \
    --duration "$DURATION" --payload-bytes "$PAYLOAD_BYTES" --batch "$batch" \
    --publishers "$publishers"
}

# The scenario runs in order, as "NAME|loadgen-kind|args": every round runs each once per peer.
runs=()
case "$scenario" in idle|all) runs+=("idle|idle") ;; esac
case "$scenario" in broadcast|all)
  runs+=("broadcast-batch$BATCH|fanout|$THROUGHPUT_RATE $BATCH $PUBLISHERS")
  [ "$BATCH" = 1 ] || runs+=("broadcast-batch1|fanout|$THROUGHPUT_RATE 1 $PUBLISHERS")
  ;;
esac
case "$scenario" in latency|all)
  for rate in $RATES; do runs+=("latency-$rate|fanout|$rate 1 1"); done
  ;;
esac

describe() {
  case "$1" in
    idle) echo "idle: $CONNECTIONS subscribed connections held $IDLE_HOLD" ;;
    broadcast-batch1) echo "broadcast, unbatched: $SUBSCRIBERS subscribers, 1 event per publish, rate $THROUGHPUT_RATE (0 = as fast as accepted), $PUBLISHERS publishers, $DURATION" ;;
    broadcast-batch*) echo "broadcast, batched: $SUBSCRIBERS subscribers, $BATCH events per publish, rate $THROUGHPUT_RATE (0 = as fast as accepted), $PUBLISHERS publishers, $DURATION" ;;
    latency-*) echo "latency: $SUBSCRIBERS subscribers, ${1#latency-} events/s, 1 event per publish, $DURATION" ;;
  esac
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "peers: $PEERS; $RUNS rounds; reports in $RESULTS_DIR"
for round in $(seq 1 "$RUNS"); do
  for entry in "${runs[@]}"; do
    IFS='|' read -r name what args <<<"$entry"
    echo "== round $round/$RUNS: $(describe "$name") ==" >&2
    for peer in $PEERS; do
      if [ "$what" = idle ]; then
        run_once "$name" "$peer" idle --connections "$CONNECTIONS" --hold "$IDLE_HOLD"
      else
        # shellcheck disable=SC2086 # rate batch publishers
        run_fanout "$name" "$peer" $args
      fi
    done
  done
done

# --- the table -------------------------------------------------------------------------------

# row LABEL FILTER DIGITS RATIO NAME : one line per peer: the median (min–max) of FILTER over
# the runs of scenario NAME, and (RATIO=yes) the ratio of its median to our service's.
row() {
  local label="$1" filter="$2" digits="$3" ratio="$4" name="$5"
  local peer ours="" median cell vs files
  for peer in $PEERS; do
    files=()
    for f in "$RESULTS_DIR/$name-$peer"-*.json; do [ -e "$f" ] && files+=("$f"); done
    median="n/a"
    cell="n/a (no run)"
    if [ "${#files[@]}" -gt 0 ]; then
      read -r median cell < <(bench_cell "$filter" "$digits" "$RUNS" "${files[@]}")
    fi
    [ "$peer" = eventrouter ] && ours="$median"
    vs=""
    if [ "$ratio" = yes ] && [ -n "$ours" ]; then
      vs="$(awk -v a="$median" -v b="$ours" 'BEGIN {
        if (a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }')"
    fi
    printf '  %-30s %-12s %-40s %s\n' "$label" "$peer" "$cell" "$vs"
    label=""
  done
}

echo
echo "== side by side: median (min–max) of $RUNS rounds; 'vs ours' = the peer's median / our service's"
echo "   (higher is better for deliveries/s and events/s; lower for RSS, latency and CPU per delivery) =="
echo "   eventrouter $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$root" && git diff --quiet HEAD 2>/dev/null || echo '+changes') ($EVENTROUTER_ARGS), Bun $BUN_VERSION, Centrifugo $CENTRIFUGO_VERSION"
for entry in "${runs[@]}"; do
  IFS='|' read -r name what _ <<<"$entry"
  echo
  describe "$name"
  printf '  %-30s %-12s %-40s %s\n' metric peer "median (min–max)" "vs ours"
  if [ "$what" = idle ]; then
    row "established" .established 0 no "$name"
    row "RSS per connection (B)" .rss_per_connection_bytes 0 yes "$name"
    row "RssAnon per connection (B)" .rss_anon_per_connection_bytes 0 yes "$name"
    row "pings answered" .pongs_sent 0 no "$name"
    row "closed by server" .closed_by_server 0 no "$name"
  else
    row "deliveries/s" .deliveries_per_second 0 yes "$name"
    row "published events/s" .publish_rate 0 yes "$name"
    row "missing" .missing 0 no "$name"
    row "publish errors" '((.publish_errors // {}) | add // 0)' 0 no "$name"
    row "subscribers closed" '((.subscribers_closed // {}) | add // 0)' 0 no "$name"
    row "latency p50 (ms)" .latency_p50_ms 2 yes "$name"
    row "latency p99 (ms)" .latency_p99_ms 2 yes "$name"
    row "server CPU/delivery (us)" .service_cpu_us_per_delivery 3 yes "$name"
  fi
done
echo
echo "run reports: $RESULTS_DIR"
if [ "$failed_runs" -gt 0 ]; then
  echo "$failed_runs run(s) failed; see the logs in $RESULTS_DIR" >&2
  exit 1
fi
