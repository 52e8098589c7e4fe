#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: installs what the tests need,
# then the formatting gate, the lint gate and every test of the workspace.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
