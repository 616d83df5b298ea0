# Tests of the access rules (access.rego); run with `rempart policy test policies/`.
package access_test

import rego.v1

import data.rempart

request(method, path, resource, roles) := {
	"direction": "ingress",
	"request": {
		"id": "t", "method": method, "scheme": "https", "host": "crm.example.eu", "port": 443,
		"path": path, "segments": [s | some s in split(path, "/"); s != ""],
		"query": {}, "headers": {}, "protocol": "HTTP/1.1",
	},
	"source": {"ip": "10.0.0.5", "port": 40000, "scope": "private", "geo": {"scope": "private", "country": null, "in_eu": false, "in_eea": false}},
	"destination": {"host": "127.0.0.1", "ip": "127.0.0.1", "port": 8000, "scope": "loopback"},
	"identity": {
		"authenticated": true, "method": "jwt", "subject": "alice", "name": null, "email": null,
		"roles": roles, "groups": [], "claims": {}, "issuer": null, "error": null, "sources": ["jwt"],
	},
	"resource": object.union({"crm": "creme", "id": null, "bulk": false, "inspection": null}, resource),
	"time": {"rfc3339": "2026-11-27T10:00:00Z", "unix_ns": 0, "weekday": 5, "hour": 10},
}

contacts_list(roles) := request("GET", "/persons/contacts", {"type": "contact", "operation": "list"}, roles)

export(roles) := request("GET", "/creme_core/mass_export", {"type": "contact", "operation": "export", "bulk": true}, roles)

delete(roles) := request("POST", "/creme_core/entity/delete/7", {"type": "entity", "operation": "delete", "id": "7"}, roles)

anonymous(inp) := object.union(inp, {"identity": object.union(inp.identity, {"authenticated": false, "method": "none", "subject": null, "roles": []})})

from_public(inp, geo) := object.union(inp, {"source": {"ip": "203.0.113.9", "port": 1, "scope": "public", "geo": geo}})

codes(d) := {r.code | some r in d.deny}

warn_codes(d) := {r.code | some r in d.warn}

test_sales_may_list_contacts if {
	d := rempart.decision with input as contacts_list(["sales"])
	d.allow
}

test_unauthenticated_is_denied if {
	d := rempart.decision with input as anonymous(contacts_list(["sales"]))
	codes(d) == {"unauthenticated"}
}

test_login_and_assets_stay_open_without_identity if {
	login := anonymous(request("POST", "/creme_login", {"type": "session", "operation": "login"}, []))
	d := rempart.decision with input as login
	d.allow
	css := anonymous(request("GET", "/static_media/a.css", {"type": "asset", "operation": "read"}, []))
	d2 := rempart.decision with input as css
	d2.allow
}

test_export_only_for_dpo if {
	d := rempart.decision with input as export(["dpo"])
	d.allow
	d2 := rempart.decision with input as export(["sales"])
	codes(d2) == {"bulk_requires_role"}
	some r in d2.deny
	r.message == "bulk export of contact requires one of the roles: dpo"
	# An administrator is not the DPO.
	d3 := rempart.decision with input as export(["admin"])
	codes(d3) == {"bulk_requires_role"}
}

test_non_export_bulk_also_needs_the_role if {
	inp := request("POST", "/creme_core/entity/update/bulk/98", {"type": "entity", "operation": "update", "bulk": true}, ["sales"])
	d := rempart.decision with input as inp
	codes(d) == {"bulk_requires_role"}
}

test_bulk_role_comes_from_data if {
	d := rempart.decision with input as export(["privacy"])
		with data.settings.access.bulk_roles as ["privacy"]
	d.allow
	d2 := rempart.decision with input as export(["dpo"])
		with data.settings.access.bulk_roles as ["privacy"]
	codes(d2) == {"bulk_requires_role"}
}

test_delete_only_for_admin if {
	d := rempart.decision with input as delete(["admin"])
	d.allow
	d2 := rempart.decision with input as delete(["sales", "dpo"])
	codes(d2) == {"delete_requires_role"}
	some r in d2.deny
	r.message == "deleting entity requires one of the roles: admin"
}

test_personal_data_from_outside_the_eea_is_denied if {
	us := from_public(contacts_list(["sales"]), {"scope": "public", "country": "US", "in_eu": false, "in_eea": false})
	d := rempart.decision with input as us
	codes(d) == {"personal_data_outside_eea"}
	some r in d.deny
	contains(r.message, "source country: US")
}

test_unknown_location_is_not_the_eu if {
	unknown := from_public(contacts_list(["sales"]), {"scope": "public", "country": null, "in_eu": false, "in_eea": false})
	d := rempart.decision with input as unknown
	codes(d) == {"personal_data_outside_eea"}
	some r in d.deny
	contains(r.message, "source country: unknown")
	# No geo at all: the same.
	bare := json.remove(object.union(contacts_list(["sales"]), {"source": {"ip": "203.0.113.9", "scope": "public"}}), ["source/geo"])
	not bare.source.geo
	d2 := rempart.decision with input as bare
	"personal_data_outside_eea" in codes(d2)
}

test_eu_eea_and_listed_countries_are_allowed if {
	fr := from_public(contacts_list(["sales"]), {"scope": "public", "country": "FR", "in_eu": true, "in_eea": true})
	d := rempart.decision with input as fr
	d.allow
	no := from_public(contacts_list(["sales"]), {"scope": "public", "country": "NO", "in_eu": false, "in_eea": true})
	d2 := rempart.decision with input as no
	d2.allow
	ch := from_public(contacts_list(["sales"]), {"scope": "public", "country": "CH", "in_eu": false, "in_eea": false})
	d3 := rempart.decision with input as ch with data.settings.access.allowed_countries as ["CH"]
	d3.allow
}

test_non_personal_types_are_not_location_bound if {
	inp := from_public(request("GET", "/products/products", {"type": "product", "operation": "list"}, ["sales"]), {"scope": "public", "country": "US", "in_eu": false, "in_eea": false})
	d := rempart.decision with input as inp
	d.allow
}

# Organisations are personal data as shipped: a sole trader's company is
# the person, and an organisation's page lists its employees; so are the
# files (attachments) and Odoo's generic export records.
test_organisations_files_and_records_are_personal_data if {
	us := {"scope": "public", "country": "US", "in_eu": false, "in_eea": false}
	every t in ["organisation", "file", "record"] {
		d := rempart.decision with input as from_public(request("GET", "/x", {"type": t, "operation": "read"}, ["sales"]), us)
		codes(d) == {"personal_data_outside_eea"}
	}
}

# Where a request comes from does not depend on who sends it: the location
# rule holds with no identity source configured.
test_location_rule_holds_without_identity_source if {
	us := from_public(contacts_list([]), {"scope": "public", "country": "US", "in_eu": false, "in_eea": false})
	no_source := object.union(anonymous(us), {"identity": {"sources": [], "error": null}})
	d := rempart.decision with input as no_source
	codes(d) == {"personal_data_outside_eea"}
	fr := from_public(contacts_list([]), {"scope": "public", "country": "FR", "in_eu": true, "in_eea": true})
	d2 := rempart.decision with input as object.union(anonymous(fr), {"identity": {"sources": []}})
	d2.allow
}

test_matrix_is_enforced_when_asked if {
	create := request("POST", "/persons/contact/add", {"type": "contact", "operation": "create"}, ["viewer"])
	d := rempart.decision with input as create
	d.allow
	d2 := rempart.decision with input as create with data.settings.access.permissions_enforced as true
	codes(d2) == {"permission_denied"}
	some r in d2.deny
	r.message == "no role of alice may create contact (roles: viewer)"
	sales := request("POST", "/persons/contact/add", {"type": "contact", "operation": "create"}, ["sales"])
	d3 := rempart.decision with input as sales with data.settings.access.permissions_enforced as true
	d3.allow
}

test_matrix_wildcards_and_no_roles if {
	cfg := request("GET", "/creme_config/", {"type": "configuration", "operation": "admin"}, ["admin"])
	d := rempart.decision with input as cfg with data.settings.access.permissions_enforced as true
	d.allow
	none := request("GET", "/persons/contacts", {"type": "contact", "operation": "list"}, [])
	d2 := rempart.decision with input as none with data.settings.access.permissions_enforced as true
	codes(d2) == {"permission_denied"}
	# The DPO exports with both rules on.
	d3 := rempart.decision with input as export(["dpo"]) with data.settings.access.permissions_enforced as true
	d3.allow
}

test_unknown_routes_are_decided_explicitly if {
	inp := request("GET", "/activities/calendar", {"type": "unknown", "operation": "other"}, ["sales"])
	# Denied as shipped: a route the profile does not know may be an export.
	d2 := rempart.decision with input as inp
	codes(d2) == {"unclassified_request"}
	some r in d2.deny
	r.message == "GET /activities/calendar matches no route of the creme profile"
	# `warn` is the roll-out setting: allowed, and recorded.
	d := rempart.decision with input as inp with data.settings.access.unknown_routes as "warn"
	d.allow
	warn_codes(d) == {"unclassified_request"}
	# An older data.json without the key gets the fail-closed default.
	d4 := rempart.decision with input as inp with data.settings.access as json.remove(data.settings.access, ["unknown_routes"])
	codes(d4) == {"unclassified_request"}
	# A misspelt setting denies too.
	d5 := rempart.decision with input as inp with data.settings.access.unknown_routes as "Warn"
	codes(d5) == {"unclassified_request"}
	d3 := rempart.decision with input as inp with data.settings.access.unknown_routes as "allow"
	d3.allow
	count(d3.warn) == 0
}

test_inactive_without_identity_source_or_when_disabled if {
	no_source := object.union(export(["sales"]), {"identity": {"sources": []}})
	d := rempart.decision with input as no_source
	d.allow
	d2 := rempart.decision with input as export(["sales"]) with data.settings.access.enabled as false
	d2.allow
}

test_egress_is_not_judged_here if {
	inp := object.union(export(["sales"]), {"direction": "egress"})
	d := rempart.decision with input as inp
	not "bulk_requires_role" in codes(d)
}

odoo_call(method, inspection, roles) := object.union(
	request(method, "/web/dataset/call_kw", {"crm": "odoo", "type": "unknown", "operation": "other", "inspection": inspection}, roles),
	{"resource": {"crm": "odoo", "type": "unknown", "operation": "other", "id": null, "bulk": false, "inspection": inspection}},
)

# An Odoo call whose body could not be read cannot show it is not an
# `unlink` or an `export_data`: denied, with why, and without the
# "matches no route" of unknown routes.
test_uninspected_body_is_denied_and_says_why if {
	every inspection, why in {
		"too_large": "it is larger than [classify] body_inspect_max_bytes",
		"malformed": "it is not the JSON the route expects",
		"timeout": "it did not arrive within [classify] body_inspect_timeout",
		"unreadable": "it could not be read",
	} {
		d := rempart.decision with input as odoo_call("POST", inspection, ["sales"])
		codes(d) == {"body_not_inspected"}
		count(d.warn) == 0
		[r.message | some r in d.deny] == [sprintf("POST /web/dataset/call_kw: the request body was not inspected (%s), so what the call does is unknown", [why])]
	}
}

test_uninspected_body_is_denied_without_identity_source_too if {
	inp := object.union(anonymous(odoo_call("POST", "too_large", [])), {"identity": {"sources": []}})
	d := rempart.decision with input as inp
	codes(d) == {"body_not_inspected"}
}

test_uninspected_body_allowed_for_a_configured_role_with_a_warning if {
	d := rempart.decision with input as odoo_call("POST", "too_large", ["integration"])
		with data.settings.access.uninspected_body_roles as ["integration"]
	d.allow
	warn_codes(d) == {"body_not_inspected"}
	d2 := rempart.decision with input as odoo_call("POST", "too_large", ["sales"])
		with data.settings.access.uninspected_body_roles as ["integration"]
	codes(d2) == {"body_not_inspected"}
}

test_inspected_bodies_are_decided_on_what_they_say if {
	inp := object.union(odoo_call("POST", "inspected", ["sales"]), {"resource": {"type": "contact", "operation": "list"}})
	d := rempart.decision with input as inp
	d.allow
	unlink := object.union(odoo_call("POST", "inspected", ["sales"]), {"resource": {"type": "contact", "operation": "delete", "id": "42"}})
	d2 := rempart.decision with input as unlink
	codes(d2) == {"delete_requires_role"}
}

# The generic profile types a request by the collection named in the URL
# (`/api/contacts/42` is type `contacts`): the usual collection names of
# people are personal data too, and a product catalogue is not.
test_generic_collections_of_people_are_personal_data if {
	us := {"scope": "public", "country": "US", "in_eu": false, "in_eea": false}
	every t in ["contacts", "customers", "accounts", "users", "people"] {
		d := rempart.decision with input as from_public(request("GET", "/api/x/42", {"type": t, "operation": "read"}, ["sales"]), us)
		codes(d) == {"personal_data_outside_eea"}
	}
	products := rempart.decision with input as from_public(request("GET", "/api/products/42", {"type": "products", "operation": "read"}, ["sales"]), us)
	products.allow
}
