#!/usr/bin/env bash
# The whole test suite: unit tests, hermetic tests and real end-to-end tests
# (libcontainer sandboxes, tarballs, OCI layouts, debootstrap). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
