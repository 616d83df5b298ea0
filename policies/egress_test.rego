# Tests of the egress rules; run with `rempart policy test policies/`.
package egress_test

import rego.v1

import data.rempart

ovh := {
	"id": "ovhcloud", "name": "OVHcloud", "parent": "OVH Groupe SA",
	"jurisdiction": "FR", "jurisdiction_in_eea": true, "cloud_act": false,
	"other_laws": [], "sources": [],
}

amazon := {
	"id": "amazon", "name": "Amazon Web Services", "parent": "Amazon.com, Inc.",
	"jurisdiction": "US", "jurisdiction_in_eea": false, "cloud_act": true,
	"other_laws": [], "sources": [],
}

local(scope) := {
	"scope": scope, "country": null, "in_eu": false, "in_eea": false,
	"adequacy": null, "asn": null, "as_org": null, "as_country": null,
	"operator": null, "sovereign": "local",
}

public(country, in_eea, op) := {
	"scope": "public", "country": country, "in_eu": in_eea, "in_eea": in_eea,
	"adequacy": null, "asn": null, "as_org": null, "as_country": null,
	"operator": op, "sovereign": "whatever",
}

call(host, ip, g, workload) := {
	"direction": "egress",
	"request": {"method": "CONNECT", "scheme": "tunnel", "path": "", "segments": []},
	"source": {"ip": "10.1.0.5", "scope": "private", "workload": workload},
	"destination": {
		"host": host, "ip": ip, "port": 443, "scope": g.scope, "geo": g,
		"addresses": [{"ip": ip, "scope": g.scope, "geo": g}],
	},
	"identity": {"authenticated": false, "method": "none"},
	"resource": {"crm": "egress", "type": "tunnel", "operation": "send", "bulk": false},
}

codes(d) := {r.code | some r in d.deny}

warn_codes(d) := {r.code | some r in d.warn}

eu := call("hooks.example.fr", "51.15.0.1", public("FR", true, ovh), "creme")

test_eu_operator_in_eu_passes if {
	d := rempart.decision with input as eu
	d.allow
}

test_private_loopback_link_local_cgnat_are_refused if {
	every scope_ip in [["private", "10.0.0.1"], ["loopback", "127.0.0.1"], ["link_local", "169.254.1.1"], ["cgnat", "100.64.0.1"], ["reserved", "240.0.0.1"]] {
		d := rempart.decision with input as call("intranet.example", scope_ip[1], local(scope_ip[0]), "creme")
		codes(d) == {"egress_special_destination"}
	}
}

test_metadata_service_is_refused_even_when_allowlisted if {
	d := rempart.decision with input as call("169.254.169.254", "169.254.169.254", local("link_local"), "creme")
		with data.settings.egress.allow as {"*": {"networks": ["169.254.0.0/16"]}}
	codes(d) == {"egress_metadata_service"}
	d6 := rempart.decision with input as call("fd00:ec2::254", "fd00:ec2::254", local("private"), "creme")
	codes(d6) == {"egress_metadata_service"}
}

test_internal_networks_lift_only_the_special_range_rule if {
	d := rempart.decision with input as call("smtp.corp", "10.0.0.25", local("private"), "creme")
		with data.settings.egress.internal_networks as ["10.0.0.0/24"]
	d.allow

	# Mapped by the company's own geo data to a US site: still judged.
	us_site := object.union(local("private"), {"country": "US", "in_eu": false, "in_eea": false})
	d2 := rempart.decision with input as call("relay.corp", "10.0.0.26", us_site, "creme")
		with data.settings.egress.internal_networks as ["10.0.0.0/24"]
	codes(d2) == {"destination_outside_eu"}
}

test_us_operator_in_eu_is_refused if {
	d := rempart.decision with input as call("api.example.com", "3.120.0.1", public("DE", true, amazon), "creme")
	codes(d) == {"destination_non_eu_jurisdiction"}
}

test_allowlist_by_host_per_workload if {
	inp := call("api.brevo.com", "3.120.0.1", public("DE", true, amazon), "creme")
	allow := {"creme": {"hosts": ["*.brevo.com"]}}
	d := rempart.decision with input as inp with data.settings.egress.allow as allow
	d.allow

	# Another workload does not inherit creme's exception.
	other := object.union(inp, {"source": {"workload": "billing"}})
	d2 := rempart.decision with input as other with data.settings.egress.allow as allow
	codes(d2) == {"destination_non_eu_jurisdiction"}

	# A wildcard does not match the apex.
	apex := object.union(inp, {"destination": {"host": "brevo.com"}})
	d3 := rempart.decision with input as apex with data.settings.egress.allow as allow
	not d3.allow
}

test_allowlist_by_operator_for_every_workload if {
	d := rempart.decision with input as call("s3.eu-west-3.amazonaws.com", "3.120.0.1", public("FR", true, amazon), null)
		with data.settings.egress.allow as {"*": {"operators": ["amazon"]}}
	d.allow
}

test_default_deny_refuses_unlisted_destinations if {
	d := rempart.decision with input as eu
		with data.settings.egress.default_deny as true
		with data.settings.egress.allow as {"creme": {"hosts": ["api.example.eu"]}}
	codes(d) == {"egress_not_allowlisted"}
	some r in d.deny
	contains(r.message, "workload creme")
	listed := object.union(eu, {"destination": {"host": "api.example.eu"}})
	d2 := rempart.decision with input as listed
		with data.settings.egress.default_deny as true
		with data.settings.egress.allow as {"creme": {"hosts": ["api.example.eu"]}}
	d2.allow
}

test_report_unlisted_warns_without_blocking if {
	d := rempart.decision with input as eu with data.settings.egress.report_unlisted as true
	d.allow
	warn_codes(d) == {"egress_not_allowlisted"}
}

test_ingress_is_not_judged_by_egress_rules if {
	inp := object.union(call("crm.local", "127.0.0.1", local("loopback"), null), {"direction": "ingress"})
	d := rempart.decision with input as inp
	not "egress_special_destination" in codes(d)
}
