#!/usr/bin/env bash
# Egress tunnel throughput in a sidecar's topology: the CRM and rempart on
# one host's loopback, the destination across a network link.
#
#   bash benches/egress_link.sh            # as root; RATES="1gbit 10gbit none"
#   RATES=10gbit BYTES=$((4<<30)) bash benches/egress_link.sh
#
# benches/egress.rs measures on loopback alone, where the destination is
# a process on the same 2 cores and every byte of a tunnel crosses two
# loopback connections against one for the direct transfer: there the
# kernel's TCP work is the bound, for any relay. In a deployment the CRM
# talks to rempart over its pod's loopback and rempart to the destination
# over the network. This script builds that shape, on this machine only:
#
#   namespace rp-crm-PID: the bench client, rempart (started by the bench),
#                         and a plain copy relay, on the namespace's own lo;
#                         veth end 198.18.0.1/30
#   namespace rp-dst-PID: the sink; veth end 198.18.0.2/30
#
# 198.18.0.0/15 is the range RFC 2544 sets aside for benchmarks; the veth
# pair exists only between the two namespaces, so no packet leaves them.
# Each rate in RATES shapes both ends of the link with `tc tbf` ("none":
# the bare veth pair). For each, the bench pushes BYTES direct (client ->
# sink over the link), through the plain copy relay, and through a rempart
# CONNECT tunnel, ROUNDS times, and prints the same lines as
# `cargo bench --bench egress`.
#
# Needs root (namespaces) and iproute2 (ip, tc). It builds the bench with
# cargo as the user running it: run it as the owner of target/. Everything
# it made is removed on exit.
set -euo pipefail

RATES=${RATES:-"1gbit 10gbit none"}
BYTES=${BYTES:-$((1 << 30))}
ROUNDS=${ROUNDS:-3}
PORT=9000
REPO=$(cd "$(dirname "$0")/.." && pwd)
CRM=rp-crm-$$
DST=rp-dst-$$
VC=rpc$$
VD=rpd$$
SINK_PID=

cleanup() {
    if [[ -n $SINK_PID ]]; then kill "$SINK_PID" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    # Deleting a namespace deletes the veth end inside it; the pair is
    # also created inside them, so nothing is left in the host's.
    ip link del "$VC" 2>/dev/null || true
    ip netns del "$CRM" 2>/dev/null || true
    ip netns del "$DST" 2>/dev/null || true
}
trap cleanup EXIT

command -v tc >/dev/null || { echo "needs tc (Debian package iproute2)" >&2; exit 1; }

# The bench binary (and the rempart binary it starts), built once.
BENCH=$(cd "$REPO" && cargo bench --bench egress --no-run 2>&1 |
    sed -n 's/.*Executable benches\/egress.rs (\(.*\))/\1/p' | tail -1)
[[ -x $REPO/$BENCH ]] || { echo "no bench binary found" >&2; exit 1; }
BENCH=$REPO/$BENCH

ip netns add "$CRM"
ip netns add "$DST"
ip -n "$CRM" link add "$VC" type veth peer name "$VD" netns "$DST"
ip -n "$CRM" addr add 198.18.0.1/30 dev "$VC"
ip -n "$DST" addr add 198.18.0.2/30 dev "$VD"
for ns in "$CRM" "$DST"; do ip -n "$ns" link set lo up; done
ip -n "$CRM" link set "$VC" up
ip -n "$DST" link set "$VD" up

REMPART_BENCH_SINK_ONLY=198.18.0.2:$PORT ip netns exec "$DST" "$BENCH" --bench &
SINK_PID=$!
up=0
for _ in $(seq 1 50); do
    if ip netns exec "$CRM" bash -c "exec 3<>/dev/tcp/198.18.0.2/$PORT" 2>/dev/null; then
        up=1
        break
    fi
    sleep 0.1
done
((up)) || { echo "the sink did not come up on 198.18.0.2:$PORT" >&2; exit 1; }

for rate in $RATES; do
    for pair in "$CRM $VC" "$DST $VD"; do
        read -r ns dev <<<"$pair"
        tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
        if [[ $rate != none ]]; then
            # Burst: one millisecond at the rate (at least 64 KiB).
            r=${rate%bit}
            bits=$(numfmt --from=si "${r^^}")
            burst=$(( bits / 8 / 1000 > 65536 ? bits / 8 / 1000 : 65536 ))
            tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 20ms
        fi
    done
    echo "== link $rate"
    ip netns exec "$CRM" env REMPART_BENCH_TARGET=198.18.0.2:$PORT \
        REMPART_BENCH_BYTES="$BYTES" REMPART_BENCH_ROUNDS="$ROUNDS" \
        REMPART_BENCH_CONNECTS=0 "$BENCH" --bench | grep throughput
done
