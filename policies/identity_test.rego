# Tests of the authentication rules; run with `rempart policy test policies/`.
package identity_test

import rego.v1

import data.rempart

request(path) := {
	"direction": "ingress",
	"request": {
		"id": "t", "method": "GET", "scheme": "https", "host": "crm.example.eu", "port": 443,
		"path": path, "segments": [s | some s in split(path, "/"); s != ""],
		"query": {}, "headers": {}, "protocol": "HTTP/1.1",
	},
	"source": {"ip": "10.0.0.5", "port": 40000, "scope": "private"},
	"destination": {"host": "127.0.0.1", "ip": "127.0.0.1", "port": 8000, "scope": "loopback"},
	"identity": {
		"authenticated": false, "method": "none", "subject": null, "name": null, "email": null,
		"roles": [], "groups": [], "claims": {}, "issuer": null, "error": null, "sources": ["jwt"],
	},
	"resource": {"crm": "generic", "type": "contacts", "id": null, "operation": "read", "bulk": false},
	"time": {"rfc3339": "2026-11-27T10:00:00Z", "unix_ns": 0, "weekday": 5, "hour": 10},
}

with_identity(inp, patch) := object.union(inp, {"identity": object.union(inp.identity, patch)})

codes(d) := {r.code | some r in d.deny}

test_anonymous_is_denied_when_a_source_is_configured if {
	d := rempart.decision with input as request("/api/contacts")
	codes(d) == {"unauthenticated"}
	some r in d.deny
	r.message == "authentication required"
}

test_refused_token_says_why if {
	inp := with_identity(request("/api/contacts"), {"method": "jwt", "error": "expired"})
	d := rempart.decision with input as inp
	some r in d.deny
	r.code == "unauthenticated"
	contains(r.message, "expired")
}

test_authenticated_is_allowed if {
	inp := with_identity(request("/api/contacts"), {"authenticated": true, "method": "jwt", "subject": "alice"})
	d := rempart.decision with input as inp
	d.allow
}

test_login_paths_stay_open if {
	d := rempart.decision with input as request("/login")
	d.allow
	d2 := rempart.decision with input as request("/login/callback")
	d2.allow
}

test_login_prefix_is_per_segment if {
	d := rempart.decision with input as request("/login-admin")
	codes(d) == {"unauthenticated"}
}

test_login_paths_come_from_data if {
	d := rempart.decision with input as request("/signin")
		with data.settings.identity.login_paths as ["/signin"]
	d.allow
	d2 := rempart.decision with input as request("/login")
		with data.settings.identity.login_paths as ["/signin"]
	not d2.allow
}

test_no_source_configured_keeps_the_rule_inactive if {
	d := rempart.decision with input as with_identity(request("/api/contacts"), {"sources": []})
	d.allow
}

test_input_without_sources_keeps_the_rule_inactive if {
	inp := object.union(object.remove(request("/api/contacts"), ["identity"]), {"identity": {"authenticated": false, "method": "none"}})
	d := rempart.decision with input as inp
	d.allow
}

test_egress_is_not_this_rule if {
	inp := object.union(request("/api/contacts"), {"direction": "egress"})
	d := rempart.decision with input as inp
	not "unauthenticated" in codes(d)
}
