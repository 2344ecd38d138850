#!/usr/bin/env bash
# The event service on RabbitMQ: many clients recovering missed events at once.
# Builds the release binaries and, for each run, waits for a quiet machine, starts a fresh
# dedicated RabbitMQ node, runs `recovery_bench` against it (a fresh event service with the
# history stream, a publisher at RATE events/s for the whole run spread over TOPICS topics,
# CLIENTS clients, each on one topic, that drop their connections after WARMUP and reconnect all
# at once with `since` after GAP, LIVE live subscribers sampling latency) and stops the node.
# Prints each run's summary, then every figure as median (min–max) over the runs, with the load
# average before each run.
#
# Usage: tests/loadgen/recovery-bench.sh
#
# Knobs (environment variables, with defaults):
#   RUNS=3                   runs (a fresh broker node and service each)
#   CLIENTS=1000 LIVE=8      recovering clients, live subscribers
#   RATE=1000 GAP=10s WARMUP=5s TAIL=5s
#   TOPICS=10                topics the events are spread over (event n on bench.<n % TOPICS>,
#                            client i on bench.<i % TOPICS>); the steady state is
#                            RATE × (CLIENTS + LIVE) / TOPICS deliveries/s. 1: every client
#                            receives every event
#   MAX_LOAD=1.5             wait until the 1-minute load average is at most this before a run
#   LOAD_WAIT=900            ... for at most this many seconds, then run anyway (and say so)
#   AMQP_PORT=5693 MGMT_PORT=15693   loopback ports of the dedicated RabbitMQ node
#   BENCH_ARGS=""            extra recovery_bench flags (see `recovery_bench --help`), e.g.
#                            "--service-arg=--recovery-max-concurrent=128"
#   RESULTS_DIR=<tmp>        where each run's JSON report is kept
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUNS="${RUNS:-3}"
CLIENTS="${CLIENTS:-1000}"
LIVE="${LIVE:-8}"
RATE="${RATE:-1000}"
TOPICS="${TOPICS:-10}"
GAP="${GAP:-10s}"
WARMUP="${WARMUP:-5s}"
TAIL="${TAIL:-5s}"
MAX_LOAD="${MAX_LOAD:-1.5}"
LOAD_WAIT="${LOAD_WAIT:-900}"
AMQP_PORT="${AMQP_PORT:-5693}"
MGMT_PORT="${MGMT_PORT:-15693}"
BENCH_ARGS="${BENCH_ARGS:-}"
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t eventrouter-recovery-bench.XXXXXX)}"
node=recoverybench
rabbitmq="$root/tests/infra/rabbitmq.sh"
node_dir="${EVENTROUTER_RABBITMQ_DIR:-${TMPDIR:-/tmp}/eventrouter-rabbitmq}/$node"
mkdir -p "$RESULTS_DIR"

command -v jq >/dev/null || { echo "recovery-bench.sh needs jq" >&2; exit 1; }

echo "building release binaries ..." >&2
(cd "$root" && cargo build --release --quiet -p event-service -p eventrouter-loadgen \
  --bin event-service --bin recovery_bench)
bench_bin="${CARGO_TARGET_DIR:-$root/target}/release/recovery_bench"

# The service and the clients hold one descriptor per connection.
ulimit -n "$(ulimit -Hn)"

trap '"$rabbitmq" stop "$node" >/dev/null 2>&1 || true' EXIT

load1() { cut -d' ' -f1 /proc/loadavg; }

# Waits up to LOAD_WAIT seconds for the 1-minute load average to fall to MAX_LOAD.
wait_quiet() {
  local waited=0
  while awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l > m) }'; do
    if ((waited >= LOAD_WAIT)); then
      echo "load average still $(load1) after ${LOAD_WAIT}s; running anyway" >&2
      return
    fi
    ((waited % 60 == 0)) && echo "load average $(load1) > $MAX_LOAD; waiting ..." >&2
    sleep 10
    waited=$((waited + 10))
  done
}

files=()
loads=()
for i in $(seq 1 "$RUNS"); do
  wait_quiet
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  loads+=("$load")
  echo "=== run $i/$RUNS (load average before: $load) ===" >&2
  "$rabbitmq" start "$node" "$AMQP_PORT" "$MGMT_PORT" >/dev/null
  broker_pid="$(cat "$node_dir/pid")"
  [[ "$(cat "/proc/$broker_pid/comm" 2>/dev/null)" == beam.smp ]] ||
    echo "warning: pid $broker_pid of node $node is not beam.smp; broker CPU may be wrong" >&2
  out="$RESULTS_DIR/run-$i.json"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  "$bench_bin" --json --amqp-url "amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" \
    --broker-pid "$broker_pid" --clients "$CLIENTS" --live "$LIVE" --rate "$RATE" \
    --topics "$TOPICS" --gap "$GAP" --warmup "$WARMUP" --tail "$TAIL" $BENCH_ARGS >"$out"
  jq --arg load "$load" '. + {load_before: $load}' "$out" >"$out.tmp" && mv "$out.tmp" "$out"
  "$rabbitmq" stop "$node" >/dev/null 2>&1
  files+=("$out")
done

# stat FIELD DIGITS: "median (min–max)" of a numeric field over the runs.
stat() {
  jq -rs --arg f "$1" --argjson d "$2" '
    def r: if . == null then "-" else (. * pow(10; $d) | round) / pow(10; $d) end;
    map(getpath($f | split(".")) // empty) | sort
    | if length == 0 then "n/a"
      else "\(.[(length / 2 | floor)] | r) (\(.[0] | r)–\(.[-1] | r))"
      end' "${files[@]}"
}
# each FIELD DIGITS: the field's value in every run, in run order.
each() {
  jq -rs --arg f "$1" --argjson d "$2" '
    map(getpath($f | split(".")) | if . == null then "-" else (. * pow(10; $d) | round) / pow(10; $d) end)
    | map(tostring) | join(" / ")' "${files[@]}"
}

echo
echo "recovery: $CLIENTS clients reconnecting at once with since after $GAP at $RATE events/s over $TOPICS topics ($((RATE * (CLIENTS + LIVE) / TOPICS)) deliveries/s steady state), $LIVE live subscribers, $RUNS runs"
echo "machine: $(nproc) CPUs; load average before each run: $(printf '[%s] ' "${loads[@]}")"
echo "  median (min–max) over the runs; 'each' lists the runs in order"
echo "  all caught up (s)          $(stat all_caught_up_s 2)   each $(each all_caught_up_s 2)"
echo "  all live (s)               $(stat all_live_s 2)   each $(each all_live_s 2)"
echo "  caught up p50 / p99 (s)    $(stat caught_up_s.p50 2) / $(stat caught_up_s.p99 2)"
echo "  caught up min (s)          $(stat caught_up_s.min 2)"
echo "  subscribed reply p50 / max $(stat ack_s.p50 2) / $(stat ack_s.max 2)"
echo "  missed per client (p50)    $(stat missed.p50 0)"
echo "  recovered / false / failed $(each recovered 0) | $(each not_recovered 0) | $(each failed 0)"
echo "  busy retries               $(each busy_retries 0)"
echo "  closed by the service, reconnected  $(jq -rs 'map(.closes | to_entries | map("\(.key):\(.value)") | join(",") | if . == "" then "0" else . end) | join(" / ")' "${files[@]}")"
echo "  gaps / duplicates after    $(each after.gaps 0) | $(each after.duplicates 0)"
echo "  ended on the last event    $(each complete 0) of $CLIENTS (the last of each client's topic)"
echo "  live p50 / p99 / max, warm-up (ms)   $(stat latency_ms.warmup.p50 2) / $(stat latency_ms.warmup.p99 2) / $(stat latency_ms.warmup.max 2)"
echo "  live p50 / p99 / max, recovery (ms)  $(stat latency_ms.recovery.p50 2) / $(stat latency_ms.recovery.p99 2) / $(stat latency_ms.recovery.max 2)"
echo "  live gaps / duplicates     $(each live_order.gaps 0) | $(each live_order.duplicates 0)"
echo "  live subscribers' Recv-Q max / service Send-Q to them max (B)  $(each queues.live_recv_q_max 0) | $(each queues.live_send_q_max 0)"
echo "  CPU s in recovery: service $(stat cpu.recovery.service 2), broker $(stat cpu.recovery.broker 2), loadgen $(stat cpu.recovery.loadgen 2)"
echo "  CPU s/s in warm-up: service $(jq -rs 'map(.cpu.warmup.service / .cpu.warmup.seconds * 100 | round / 100) | join(" / ")' "${files[@]}"), broker $(jq -rs 'map(.cpu.warmup.broker / .cpu.warmup.seconds * 100 | round / 100) | join(" / ")' "${files[@]}")"
echo "  CPU µs per replayed event: service $(stat cpu_per_replayed_event_us.service 2), broker $(stat cpu_per_replayed_event_us.broker 2), loadgen $(stat cpu_per_replayed_event_us.loadgen 2)"
echo "  replayed events (service)  $(each service_replayed_events 0)"
echo "  client Recv-Q max (B)      $(each queues.client_recv_q_max 0)"
echo
echo "run reports: $RESULTS_DIR"
