#!/usr/bin/env bash
# Installs what kiln and its tests need on a fresh Debian machine (as root):
# busybox-static (a real userland for test images), debootstrap (Debian
# bases), zstd (a .tar.zst fixture), python3 (writes hostile tarballs),
# iproute2 (server networks), curl (an HTTP/2 client for the balancer's TLS
# tests), pebble (ACME test server for the balancer's ACME tests), haproxy
# and wrk (the balancer benchmark's reference and load generator).
# Idempotent and quiet when all is there.
set -euo pipefail
need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v pebble >/dev/null 2>&1 || need+=(pebble)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "kiln needs root to run sandboxes and to install: ${need[*]}" >&2
    exit 1
  fi
  echo "installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  # Only the binary is wanted: the packaged service must not hold ports.
  if [[ " ${need[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
fi
