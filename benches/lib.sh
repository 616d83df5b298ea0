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

# nginx.conf of a static upstream (1 worker) on 127.0.0.1:PORT that answers
# every GET with UPSTREAM_BODY; its pid, error log and temp files go under
# DIR. Start it with: nginx -p DIR -e DIR/error.log -c CONF -g 'daemon off;'
static_upstream_conf() { # dir port
    cat <<EOF2
worker_processes 1;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    $NGINX_KEEPALIVE
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    server {
        listen 127.0.0.1:$2;
        location / {
            default_type application/json;
            return 200 '$UPSTREAM_BODY';
        }
    }
}
EOF2
}
