#!/usr/bin/env bash
# rempart in front of Creme CRM, on this machine, for a browser:
#   https://127.0.0.1:8443  the gateway (TLS, JWT identity, creme profile,
#                           shipped policies with the role matrix on)
#   http://127.0.0.1:8444   a demo "identity provider": pick a role, get a
#                           signed JWT cookie, land on Creme's login page
#   http://127.0.0.1:9464/metrics  rempart's metrics
# The audit trail is tests/e2e/.demo/audit.jsonl. Ctrl-C stops everything.
#
# First run: installs Creme (about 80 s) and builds rempart if needed.
# Ports: CREME_PORT (8001), GATEWAY_PORT (8443), IDP_PORT (8444), ADMIN_PORT (9464).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
demo="$here/.demo"
creme_port="${CREME_PORT:-8001}"
gateway_port="${GATEWAY_PORT:-8443}"
idp_port="${IDP_PORT:-8444}"
admin_port="${ADMIN_PORT:-9464}"

eval "$("$here/creme-setup.sh" | grep -E '^[A-Z_]+=')"
rempart="$root/target/release/rempart"
if [ ! -x "$rempart" ]; then
    echo "building rempart (cargo build --release)..." >&2
    (cd "$root" && cargo build --release --quiet)
fi

mkdir -p "$demo/policies"
[ -f "$demo/cert.pem" ] || "$PYTHON" "$here/creme_demo.py" init "$demo"
for f in "$root"/policies/*.rego; do
    case "$f" in *_test.rego) ;; *) cp "$f" "$demo/policies/" ;; esac
done
"$PYTHON" - "$root/policies/data.json" "$demo/policies/data.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["settings"]["access"]["permissions_enforced"] = True
json.dump(data, open(sys.argv[2], "w"), indent=2)
PY
cat > "$demo/rempart.toml" <<TOML
[server]
listen = "127.0.0.1:$gateway_port"
[server.tls]
cert = "$demo/cert.pem"
key = "$demo/key.pem"
[upstream]
url = "http://127.0.0.1:$creme_port"
[admin]
listen = "127.0.0.1:$admin_port"
[policy]
dir = "$demo/policies"
[audit]
path = "$demo/audit.jsonl"
[identity.jwt]
issuer = "https://idp.demo.invalid/realms/crm"
audiences = ["crm"]
jwks_file = "$demo/jwks.json"
roles_claim = "roles"
cookie = "rempart_token"
[classify]
profiles = ["creme"]
TOML

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

(cd "$CREME_STATE/crmproj" && PYTHONWARNINGS=ignore exec "$CREME" runserver "127.0.0.1:$creme_port" --noreload --settings=crmproj.settings >"$demo/creme.log" 2>&1) &
pids+=($!)
"$rempart" serve --config "$demo/rempart.toml" >"$demo/rempart.log" 2>&1 &
pids+=($!)
"$PYTHON" "$here/creme_demo.py" serve "$demo" "$idp_port" "https://127.0.0.1:$gateway_port" &
pids+=($!)

for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$creme_port/creme_login/" && break
    sleep 0.2
done

cat <<TXT

  rempart in front of Creme CRM is running.

  1. Open http://127.0.0.1:$idp_port/ and pick a role (sales, dpo, admin).
  2. Your browser lands on https://127.0.0.1:$gateway_port/creme_login/ — accept the
     demo certificate (or trust $demo/ca.pem) — log in to Creme as
     sales / sales-pass, dpo / dpo-pass or admin / admin-pass.
  3. As sales, try Contacts > Export (403 from rempart, with the reason); as dpo
     it downloads the CSV. Deleting needs admin.
  4. Watch the audit trail:  tail -f $demo/audit.jsonl
     Metrics:                http://127.0.0.1:$admin_port/metrics

  Ctrl-C stops Creme, rempart and the demo identity provider.
TXT
wait
