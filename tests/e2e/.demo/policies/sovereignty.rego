# Sovereignty rules: where a request's data goes, and under whose law.
#
# They look at destination.geo (see docs/geo.md): the located country, and
# the operator of the address with the jurisdiction of its controlling
# company. They judge public destinations, and non-public ones that the
# company's own geo data places somewhere ([geo] locate_non_public); other
# private and loopback addresses have no location to judge (egress.rego
# handles them).
# Settings: data.settings.sovereignty (policies/data.json).
package rempart

import rego.v1

sovereignty := data.settings.sovereignty

# The destination host is exempted by the DSI (exact host name or IP).
sovereignty_exempt if input.destination.host in sovereignty.host_exceptions

# An egress destination on the caller's allow-list (egress.rego).
sovereignty_exempt if egress_allowlisted

public_destination if input.destination.geo.scope == "public"

located_destination if public_destination

located_destination if input.destination.geo.country != null

destination_country_allowed(geo) if geo.in_eea

destination_country_allowed(geo) if geo.country in sovereignty.allowed_countries

# Adequacy decisions count only when the DSI opts in; a partial one (e.g.
# the US, only for Data Privacy Framework members) needs its own opt-in.
destination_country_allowed(geo) if {
	sovereignty.allow_adequacy
	geo.adequacy.scope == "full"
}

destination_country_allowed(geo) if {
	sovereignty.allow_adequacy
	geo.adequacy.scope == "partial"
	geo.country in sovereignty.allow_partial_adequacy
}

deny contains {
	"code": "destination_outside_eu",
	"message": sprintf("destination %s is located in %s, outside the EU/EEA", [input.destination.host, input.destination.geo.country]),
} if {
	located_destination
	not sovereignty_exempt
	input.destination.geo.country != null
	not destination_country_allowed(input.destination.geo)
}

operator_allowed(op) if op.id in sovereignty.allowed_operators

operator_foreign(op) if not op.jurisdiction_in_eea

operator_foreign(op) if op.cloud_act

operator_foreign(op) if count(op.other_laws) > 0

deny contains {
	"code": "destination_non_eu_jurisdiction",
	"message": sprintf(
		"destination %s is operated by %s (%s, %s law%s)",
		[
			input.destination.host, op.name, op.parent, op.jurisdiction,
			cloud_act_note(op),
		],
	),
} if {
	located_destination
	not sovereignty_exempt
	op := input.destination.geo.operator
	op != null
	operator_foreign(op)
	not operator_allowed(op)
}

cloud_act_note(op) := ", exposed to the US CLOUD Act" if op.cloud_act

cloud_act_note(op) := "" if not op.cloud_act

# Unknown location or operator is not sovereign (fail closed) unless the
# DSI accepts it.
deny contains {
	"code": "destination_unknown",
	"message": sprintf("the location or operator of destination %s is unknown", [input.destination.host]),
} if {
	public_destination
	not sovereignty_exempt
	input.destination.geo.sovereign == "unknown"
	not sovereignty.allow_unknown
}

# A public destination that could not be located at all (no geo data).
deny contains {
	"code": "destination_unknown",
	"message": sprintf("destination %s could not be located", [input.destination.host]),
} if {
	input.destination.scope == "public"
	input.destination.geo == null
	not sovereignty_exempt
	not sovereignty.allow_unknown
}
