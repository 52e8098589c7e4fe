#!/usr/bin/env bash
# kiln's main job on the embedded default: scaffold the example project,
# bake its images (debootstrap base → app), fire its `staging` environment
# on the local provider, and print the addresses to curl.
# Needs root. Usage: scripts/demo.sh [DIR]   (default: ./demo)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$here/demo}"
bash "$here/scripts/setup.sh"
cargo build --release --locked --manifest-path "$here/Cargo.toml" -p kiln
kiln="$here/target/release/kiln"
[ -f "$dir/kiln.toml" ] || "$kiln" init "$dir"
"$kiln" -C "$dir" image build --all
"$kiln" -C "$dir" image verify app
"$kiln" -C "$dir" apply staging --yes
"$kiln" -C "$dir" server list staging
addr=$("$kiln" -C "$dir" server list staging --json | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]; print("%s:%s" % (s["address"], s["ports"][0]))')
echo
echo "curl http://$addr/"
curl -fsS "http://$addr/" || python3 -c "import urllib.request; print(urllib.request.urlopen('http://$addr/').read().decode())"
echo
echo "curl http://127.0.0.1:8080/   (through the role's balancer)"
curl -fsS "http://127.0.0.1:8080/" || python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').read().decode())"
echo
echo "Tear it down with: $kiln -C $dir destroy staging --yes"
