# shellcheck shell=bash disable=SC2034
# Shared by benches/load.sh and benches/ab.sh (sourced, not run): what both
# must agree on for their numbers to be comparable.

# The static upstream's answer to GET /api/contacts/<id>: about 220 bytes
# of JSON, as a CRM's contact read.
UPSTREAM_BODY='{"id":42,"type":"contact","first_name":"Camille","last_name":"Durand","email":"camille.durand@example.eu","phone":"+33 1 23 45 67 89","company":"Exemple SARL","country":"FR","owner":"bob","updated_at":"2026-11-27T13:13:34Z"}'

# nginx directives of every nginx the benches start (http context): long-lived
# keep-alive everywhere, so that no side closes connections every 1000
# requests (nginx's default) while the other does not.
NGINX_KEEPALIVE='keepalive_requests 1000000;
    keepalive_timeout 75s;'

# A port below the ephemeral range that nobody listens on.
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}
