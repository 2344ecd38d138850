# shellcheck shell=bash
# Shell functions shared by the benchmark scripts of tests/loadgen (bench.sh, side-by-side.sh).
# Source it from bash; it defines functions only and changes no options.

# bench_require TOOL... : exit unless every TOOL is on PATH.
bench_require() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "$(basename "$0") needs $tool on PATH" >&2
      exit 1
    }
  done
}

# bench_raise_nofile CONNECTIONS : raise the open-file limit to the hard limit (the server and the
# load generator each hold one descriptor per connection) and warn when it is still too low.
bench_raise_nofile() {
  local connections="$1"
  ulimit -n "$(ulimit -Hn)"
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((connections + 256)) ]; then
    echo "warning: open-file limit $(ulimit -n) is below $connections connections (raise ulimit -Hn)" >&2
  fi
}

# bench_ports_free PORT... : exit when one of the loopback ports is already listening.
bench_ports_free() {
  local p
  for p in "$@"; do
    if ss -Hltn "sport = :$p" | grep -q .; then
      echo "port $p is in use; set PORT/ADMIN_PORT" >&2
      exit 1
    fi
  done
}

# bench_wait_healthy URL PID LOG NAME : wait up to 10 s for URL to answer 2xx while PID lives,
# then 1 s more so the allocator and runtime settle before a baseline RSS. Exits with the log
# when the process dies or never becomes healthy.
bench_wait_healthy() {
  local url="$1" pid="$2" log="$3" name="$4"
  for _ in $(seq 1 100); do
    if curl -fsS "$url" >/dev/null 2>&1; then
      sleep 1
      return
    fi
    kill -0 "$pid" 2>/dev/null || {
      echo "$name exited; its log ($log):" >&2
      cat "$log" >&2
      exit 1
    }
    sleep 0.1
  done
  echo "$name did not become healthy at $url; log: $log" >&2
  exit 1
}

# bench_stop PID : SIGTERM the process and wait for it (a no-op when it is gone).
bench_stop() {
  local pid="$1"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
}

# bench_wait_load MAX : when MAX is set, wait (at most 5 minutes) until the 1-minute load average
# is at most MAX, so a run does not start on a machine still busy with the previous one.
bench_wait_load() {
  local max="$1"
  [ -n "$max" ] || return 0
  for _ in $(seq 1 300); do
    awk -v max="$max" '{ exit !($1 <= max) }' /proc/loadavg && return 0
    sleep 1
  done
  echo "warning: load average still $(cut -d' ' -f1 /proc/loadavg) > $max; running anyway" >&2
}

# bench_stats FIELD DIGITS FILE... : "median (range min–max, n)" of a numeric field (a dotted
# path) over the JSON run reports, rounded to DIGITS decimals.
bench_stats() {
  local field="$1" digits="$2"; shift 2
  jq -rs --arg f "$field" --argjson d "$digits" '
    def r: (. * pow(10; $d) | round) / pow(10; $d);
    map(getpath($f | split(".")) // empty) | sort
    | if length == 0 then "n/a"
      else "\(.[(length / 2 | floor)] | r) (range \(.[0] | r)–\(.[-1] | r), n=\(length))"
      end' "$@"
}

# bench_cell FILTER DIGITS RUNS FILE... : "<median> <median (min–max)>" of a jq FILTER (e.g.
# `.missing`, `(.publish_errors | add // 0)`) over the JSON run reports, rounded to DIGITS
# decimals (the upper median for an even count, as bench_stats), with ", n=<count>" when fewer
# than RUNS reports give a number; "n/a n/a" when none does.
bench_cell() {
  local filter="$1" digits="$2" runs="$3"; shift 3
  jq -rs --argjson d "$digits" --argjson runs "$runs" "
    def r: (. * pow(10; \$d) | round) / pow(10; \$d);
    [.[] | (try ($filter) catch null) | numbers] | sort
    | if length == 0 then \"n/a n/a\"
      else \"\\(.[(length / 2 | floor)]) \\(.[(length / 2 | floor)] | r) (\\(.[0] | r)–\\(.[-1] | r)\\(if length < \$runs then \", n=\\(length)\" else \"\" end))\"
      end" "$@"
}
