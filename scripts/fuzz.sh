#!/usr/bin/env bash
# Fuzzes the spec loader and the planner (fuzz/fuzz_targets/spec.rs) with
# libFuzzer for a bounded time, starting from the checked-in corpus
# (fuzz/corpus/spec/). Fails on any panic, hang (an input running longer
# than 30 s) or sanitizer report, leaving the input in fuzz/artifacts/spec/.
# Prints executions per second and total executions.
#
#   scripts/fuzz.sh [SECONDS]          # default 60
#   FUZZ_SANITIZER=none scripts/fuzz.sh   # without AddressSanitizer
set -euo pipefail
secs="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly `-Z` flags (sanitizer, coverage); the stable
# compiler accepts them when told it is bootstrapping itself. The
# AddressSanitizer runtime ships with the stable x86_64 Linux toolchain.
export RUSTC_BOOTSTRAP=1

cargo fuzz build --sanitizer "$sanitizer" spec

# New inputs go to a scratch corpus; the checked-in one is only read.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/corpus" fuzz/artifacts/spec
start=$(date +%s)
status=0
cargo fuzz run --sanitizer "$sanitizer" spec "$work/corpus" fuzz/corpus/spec -- \
    -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=8192 \
    -dict="$here/fuzz/spec.dict" -print_final_stats=1 -artifact_prefix="$here/fuzz/artifacts/spec/" \
    >"$work/log" 2>&1 || status=$?
elapsed=$(($(date +%s) - start))

if [ "$status" -ne 0 ]; then
    tail -n 60 "$work/log"
    echo "fuzz: FAILED after ${elapsed}s; the input is in fuzz/artifacts/spec/ (add it to fuzz/corpus/spec/ once fixed)" >&2
    exit 1
fi
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log")
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/log")
echo "fuzz: spec target, ${secs}s ($sanitizer sanitizer): ${runs:-?} executions, ${rate:-?} exec/s, 0 crashes"
