#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: installs what the tests need,
# then the formatting gate, the lint gate, every test of the workspace, and
# a bounded fuzzing run of the spec loader and planner (FUZZ_SECONDS,
# default 60; see scripts/fuzz.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
