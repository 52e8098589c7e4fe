#!/usr/bin/env bash
# Shows what a dockerd does to the local provider's bridges, and that one
# iptables rule undoes it, without touching this host's firewall: a fake
# "host" network namespace gets a kiln-style bridge (kb-check, .1 on it)
# with two servers (.2, .3) and a second bridge (kb-other) with one server,
# then a real dockerd starts inside the fake host.
#
# Prints, for each stage, host->server, server->host, server->server (same
# bridge) and server->server across bridges (another environment, which
# must stay blocked). Cleans up after itself. Needs root, dockerd, iptables,
# curl and busybox-static.
set -euo pipefail
P=kfc$$; H=$P-host; D=$(mktemp -d /var/tmp/$P.XXXX)
B=/bin/busybox
cleanup() {
  [ -f "$D/docker.pid" ] && kill "$(cat "$D/docker.pid")" 2>/dev/null && sleep 3
  for ns in $H $P-s1 $P-s2 $P-s3; do
    pids=$(ip netns pids $ns 2>/dev/null || true); [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
  sleep 0.3
  for ns in $H $P-s1 $P-s2 $P-s3; do ip netns del $ns 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
F="ip netns exec $H"
ip netns add $H; $F ip link set lo up
net() { # bridge subnet-prefix server-index...
  local br=$1 pfx=$2; shift 2
  $F ip link add $br type bridge; $F ip addr add $pfx.1/24 dev $br; $F ip link set $br up
  for i in "$@"; do
    ip netns add $P-s$i
    $F ip link add kv$i type veth peer name eth0 netns $P-s$i
    $F ip link set kv$i master $br up
    ip -n $P-s$i addr add $pfx.$((i+1))/24 dev eth0
    ip -n $P-s$i link set eth0 up; ip -n $P-s$i link set lo up
    ip -n $P-s$i route add default via $pfx.1
  done
}
net kb-check 10.251.0 1 2
net kb-other 10.251.1 3
mkdir -p "$D/www"; echo ok > "$D/www/index.html"
for ns in $H $P-s1 $P-s2 $P-s3; do ip netns exec $ns $B httpd -p 8080 -h "$D/www"; done
sleep 0.3
probe() { ip netns exec $1 curl -sf -m 2 "http://$2:8080/" >/dev/null && echo ok || echo BLOCKED; }
report() {
  echo "== $1"
  echo "   host -> server        $(probe $H 10.251.0.2)"
  echo "   server -> host        $(probe $P-s1 10.251.0.1)"
  echo "   server -> server      $(probe $P-s1 10.251.0.3)"
  echo "   server -> other env   $(probe $P-s1 10.251.1.2)"
}
report "before dockerd (bridge-nf-call-iptables=$($F cat /proc/sys/net/bridge/bridge-nf-call-iptables), ip_forward=$($F cat /proc/sys/net/ipv4/ip_forward))"
echo '{}' > "$D/daemon.json"
unshare -m --propagation slave nsenter --net=/var/run/netns/$H dockerd --config-file "$D/daemon.json" \
  --data-root "$D/data" --exec-root "$D/exec" --pidfile "$D/docker.pid" -H "unix://$D/docker.sock" >"$D/log" 2>&1 &
for _ in $(seq 100); do curl -s --unix-socket "$D/docker.sock" http://x/_ping >/dev/null 2>&1 && break; sleep 0.1; done
report "with dockerd (FORWARD policy $($F iptables -S FORWARD | head -1 | cut -d' ' -f3), ip_forward=$($F cat /proc/sys/net/ipv4/ip_forward))"
RULE=(FORWARD -i kb-+ -m physdev --physdev-is-bridged -m comment --comment kiln -j ACCEPT)
$F iptables -I "${RULE[@]}"
report "with dockerd + iptables -I ${RULE[*]}"
