#!/usr/bin/env bash
# Idle connections at scale: 100,000+ subscribed WebSocket connections held at once on one
# machine, spread over INSTANCES event services that share one RabbitMQ node (as pods on one node
# would), each fed by a load generator of its own, all on loopback. One process holds at most its
# open-files limit of connections (less the service's 128 reserved descriptors), so the total
# comes from several processes: 6 instances x 17,000 = 102,000 by default.
#
# Builds the release binaries, starts a dedicated RabbitMQ node and INSTANCES services on it
# (`--source amqp`, each its own ports, pod name and RabbitMQ queue, `--max-connections` its
# share), then starts one `loadgen idle` per service, all at once, so the connects run
# concurrently. Each connection subscribes to a pattern of its own (PATTERN), which the service
# binds on its queue. Once every load generator holds its connections, the script measures for
# HOLD: the services' CPU time (/proc/<pid>/stat utime + stime), their VmRSS, the kernel slab
# (/proc/meminfo, before connecting and while holding) and the broker's RSS and CPU; then it
# releases the load generators (SIGUSR1, `loadgen idle --hold-until-signal`), whose reports give
# the connect times, pings answered, Recv-Q and closes. Prints a summary and a table per instance,
# says what ran out when connections are missing, keeps every report and log in RESULTS_DIR, and
# stops everything, the broker included.
#
# Usage: tests/loadgen/scale.sh
#        INSTANCES=2 CONNECTIONS_PER_INSTANCE=1000 HOLD=5s tests/loadgen/scale.sh   # smoke
#
# Knobs (environment variables, with defaults):
#   INSTANCES=6                    event services, each with its own load generator
#   CONNECTIONS_PER_INSTANCE=17000 connections per service (at most the open-files limit less
#                                  128: `ulimit -Hn` bounds every process)
#   SOURCE_IPS=<total/10,000 rounded up, at least 2>
#                                  each load generator spreads its connections over 127.0.0.1 ...
#                                  127.0.0.<SOURCE_IPS>; every socket is bound to its source address
#                                  first, so one address's ephemeral-port range is shared by all
#                                  load generators: keep total / SOURCE_IPS well below its size
#   HOLD=60s                       how long to measure while everything is held (s or m; spans
#                                  server pings, every 20 s by default)
#   PATTERN=bench.scale.{n}.{i}    each connection's pattern; {n} = instance, {i} = connection.
#                                  A fixed name (e.g. bench.scale) gives one binding per queue
#   CONNECT_CONCURRENCY=128        connections each load generator opens at once
#   LOADGEN_THREADS=1              worker threads of each load generator
#   LOADGEN_ARGS=""                extra `loadgen idle` flags
#   PORT=28080 ADMIN_PORT=29090    instance n (from 0) listens on PORT+n and ADMIN_PORT+n
#   AMQP_PORT=5694 MGMT_PORT=15694 loopback ports of the dedicated RabbitMQ node
#   SERVICE_ARGS=""                extra event-service flags (e.g. "--rebalance false")
#   SERVICE_BIN=""                 run this event-service binary instead of this checkout's
#                                  release build
#   RESULTS_DIR=<tmp>              where the reports and logs are kept
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=tests/loadgen/bench-lib.sh
source "$root/tests/loadgen/bench-lib.sh"
INSTANCES="${INSTANCES:-6}"
CONNECTIONS_PER_INSTANCE="${CONNECTIONS_PER_INSTANCE:-17000}"
total=$((INSTANCES * CONNECTIONS_PER_INSTANCE))
default_source_ips=$(((total + 9999) / 10000))
((default_source_ips >= 2)) || default_source_ips=2
SOURCE_IPS="${SOURCE_IPS:-$default_source_ips}"
HOLD="${HOLD:-60s}"
default_pattern='bench.scale.{n}.{i}'
PATTERN="${PATTERN:-$default_pattern}"
CONNECT_CONCURRENCY="${CONNECT_CONCURRENCY:-128}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"
PORT="${PORT:-28080}"
ADMIN_PORT="${ADMIN_PORT:-29090}"
AMQP_PORT="${AMQP_PORT:-5694}"
MGMT_PORT="${MGMT_PORT:-15694}"
SERVICE_ARGS="${SERVICE_ARGS:-}"
SERVICE_BIN="${SERVICE_BIN:-}"
RESULTS_DIR="${RESULTS_DIR:-$(mktemp -d -t eventrouter-scale.XXXXXX)}"
mkdir -p "$RESULTS_DIR"
node=scalebench
rabbitmq="$root/tests/infra/rabbitmq.sh"
node_dir="${EVENTROUTER_RABBITMQ_DIR:-${TMPDIR:-/tmp}/eventrouter-rabbitmq}/$node"

case "$HOLD" in
  *m) hold_s=$((${HOLD%m} * 60)) ;;
  *s) hold_s="${HOLD%s}" ;;
  *) hold_s="$HOLD" ;;
esac
if ! [[ "$hold_s" =~ ^[1-9][0-9]*$ ]]; then
  echo "HOLD must be whole seconds or minutes (60s, 2m), got '$HOLD'" >&2
  exit 2
fi
for knob in INSTANCES CONNECTIONS_PER_INSTANCE SOURCE_IPS; do
  [[ "${!knob}" =~ ^[1-9][0-9]*$ ]] || { echo "$knob must be a positive number, got '${!knob}'" >&2; exit 2; }
done
((SOURCE_IPS <= 255)) || { echo "SOURCE_IPS is at most 255" >&2; exit 2; }

bench_require jq curl ss getconf
clk_tck="$(getconf CLK_TCK)"

echo "building release binaries ..." >&2
target_dir="${CARGO_TARGET_DIR:-$root/target}"
if [ -z "$SERVICE_BIN" ]; then
  (cd "$root" && cargo build --release --quiet -p event-service --bin event-service)
fi
(cd "$root" && cargo build --release --quiet -p eventrouter-loadgen --bin loadgen)
service_bin="${SERVICE_BIN:-$target_dir/release/event-service}"
loadgen_bin="$target_dir/release/loadgen"

# Every service and every load generator holds one descriptor per connection.
bench_raise_nofile "$CONNECTIONS_PER_INSTANCE"
nofile="$(ulimit -n)"
if [ "$nofile" != unlimited ] && ((CONNECTIONS_PER_INSTANCE > nofile - 128)); then
  echo "warning: the open-files limit $nofile holds at most $((nofile - 128)) connections per service; use more INSTANCES" >&2
fi
# Sockets bound to a source address share its ephemeral-port range.
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
port_range=$((port_hi - port_lo + 1))
per_source=$(((total + SOURCE_IPS - 1) / SOURCE_IPS))
if ((SOURCE_IPS > 1 && per_source * 10 > port_range * 8)); then
  echo "warning: $per_source connections per source address fill more than 80% of the $port_range ephemeral ports; raise SOURCE_IPS" >&2
fi

service_pids=()
loadgen_pids=()
broker_started=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local pid
  for pid in "${loadgen_pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${service_pids[@]}"; do bench_stop "$pid"; done
  if [ -n "$broker_started" ]; then
    "$rabbitmq" stop "$node" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# /proc readers: CPU ticks (utime + stime), VmRSS in KiB, a /proc/meminfo field in KiB.
cpu_ticks() {
  local stat fields
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || { echo 0; return; }
  read -ra fields <<<"${stat##*) }"
  echo $((fields[11] + fields[12]))
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
meminfo_kib() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
# sum_of FUNCTION PID... : the sum of FUNCTION over the processes.
sum_of() {
  local f="$1" sum=0 pid v; shift
  for pid in "$@"; do
    v="$("$f" "$pid")"
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
now() { date +%s.%N; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); open-files limit $nofile"
echo "== starting RabbitMQ node $node (127.0.0.1:$AMQP_PORT) ==" >&2
"$rabbitmq" start "$node" "$AMQP_PORT" "$MGMT_PORT" >/dev/null
broker_started=1
broker_pid="$(cat "$node_dir/pid")"
[[ "$(cat "/proc/$broker_pid/comm" 2>/dev/null)" == beam.smp ]] ||
  echo "warning: pid $broker_pid of node $node is not beam.smp; broker figures may be wrong" >&2
amqp_url="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

echo "== starting $INSTANCES event services ==" >&2
for ((n = 0; n < INSTANCES; n++)); do
  bench_ports_free $((PORT + n)) $((ADMIN_PORT + n))
  # shellcheck disable=SC2086 # SERVICE_ARGS is a list of flags
  "$service_bin" --listen "127.0.0.1:$((PORT + n))" --admin-listen "127.0.0.1:$((ADMIN_PORT + n))" \
    --source amqp --amqp-url "$amqp_url" --declare-exchange true --pod-name "scale-$n" \
    --max-connections "$CONNECTIONS_PER_INSTANCE" --log warn --drain-duration 1s $SERVICE_ARGS \
    >"$RESULTS_DIR/service-$n.log" 2>&1 &
  service_pids+=($!)
done
for ((n = 0; n < INSTANCES; n++)); do
  bench_wait_healthy "http://127.0.0.1:$((PORT + n))/readyz" "${service_pids[n]}" \
    "$RESULTS_DIR/service-$n.log" "event-service $n"
done

rss_before="$(sum_of rss_kib "${service_pids[@]}")"
broker_rss_before="$(rss_kib "$broker_pid")"
slab_before="$(meminfo_kib Slab)"
sunreclaim_before="$(meminfo_kib SUnreclaim)"

echo "== $INSTANCES load generators x $CONNECTIONS_PER_INSTANCE connections, $SOURCE_IPS source addresses ==" >&2
for ((n = 0; n < INSTANCES; n++)); do
  # --hold is only a bound in case nobody sends SIGUSR1.
  # shellcheck disable=SC2086 # LOADGEN_ARGS is a list of flags
  "$loadgen_bin" --threads "$LOADGEN_THREADS" --json idle \
    --addr "127.0.0.1:$((PORT + n))" --admin "127.0.0.1:$((ADMIN_PORT + n))" \
    --service-pid "${service_pids[n]}" --connections "$CONNECTIONS_PER_INSTANCE" \
    --pattern "${PATTERN//\{n\}/$n}" --source-ips "$SOURCE_IPS" \
    --connect-concurrency "$CONNECT_CONCURRENCY" --hold-until-signal --hold "$((hold_s + 1800))s" \
    $LOADGEN_ARGS >"$RESULTS_DIR/loadgen-$n.json" 2>"$RESULTS_DIR/loadgen-$n.log" &
  loadgen_pids+=($!)
done

# Wait until every load generator holds its connections (or has exited).
last_report=$SECONDS
while :; do
  holding=0 gone=0 opened=0
  for ((n = 0; n < INSTANCES; n++)); do
    log="$RESULTS_DIR/loadgen-$n.log"
    if grep -q '  holding ' "$log"; then
      holding=$((holding + 1))
    elif ! kill -0 "${loadgen_pids[n]}" 2>/dev/null; then
      gone=$((gone + 1))
    fi
    o="$(grep -o 'opened [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)"
    opened=$((opened + ${o:-0}))
  done
  ((holding + gone < INSTANCES)) || break
  if ((SECONDS - last_report >= 10)); then
    echo "  $opened of $total connections done (opened or failed), $holding of $INSTANCES load generators holding" >&2
    last_report=$SECONDS
  fi
  sleep 0.2
done
((gone == 0)) || echo "warning: $gone load generator(s) exited before holding; see below" >&2

echo "== holding for ${hold_s}s ==" >&2
t0="$(now)"
cpu0="$(sum_of cpu_ticks "${service_pids[@]}")"
broker_cpu0="$(cpu_ticks "$broker_pid")"
sleep "$hold_s"
t1="$(now)"
cpu1="$(sum_of cpu_ticks "${service_pids[@]}")"
broker_cpu1="$(cpu_ticks "$broker_pid")"
rss_holding="$(sum_of rss_kib "${service_pids[@]}")"
broker_rss_holding="$(rss_kib "$broker_pid")"
slab_holding="$(meminfo_kib Slab)"
sunreclaim_holding="$(meminfo_kib SUnreclaim)"
rss_each=()
for pid in "${service_pids[@]}"; do rss_each+=("$(rss_kib "$pid")"); done
services_alive=0
for pid in "${service_pids[@]}"; do kill -0 "$pid" 2>/dev/null && services_alive=$((services_alive + 1)); done

# Release the load generators together and collect their reports.
for pid in "${loadgen_pids[@]}"; do kill -USR1 "$pid" 2>/dev/null || true; done
loadgen_rc=()
for pid in "${loadgen_pids[@]}"; do
  if wait "$pid"; then loadgen_rc+=(0); else loadgen_rc+=($?); fi
done
loadgen_pids=()

reports=()
for ((n = 0; n < INSTANCES; n++)); do
  f="$RESULTS_DIR/loadgen-$n.json"
  if jq -e . "$f" >/dev/null 2>&1; then reports+=("$f"); fi
done

jq -n \
  --argjson instances "$INSTANCES" --argjson per_instance "$CONNECTIONS_PER_INSTANCE" \
  --argjson source_ips "$SOURCE_IPS" --argjson hold_s "$hold_s" \
  --argjson window_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" \
  --argjson clk_tck "$clk_tck" --argjson cpu0 "$cpu0" --argjson cpu1 "$cpu1" \
  --argjson broker_cpu0 "$broker_cpu0" --argjson broker_cpu1 "$broker_cpu1" \
  --argjson rss_before "$rss_before" --argjson rss_holding "$rss_holding" \
  --argjson rss_each "[$(IFS=,; echo "${rss_each[*]}")]" \
  --argjson broker_rss_before "$broker_rss_before" --argjson broker_rss_holding "$broker_rss_holding" \
  --argjson slab_before "$slab_before" --argjson slab_holding "$slab_holding" \
  --argjson sunreclaim_before "$sunreclaim_before" --argjson sunreclaim_holding "$sunreclaim_holding" \
  --argjson services_alive "$services_alive" \
  --arg pattern "$PATTERN" --arg service_args "$SERVICE_ARGS" --arg loadgen_args "$LOADGEN_ARGS" \
  --argjson loadgen_rc "[$(IFS=,; echo "${loadgen_rc[*]}")]" \
  --slurpfile reports <(cat "${reports[@]}" /dev/null) '
  def after_hold: [.snapshots[] | select(.label == "after hold")][0];
  ($reports | map(.established) | add // 0) as $established
  | ($reports | map(.open_started_unix_s) | min) as $open_start
  | ($reports | map(.open_finished_unix_s) | max) as $open_end
  | (($cpu1 - $cpu0) / $clk_tck) as $cpu_s
  | {
      instances: $instances, connections_per_instance: $per_instance,
      requested: ($instances * $per_instance), established: $established,
      source_ips: $source_ips, pattern: $pattern, service_args: $service_args,
      loadgen_args: $loadgen_args, hold_seconds: $hold_s, window_seconds: $window_s,
      services_alive: $services_alive, loadgen_exit_codes: $loadgen_rc,
      open_seconds: (if $open_start then $open_end - $open_start else null end),
      connect_rate: (if $open_start and $open_end > $open_start then $established / ($open_end - $open_start) else null end),
      service_rss_before_kib: $rss_before, service_rss_holding_kib: $rss_holding,
      service_rss_holding_each_kib: $rss_each,
      service_rss_per_connection_bytes: (if $established > 0 then ($rss_holding - $rss_before) * 1024 / $established else null end),
      slab_before_kib: $slab_before, slab_holding_kib: $slab_holding,
      sunreclaim_before_kib: $sunreclaim_before, sunreclaim_holding_kib: $sunreclaim_holding,
      slab_per_connection_pair_bytes: (if $established > 0 then ($slab_holding - $slab_before) * 1024 / $established else null end),
      sunreclaim_per_connection_pair_bytes: (if $established > 0 then ($sunreclaim_holding - $sunreclaim_before) * 1024 / $established else null end),
      service_cpu_seconds: $cpu_s,
      service_cpu_percent: ($cpu_s / $window_s * 100),
      service_cpu_percent_per_10k: (if $established > 0 then $cpu_s / $window_s * 100 / ($established / 10000) else null end),
      broker_rss_before_kib: $broker_rss_before, broker_rss_holding_kib: $broker_rss_holding,
      broker_cpu_percent: (($broker_cpu1 - $broker_cpu0) / $clk_tck / $window_s * 100),
      pings_received: ($reports | map(.pings_received) | add // 0),
      pongs_sent: ($reports | map(.pongs_sent) | add // 0),
      closed_by_server: ($reports | map(.closed_by_server) | add // 0),
      read_errors: ($reports | map(.read_errors) | add // 0),
      unexpected_messages: ($reports | map(.unexpected_messages) | add // 0),
      server_recv_q_after_hold: ($reports | map(after_hold.queues.server_side.recv_q // 0) | add // 0),
      server_max_recv_q_after_hold: ($reports | map(after_hold.queues.server_side.max_recv_q // 0) | max // 0),
      client_recv_q_after_hold: ($reports | map(after_hold.queues.client_side.recv_q // 0) | add // 0),
      service_connections_after_hold: ($reports | map(after_hold.service_connections // 0) | add // 0)
    }' >"$RESULTS_DIR/scale.json"

s="$RESULTS_DIR/scale.json"
# fig FIELD DIGITS : a figure of the summary rounded to DIGITS decimals, or n/a.
fig() {
  # shellcheck disable=SC2016 # a jq program
  jq -r --arg f "$1" --argjson d "$2" '
    getpath($f | split(".")) | if type == "number" then (. * pow(10; $d) | round) / pow(10; $d) else "n/a" end' "$s"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

echo
echo "scale: $INSTANCES event services x $CONNECTIONS_PER_INSTANCE idle subscribed connections, one RabbitMQ node, $SOURCE_IPS source addresses, held ${hold_s}s"
echo "  established              $(fig established 0) of $total (the services count $(fig service_connections_after_hold 0) after the hold)"
echo "  connect rate             $(fig connect_rate 0) connections/s (all opened in $(fig open_seconds 1) s, concurrently)"
echo "  service RSS              $(mib "$rss_holding") MiB total while holding ($(mib "$rss_before") MiB before); $(fig service_rss_per_connection_bytes 0) B per connection"
echo "  kernel slab (system)     Slab +$(mib $((slab_holding - slab_before))) MiB, SUnreclaim +$(mib $((sunreclaim_holding - sunreclaim_before))) MiB; per connection pair $(fig slab_per_connection_pair_bytes 0) B (SUnreclaim $(fig sunreclaim_per_connection_pair_bytes 0) B)"
echo "  idle CPU (services)      $(fig service_cpu_percent 2)% of one core over $(fig window_seconds 1) s, all $INSTANCES together; $(fig service_cpu_percent_per_10k 2)% per 10k connections"
echo "  broker                   RSS $(mib "$broker_rss_holding") MiB while holding ($(mib "$broker_rss_before") MiB before); CPU $(fig broker_cpu_percent 2)% of one core over the hold"
echo "  pings answered           $(fig pongs_sent 0) of $(fig pings_received 0) received (whole run)"
echo "  server Recv-Q after hold $(fig server_recv_q_after_hold 0) B (max $(fig server_max_recv_q_after_hold 0) B on one socket); client side $(fig client_recv_q_after_hold 0) B"
echo "  closed by server         $(fig closed_by_server 0) (read errors $(fig read_errors 0), unexpected messages $(fig unexpected_messages 0))"
echo
printf '  %-4s %-6s %-15s %-8s %-10s %-9s %-8s %-7s %-7s %s\n' \
  inst port established open_s RSS_MiB B/conn pongs closed recv_q failures
for ((n = 0; n < INSTANCES; n++)); do
  f="$RESULTS_DIR/loadgen-$n.json"
  if jq -e . "$f" >/dev/null 2>&1; then
    # shellcheck disable=SC2016 # a jq program
    jq -r --arg n "$n" --arg port $((PORT + n)) --arg rss "$(mib "${rss_each[n]}")" '
      def after_hold: [.snapshots[] | select(.label == "after hold")][0];
      [$n, $port, "\(.established)/\(.requested)", (.open_seconds * 10 | round / 10), $rss,
       (.rss_per_connection_bytes // "n/a" | if type == "number" then round else . end),
       .pongs_sent, .closed_by_server, (after_hold.queues.server_side.recv_q // "n/a"),
       (.failures | if length == 0 then "-" else to_entries | map("\(.key):\(.value)") | join(",") end)]
      | @tsv' "$f" | awk -F'\t' '{ printf "  %-4s %-6s %-15s %-8s %-10s %-9s %-8s %-7s %-7s %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }'
  else
    printf '  %-4s %-6s no report (load generator exit status %s)\n' "$n" $((PORT + n)) "${loadgen_rc[n]}"
  fi
done

# What ran out: every instance that did not get all its connections, with the reason.
hint() {
  case "$1" in
    connect:AddrNotAvailable | connect:AddrInUse)
      echo "the source addresses ran out of ephemeral ports ($per_source connections per address, $port_range ports each): raise SOURCE_IPS" ;;
    connect:Uncategorized | io:Uncategorized)
      echo "probably the load generator's open files (EMFILE): limit $nofile" ;;
    http_503)
      echo "the service refused upgrades: at --max-connections or out of descriptors (its log says which)" ;;
    http_429)
      echo "a per-address limit of the service (--max-connections-per-ip, --connect-rate-per-ip)" ;;
    connect:ConnectionRefused | connect:ConnectionReset | io:ConnectionReset | io:UnexpectedEof)
      echo "the accept backlog overflowed or the service went away: lower CONNECT_CONCURRENCY, check net.core.somaxconn" ;;
    timeout)
      echo "no upgrade or subscription ack within the load generator's --handshake-timeout: the service, the broker's queue.bind or the machine is saturated" ;;
    subscribe_error)
      echo "the service could not bind the pattern on RabbitMQ (its log; the broker's log is under $node_dir/log)" ;;
    *) echo "see the load generator's log" ;;
  esac
}
failed=0
for ((n = 0; n < INSTANCES; n++)); do
  f="$RESULTS_DIR/loadgen-$n.json"
  log="$RESULTS_DIR/loadgen-$n.log"
  if ! jq -e . "$f" >/dev/null 2>&1; then
    failed=1
    echo
    echo "instance $n: the load generator exited with status ${loadgen_rc[n]} and no report; its log ($log) ends:"
    tail -n 5 "$log" | sed 's/^/    /'
  elif [ "$(jq '.established < .requested' "$f")" = true ]; then
    failed=1
    echo
    echo "instance $n: $(jq -r '"established \(.established) of \(.requested) in \(.open_seconds * 10 | round / 10) s; failures \(.failures | tojson)"' "$f")"
    echo "  first failure: $(jq -r '.first_failure // "-"' "$f")"
    while read -r kind; do
      echo "  $kind: $(hint "$kind")"
    done < <(jq -r '.failures | keys[]' "$f")
  fi
  if ! kill -0 "${service_pids[n]}" 2>/dev/null; then
    failed=1
    echo "instance $n: the event service exited; its log ($RESULTS_DIR/service-$n.log) ends:"
    tail -n 5 "$RESULTS_DIR/service-$n.log" | sed 's/^/    /'
  elif grep -qE 'WARN|ERROR' "$RESULTS_DIR/service-$n.log"; then
    echo "instance $n: the event service logged $(grep -cE 'WARN|ERROR' "$RESULTS_DIR/service-$n.log") warning(s) or error(s), the last:"
    grep -E 'WARN|ERROR' "$RESULTS_DIR/service-$n.log" | tail -n 3 | sed 's/^/    /'
  fi
done
kill -0 "$broker_pid" 2>/dev/null || { failed=1; echo "the RabbitMQ node exited; its logs are in $node_dir/log"; }

echo
echo "reports: $RESULTS_DIR (scale.json, loadgen-<n>.json and .log, service-<n>.log)"
exit "$failed"
