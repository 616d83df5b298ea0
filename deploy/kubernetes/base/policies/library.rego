# The default library: request hygiene rules that hold in front of any CRM.
# Their settings are in data.json (data.settings), which a DSI edits.
package rempart

import rego.v1

# The request-hygiene rules below add to ingress_deny, which only an
# ingress request evaluates (regorus skips their bodies on the egress).
# Each definition still states the direction itself, so that it reads (and
# `policy eval --explain` reports it) on its own.
deny contains reason if {
	input.direction == "ingress"
	some reason in ingress_deny
}

# Methods a CRM never needs from a browser or an API client (TRACE echoes
# credentials back; CONNECT on the ingress is a misrouted proxy request).
ingress_deny contains {
	"code": "method_not_allowed",
	"message": sprintf("method %s is not allowed", [input.request.method]),
} if {
	input.direction == "ingress"
	input.request.method in data.settings.blocked_methods
}

# A `..` or `.` segment, or a decoded segment that hides a slash or a
# backslash, is a traversal attempt whatever the CRM does with it.
ingress_deny contains {
	"code": "path_traversal",
	"message": "the path tries to leave its directory",
} if {
	input.direction == "ingress"
	path_traversal
}

path_traversal if {
	some segment in input.request.segments
	segment in {"..", "."}
}

# One search over the segments joined by a newline (which is neither "/"
# nor "\\"), rather than a call per segment: this runs on every request.
path_traversal if contains(segments_joined, "/")

path_traversal if contains(segments_joined, "\\")

segments_joined := concat("\n", input.request.segments)

# Paths that must never be served: any path with a segment naming
# repository metadata or a secrets file (compared per segment, so that
# "//.git/config" cannot slip past and "/.github" is not caught). Segments
# are compared lower-cased with data.settings.blocked_segments, whose
# entries must therefore be written in lower case (library_test.rego checks
# the data it runs with): lower-casing the list on every request would cost
# more than the rest of the rule.
ingress_deny contains {
	"code": "blocked_path",
	"message": sprintf("path %s is blocked (segment %s)", [input.request.path, segment]),
} if {
	input.direction == "ingress"
	some segment in input.request.segments
	lower(segment) in data.settings.blocked_segments
}

# Bulk operations (exports, mass deletes) are allowed here but always
# flagged, so that a DPO can find them in the trail.
warn contains {
	"code": "bulk_operation",
	"message": sprintf("bulk %s on %s", [input.resource.operation, input.resource.type]),
} if {
	input.resource.bulk
}

# Plain HTTP from the public internet exposes credentials in transit.
warn contains {
	"code": "plaintext_from_public",
	"message": "plain HTTP request from a public address",
} if {
	input.direction == "ingress"
	input.request.scheme == "http"
	input.source.scope == "public"
}
