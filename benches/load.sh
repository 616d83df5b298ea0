#!/usr/bin/env bash
# Load test: rempart vs nginx as reverse proxies in front of the same static
# upstream, on loopback only.
#
#   bash benches/load.sh
#
# What it does:
#   1. installs nginx, wrk (and procps) with apt-get if they are missing;
#   2. builds rempart (`cargo build --release`, a no-op when fresh);
#   3. starts a static upstream (nginx, 1 worker) answering
#      GET /api/contacts/42 with a fixed ~220-byte JSON body;
#   4. starts nginx as a reverse proxy in front of it (the comparison point);
#   5. starts rempart in front of it, shipped policies, audit trail on;
#   6. runs wrk against direct upstream / nginx / rempart in alternating
#      rounds (-t2 -cCONNECTIONS), then moderate-load rounds (-t1 -c8), also
#      alternating, for the added latency at moderate load;
#   7. prints a summary: median req/s, p50/p90/p99, rempart/nginx ratio,
#      rempart's peak RSS and the audit trail's line count vs requests sent.
# Every process it starts is stopped on exit (rempart with SIGTERM).
#
# Environment knobs (defaults in brackets):
#   DURATION [10s]       length of each measured wrk run
#   CONNECTIONS [64]     connections of the full-load rounds (2 wrk threads)
#   ROUNDS [3]           full-load rounds (each round runs all three targets)
#   WARMUP [2s]          warm-up run per target before the rounds ("0" = none)
#   MODERATE_CONNECTIONS [8]  connections of the moderate rounds (1 wrk thread)
#   MODERATE_ROUNDS [3]  moderate-load rounds; one round's p99 is too noisy on
#                        a shared 2-core machine, so the median of 3 is used
#   PACE_MS [1]          > 0: in the moderate rounds each connection waits this
#                        many ms between requests (wrk's Lua delay()), so both
#                        proxies get about the same request rate, roughly
#                        MODERATE_CONNECTIONS*1000/(PACE_MS+latency) req/s
#                        (about 5,600 req/s with the defaults: an eighth of
#                        what either proxy carries here, and far above a
#                        CRM's peak); 0 = closed loop, each target as fast as
#                        it answers, which on 2 shared cores drives rempart
#                        to about 70 % of its saturation (31-34k req/s):
#                        its p99 then measures queueing, not moderate load
#   PATHS [1]            distinct paths requested: 1 = always GET
#                        /api/contacts/42; N > 1 = each request picks
#                        /api/contacts/<1..N> at random (wrk Lua request()),
#                        so that rempart's decision cache sees as many
#                        distinct requests (it keeps 1024 decisions per
#                        worker thread by default: PATHS=100000 makes
#                        nearly every decision a miss)
#   BARE [0]             1 = also load benches/bare_proxy.rs (hyper server and
#                        client, one runtime per core, nothing else: the floor
#                        under rempart) in the full-load rounds, as target
#                        `bare`, and print rempart/bare
#   SKIP_BUILD [0]       1 = use target/release/rempart as it is
#   REMPART_BIN []       measure this rempart binary instead of
#                        target/release/rempart (no build; e.g. the
#                        profile-guided one deploy/pgo.sh prints)
#   POLICIES [policies/] the policy directory rempart serves (e.g. one with
#                        decision.rego alone, to measure the proxy without
#                        the shipped rules)
#   REMPART_CONFIG []    a TOML file passed to rempart with --config (e.g. an
#                        [audit] table with durability = "sync"); the flags the
#                        script passes (upstream, listen, audit, policies,
#                        mode) still override it
#   KEEP_TMP [0]         1 = keep the temp dir (configs, logs, audit trail)
#   BUILD_WAIT_MAX [1800] seconds to wait, before each run, for other
#                        rustc/cargo jobs to end (then it stops) and for the
#                        machine to be idle (then it measures anyway)
#   IDLE_MAX_BUSY [15]   % of the machine busy that counts as "not idle"
#   FOREIGN_MAX [10]     a run during which processes other than ours used
#                        more than this % of the machine (or the hypervisor
#                        stole more) is discarded and repeated ...
#   RETRIES [2]          ... at most this many times
#
# The machine is shared with people who compile. Before each run the script
# waits until no rustc/cargo runs and the machine is idle; after each run it
# checks how much CPU processes other than its own used meanwhile.
#
# Default total: about 3.2 minutes of measurement (3 warm-ups of 2 s, 9
# full-load runs and 9 moderate runs of 10 s) plus start-up and build.
#
# Only 127.0.0.1 is ever contacted.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
MODERATE_CONNECTIONS=${MODERATE_CONNECTIONS:-8}
MODERATE_ROUNDS=${MODERATE_ROUNDS:-3}
PACE_MS=${PACE_MS:-1}
PATHS=${PATHS:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
BARE=${BARE:-0}
KEEP_TMP=${KEEP_TMP:-0}
BUILD_WAIT_MAX=${BUILD_WAIT_MAX:-1800}
URL_PATH=/api/contacts/42

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
BIN=${REMPART_BIN:-$ROOT/target/release/rempart}
[[ -n ${REMPART_BIN:-} ]] && SKIP_BUILD=1
POLICIES=${POLICIES:-$ROOT/policies}

log() { printf '[load.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install
need_install=()
command -v wrk >/dev/null 2>&1 || need_install+=(wrk)
command -v pgrep >/dev/null 2>&1 || need_install+=(procps)
NGINX=$(command -v nginx 2>/dev/null || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
[[ -z $NGINX ]] && need_install+=(nginx)
if ((${#need_install[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${need_install[*]} and not root: install them first"
    log "installing: ${need_install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    pkgs=()
    for p in "${need_install[@]}"; do
        if [[ $p == nginx ]]; then
            # Debian 12 has `nginx` (the server) and `nginx-light` (which
            # only pulls nginx plus the echo module); take nginx-light only
            # where the archive has no `nginx`.
            if apt-cache show nginx >/dev/null 2>&1; then pkgs+=(nginx); else pkgs+=(nginx-light); fi
        else
            pkgs+=("$p")
        fi
    done
    sys_nginx_before=$(cat /run/nginx.pid 2>/dev/null || true)
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    # Without a policy-rc.d, the package may start the system nginx (port
    # 80). We started it, so we stop it again.
    sys_nginx_after=$(cat /run/nginx.pid 2>/dev/null || true)
    if [[ -n $sys_nginx_after && $sys_nginx_after != "$sys_nginx_before" ]]; then
        log "stopping the system nginx that the package install started (pid $sys_nginx_after)"
        kill -QUIT "$sys_nginx_after" 2>/dev/null || true
    fi
    NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
fi
[[ -x $NGINX ]] || die "nginx not found after install"
command -v wrk >/dev/null || die "wrk not found after install"

# ------------------------------------------------------------------ build
# shellcheck disable=SC1091
[[ -f ${HOME:-/root}/.cargo/env ]] && . "${HOME:-/root}/.cargo/env"
if [[ $SKIP_BUILD != 1 ]]; then
    command -v cargo >/dev/null || { [[ -x $BIN ]] || die "no cargo and no $BIN"; log "no cargo: using $BIN as it is"; }
    if command -v cargo >/dev/null; then
        log "cargo build --release (no-op when fresh; waits for the build lock if someone else builds)"
        (cd "$ROOT" && cargo build --release --quiet --bin rempart)
    fi
fi
[[ -x $BIN ]] || die "$BIN missing"
BARE_BIN=
if [[ $BARE == 1 ]]; then
    command -v cargo >/dev/null || die "BARE=1 needs cargo (to build benches/bare_proxy.rs)"
    log "cargo bench --bench bare_proxy --no-run"
    BARE_BIN=$(cd "$ROOT" && cargo bench --bench bare_proxy --no-run 2>&1 | sed -n 's/.*Executable.*(\(.*\)).*/\1/p' | tail -1)
    [[ -n $BARE_BIN ]] || die "cannot build or find the bare_proxy bench"
    [[ $BARE_BIN == /* ]] || BARE_BIN=$ROOT/$BARE_BIN
fi

# -------------------------------------------------- quiet-machine guard
# This machine is shared with people who compile: a rustc running during a
# measurement steals one of the 2 cores and skews every number. Wait until
# no rustc/cargo process is left, before the first run and before each run.
wait_quiet() {
    local waited=0
    while pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; do
        ((waited == 0)) && log "waiting for running rustc/cargo jobs to end (they would skew the numbers)"
        sleep 5 & wait $! # interruptible: the INT/TERM trap runs at once
        waited=$((waited + 5))
        ((waited < BUILD_WAIT_MAX)) || die "rustc/cargo still running after ${BUILD_WAIT_MAX}s; not measuring"
    done
    if ((waited > 0)); then log "build jobs ended after ~${waited}s"; sleep 2; fi
}

# CPU counters of the whole machine, in clock ticks: "busy total steal".
machine_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $9 }' /proc/stat
}

# Share (%) of the machine busy over half a second.
busy_now() {
    local a b
    a=$(machine_ticks)
    sleep 0.5
    b=$(machine_ticks)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        d = y[2] - x[2]; printf "%d", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }'
}

# Before each run, also wait (bounded) until the machine is idle: other
# jobs than compilers (test binaries, another benchmark) skew numbers too.
IDLE_MAX_BUSY=${IDLE_MAX_BUSY:-15}
wait_idle() {
    local waited=0 busy
    while busy=$(busy_now); ((busy >= IDLE_MAX_BUSY)); do
        ((waited == 0)) && log "machine ${busy}% busy with other work; waiting for it to settle"
        sleep 5 & wait $! # interruptible: the INT/TERM trap runs at once
        waited=$((waited + 5))
        if ((waited >= BUILD_WAIT_MAX)); then
            log "WARNING: machine still ${busy}% busy after ${BUILD_WAIT_MAX}s; measuring anyway"
            return 0
        fi
    done
    ((waited == 0)) || log "machine idle again after ~${waited}s"
}

# CPU seconds used by every process of this benchmark that is still
# running (upstream nginx, nginx proxy, rempart, with their children).
ours_cpu() {
    local p total=0
    for p in "$UP_PID" "$PX_PID" "$REMPART_PID" "$BARE_PID"; do
        [[ -n $p ]] && total=$(awk -v t="$total" -v c="$(cpu_seconds "$p")" 'BEGIN { printf "%.3f", t + c }')
    done
    echo "$total"
}

# CPU seconds of this shell's reaped children (wrk once waited for). Must
# run in the main shell, not in $(...): a subshell has its own children.
children_cpu() { # variable name to set
    times >"$TMP/times"
    printf -v "$1" '%s' "$(tail -1 "$TMP/times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { v = $i; m = v; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", v); sub(/s$/, "", v); s += m * 60 + v } printf "%.3f", s }')"
}

# ---------------------------------------------------------------- helpers
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rempart-load.XXXXXX")
PIDS_NGINX=()
REMPART_PID=
BARE_PID=
WRK_PID=

cleanup() {
    local rc=$?
    set +e
    [[ -n $WRK_PID ]] && kill "$WRK_PID" 2>/dev/null
    if [[ -n $REMPART_PID ]] && kill -0 "$REMPART_PID" 2>/dev/null; then
        kill -TERM "$REMPART_PID"
        for _ in $(seq 1 100); do kill -0 "$REMPART_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$REMPART_PID" 2>/dev/null && { log "rempart did not stop on SIGTERM in 10s: SIGKILL"; kill -KILL "$REMPART_PID"; }
        wait "$REMPART_PID" 2>/dev/null
    fi
    [[ -n $BARE_PID ]] && kill "$BARE_PID" 2>/dev/null
    for p in "${PIDS_NGINX[@]}"; do
        kill -TERM "$p" 2>/dev/null # nginx master: fast shutdown, stops its workers
    done
    for p in "${PIDS_NGINX[@]}"; do wait "$p" 2>/dev/null; done
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
        log "temp dir kept: $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port pid name
    for _ in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || die "$3 exited during start-up (see $TMP)"
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 not listening on 127.0.0.1:$1 after 10s"
}

# One plain HTTP/1.1 GET over bash's /dev/tcp (no curl on a fresh Debian).
http_get() { # port path -> prints the raw response
    local fd
    exec {fd}<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&"$fd"
    timeout 5 cat <&"$fd" || true
    exec {fd}>&-
}

# CPU time (user+system, seconds) of a process and its direct children.
cpu_seconds() { # pid
    local tck total=0 p
    tck=$(getconf CLK_TCK)
    for p in "$1" $(pgrep -P "$1" || true); do
        [[ -r /proc/$p/stat ]] || continue
        # fields after the ")" of comm: utime is 12th, stime 13th
        total=$((total + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    awk -v t="$total" -v h="$tck" 'BEGIN { printf "%.3f", t / h }'
}

# A build just before (cargo writes gigabytes) leaves dirty page cache
# whose writeback then throttles the audit trail's writes: the writer
# falls behind, the queue holds thousands of records and the peak RSS
# doubles (65 MiB twice in session 11, each time in the first run after a
# build; audit_queue_records_peak was 7,818 in the one that printed it,
# against 865 in a run after an idle spell).
# Writing it out first keeps that out of the measurement.
log "sync (writing out dirty pages left by builds)"
sync

# ------------------------------------------------------------- upstream
BODY=$UPSTREAM_BODY

nginx_common() { # name
    cat <<EOF
pid $TMP/$1/nginx.pid;
error_log $TMP/$1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # name
    cat <<EOF
    access_log off;
    $NGINX_KEEPALIVE
    client_body_temp_path $TMP/$1/client_body;
    proxy_temp_path $TMP/$1/proxy;
    fastcgi_temp_path $TMP/$1/fastcgi;
    uwsgi_temp_path $TMP/$1/uwsgi;
    scgi_temp_path $TMP/$1/scgi;
EOF
}

start_nginx() { # name port
    mkdir -p "$TMP/$1"
    "$NGINX" -t -q -p "$TMP/$1" -e "$TMP/$1/error.log" -c "$TMP/$1/nginx.conf" ||
        die "nginx config $1 invalid"
    "$NGINX" -p "$TMP/$1" -e "$TMP/$1/error.log" -c "$TMP/$1/nginx.conf" -g 'daemon off;' &
    local pid=$!
    PIDS_NGINX+=("$pid")
    wait_port "$2" "$pid" "nginx $1"
    echo "$pid" >"$TMP/$1/master.pid"
}

UP_PORT=$(free_port) || die "no free port"
mkdir -p "$TMP/upstream"
cat >"$TMP/upstream/nginx.conf" <<EOF
worker_processes 1;
$(nginx_common upstream)
http {
$(nginx_http_common upstream)
    server {
        listen 127.0.0.1:$UP_PORT;
        location ^~ /api/contacts/ {
            default_type application/json;
            return 200 '$BODY';
        }
        location / { return 404; }
    }
}
EOF
start_nginx upstream "$UP_PORT"
UP_PID=$(cat "$TMP/upstream/master.pid")
log "upstream nginx (1 worker) on 127.0.0.1:$UP_PORT"

# ---------------------------------------------------------- nginx proxy
PX_PORT=$(free_port) || die "no free port"
while [[ $PX_PORT == "$UP_PORT" ]]; do PX_PORT=$(free_port); done
mkdir -p "$TMP/proxy"
cat >"$TMP/proxy/nginx.conf" <<EOF
worker_processes auto;
$(nginx_common proxy)
http {
$(nginx_http_common proxy)
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$PX_PORT;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
start_nginx proxy "$PX_PORT"
PX_PID=$(cat "$TMP/proxy/master.pid")
log "nginx proxy (worker_processes auto = $(nproc)) on 127.0.0.1:$PX_PORT"

# -------------------------------------------------------------- rempart
AUDIT=$TMP/audit.jsonl
REMPART_CONFIG_ARGS=()
[[ -n ${REMPART_CONFIG:-} ]] && REMPART_CONFIG_ARGS=(--config "$REMPART_CONFIG")
NO_COLOR=1 "$BIN" serve "${REMPART_CONFIG_ARGS[@]}" \
    --upstream "http://127.0.0.1:$UP_PORT" \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    --audit "$AUDIT" --policies "$POLICIES" --mode enforce \
    2>"$TMP/rempart.log" &
REMPART_PID=$!
RP_PORT='' ADMIN='' WORKERS='' REVISION=''
for _ in $(seq 1 200); do
    kill -0 "$REMPART_PID" 2>/dev/null || { cat "$TMP/rempart.log" >&2; die "rempart exited during start-up"; }
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$TMP/rempart.log" | grep -m1 'rempart ready' || true)
    if [[ -n $line ]]; then
        RP_PORT=$(sed -n 's/.*ingress=[^ ]*:\([0-9]*\).*/\1/p' <<<"$line")
        ADMIN=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' <<<"$line")
        WORKERS=$(sed -n 's/.* workers=\([0-9]*\).*/\1/p' <<<"$line")
        REVISION=$(sed -n 's/.* policy_revision=\([^ ]*\).*/\1/p' <<<"$line")
        break
    fi
    sleep 0.1
done
[[ -n $RP_PORT && -n $ADMIN ]] || { cat "$TMP/rempart.log" >&2; die "no 'rempart ready' line in 20s"; }
log "rempart (workers=${WORKERS:-?}, enforce, audit on) on 127.0.0.1:$RP_PORT, admin $ADMIN"

BARE_PORT=
CHECKED=("direct:$UP_PORT" "nginx:$PX_PORT" "rempart:$RP_PORT")
if [[ -n $BARE_BIN ]]; then
    BARE_PORT=$(free_port) || die "no free port"
    BARE_PROXY_LISTEN=127.0.0.1:$BARE_PORT BARE_PROXY_UPSTREAM=127.0.0.1:$UP_PORT "$BARE_BIN" >"$TMP/bare.log" 2>&1 &
    BARE_PID=$!
    wait_port "$BARE_PORT" "$BARE_PID" "bare_proxy"
    CHECKED+=("bare:$BARE_PORT")
    log "bare_proxy on 127.0.0.1:$BARE_PORT"
fi

# ------------------------------------------------------- sanity checks
# Each target must answer 200 with the upstream's body. The one rempart
# request is counted in the audit comparison below.
EXTRA_REMPART_REQUESTS=0
for t in "${CHECKED[@]}"; do
    name=${t%%:*} port=${t##*:}
    resp=$(http_get "$port" "$URL_PATH" | tr -d '\r')
    [[ $name == rempart ]] && EXTRA_REMPART_REQUESTS=$((EXTRA_REMPART_REQUESTS + 1))
    status=$(head -1 <<<"$resp")
    [[ $status == "HTTP/1.1 200"* ]] || { printf '%s\n' "$resp" >&2; die "$name answered '$status' on $URL_PATH"; }
    [[ $(tail -1 <<<"$resp") == "$BODY" ]] || { printf '%s\n' "$resp" >&2; die "$name: body differs from the upstream's"; }
done
log "all ${#CHECKED[@]} targets answer 200 with the ${#BODY}-byte body"

# ------------------------------------------------------------------ runs
RESULTS=$TMP/results.tsv # phase target round rps requests p50 p75 p90 p99 non2xx sockerr cpu_s foreign% steal%
: >"$RESULTS"
mkdir -p "$TMP/wrk"

port_of() { case $1 in direct) echo "$UP_PORT" ;; nginx) echo "$PX_PORT" ;; rempart) echo "$RP_PORT" ;; bare) echo "$BARE_PORT" ;; esac; }
# The process whose CPU time is charged to the target (with its children).
pid_of() { case $1 in direct) echo "$UP_PID" ;; nginx) echo "$PX_PID" ;; rempart) echo "$REMPART_PID" ;; bare) echo "$BARE_PID" ;; esac; }

parse_wrk() { # file -> rps requests p50 p75 p90 p99 non2xx sockerr (latencies in ms)
    awk '
    function ms(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") return n / 1000
        if (u == "ms") return n
        if (u == "s")  return n * 1000
        if (u == "m")  return n * 60000
        return n
    }
    /^ +50% / { p50 = ms($2) }
    /^ +75% / { p75 = ms($2) }
    /^ +90% / { p90 = ms($2) }
    /^ +99% / { p99 = ms($2) }
    / requests in / { reqs = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { gsub(",", ""); errs = $4 + $6 + $8 + $10 }
    END {
        if (rps == "" || reqs == "") exit 1
        printf "%s\t%s\t%.3f\t%.3f\t%.3f\t%.3f\t%d\t%d\n", rps, reqs, p50, p75, p90, p99, non2xx, errs
    }' "$1"
}

REMPART_WRK_REQUESTS=0 # every request wrk completed against rempart, discarded runs included
RETRIES=${RETRIES:-2}
FOREIGN_MAX=${FOREIGN_MAX:-10}
DISCARDED=0
FOREIGN_KEPT_MAX=0
run_wrk() { # phase target round threads connections duration [extra wrk args...]
    local phase=$1 target=$2 round=$3 threads=$4 conns=$5 dur=$6
    shift 6
    local out=$TMP/wrk/$phase-$target-$round.txt pid cpu0 cpu1 parsed attempt=0
    local m0 m1 o0 o1 c0 c1 foreign steal tck
    tck=$(getconf CLK_TCK)
    pid=$(pid_of "$target")
    while :; do
        wait_quiet
        wait_idle
        children_cpu c0
        m0=$(machine_ticks) o0=$(ours_cpu) cpu0=$(cpu_seconds "$pid")
        wrk -t"$threads" -c"$conns" -d"$dur" --latency "$@" "http://127.0.0.1:$(port_of "$target")$URL_PATH" >"$out" 2>&1 &
        WRK_PID=$!
        wait "$WRK_PID" || { cat "$out" >&2; die "wrk failed against $target"; }
        WRK_PID=
        m1=$(machine_ticks) o1=$(ours_cpu) cpu1=$(cpu_seconds "$pid")
        children_cpu c1
        parsed=$(parse_wrk "$out") || { cat "$out" >&2; die "cannot parse wrk output ($out)"; }
        [[ $target == rempart ]] && REMPART_WRK_REQUESTS=$((REMPART_WRK_REQUESTS + $(cut -f2 <<<"$parsed")))
        # Machine CPU not used by wrk, the upstream or the proxies, in % of
        # the machine over the run; and the hypervisor's steal time.
        read -r foreign steal < <(awk -v a="$m0" -v b="$m1" -v o="$(awk -v x="$o0" -v y="$o1" -v p="$c0" -v q="$c1" 'BEGIN { print (y - x) + (q - p) }')" -v h="$tck" 'BEGIN {
            split(a, x, " "); split(b, y, " "); tot = (y[2] - x[2]) / h
            f = tot > 0 ? 100 * ((y[1] - x[1]) / h - o) / tot : 0
            st = tot > 0 ? 100 * ((y[3] - x[3]) / h) / tot : 0
            printf "%d %d\n", (f < 0 ? 0 : f), st }')
        if ((foreign > FOREIGN_MAX || steal > FOREIGN_MAX)) && ((attempt < RETRIES)); then
            attempt=$((attempt + 1))
            DISCARDED=$((DISCARDED + 1))
            log "discarding $phase $target r$round: ${foreign}% of the machine used by other processes, ${steal}% steal during the run; again ($attempt/$RETRIES)"
            continue
        fi
        ((foreign > FOREIGN_MAX || steal > FOREIGN_MAX)) && log "WARNING: keeping $phase $target r$round although ${foreign}% foreign CPU / ${steal}% steal (retries exhausted)"
        ((foreign > FOREIGN_KEPT_MAX)) && FOREIGN_KEPT_MAX=$foreign
        break
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$target" "$round" "$parsed" \
        "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.3f", b - a }')" "$foreign" "$steal" >>"$RESULTS"
    local rps p50 p99 non2xx errs
    IFS=$'\t' read -r rps p50 p99 non2xx errs < <(cut -f1,3,6,7,8 <<<"$parsed")
    log "$(printf '%-8s %-7s r%-2s %10.0f req/s  p50 %7.3f ms  p99 %7.3f ms  non2xx %s  sockerr %s  foreign-cpu %s%%' \
        "$phase" "$target" "$round" "$rps" "$p50" "$p99" "$non2xx" "$errs" "$foreign")"
}

TARGETS=(direct nginx rempart)
if [[ -n $BARE_PID ]]; then TARGETS+=(bare); fi
wait_quiet
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
LOAD_EXTRA=()
LOAD_DESC=""
if ((PATHS > 1)); then
    printf 'request = function()\n    return wrk.format(nil, "/api/contacts/" .. math.random(1, %d))\nend\n' "$PATHS" >"$TMP/paths.lua"
    LOAD_EXTRA=(-s "$TMP/paths.lua")
    LOAD_DESC=" -s paths.lua (GET /api/contacts/<random 1..$PATHS>)"
fi
if [[ $WARMUP != 0 ]]; then
    log "warm-up: $WARMUP per target"
    for t in "${TARGETS[@]}"; do run_wrk warmup "$t" 0 2 "$CONNECTIONS" "$WARMUP" "${LOAD_EXTRA[@]}"; done
fi

log "full load: $ROUNDS rounds x ${#TARGETS[@]} targets, wrk -t2 -c$CONNECTIONS -d$DURATION --latency$LOAD_DESC"
for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the order each round so that no target always runs first.
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        t=${TARGETS[$(((i + r - 1) % ${#TARGETS[@]}))]}
        run_wrk load "$t" "$r" 2 "$CONNECTIONS" "$DURATION" "${LOAD_EXTRA[@]}"
    done
done

MODERATE_EXTRA=("${LOAD_EXTRA[@]}")
MODERATE_DESC="wrk -t1 -c$MODERATE_CONNECTIONS -d$DURATION --latency${LOAD_DESC}"
if ((PACE_MS > 0)); then
    cp "${LOAD_EXTRA[1]:-/dev/null}" "$TMP/pace.lua"
    printf 'function delay()\n    return %d\nend\n' "$PACE_MS" >>"$TMP/pace.lua"
    MODERATE_EXTRA=(-s "$TMP/pace.lua")
    MODERATE_DESC="$MODERATE_DESC -s pace.lua (delay() = $PACE_MS ms per connection between requests)"
fi
log "moderate load: $MODERATE_ROUNDS rounds x 3 targets, $MODERATE_DESC"
for ((r = 1; r <= MODERATE_ROUNDS; r++)); do
    for ((i = 0; i < 3; i++)); do
        t=${TARGETS[$(((i + r - 1) % 3))]}
        run_wrk moderate "$t" "$r" 1 "$MODERATE_CONNECTIONS" "$DURATION" "${MODERATE_EXTRA[@]}"
    done
done

# --------------------------------------------------- rempart end state
STATUS=/proc/$REMPART_PID/status
kill -0 "$REMPART_PID" 2>/dev/null || die "rempart died during the runs (see $TMP/rempart.log)"
VMHWM_KB=$(awk '/^VmHWM:/ { print $2 }' "$STATUS")
VMRSS_KB=$(awk '/^VmRSS:/ { print $2 }' "$STATUS")
THREADS=$(awk '/^Threads:/ { print $2 }' "$STATUS")
METRICS=$(exec 3<>"/dev/tcp/${ADMIN%:*}/${ADMIN##*:}" &&
    printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$ADMIN" >&3 &&
    timeout 5 cat <&3 | tr -d '\r' | grep '^rempart_' || true)
printf '%s\n' "$METRICS" >"$TMP/metrics.txt"
metric_sum() { awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%d", s }' "$TMP/metrics.txt"; }
M_REQUESTS=$(metric_sum rempart_requests_total)
M_ALLOWED=$(awk '/^rempart_requests_total\{.*outcome="allowed"/ { s += $NF } END { printf "%d", s }' "$TMP/metrics.txt")
M_AUDIT=$(metric_sum rempart_audit_records_total)
M_AUDIT_ERR=$(metric_sum rempart_audit_write_errors_total)
M_QFULL=$(metric_sum rempart_audit_queue_full_total)
M_QPEAK=$(metric_sum rempart_audit_queue_records_peak)
M_UPERR=$(metric_sum rempart_upstream_errors_total)
EVAL_SUM=$(awk '$1 == "rempart_policy_evaluation_seconds_sum" { print $2 }' "$TMP/metrics.txt")
EVAL_CNT=$(awk '$1 == "rempart_policy_evaluation_seconds_count" { print $2 }' "$TMP/metrics.txt")
cache_count() { awk -v r="$1" '$1 == "rempart_policy_decision_cache_total{result=\"" r "\"}" { printf "%d", $2 }' "$TMP/metrics.txt"; }
CACHE_HIT=$(cache_count hit)
CACHE_MISS=$(cache_count miss)
CACHE_BYPASSED=$(cache_count bypassed)
# The median evaluation time, interpolated within the histogram's buckets
# the way Prometheus's histogram_quantile does.
EVAL_P50=$(awk '
    /^rempart_policy_evaluation_seconds_bucket\{/ {
        le = $1; sub(/.*le="/, "", le); sub(/".*/, "", le)
        if (le != "+Inf") { n++; bound[n] = le + 0; cum[n] = $2 + 0 } else { total = $2 + 0 }
    }
    END {
        if (total == 0) exit
        want = total / 2; lo = 0; below = 0
        for (i = 1; i <= n; i++) {
            if (cum[i] >= want) {
                share = (cum[i] > below) ? (want - below) / (cum[i] - below) : 0
                printf "%.1f (in the bucket %g-%g)", (lo + (bound[i] - lo) * share) * 1e6, lo * 1e6, bound[i] * 1e6; exit
            }
            lo = bound[i]; below = cum[i]
        }
        printf ">%.0f", bound[n] * 1e6
    }' "$TMP/metrics.txt")

# Stop rempart now (SIGTERM: it drains and flushes the audit trail), then
# count the trail.
kill -TERM "$REMPART_PID"
for _ in $(seq 1 150); do kill -0 "$REMPART_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$REMPART_PID" 2>/dev/null; then
    log "WARNING: rempart still running 15s after SIGTERM"
    STOP_NOTE="did NOT stop within 15 s of SIGTERM"
else
    wait "$REMPART_PID" && STOP_NOTE="stopped cleanly on SIGTERM (exit 0)" || STOP_NOTE="exited with status $? after SIGTERM"
    REMPART_PID=
fi
AUDIT_LINES=$(wc -l <"$AUDIT")
AUDIT_ALLOWED=$(grep -c '"outcome":"allowed"' "$AUDIT" || true)
AUDIT_200=$(grep -c '"status":200,' "$AUDIT" || true)

# ---------------------------------------------------------------- summary
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan"; exit } if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { # phase target column -> values, one a line
    awk -F'\t' -v p="$1" -v t="$2" -v c="$3" '$1 == p && $2 == t { print $c }' "$RESULTS"
}
# columns: 1 phase 2 target 3 round 4 rps 5 requests 6 p50 7 p75 8 p90 9 p99 10 non2xx 11 sockerr 12 cpu_s 13 foreign% 14 steal%
summary_row() { # phase target
    local rps mn mx p50 p90 p99 non2xx errs reqs cpu cpu_us
    rps=$(col "$1" "$2" 4 | median)
    mn=$(col "$1" "$2" 4 | sort -g | head -1)
    mx=$(col "$1" "$2" 4 | sort -g | tail -1)
    p50=$(col "$1" "$2" 6 | median)
    p90=$(col "$1" "$2" 8 | median)
    p99=$(col "$1" "$2" 9 | median)
    non2xx=$(col "$1" "$2" 10 | awk '{ s += $1 } END { print s + 0 }')
    errs=$(col "$1" "$2" 11 | awk '{ s += $1 } END { print s + 0 }')
    reqs=$(col "$1" "$2" 5 | awk '{ s += $1 } END { print s + 0 }')
    cpu=$(col "$1" "$2" 12 | awk '{ s += $1 } END { print s + 0 }')
    cpu_us=$(awk -v c="$cpu" -v n="$reqs" 'BEGIN { printf "%.1f", n ? c * 1e6 / n : 0 }')
    printf '| %-7s | %-17s | %9.0f | %9.0f–%-9.0f | %6.3f | %6.3f | %6.3f | %6s | %7s | %10s |\n' \
        "$2" "$3" "$rps" "$mn" "$mx" "$p50" "$p90" "$p99" "$non2xx" "$errs" "$cpu_us"
}
header() {
    echo '| target  | wrk               | req/s med | req/s min–max       | p50 ms | p90 ms | p99 ms | non2xx | sockerr | CPU µs/req |'
    echo '|---------|-------------------|----------:|---------------------|-------:|-------:|-------:|-------:|--------:|-----------:|'
}

RPS_NGINX=$(col load nginx 4 | median)
RPS_REMPART=$(col load rempart 4 | median)
RPS_DIRECT=$(col load direct 4 | median)
MOD_P99_NGINX=$(col moderate nginx 9 | median)
MOD_P99_REMPART=$(col moderate rempart 9 | median)
MOD_P50_NGINX=$(col moderate nginx 6 | median)
MOD_P50_REMPART=$(col moderate rempart 6 | median)
EXPECTED=$((REMPART_WRK_REQUESTS + EXTRA_REMPART_REQUESTS))

{
    echo
    echo "## rempart load test — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
    echo "versions: $("$BIN" --version 2>/dev/null || echo rempart ?), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | awk '{ print $1, $2 }')"
    echo "source: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'not a git checkout'); binary: ${BIN#"$ROOT"/}; policies: $POLICIES, revision ${REVISION:-?} ($(for f in "$POLICIES"/*.rego; do [[ $f == *_test.rego ]] || printf '%s ' "${f##*/}"; done)+ data)"
    if ((PATHS > 1)); then echo "path: GET /api/contacts/<random 1..$PATHS> (${#BODY}-byte JSON body, 200); rempart: shipped policies, enforce, audit on, workers=${WORKERS:-default}"; else echo "path: GET $URL_PATH (${#BODY}-byte JSON body, 200); rempart: shipped policies, enforce, audit on, workers=${WORKERS:-default}"; fi
    echo "wrk (the load generator) and the upstream share the same $(nproc) cores as the proxy under test"
    echo "load average before the runs: $LOADAVG_BEFORE; runs discarded and repeated because other processes used > ${FOREIGN_MAX}% of the machine (or steal): $DISCARDED; highest foreign CPU in a kept run: ${FOREIGN_KEPT_MAX}%"
    echo
    echo "### Full load: wrk -t2 -c$CONNECTIONS -d$DURATION --latency, $ROUNDS rounds (median over rounds)"
    echo
    header
    summary_row load direct "-t2 -c$CONNECTIONS"
    summary_row load nginx "-t2 -c$CONNECTIONS"
    summary_row load rempart "-t2 -c$CONNECTIONS"
    if [[ -n $BARE_PID ]]; then summary_row load bare "-t2 -c$CONNECTIONS"; fi
    echo
    echo "### Moderate load: $MODERATE_DESC, $MODERATE_ROUNDS rounds (median over rounds)"
    echo
    header
    summary_row moderate direct "-t1 -c$MODERATE_CONNECTIONS"
    summary_row moderate nginx "-t1 -c$MODERATE_CONNECTIONS"
    summary_row moderate rempart "-t1 -c$MODERATE_CONNECTIONS"
    echo
    echo "CPU µs/req: CPU time (user+sys) of the target's processes (nginx master+workers, rempart) per request; for 'direct' it is the upstream nginx itself."
    echo
    echo "### Verdict inputs"
    echo
    awk -v r="$RPS_REMPART" -v n="$RPS_NGINX" -v d="$RPS_DIRECT" 'BEGIN {
        printf "- rempart/nginx req/s (full load, medians): %.0f / %.0f = %.2fx  (target >= 0.80x)\n", r, n, r / n
        printf "- nginx/direct: %.2fx, rempart/direct: %.2fx\n", n / d, r / d }'
    if [[ -n $BARE_PID ]]; then
        awk -v r="$RPS_REMPART" -v n="$RPS_NGINX" -v b="$(col load bare 4 | median)" 'BEGIN {
            printf "- bare hyper proxy (benches/bare_proxy.rs): %.0f req/s = %.2fx nginx; rempart/bare: %.2fx (the rest is the input, policy, audit and metrics work)\n", b, b / n, r / b }'
    fi
    awk -v a="$MOD_P99_REMPART" -v b="$MOD_P99_NGINX" -v c="$MOD_P50_REMPART" -v e="$MOD_P50_NGINX" 'BEGIN {
        printf "- added latency vs nginx at moderate load (medians): p99 %+.3f ms (%.3f vs %.3f; target <= 1 ms), p50 %+.3f ms\n", a - b, a, b, c - e }'
    awk -v h="$VMHWM_KB" -v s="$VMRSS_KB" -v t="$THREADS" 'BEGIN {
        printf "- rempart peak RSS (VmHWM): %.1f MiB (target <= 64 MB); RSS at end %.1f MiB; %d threads\n", h / 1024, s / 1024, t }'
    if [[ -n $EVAL_CNT && $EVAL_CNT != 0 ]]; then
        awk -v s="$EVAL_SUM" -v c="$EVAL_CNT" 'BEGIN { printf "- policy evaluation (rempart_policy_evaluation_seconds, cache hits included): mean %.1f µs over %d decisions\n", s / c * 1e6, c }'
        echo "- policy evaluation p50 (from the histogram's buckets): ${EVAL_P50:-?} µs (target <= 10 µs)"
        awk -v h="${CACHE_HIT:-0}" -v m="${CACHE_MISS:-0}" -v b="${CACHE_BYPASSED:-0}" 'BEGIN { t = h + m + b; if (t > 0) printf "- decision cache: %d hits, %d misses, %d bypassed (hit ratio %.1f%%)\n", h, m, b, 100 * h / t }'
    fi
    echo "- audit trail: $AUDIT_LINES lines ($AUDIT_ALLOWED allowed, $AUDIT_200 with status 200) vs $EXPECTED requests completed per wrk (+ sanity GET); difference $((AUDIT_LINES - EXPECTED))"
    echo "  (wrk counts only responses it received before its deadline; requests in flight when a run ends — up to the connection count per run — are audited but not counted)"
    echo "- rempart metrics: requests_total=$M_REQUESTS (allowed=$M_ALLOWED), audit_records_total=$M_AUDIT, audit_write_errors_total=$M_AUDIT_ERR, audit_queue_full_total=$M_QFULL, audit_queue_records_peak=$M_QPEAK, upstream_errors_total=$M_UPERR"
    echo "- rempart $STOP_NOTE"
    echo
} | tee "$TMP/summary.md"
