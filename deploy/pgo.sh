#!/usr/bin/env bash
# Profile-guided build of rempart: a release binary that LLVM laid out and
# inlined from a profile of rempart's own request path, then laid out again
# by BOLT from a second profile of the same traffic.
#
#   bash deploy/pgo.sh     # prints the binary's path: target/pgo/rempart
#                          # (BOLT), or target/pgo/<host triple>/release/rempart
#                          # when llvm-bolt is missing or BOLT=0
#
# The container image (deploy/Dockerfile) ships this build. On this
# project's 2-core machine PGO carried 13 % more requests/s than the plain
# `cargo build --release` at 4 us less CPU per request (docs/performance.md,
# "Session 11"), and BOLT about 2 % more on top at 0.5 us less ("Session
# 14"); its decisions are the same, since only the code layout and
# inlining differ.
#
# Steps:
#   1. llvm-profdata of the toolchain's own LLVM (`rustup component add
#      llvm-tools`; a Debian llvm is another LLVM version, whose profile
#      format rustc would refuse);
#   2. an instrumented build (`-Cprofile-generate`) in target/pgo-instrument;
#   3. training, on loopback only: a static upstream (nginx, as load.sh),
#      the instrumented rempart in front of it with the shipped policies,
#      audit on, ingress and egress listeners; then
#        - wrk: GET /api/contacts/<1..5000> (decision-cache hits and misses),
#        - wrk: a route the shipped policies deny (403 path),
#        - curl: HTTP/2 requests, egress forward-proxy requests and CONNECT
#          tunnels, admin /metrics and /readyz;
#      SIGTERM, which writes the profile;
#   4. llvm-profdata merge, and the optimised build (`-Cprofile-use`, linked
#      with `--emit-relocs` for BOLT) in target/pgo;
#   5. when llvm-bolt is installed (Debian: `apt-get install bolt-19`):
#      `llvm-bolt -instrument` on that binary, the same training through it,
#      and `llvm-bolt` with that profile (blocks ordered by ext-tsp,
#      functions by cdsort, cold code split off) into target/pgo/rempart;
#      the result must pass the shipped policies' tests and answer each
#      kind of traffic before its path is printed.
# Both builds pass `--target` so that RUSTFLAGS reach rempart and its
# dependencies but not build scripts and proc macros (which would write
# profiles of the compiler's helpers). target/release is left alone.
#
# Knobs: TRAIN_SECONDS [20] (the main wrk run), KEEP_TMP [0], BOLT [auto]
# (0: stop after step 4; 1: fail when llvm-bolt is missing).
# Needs nginx, wrk, curl (`bash benches/load.sh` installs nginx and wrk).
# About 17 minutes on 2 cores: two cold release builds, 80 s of training
# and a minute of BOLT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
TRAIN_SECONDS=${TRAIN_SECONDS:-20}
BOLT=${BOLT:-auto}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
log() { printf '[pgo.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in nginx wrk curl python3; do
    command -v "$tool" >/dev/null 2>&1 || [[ $tool == nginx && -x /usr/sbin/nginx ]] || die "$tool missing"
done
NGINX=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)

# ------------------------------------------------------------ llvm-profdata
SYSROOT=$(rustc --print sysroot)
PROFDATA=$SYSROOT/lib/rustlib/$TRIPLE/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    log "rustup component add llvm-tools (llvm-profdata of rustc's LLVM)"
    rustup component add llvm-tools >/dev/null
fi
[[ -x $PROFDATA ]] || die "no $PROFDATA after installing llvm-tools"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ ${KEEP_TMP:-0} == 1 ]] && log "kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT

# ---------------------------------------------------------- instrumented
# A fixed path: it is part of RUSTFLAGS, and a new one would rebuild
# everything.
RAW=$ROOT/target/pgo-instrument/profraw
log "instrumented build (target/pgo-instrument)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$ROOT/target/pgo-instrument" \
    cargo build --release --locked --quiet --bin rempart --target "$TRIPLE")
INSTR=$ROOT/target/pgo-instrument/$TRIPLE/release/rempart
rm -rf "$RAW"

# -------------------------------------------------------------- training
UP_PORT=$(free_port) || die "no free port"
mkdir -p "$TMP/upstream"
static_upstream_conf "$TMP/upstream" "$UP_PORT" >"$TMP/upstream/nginx.conf"
"$NGINX" -p "$TMP/upstream" -e "$TMP/upstream/error.log" -c "$TMP/upstream/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$UP_PORT") 2>/dev/null && break
    sleep 0.1
done

# The shipped policies, with loopback listed as an internal network so that
# egress requests to the local upstream are allowed (and take the whole
# forwarding path, not only the refusal).
cp -r "$ROOT/policies" "$TMP/policies"
python3 - "$TMP/policies/data.json" <<'EOF'
import json, sys
p = sys.argv[1]
d = json.load(open(p))
d["settings"]["egress"]["internal_networks"] = ["127.0.0.0/8"]
json.dump(d, open(p, "w"))
EOF

# Each kind of traffic must do what it stands for, or a profile trains the
# wrong path.
expect() { # what status url [curl args...]
    local what=$1 want=$2 got
    shift 2
    got=$(curl -s -o /dev/null -w '%{http_code}' "$@")
    [[ $got == "$want" ]] || die "$what: expected $want, got $got (curl $*)"
}
# A path segment the shipped library blocks (blocked_path).
DENIED=/.git/config
cat >"$TMP/paths.lua" <<'EOF'
request = function()
    return wrk.format("GET", "/api/contacts/" .. math.random(1, 5000))
end
EOF

start_rempart() { # BINARY NAME: sets ING, ADMIN, EGRESS, RP_PID
    # Distinct ports: rempart refuses an egress listener on the ingress address,
    # and 127.0.0.1:0 twice reads as the same address.
    ING_PORT=$(free_port) || die "no free port"
    EG_PORT=$(free_port) || die "no free port"
    while [[ $EG_PORT == "$ING_PORT" || $EG_PORT == "$UP_PORT" ]]; do EG_PORT=$(free_port); done
    NO_COLOR=1 "$1" serve --upstream "http://127.0.0.1:$UP_PORT" \
        --listen "127.0.0.1:$ING_PORT" --admin 127.0.0.1:0 --egress "127.0.0.1:$EG_PORT" \
        --audit "$TMP/audit-$2.jsonl" --policies "$TMP/policies" --mode enforce \
        2>"$TMP/rempart-$2.log" &
    RP_PID=$!
    PIDS+=("$RP_PID")
    line=
    for _ in $(seq 1 200); do
        kill -0 "$RP_PID" 2>/dev/null || { cat "$TMP/rempart-$2.log" >&2; die "rempart exited during start-up"; }
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$TMP/rempart-$2.log" | grep -m1 'rempart ready' || true)
        [[ -n $line ]] && break
        sleep 0.1
    done
    [[ -n $line ]] || { cat "$TMP/rempart-$2.log" >&2; die "no 'rempart ready' line"; }
    ING=$(sed -n 's/.*ingress=\([^ ]*\).*/\1/p' <<<"$line")
    ADMIN=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' <<<"$line")
    EGRESS=$(sed -n 's/.* egress=\([^ ]*\).*/\1/p' <<<"$line")
    [[ -n $ING && -n $ADMIN && -n $EGRESS ]] || die "cannot read the listeners from: $line"
}

# Each kind of traffic answers as it should.
check_paths() {
    expect "allowed read" 200 "http://$ING/api/contacts/42"
    expect "denied route" 403 "http://$ING$DENIED"
    expect "HTTP/2 read" 200 --http2-prior-knowledge "http://$ING/api/contacts/7"
    expect "egress forward" 200 -x "http://$EGRESS" "http://127.0.0.1:$UP_PORT/hook"
    expect "egress tunnel" 200 -p -x "http://$EGRESS" "http://127.0.0.1:$UP_PORT/hook"
}

stop_rempart() {
    kill -TERM "$RP_PID"
    rc=0
    wait "$RP_PID" || rc=$?
    [[ $rc == 0 ]] || die "rempart exited $rc on SIGTERM (a profile it writes would be incomplete)"
}

# The training traffic, through BINARY (the compiler-instrumented build,
# then the BOLT-instrumented one); each writes its profile on SIGTERM.
train() { # BINARY NAME
    start_rempart "$1" "$2"
    check_paths
    wrk -t2 -c64 -d"${TRAIN_SECONDS}s" -s "$TMP/paths.lua" "http://$ING/" >"$TMP/wrk-reads-$2.txt"
    wrk -t1 -c8 -d5s "http://$ING$DENIED" >"$TMP/wrk-denied-$2.txt"
    for i in $(seq 1 200); do
        curl -s -o /dev/null --http2-prior-knowledge "http://$ING/api/contacts/$i" &
        h2=$!
        curl -s -o /dev/null -x "http://$EGRESS" "http://127.0.0.1:$UP_PORT/hook/$i" &
        fwd=$!
        curl -s -o /dev/null -p -x "http://$EGRESS" "http://127.0.0.1:$UP_PORT/hook/$i"
        wait "$h2" "$fwd"
        ((i % 20)) || curl -s -o /dev/null "http://$ADMIN/metrics"
    done
    expect "readiness" 200 "http://$ADMIN/readyz"
    grep -h 'Requests/sec' "$TMP/wrk-reads-$2.txt" "$TMP/wrk-denied-$2.txt" >&2
    stop_rempart
}

log "training the compiler profile: ${TRAIN_SECONDS}s of reads, 5s of denials, HTTP/2, egress, admin"
train "$INSTR" pgo
ls "$RAW"/*.profraw >/dev/null 2>&1 || die "no .profraw written under $RAW"

mkdir -p "$ROOT/target/pgo"
PROFILE=$ROOT/target/pgo/rempart.profdata
"$PROFDATA" merge -o "$PROFILE" "$RAW"
log "profile: $PROFILE ($(du -h "$PROFILE" | cut -f1))"

# -------------------------------------------------------------- optimised
log "optimised build (target/pgo)"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$PROFILE -Clink-arg=-Wl,--emit-relocs" CARGO_TARGET_DIR="$ROOT/target/pgo" \
    cargo build --release --locked --quiet --bin rempart --target "$TRIPLE")
PGO_OUT=$ROOT/target/pgo/$TRIPLE/release/rempart

# ------------------------------------------------------------------ BOLT
# llvm-bolt lays the linked binary out again from a profile of the same
# training: hot code of every crate together, cold blocks split away. Its
# instrumentation counts branches in software (no hardware counters
# needed). Needs the relocations `--emit-relocs` kept above. The result is
# a separate file: cargo's own stays as it linked it (cargo would take a
# rewritten one for up to date, and BOLT refuses a binary it has already
# rewritten).
OUT=$PGO_OUT
if [[ $BOLT != 0 ]]; then
    LLVM_BOLT=$(command -v llvm-bolt || ls /usr/lib/llvm-*/bin/llvm-bolt 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -z $LLVM_BOLT && $BOLT == 1 ]]; then
        die "BOLT=1 but no llvm-bolt (apt-get install bolt-19)"
    fi
    if [[ -n $LLVM_BOLT ]]; then
        log "BOLT: instrumenting with $LLVM_BOLT"
        FDATA=$TMP/bolt.fdata
        "$LLVM_BOLT" "$PGO_OUT" -o "$TMP/rempart.bolt-instrumented" -instrument \
            -instrumentation-file="$FDATA" >"$TMP/bolt-instrument.log" 2>&1 \
            || { cat "$TMP/bolt-instrument.log" >&2; die "llvm-bolt -instrument failed"; }
        log "training the layout profile"
        train "$TMP/rempart.bolt-instrumented" bolt
        [[ -s $FDATA ]] || die "no BOLT profile written to $FDATA"
        OUT=$ROOT/target/pgo/rempart
        "$LLVM_BOLT" "$PGO_OUT" -o "$OUT.tmp" -data="$FDATA" \
            -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions \
            -split-all-cold -split-eh -icf=1 -use-gnu-stack -update-debug-sections \
            >"$TMP/bolt-optimise.log" 2>&1 \
            || { cat "$TMP/bolt-optimise.log" >&2; die "llvm-bolt failed"; }
        mv "$OUT.tmp" "$OUT"
        # A rewritten binary is checked before it is handed over: the
        # shipped policies' own tests, and each kind of traffic.
        log "checking the rewritten binary"
        "$OUT" policy test "$ROOT/policies" >"$TMP/policy-test.log" 2>&1 \
            || { cat "$TMP/policy-test.log" >&2; die "the BOLT binary fails the policy tests"; }
        start_rempart "$OUT" check
        check_paths
        expect "readiness" 200 "http://$ADMIN/readyz"
        stop_rempart
    else
        log "no llvm-bolt: the PGO build is the result (apt-get install bolt-19 for BOLT)"
    fi
fi
log "done: $OUT"
echo "$OUT"
