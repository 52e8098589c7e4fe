#!/usr/bin/env bash
# Installs what kiln and its tests need on a fresh Debian machine (as root):
# busybox-static (a real userland for test images), debootstrap (Debian
# bases), zstd (a .tar.zst fixture), python3 (writes hostile tarballs),
# iproute2 (server networks), openssh-client (ssh-keygen: signature
# interop tests), libseccomp-dev (libcontainer's seccomp support links
# against libseccomp), util-linux (runuser in tests), g++ (libFuzzer, built
# by scripts/fuzz.sh), iptables (environment isolation; dockerd programs
# its firewall with it too), dnsmasq-base and dnsperf (the DNS
# benchmark: dnsmasq-base is the dnsmasq binary without the service that
# would start on port 53), curl (an HTTP/2 client for the balancer's TLS
# tests), pebble (ACME test server), haproxy and wrk (the balancer
# benchmark's reference and load generator), and for the `swarm`
# provider's tests a real Docker Swarm: docker.io (dockerd 20.10,
# containerd, runc) and docker-registry. Idempotent and quiet when all is
# there.
set -euo pipefail
need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v c++ >/dev/null 2>&1 || need+=(g++)
dpkg -s dnsmasq-base >/dev/null 2>&1 || need+=(dnsmasq-base)
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v pebble >/dev/null 2>&1 || need+=(pebble)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
dpkg -s libseccomp-dev >/dev/null 2>&1 || need+=(libseccomp-dev)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "kiln needs root to run sandboxes and to install: ${need[*]}" >&2
    exit 1
  fi
  echo "installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages start their daemons on install. A dockerd on the host would set
  # the host's FORWARD policy to DROP (breaking traffic between servers on
  # the local provider's bridges); the tests run their own daemons in
  # network namespaces. So nothing starts during this install.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    guard=1
  fi
  apt-get install -y -qq "${need[@]}" >/dev/null
  if [ -n "$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi
  # Only the binary is wanted: the packaged service must not hold ports.
  if [[ " ${need[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
fi
