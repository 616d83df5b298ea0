# Egress rules: the CRM's own outbound calls (input.direction == "egress"),
# made through rempart's forward proxy. The sovereignty rules
# (sovereignty.rego) judge where each destination is and under whose law;
# these add what only makes sense for outbound calls: special-purpose
# addresses (the SSRF classics), cloud metadata services, and per-workload
# allow-lists. Settings: data.settings.egress (policies/data.json).
#
# rempart resolves a name once and decides on each resolved address in
# turn (input.destination.ip is the one under decision; all of them are in
# input.destination.addresses); it connects only to an address allowed here.
package rempart

import rego.v1

egress := data.settings.egress

# The egress rules below add to egress_deny / egress_warn, which only an
# egress request evaluates: on the ingress (most traffic) regorus skips
# their bodies instead of entering each one to test the direction. Each
# definition still states the direction itself, so that it reads (and
# `policy eval --explain` reports it) on its own.
deny contains reason if {
	input.direction == "egress"
	some reason in egress_deny
}

warn contains reason if {
	input.direction == "egress"
	some reason in egress_warn
}

# Allow-list entries that apply to this caller: "*" and its workload.
egress_allow_entries contains entry if {
	input.direction == "egress"
	some name, entry in egress.allow
	name in {"*", input.source.workload}
}

# A destination the DSI trusts for this workload: exempt from the egress
# and sovereignty rules (an explicit, recorded exception).
egress_allowlisted if {
	some entry in egress_allow_entries
	some pattern in object.get(entry, "hosts", [])
	host_matches(input.destination.host, pattern)
}

egress_allowlisted if {
	some entry in egress_allow_entries
	some network in object.get(entry, "networks", [])
	net.cidr_contains(network, input.destination.ip)
}

egress_allowlisted if {
	some entry in egress_allow_entries
	input.destination.geo.operator.id in object.get(entry, "operators", [])
}

# "api.example.eu" matches itself; "*.example.eu" matches its subdomains
# (not example.eu itself).
host_matches(host, pattern) if host == lower(pattern)

host_matches(host, pattern) if {
	startswith(pattern, "*.")
	endswith(host, trim_prefix(lower(pattern), "*"))
}

# Cloud metadata services hand out the instance's credentials: never
# reachable from the CRM, whatever the allow-lists say.
egress_deny contains {
	"code": "egress_metadata_service",
	"message": sprintf("%s (%s) is a cloud metadata service", [input.destination.host, input.destination.ip]),
} if {
	input.direction == "egress"
	input.destination.ip in egress.metadata_addresses
}

# Private, loopback, link-local, CGNAT, multicast, reserved... addresses:
# the CRM's calls must not reach the inside of the network (SSRF), except
# the internal services the DSI lists.
egress_deny contains {
	"code": "egress_special_destination",
	"message": sprintf("destination %s resolves to %s, a %s address", [input.destination.host, input.destination.ip, input.destination.scope]),
} if {
	input.direction == "egress"
	input.destination.scope != "public"
	not input.destination.ip in egress.metadata_addresses
	not egress_internal
	not egress_allowlisted
}

egress_internal if {
	some network in egress.internal_networks
	net.cidr_contains(network, input.destination.ip)
}

# Allow-list only (Smokescreen's "enforce" role): anything not listed is
# refused.
egress_deny contains {
	"code": "egress_not_allowlisted",
	"message": sprintf("destination %s is not on the egress allow-list of %s", [input.destination.host, workload_name]),
} if {
	input.direction == "egress"
	egress.default_deny
	not egress_allowlisted
}

# Report-only roll-out of an allow-list: unlisted destinations pass, with
# a warning in the trail, until default_deny is switched on.
egress_warn contains {
	"code": "egress_not_allowlisted",
	"message": sprintf("destination %s is not on the egress allow-list of %s", [input.destination.host, workload_name]),
} if {
	input.direction == "egress"
	not egress.default_deny
	egress.report_unlisted
	not egress_allowlisted
}

workload_name := sprintf("workload %s", [input.source.workload]) if input.source.workload != null

workload_name := "this caller" if input.source.workload == null
