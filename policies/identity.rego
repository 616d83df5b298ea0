# Authentication: once rempart is configured with an identity source (JWT,
# mTLS or a trusted header: input.identity.sources is not empty), requests
# without an authenticated identity are denied, except on the paths the CRM
# needs for its own login. With no identity source configured these rules
# stay inactive, so rempart can sit in front of a CRM that authenticates
# its users itself (`rempart check` warns about it).
# Settings: data.settings.identity (policies/data.json).
package rempart

import rego.v1

identity_required if count(input.identity.sources) > 0

# A login path matches itself and everything below it ("/login" covers
# "/login" and "/login/callback", not "/login-admin").
login_path if {
	some p in data.settings.identity.login_paths
	path_under(input.request.path, p)
}

path_under(path, p) if path == p

path_under(path, p) if startswith(path, concat("", [trim_right(p, "/"), "/"]))

deny contains {
	"code": "unauthenticated",
	"message": unauthenticated_message,
} if {
	input.direction == "ingress"
	identity_required
	not input.identity.authenticated
	not login_path
}

unauthenticated_message := sprintf("authentication required: the %s credential was refused (%s)", [input.identity.method, input.identity.error]) if {
	is_string(input.identity.error)
}

unauthenticated_message := "authentication required" if {
	not is_string(input.identity.error)
}
