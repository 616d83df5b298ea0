#!/usr/bin/env bash
# A/B of the audit durability modes: two rempart processes in front of the
# same static upstream (nginx), one with [audit] durability = "buffered",
# one with "sync", measured with wrk in alternating runs, on loopback only.
#
#   bash benches/audit_sync.sh
#
# Needs nginx and wrk (benches/load.sh installs them) and a built
# target/release/rempart. Knobs: DURATION [5s], ROUNDS [3], CONNECTIONS [64]
# (full load, wrk -t2), MODERATE_CONNECTIONS [8] (wrk -t1), AUDIT_DIR [a
# temp dir]: where the trails are written (the file system decides what an
# fsync costs). Prints one line per run and the medians; the trails are
# checked with `rempart audit verify` at the end.
set -euo pipefail
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
MODERATE_CONNECTIONS=${MODERATE_CONNECTIONS:-8}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release/rempart
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rempart-audit-ab.XXXXXX")
AUDIT_DIR=${AUDIT_DIR:-$TMP}
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

UP_PORT=$(free_port)
mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<CONF
worker_processes 1;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $TMP/up/cb; proxy_temp_path $TMP/up/px;
    fastcgi_temp_path $TMP/up/fc; uwsgi_temp_path $TMP/up/uw; scgi_temp_path $TMP/up/sc;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type application/json; return 200 '{"id":42,"name":"Ada"}'; }
    }
}
CONF
"$NGINX" -p "$TMP/up" -e "$TMP/up/error.log" -c "$TMP/up/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

declare -A PORT
for mode in buffered sync; do
    printf '[audit]\ndurability = "%s"\n' "$mode" >"$TMP/$mode.toml"
    NO_COLOR=1 "$BIN" serve --config "$TMP/$mode.toml" --upstream "http://127.0.0.1:$UP_PORT" \
        --listen 127.0.0.1:0 --admin 127.0.0.1:0 --audit "$AUDIT_DIR/$mode.jsonl" \
        --policies "$ROOT/policies" 2>"$TMP/$mode.log" &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        line=$(grep -m1 'rempart ready' "$TMP/$mode.log" || true)
        [[ -n $line ]] && break
        sleep 0.1
    done
    PORT[$mode]=$(sed -n 's/.*ingress=[^ ]*:\([0-9]*\).*/\1/p' <<<"$line")
done
sleep 0.5

run() { # mode threads connections
    wrk -t"$2" -c"$3" -d"$DURATION" --latency "http://127.0.0.1:${PORT[$1]}/api/contacts/42" |
        awk -v m="$1" -v c="$3" '
            /Requests\/sec/ { rps = $2 }
            /^ +50%/ { p50 = $2 } /^ +90%/ { p90 = $2 } /^ +99%/ { p99 = $2 }
            END { printf "%s c=%s req/s=%s p50=%s p90=%s p99=%s\n", m, c, rps, p50, p90, p99 }'
}
for _ in $(seq 1 "$ROUNDS"); do
    for mode in buffered sync; do run "$mode" 2 "$CONNECTIONS"; done
    for mode in sync buffered; do run "$mode" 1 "$MODERATE_CONNECTIONS"; done
done | tee "$TMP/runs.txt"
# wrk prints 459.00us, 2.97ms or 1.02s: to milliseconds.
to_ms() { awk '/us$/ { print $1 / 1000; next } /ms$/ { print $1 + 0; next } /s$/ { print $1 * 1000 }'; }
echo "medians:"
for c in "$CONNECTIONS" "$MODERATE_CONNECTIONS"; do
    for mode in buffered sync; do
        med() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
        rps=$(grep "^$mode c=$c " "$TMP/runs.txt" | sed 's/.*req\/s=\([^ ]*\).*/\1/' | med)
        p50=$(grep "^$mode c=$c " "$TMP/runs.txt" | sed 's/.*p50=\([^ ]*\).*/\1/' | to_ms | med)
        p99=$(grep "^$mode c=$c " "$TMP/runs.txt" | sed 's/.*p99=\([^ ]*\).*/\1/' | to_ms | med)
        echo "  $mode c=$c: req/s $rps, p50 ${p50}ms, p99 ${p99}ms"
    done
done
for p in "${PIDS[@]:1}"; do kill -TERM "$p"; done
sleep 2
for mode in buffered sync; do
    echo "$mode: $("$BIN" audit verify "$AUDIT_DIR/$mode.jsonl" 2>&1)"
done
df -T "$AUDIT_DIR" | tail -1 | awk '{ print "audit file system: " $2 }'
