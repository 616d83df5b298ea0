#!/usr/bin/env bash
# A/B of two rempart binaries: CPU per request, same upstream, same load.
#
#   bash benches/ab.sh OLD_BINARY NEW_BINARY [ROUNDS]
#
# Starts a static upstream (nginx, 1 worker, the same JSON body and
# keep-alive settings as load.sh: benches/lib.sh) and both binaries in
# front of it (shipped policies, audit on), then runs `wrk -t2 -c64 -d${SECONDS_PER_ROUND:-6}s` against A, then B,
# ROUNDS times (default 4), and prints each round and the means: req/s and
# the user and system CPU (from /proc/PID/stat) per request.
#
# Differences under about 0.5 µs per request are noise on a 2-core machine,
# and whichever binary runs first in a round tends to come out ahead: run
# it twice with the binaries swapped before believing a gain.
# PATHS=N requests /api/contacts/<random 1..N> instead of one path.
# BROWSER=1 sends the ten headers a browser's CRM request carries (user
# agent, accept*, a session cookie, referer, sec-fetch-*) instead of wrk's
# bare Host.
# Needs nginx and wrk (`bash benches/load.sh` installs both).
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,16p' "$0"; exit 2; }
A=$1 B=$2 ROUNDS=${3:-4}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() { # port
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1 after 10 s (see $TMP)" >&2
    exit 1
}

UP=$(free_port)
mkdir -p "$TMP/upstream"
static_upstream_conf "$TMP/upstream" "$UP" >"$TMP/upstream/nginx.conf"
nginx -p "$TMP/upstream" -e "$TMP/upstream/error.log" -c "$TMP/upstream/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_port "$UP"

start() { # name binary -> "pid port"
    local port admin
    port=$(free_port)
    admin=$(free_port)
    "$2" serve --upstream "http://127.0.0.1:$UP" --listen "127.0.0.1:$port" \
        --admin "127.0.0.1:$admin" --policies "$REPO/policies" \
        --audit "$TMP/$1.jsonl" >"$TMP/$1.log" 2>&1 &
    echo "$! $port"
}
read -r PID_A PORT_A < <(start a "$A")
PIDS+=("$PID_A")
read -r PID_B PORT_B < <(start b "$B")
PIDS+=("$PID_B")
wait_port "$PORT_A"
wait_port "$PORT_B"

WRK_ARGS=()
if [[ -n ${PATHS:-} ]]; then
    cat >"$TMP/paths.lua" <<EOF
request = function()
    return wrk.format(nil, "/api/contacts/" .. math.random(1, $PATHS))
end
EOF
    WRK_ARGS=(-s "$TMP/paths.lua")
fi
if [[ -n ${BROWSER:-} ]]; then
    WRK_ARGS+=(
        -H "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
        -H "Accept: application/json, text/plain, */*"
        -H "Accept-Language: fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7"
        -H "Accept-Encoding: gzip, deflate, br, zstd"
        -H "Cookie: session_id=5f1c0e9b2a7d4c3e8f6a1b0d9c8e7f6a; frontend_lang=fr_FR; tz=Europe/Paris"
        -H "Referer: http://127.0.0.1/web"
        -H "Sec-Fetch-Dest: empty"
        -H "Sec-Fetch-Mode: cors"
        -H "Sec-Fetch-Site: same-origin"
        -H "X-Requested-With: XMLHttpRequest"
    )
fi

cpu() { awk '{ print $14, $15 }' "/proc/$1/stat"; } # user, system ticks

round() { # label pid port
    local t0 t1 out
    t0=$(cpu "$2")
    out=$(wrk -t2 -c64 "-d${SECONDS_PER_ROUND:-6}s" "${WRK_ARGS[@]}" "http://127.0.0.1:$3/api/contacts/42")
    t1=$(cpu "$2")
    echo "$1 $t0 $t1 $(awk '/requests in/ { print $1 }' <<<"$out") $(awk '/Requests\/sec/ { print $2 }' <<<"$out")" |
        awk -v hz="$(getconf CLK_TCK)" '{ printf "%s req/s %s user %.2f sys %.2f us/req\n", $1, $7, ($4 - $2) * 1e6 / hz / $6, ($5 - $3) * 1e6 / hz / $6 }'
}

for _ in $(seq "$ROUNDS"); do
    round A "$PID_A" "$PORT_A"
    round B "$PID_B" "$PORT_B"
done | tee "$TMP/rounds.txt"
awk '{ n[$1]++; r[$1] += $3; u[$1] += $5; s[$1] += $7 }
     END { for (k in n) printf "%s mean: req/s %.0f, user %.2f us/req, sys %.2f us/req\n", k, r[k] / n[k], u[k] / n[k], s[k] / n[k] }' \
    "$TMP/rounds.txt" | sort
