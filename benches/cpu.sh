#!/usr/bin/env bash
# CPU per request of any proxy already running on loopback.
#
#   bash benches/cpu.sh PORT "PID [PID...]" [SECONDS] [PATH]
#
# Runs `wrk -t2 -c64 -dSECONDS` (default 5) against http://127.0.0.1:PORT/PATH
# (default /api/contacts/1) and prints the rate, the user and system CPU
# of the given processes (all their threads, from /proc/PID/task/*/stat)
# per request, and the whole machine's busy CPU per request (/proc/stat:
# the proxy, wrk, the upstream, the kernel's own threads). On a saturated
# 2-core machine the last one is what sets the rate, and it is the one to
# compare between two proxies. It also prints context switches per
# request: the processes' involuntary ones (preempted while runnable) and
# the machine's (/proc/stat ctxt).
#
# For nginx give the master and its workers: "$(cat nginx.pid) $(pgrep -P
# "$(cat nginx.pid)" | tr '\n' ' ')". Only 127.0.0.1 is contacted.
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,15p' "$0"; exit 2; }
PORT=$1 PIDS=$2 SECONDS_RUN=${3:-5} URL_PATH=${4:-/api/contacts/1}
command -v wrk >/dev/null || { echo "wrk missing (bash benches/load.sh installs it)" >&2; exit 1; }

proc_ticks() { # user and system ticks of every thread of PIDS
    local u=0 s=0 p t f
    for p in $PIDS; do
        for t in /proc/"$p"/task/*/stat; do
            read -r -a f < <(sed 's/.*) //' "$t")
            u=$((u + f[11])) s=$((s + f[12]))
        done
    done
    echo "$u $s"
}
proc_preempted() { # involuntary context switches of every thread of PIDS
    local n=0 p
    for p in $PIDS; do
        n=$((n + $(awk '/^nonvoluntary_ctxt_switches/ { s += $2 } END { print s + 0 }' /proc/"$p"/task/*/status)))
    done
    echo "$n"
}
machine_switches() { awk '/^ctxt / { print $2 }' /proc/stat; }
machine_busy() { # busy ticks of the whole machine (not idle, not iowait)
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

read -r u0 s0 < <(proc_ticks)
m0=$(machine_busy) c0=$(machine_switches) p0=$(proc_preempted)
out=$(wrk -t2 -c64 -d"${SECONDS_RUN}s" "http://127.0.0.1:$PORT$URL_PATH")
m1=$(machine_busy) c1=$(machine_switches) p1=$(proc_preempted)
read -r u1 s1 < <(proc_ticks)
n=$(awk '/ requests in /{ print $1 }' <<<"$out")
rps=$(awk '/^Requests\/sec:/{ print $2 }' <<<"$out")
awk -v n="$n" -v rps="$rps" -v h="$(getconf CLK_TCK)" -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v m="$((m1 - m0))" \
    -v p="$((p1 - p0))" -v c="$((c1 - c0))" 'BEGIN {
    printf "%.0f req/s  user %.2f  sys %.2f  machine %.2f µs/req  preempted %.2f  machine switches %.2f /req\n",
        rps, u * 1e6 / h / n, s * 1e6 / h / n, m * 1e6 / h / n, p / n, c / n }'
