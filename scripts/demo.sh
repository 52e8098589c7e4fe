#!/usr/bin/env bash
# kiln's main job on the embedded default: scaffold the example project,
# bake its images (debootstrap base → app), and verify their seals.
# Needs root. Usage: scripts/demo.sh [DIR]   (default: ./demo)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$here/demo}"
bash "$here/scripts/setup.sh"
cargo build --release --locked --manifest-path "$here/Cargo.toml" -p kiln
kiln="$here/target/release/kiln"
[ -f "$dir/kiln.toml" ] || "$kiln" init "$dir"
"$kiln" -C "$dir" image build --all
"$kiln" -C "$dir" image list
"$kiln" -C "$dir" image verify app
