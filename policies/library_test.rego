# Tests of the default library; run with `rempart policy test policies/`.
package rempart_test

import rego.v1

import data.rempart

base := {
	"direction": "ingress",
	"request": {
		"id": "t", "method": "GET", "scheme": "http", "host": "crm.example.eu", "port": 8080,
		"path": "/api/contacts/42", "segments": ["api", "contacts", "42"],
		"query": {}, "headers": {}, "protocol": "HTTP/1.1",
	},
	"source": {"ip": "10.0.0.5", "port": 40000, "scope": "private"},
	"destination": {"host": "127.0.0.1", "ip": "127.0.0.1", "port": 8000, "scope": "loopback"},
	"identity": {"authenticated": false, "method": "none", "subject": null, "roles": []},
	"resource": {"crm": "generic", "type": "contacts", "id": "42", "operation": "read", "bulk": false},
	"time": {"rfc3339": "2026-11-27T10:00:00Z", "unix_ns": 0, "weekday": 5, "hour": 10},
}

codes(reasons) := {r.code | some r in reasons}

with_request(patch) := object.union(base, {"request": object.union(base.request, patch)})

test_plain_read_is_allowed if {
	d := rempart.decision with input as base
	d.allow
	d.deny == []
	d.warn == []
}

test_trace_is_denied if {
	d := rempart.decision with input as with_request({"method": "TRACE"})
	not d.allow
	codes(d.deny) == {"method_not_allowed"}
}

test_blocked_methods_come_from_data if {
	d := rempart.decision with input as with_request({"method": "TRACE"})
		with data.settings.blocked_methods as []
	d.allow
}

test_dot_dot_segment_is_denied if {
	d := rempart.decision with input as with_request({"path": "/a/../etc/passwd", "segments": ["a", "..", "etc", "passwd"]})
	"path_traversal" in codes(d.deny)
}

test_encoded_slash_segment_is_denied if {
	d := rempart.decision with input as with_request({"path": "/a/../b", "segments": ["a/..", "b"]})
	"path_traversal" in codes(d.deny)
}

test_single_dot_and_backslash_segments_are_denied if {
	dot := rempart.decision with input as with_request({"path": "/a/./b", "segments": ["a", ".", "b"]})
	codes(dot.deny) == {"path_traversal"}
	backslash := rempart.decision with input as with_request({"path": "/a/%5C..", "segments": ["a", "\\.."]})
	codes(backslash.deny) == {"path_traversal"}
}

test_dotted_names_are_not_traversal if {
	d := rempart.decision with input as with_request({"path": "/files/report..v2/.well", "segments": ["files", "report..v2", ".well"]})
	d.allow
}

test_traversal_rules_are_ingress_only if {
	d := rempart.decision with input as object.union(with_request({"method": "TRACE", "segments": [".."]}), {"direction": "egress"})
	not "path_traversal" in codes(d.deny)
	not "method_not_allowed" in codes(d.deny)
}

# blocked_path compares lower-cased segments with the list as written: an
# entry with a capital letter would never match.
test_blocked_segments_are_written_in_lower_case if {
	every s in data.settings.blocked_segments {
		s == lower(s)
	}
}

test_blocked_ds_store_is_denied_whatever_its_case if {
	d := rempart.decision with input as with_request({"path": "/img/.DS_Store", "segments": ["img", ".DS_Store"]})
	codes(d.deny) == {"blocked_path"}
}

test_blocked_prefix_is_denied_case_insensitively if {
	d := rempart.decision with input as with_request({"path": "/.GIT/config", "segments": [".GIT", "config"]})
	codes(d.deny) == {"blocked_path"}
}

test_similar_path_is_not_blocked if {
	d := rempart.decision with input as with_request({"path": "/.github/config", "segments": [".github", "config"]})
	d.allow
}

test_blocked_segment_anywhere_is_denied if {
	d := rempart.decision with input as with_request({"path": "//static/.env", "segments": ["static", ".env"]})
	codes(d.deny) == {"blocked_path"}
}

test_bulk_operation_warns_but_allows if {
	inp := object.union(base, {"resource": object.union(base.resource, {"operation": "export", "bulk": true})})
	d := rempart.decision with input as inp
	d.allow
	codes(d.warn) == {"bulk_operation"}
}

test_public_plaintext_warns if {
	# A product catalogue: contacts from an unlocated public address would
	# also be refused as personal data (access.rego), which is not this rule.
	products := object.union(base.resource, {"type": "products"})
	inp := object.union(base, {"source": {"ip": "8.8.8.8", "port": 1, "scope": "public"}, "resource": products})
	d := rempart.decision with input as inp
	d.allow
	"plaintext_from_public" in codes(d.warn)
}

test_egress_trace_is_not_this_rule if {
	inp := object.union(with_request({"method": "TRACE"}), {"direction": "egress"})
	d := rempart.decision with input as inp
	not "method_not_allowed" in codes(d.deny)
}
