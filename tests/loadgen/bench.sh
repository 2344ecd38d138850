#!/usr/bin/env bash
# Event service benchmarks: builds release binaries, starts a fresh service per run on loopback,
# runs the load generator against it, stops the service, and prints each figure as the median
# and range of the runs. The numbers and this command are recorded in BENCHMARKS.md.
#
# Usage: tests/loadgen/bench.sh [idle|fanout|all]      (default: all)
#
# Knobs (environment variables, with defaults):
#   RUNS=3                runs per scenario; a fresh service each run
#   CONNECTIONS=10000     idle: connections to hold (the service's default --max-connections)
#   IDLE_HOLD=25s         idle: keep them open this long after measuring (spans a server ping)
#   SUBSCRIBERS=2000      fanout: subscribers of one event
#   RATES="500"           fanout: publish rates in events/s to run (0 = as fast as accepted);
#                         deliveries/s = rate x subscribers, so 500 is the 1M/s target
#   DURATION=10s          fanout: publishing time per run
#   PAYLOAD_BYTES=100     fanout: size of each event's data
#   BATCH=25              fanout: events per POST /publish
#   PUBLISHERS=2          fanout: concurrent keep-alive publisher connections
#   LOADGEN_THREADS=1     worker threads of the load generator
#   PORT=18080 ADMIN_PORT=19090   loopback ports for the service
#   SERVICE_ARGS=""       extra flags for event-service (default settings otherwise)
#   AUTH=0                1: authentication on. The service gets an HMAC secret file and a
#                         publish-keys file; every connection sends {"op":"auth"} with an HS256
#                         token before subscribing, and every publish carries its key
#   RESULTS_DIR=<tmp>     where each run's JSON report is kept
#   SERVICE_BIN=""        run this event-service binary instead of this checkout's release build
#                         (e.g. another commit's, to compare side by side)
set -euo pipefail

scenario="${1:-all}"
case "$scenario" in idle|fanout|all) ;; *) echo "usage: $0 [idle|fanout|all]" >&2; exit 2 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/loadgen/bench-lib.sh
source "$root/tests/loadgen/bench-lib.sh"
RUNS="${RUNS:-3}"
CONNECTIONS="${CONNECTIONS:-10000}"
IDLE_HOLD="${IDLE_HOLD:-25s}"
SUBSCRIBERS="${SUBSCRIBERS:-2000}"
RATES="${RATES:-500}"
DURATION="${DURATION:-10s}"
PAYLOAD_BYTES="${PAYLOAD_BYTES:-100}"
BATCH="${BATCH:-25}"
PUBLISHERS="${PUBLISHERS:-2}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
PORT="${PORT:-18080}"
ADMIN_PORT="${ADMIN_PORT:-19090}"
SERVICE_ARGS="${SERVICE_ARGS:-}"
AUTH="${AUTH:-0}"
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t eventrouter-bench.XXXXXX)}"
mkdir -p "$RESULTS_DIR"

auth_args=()
if [ "$AUTH" = 1 ]; then
  head -c 48 /dev/urandom | base64 | tr -d '\n' >"$RESULTS_DIR/hmac-secret"
  publish_key="bench-$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  printf '[{"name":"bench","key":"%s"}]\n' "$publish_key" >"$RESULTS_DIR/publish-keys.json"
  SERVICE_ARGS="$SERVICE_ARGS --auth-hmac-secret-file $RESULTS_DIR/hmac-secret --publish-keys-file $RESULTS_DIR/publish-keys.json"
  auth_args=(--auth-secret-file "$RESULTS_DIR/hmac-secret" --publish-key "$publish_key")
fi

bench_require jq curl

echo "building release binaries ..." >&2
(cd "$root" && cargo build --release --quiet -p event-service -p eventrouter-loadgen)
target_dir="${CARGO_TARGET_DIR:-$root/target}"
service_bin="${SERVICE_BIN:-$target_dir/release/event-service}"
loadgen_bin="$target_dir/release/loadgen"

# Both processes hold one descriptor per connection.
bench_raise_nofile "$CONNECTIONS"

service_pid=""
stop_service() {
  bench_stop "$service_pid"
  service_pid=""
}
trap stop_service EXIT

start_service() {
  bench_ports_free "$PORT" "$ADMIN_PORT"
  # shellcheck disable=SC2086 # SERVICE_ARGS is a list of flags
  "$service_bin" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --log warn --drain-duration 1s $SERVICE_ARGS >"$RESULTS_DIR/service.log" 2>&1 &
  service_pid=$!
  bench_wait_healthy "http://127.0.0.1:$PORT/healthz" "$service_pid" "$RESULTS_DIR/service.log" event-service
}

# stats FIELD DIGITS FILE... : "median (range min–max, n)" of a numeric field over the run reports.
stats() { bench_stats "$@"; }

common=(--addr "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN_PORT" "${auth_args[@]}")

# One scenario run against a fresh service: `run_once OUT SCENARIO [FLAGS...]` writes the JSON
# report to OUT.
run_once() {
  local out="$1" scenario="$2"; shift 2
  start_service
  "$loadgen_bin" --threads "$LOADGEN_THREADS" --json "$scenario" "${common[@]}" \
    --service-pid "$service_pid" "$@" >"$out"
  stop_service
}

run_idle() {
  local files=()
  for i in $(seq 1 "$RUNS"); do
    echo "== idle run $i/$RUNS: $CONNECTIONS connections ==" >&2
    local out="$RESULTS_DIR/idle-$i.json"
    run_once "$out" idle --connections "$CONNECTIONS" --hold "$IDLE_HOLD"
    files+=("$out")
  done
  echo
  echo "idle: $CONNECTIONS subscribed connections, default settings, auth $([ "$AUTH" = 1 ] && echo on || echo off), $RUNS runs"
  echo "  established              $(stats established 0 "${files[@]}")"
  echo "  RSS per connection (B)   $(stats rss_per_connection_bytes 0 "${files[@]}")"
  echo "  RssAnon per conn (B)     $(stats rss_anon_per_connection_bytes 0 "${files[@]}")"
  echo "  kernel slab per pair (B) $(stats kernel_slab_per_connection_pair_bytes 0 "${files[@]}")"
  echo "  server Recv-Q after hold $(jq -s '[.[] | .snapshots[] | select(.label == "after hold") | .queues.server_side.recv_q] | add' "${files[@]}") B (sum over runs)"
  echo "  pings answered           $(stats pongs_sent 0 "${files[@]}")"
  echo "  closed by server         $(stats closed_by_server 0 "${files[@]}")"
}

run_fanout() {
  for rate in $RATES; do
    local files=()
    for i in $(seq 1 "$RUNS"); do
      echo "== fanout run $i/$RUNS: $SUBSCRIBERS subscribers, $rate events/s ==" >&2
      local out="$RESULTS_DIR/fanout-$rate-$i.json"
      run_once "$out" fanout --subscribers "$SUBSCRIBERS" --rate "$rate" \
        --duration "$DURATION" --payload-bytes "$PAYLOAD_BYTES" --batch "$BATCH" \
        --publishers "$PUBLISHERS"
      files+=("$out")
    done
    echo
    echo "fanout: $SUBSCRIBERS subscribers, rate $rate events/s (0 = full speed), $PAYLOAD_BYTES-byte data, auth $([ "$AUTH" = 1 ] && echo on || echo off), $RUNS runs"
    echo "  published events/s       $(stats publish_rate 0 "${files[@]}")"
    echo "  deliveries/s (overall)    $(stats deliveries_per_second 0 "${files[@]}")"
    echo "  deliveries/s (steady)     $(stats steady_deliveries_per_second 0 "${files[@]}")"
    echo "  missing                   $(stats missing 0 "${files[@]}")"
    echo "  service drops             $(stats service.drops 0 "${files[@]}")"
    echo "  subscribers closed        $(jq -s '[.[] | .subscribers_closed | to_entries[] | .value] | add // 0' "${files[@]}") (sum over runs)"
    echo "  latency p50 / p99 (ms)    $(stats latency_p50_ms 2 "${files[@]}") / $(stats latency_p99_ms 2 "${files[@]}")"
    echo "  mean frame (B)            $(stats mean_frame_bytes 0 "${files[@]}")"
    echo "  service CPU s per run     $(jq -rs 'map(.service_cpu_seconds) | map(. * 100 | round / 100) | join(" ")' "${files[@]}")"
    echo "  loadgen CPU s per run     $(jq -rs 'map(.loadgen_cpu_seconds) | map(. * 100 | round / 100) | join(" ")' "${files[@]}")"
  done
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
case "$scenario" in
  idle) run_idle ;;
  fanout) run_fanout ;;
  all) run_idle; run_fanout ;;
esac
echo
echo "run reports: $RESULTS_DIR"
