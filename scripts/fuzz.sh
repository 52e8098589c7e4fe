#!/usr/bin/env bash
# Fuzzes the spec loader and the planner with libFuzzer for a bounded time:
# target `spec` (any bytes as kiln.toml, from the checked-in corpus in
# fuzz/corpus/spec/) and target `spec_gen` (kiln.toml files generated from
# the fuzzer's bytes), half of the time each. Fails on any panic, hang (an
# input running longer than 30 s) or sanitizer report, leaving the input
# in fuzz/artifacts/TARGET/. Prints executions per second and total
# executions of each target.
#
#   scripts/fuzz.sh [SECONDS]             # default 60
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

cargo fuzz build --sanitizer "$sanitizer"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
half=$(((secs + 1) / 2))
for target in spec spec_gen; do
    # New inputs go to a scratch corpus; the checked-in one is only read.
    mkdir -p "$work/$target" "fuzz/corpus/$target" "fuzz/artifacts/$target"
    # The dictionary holds kiln.toml words: of use to the text target only.
    dict=()
    [ "$target" = spec ] && dict=(-dict="$here/fuzz/spec.dict")
    status=0
    cargo fuzz run --sanitizer "$sanitizer" "$target" "$work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$half" -timeout=30 -rss_limit_mb=2048 -max_len=8192 -len_control=0 \
        "${dict[@]}" -print_final_stats=1 \
        -artifact_prefix="$here/fuzz/artifacts/$target/" \
        >"$work/$target.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$work/$target.log"
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/ (add it to fuzz/corpus/spec/ once fixed)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$target.log")
    echo "fuzz: $target, ${half}s ($sanitizer sanitizer): ${runs:-?} executions, ${rate:-?} exec/s, 0 crashes"
done
