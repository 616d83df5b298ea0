# Access rights: who may do what to which records, from input.resource (what
# the CRM profile says a request touches) and input.identity.roles.
#
# Ingress only, while data.settings.access.enabled is true:
# - personal-data types (`personal_data_types`) only from the EU/EEA: a public
#   source whose location is unknown is not in the EU; private and loopback
#   sources are the organisation's own network. This rule reads where the
#   request comes from, not who sends it: it is active without identity too;
# - a request whose operation is read from its body (Odoo's call_kw) but whose
#   body could not be inspected (too large, malformed, too slow) is denied,
#   unless the caller has one of `uninspected_body_roles` (default: none):
#   otherwise padding an `unlink` past the bound would hide the delete.
#   Also active without identity (nobody then has a role).
# Once rempart also has an identity source (as the authentication rules in
# identity.rego):
# - export and other bulk operations only for the roles in `bulk_roles`
#   (default: dpo);
# - delete only for the roles in `delete_roles` (default: admin);
# - with `permissions_enforced`, the role -> type -> operations matrix in
#   `permissions` ("*" for any type or any operation);
# - requests no profile route matched (type "unknown") are denied, warned
#   about or allowed as `unknown_routes` says (default: deny).
# Types in `public_types` (the CRM's login pages and static assets) need no
# authentication and no permission.
# Settings: data.settings.access (policies/data.json).
package rempart

import rego.v1

access := object.get(data.settings, "access", {})

access_enabled if {
	input.direction == "ingress"
	object.get(access, "enabled", false) == true
}

# The rules that need to know who asks.
access_active if {
	access_enabled
	identity_required
}

# The rules below add to access_deny / access_warn, which are evaluated
# only when access control is enabled: otherwise regorus skips their bodies.
# Each definition still states its own conditions, so that it reads (and
# `policy eval --explain` reports it) on its own; the gate only saves work.
deny contains reason if {
	access_enabled
	some reason in access_deny
}

warn contains reason if {
	access_enabled
	some reason in access_warn
}

public_resource if input.resource.type in object.get(access, "public_types", [])

# The CRM's own login pages and assets stay open (see identity.rego).
login_path if {
	input.direction == "ingress"
	public_resource
}

has_any_role(roles) if {
	some r in input.identity.roles
	r in roles
}

roles_text(roles) := concat(", ", roles)

bulk_or_export if input.resource.bulk == true

bulk_or_export if input.resource.operation == "export"

bulk_roles := object.get(access, "bulk_roles", ["dpo"])

access_deny contains {
	"code": "bulk_requires_role",
	"message": sprintf("%s%s of %s requires one of the roles: %s", [bulk_word, input.resource.operation, input.resource.type, roles_text(bulk_roles)]),
} if {
	access_active
	input.identity.authenticated
	not public_resource
	bulk_or_export
	not has_any_role(bulk_roles)
}

bulk_word := "bulk " if input.resource.bulk == true

bulk_word := "" if input.resource.bulk != true

delete_roles := object.get(access, "delete_roles", ["admin"])

access_deny contains {
	"code": "delete_requires_role",
	"message": sprintf("deleting %s requires one of the roles: %s", [input.resource.type, roles_text(delete_roles)]),
} if {
	access_active
	input.identity.authenticated
	input.resource.operation == "delete"
	not has_any_role(delete_roles)
}

# --- location of the source ---------------------------------------------

# Read by its path: the decision cache keys on the input fields the rules
# read, and `object.get(input.source, ...)` would read the whole source,
# client port included.
default source_geo := {}

source_geo := input.source.geo

source_in_eea if input.source.scope != "public"

source_in_eea if object.get(source_geo, "in_eea", false) == true

source_in_eea if object.get(source_geo, "in_eu", false) == true

source_in_eea if object.get(source_geo, "country", null) in object.get(access, "allowed_countries", [])

source_country := c if {
	c := object.get(source_geo, "country", null)
	is_string(c)
} else := "unknown"

access_deny contains {
	"code": "personal_data_outside_eea",
	"message": sprintf("%s records hold personal data and may not be reached from outside the EU/EEA (source country: %s)", [input.resource.type, source_country]),
} if {
	access_enabled
	input.resource.type in object.get(access, "personal_data_types", [])
	not source_in_eea
}

# --- the role -> permission matrix ----------------------------------------

permitted if {
	some role in input.identity.roles
	perms := object.get(object.get(access, "permissions", {}), role, {})
	ops := object.get(perms, input.resource.type, object.get(perms, "*", []))
	some op in ops
	op in {"*", input.resource.operation}
}

access_deny contains {
	"code": "permission_denied",
	"message": sprintf("no role of %s may %s %s (roles: %s)", [subject_text, input.resource.operation, input.resource.type, roles_text(input.identity.roles)]),
} if {
	access_active
	object.get(access, "permissions_enforced", false) == true
	input.identity.authenticated
	not public_resource
	not permitted
}

subject_text := s if {
	s := input.identity.subject
	is_string(s)
} else := "the caller"

# --- bodies that could not be inspected -----------------------------------

# resource.inspection is set only for routes that read their body to know
# the type and operation; anything but "inspected" means they are not known.
uninspected_body if {
	access_enabled
	is_string(input.resource.inspection)
	input.resource.inspection != "inspected"
}

uninspected_body_roles := object.get(access, "uninspected_body_roles", [])

inspection_reasons := {
	"too_large": "it is larger than [classify] body_inspect_max_bytes",
	"malformed": "it is not the JSON the route expects",
	"timeout": "it did not arrive within [classify] body_inspect_timeout",
	"unreadable": "it could not be read",
}

uninspected_body_message := sprintf("%s %s: the request body was not inspected (%s), so what the call does is unknown", [input.request.method, input.request.path, object.get(inspection_reasons, input.resource.inspection, input.resource.inspection)])

access_deny contains {"code": "body_not_inspected", "message": uninspected_body_message} if {
	uninspected_body
	not has_any_role(uninspected_body_roles)
}

access_warn contains {"code": "body_not_inspected", "message": uninspected_body_message} if {
	uninspected_body
	has_any_role(uninspected_body_roles)
}

# --- routes no profile knows ------------------------------------------------

# A body that was not inspected also leaves the type "unknown": the rule
# above says why, not this one.
unknown_route if {
	access_active
	input.identity.authenticated
	input.resource.type == "unknown"
	not is_string(input.resource.inspection)
}

unknown_routes := object.get(access, "unknown_routes", "deny")

unknown_route_message := sprintf("%s %s matches no route of the %s profile", [input.request.method, input.request.path, input.resource.crm])

# Anything but "warn" or "allow" (a typo included) denies: fail closed.
access_deny contains {"code": "unclassified_request", "message": unknown_route_message} if {
	unknown_route
	not unknown_routes in {"warn", "allow"}
}

access_warn contains {"code": "unclassified_request", "message": unknown_route_message} if {
	unknown_route
	unknown_routes == "warn"
}
