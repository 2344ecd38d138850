#!/usr/bin/env bash
# The event service on RabbitMQ: consume-and-deliver rate against a bare consumer, and latency.
# Builds the release binaries, starts a dedicated RabbitMQ node, runs `amqp_bench` against it and
# stops the node, in up to two placements:
#
#   shared  the broker, the service, the bench process (publisher + receiver) and the receiver
#           processes share every CPU, as on a developer laptop: the ratio then also says how
#           much CPU the service takes away from the broker;
#   pinned  the broker on CPU 0, the service, the bench process and the receiver processes on
#           the other CPUs, as in a cluster where the broker has cores of its own: the ratio says
#           whether the service keeps up with everything the broker can hand out (skipped on a
#           1-CPU machine).
#
# Usage: tests/loadgen/amqp-bench.sh [shared|pinned|both]      (default: both)
#
# Knobs (environment variables, with defaults):
#   RUNS=5                  throughput runs per receiver per placement (medians are reported)
#   AMQP_PORT=5690 MGMT_PORT=15690   loopback ports of the dedicated RabbitMQ node
#   RECEIVERS=bare,service  receivers run in turn in every round (`amqp_bench --receivers`):
#                           bare, lapin-process, minimal-process, service; the *-process ones run
#                           in a process of their own and report its CPU per event
#   PERF_DIR=""             when set: one extra lapin-process run per placement under
#                           `perf record -g`, written to PERF_DIR/lapin-PLACEMENT.perf.data
#   BENCH_ARGS=""           extra amqp_bench flags (see `amqp_bench --help`)
#
# The lapin consumer, the minimal consumer and the service, with their CPU per event:
#   RUNS=3 RECEIVERS=lapin-process,minimal-process,service tests/loadgen/amqp-bench.sh
set -euo pipefail

mode="${1:-both}"
case "$mode" in shared|pinned|both) ;; *) echo "usage: $0 [shared|pinned|both]" >&2; exit 2 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUNS="${RUNS:-5}"
AMQP_PORT="${AMQP_PORT:-5690}"
MGMT_PORT="${MGMT_PORT:-15690}"
RECEIVERS="${RECEIVERS:-bare,service}"
PERF_DIR="${PERF_DIR:-}"
BENCH_ARGS="${BENCH_ARGS:-}"
node=amqpbench
rabbitmq="$root/tests/infra/rabbitmq.sh"
cpus="$(nproc)"

command -v taskset >/dev/null || { echo "amqp-bench.sh needs taskset (util-linux)" >&2; exit 1; }

echo "building release binaries ..." >&2
(cd "$root" && cargo build --release --quiet -p event-service -p eventrouter-loadgen \
  --bin event-service --bin amqp_bench)
bench_bin="${CARGO_TARGET_DIR:-$root/target}/release/amqp_bench"

trap '"$rabbitmq" stop "$node" >/dev/null 2>&1 || true' EXIT

# run PLACEMENT BROKER_CPUS BENCH_CPUS
run() {
  echo "=== placement: $1 (broker on CPUs $2, service and bench on CPUs $3, $cpus CPUs) ==="
  taskset -c "$2" "$rabbitmq" start "$node" "$AMQP_PORT" "$MGMT_PORT" >/dev/null
  local perf=()
  if [[ -n "$PERF_DIR" ]]; then
    mkdir -p "$PERF_DIR"
    perf=(--perf-record "$PERF_DIR/lapin-$1.perf.data")
  fi
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
  taskset -c "$3" "$bench_bin" --amqp-url "amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f" \
    --runs "$RUNS" --receivers "$RECEIVERS" "${perf[@]}" $BENCH_ARGS
  "$rabbitmq" stop "$node" >/dev/null 2>&1
}

all="0-$((cpus - 1))"
if [[ "$mode" == shared || "$mode" == both ]]; then
  run shared "$all" "$all"
fi
if [[ "$mode" == pinned || "$mode" == both ]]; then
  if ((cpus < 2)); then
    echo "pinned placement needs at least 2 CPUs; this machine has $cpus" >&2
    [[ "$mode" == pinned ]] && exit 1
  else
    run pinned 0 "1-$((cpus - 1))"
  fi
fi
