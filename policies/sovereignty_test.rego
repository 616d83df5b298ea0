# Tests of the sovereignty rules; run with `rempart policy test policies/`.
package sovereignty_test

import rego.v1

import data.rempart

amazon := {
	"id": "amazon", "name": "Amazon Web Services", "parent": "Amazon.com, Inc.",
	"jurisdiction": "US", "jurisdiction_in_eea": false, "cloud_act": true,
	"other_laws": [], "sources": ["https://www.peeringdb.com/asn/16509"],
}

ovh := {
	"id": "ovhcloud", "name": "OVHcloud", "parent": "OVH Groupe SA",
	"jurisdiction": "FR", "jurisdiction_in_eea": true, "cloud_act": false,
	"other_laws": [], "sources": ["https://www.peeringdb.com/asn/16276"],
}

geo(country, in_eea, op, sovereign) := {
	"scope": "public", "country": country, "in_eu": in_eea, "in_eea": in_eea,
	"adequacy": null, "asn": null, "as_org": null, "as_country": null,
	"operator": op, "sovereign": sovereign,
}

to(host, g) := {
	"direction": "egress",
	"request": {"method": "POST", "path": "/hook", "segments": ["hook"], "scheme": "https"},
	"source": {"scope": "loopback"},
	"destination": {"host": host, "ip": "203.0.113.7", "port": 443, "scope": g.scope, "geo": g},
	"identity": {"authenticated": false},
	"resource": {"bulk": false, "operation": "create", "type": "hook"},
}

codes(d) := {r.code | some r in d.deny}

frankfurt_amazon := to("api.example.com", geo("DE", true, amazon, "non_eu_operator_in_eu"))

test_eu_datacenter_of_us_operator_is_denied_for_jurisdiction_only if {
	d := rempart.decision with input as frankfurt_amazon
	codes(d) == {"destination_non_eu_jurisdiction"}
	some r in d.deny
	contains(r.message, "CLOUD Act")
}

test_eu_operator_in_eu_is_allowed if {
	d := rempart.decision with input as to("hooks.example.fr", geo("FR", true, ovh, "eu_operated_in_eu"))
	d.allow
}

test_us_operator_in_us_gets_both_reasons if {
	d := rempart.decision with input as to("dns.google", geo("US", false, amazon, "outside_eu"))
	codes(d) == {"destination_outside_eu", "destination_non_eu_jurisdiction"}
}

test_unknown_operator_in_eu_is_denied_fail_closed if {
	d := rempart.decision with input as to("x.example.de", geo("DE", true, null, "unknown"))
	codes(d) == {"destination_unknown"}
}

test_unknown_can_be_accepted_by_the_dsi if {
	d := rempart.decision with input as to("x.example.de", geo("DE", true, null, "unknown"))
		with data.settings.sovereignty.allow_unknown as true
	d.allow
}

test_unlocated_public_destination_is_denied if {
	inp := object.union(frankfurt_amazon, {"destination": {"host": "h", "scope": "public", "geo": null}})
	d := rempart.decision with input as inp
	codes(d) == {"destination_unknown"}
}

switzerland := object.union(
	geo("CH", false, null, "outside_eu"),
	{"adequacy": {"scope": "full", "decided": "2000-07-26", "note": ""}},
)

test_adequacy_country_denied_unless_opted_in if {
	d := rempart.decision with input as to("ch.example", switzerland)
	codes(d) == {"destination_outside_eu"}
	d2 := rempart.decision with input as to("ch.example", switzerland)
		with data.settings.sovereignty.allow_adequacy as true
	d2.allow
}

us_dpf := object.union(
	geo("US", false, null, "outside_eu"),
	{"adequacy": {"scope": "partial", "decided": "2023-07-10", "note": "DPF only"}},
)

test_partial_adequacy_needs_its_own_opt_in if {
	d := rempart.decision with input as to("us.example", us_dpf)
		with data.settings.sovereignty.allow_adequacy as true
	"destination_outside_eu" in codes(d)
	d2 := rempart.decision with input as to("us.example", us_dpf)
		with data.settings.sovereignty.allow_adequacy as true
		with data.settings.sovereignty.allow_partial_adequacy as ["US"]
	not "destination_outside_eu" in codes(d2)
}

test_allowed_operator_and_host_exception if {
	d := rempart.decision with input as frankfurt_amazon
		with data.settings.sovereignty.allowed_operators as ["amazon"]
	d.allow
	d2 := rempart.decision with input as frankfurt_amazon
		with data.settings.sovereignty.host_exceptions as ["api.example.com"]
	d2.allow
}

# (egress.rego refuses unlisted loopback destinations on its own grounds.)
test_local_destinations_are_not_judged_here if {
	inp := object.union(frankfurt_amazon, {"destination": {"host": "127.0.0.1", "scope": "loopback", "geo": {"scope": "loopback", "sovereign": "local", "country": null, "operator": null}}})
	d := rempart.decision with input as inp
	sovereignty_codes := {c | some c in codes(d); startswith(c, "destination_")}
	count(sovereignty_codes) == 0
	codes(d) == {"egress_special_destination"}
}
