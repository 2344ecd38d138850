#!/usr/bin/env bash
# Fuzzes the event service's input parsers with cargo-fuzz (libFuzzer, nightly toolchain).
#
# Usage: tests/fuzz.sh [TARGET] [SECONDS]
#   TARGET   one of client_frame, patterns, token, publish, amqp_message, or "all" (default)
#   SECONDS  run time per target (default 600)
#
# Runs the targets one after another (one fuzzer process at a time), growing the corpora in
# event-service/fuzz/corpus/<target>/, and prints each target's final libFuzzer stats line.
# Crash inputs land in event-service/fuzz/artifacts/<target>/. Not part of the default test run;
# the committed corpora replay in `cargo test -p event-service` (fuzzing::tests).
# FUZZ_LOG_DIR=dir keeps each target's full libFuzzer output as dir/<target>.log.
set -euo pipefail

TARGET="${1:-all}"
SECONDS_PER_TARGET="${2:-600}"
ALL_TARGETS=(client_frame patterns token publish amqp_message)

cd "$(dirname "$0")/../event-service"

# libFuzzer's instrumentation needs a nightly toolchain; cargo-fuzz drives it.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [[ "$TARGET" == all ]]; then
    targets=("${ALL_TARGETS[@]}")
else
    targets=("$TARGET")
fi

status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    if [[ -n "${FUZZ_LOG_DIR:-}" ]]; then
        mkdir -p "$FUZZ_LOG_DIR"
        log="$FUZZ_LOG_DIR/$t.log"
    else
        log="$(mktemp)"
    fi
    echo "== $t (${SECONDS_PER_TARGET}s)"
    if cargo +nightly fuzz run "$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
        >"$log" 2>&1; then
        grep -aE '^#[0-9]+[[:space:]]+DONE' "$log" || tail -c 2000 "$log"
    else
        echo "!! $t failed:"
        tail -n 40 "$log"
        status=1
    fi
    [[ -n "${FUZZ_LOG_DIR:-}" ]] || rm -f "$log"
done
exit "$status"
