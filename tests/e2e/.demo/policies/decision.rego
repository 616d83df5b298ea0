# The entry point rempart evaluates on every request: data.rempart.decision.
#
# Rules in any file of package `rempart` add reasons to `deny` (blocks in
# enforce mode) and `warn` (never blocks, always recorded). A reason is
# {"code": "snake_case_code", "message": "for humans"}.
package rempart

import rego.v1

decision := {
	"allow": count(deny) == 0,
	"deny": [r | some r in deny],
	"warn": [r | some r in warn],
}

# Declared here, never true, so that `deny` and `warn` are defined (empty)
# even when no library file contributes to them.
deny contains reason if {
	false
	reason := {}
}

warn contains reason if {
	false
	reason := {}
}
