//! Stage 3, **classify**: what is being touched.
//!
//! This first form knows one CRM shape, a generic REST API
//! (`[/api][/vN]/<type>[/<id>][/<action>]`) and the HTTP method. CRM
//! profiles (Creme, SuiteCRM, Odoo...) replace it later with data-driven
//! route tables; unknown shapes stay `type: "unknown"` so that policies
//! decide about them explicitly.

use crate::input::Resource;

fn is_version(seg: &str) -> bool {
    let rest = seg.strip_prefix('v').unwrap_or("");
    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// Classifies a request from its method and decoded path segments.
pub fn classify(method: &http::Method, segments: &[String]) -> Resource {
    let mut rest = segments.iter().map(String::as_str).peekable();
    if rest.peek() == Some(&"api") {
        rest.next();
    }
    if rest.peek().is_some_and(|s| is_version(s)) {
        rest.next();
    }
    let kind = rest.next();
    let id = rest.next();
    let action = rest.next();
    let export = segments
        .iter()
        .any(|s| s.eq_ignore_ascii_case("export") || s.ends_with("_export"));

    let operation = if export {
        "export"
    } else {
        match (method.as_str(), id) {
            ("GET" | "HEAD", Some(_)) => "read",
            ("GET" | "HEAD", None) => "list",
            ("POST", None) => "create",
            ("POST", Some(_)) if action.is_some() => "update",
            ("POST", Some(_)) | ("PUT" | "PATCH", _) => "update",
            ("DELETE", _) => "delete",
            _ => "other",
        }
    };
    let bulk = export || (operation == "delete" && id.is_none() && kind.is_some());
    Resource {
        crm: "generic".into(),
        kind: kind.map_or_else(|| "unknown".into(), |k| k.to_ascii_lowercase()),
        id: id.map(String::from),
        operation: operation.into(),
        bulk,
    }
}

/// Classifies an egress request. Without TLS interception a tunnel's
/// content is unknown: `type` says how the data leaves (`tunnel` for
/// `CONNECT`, `http` for a plain request), `operation` is `send`.
pub fn classify_egress(tunnel: bool) -> Resource {
    Resource {
        crm: "egress".into(),
        kind: if tunnel { "tunnel" } else { "http" }.into(),
        id: None,
        operation: "send".into(),
        bulk: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(method: &str, path: &str) -> Resource {
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        classify(&method.parse().unwrap(), &segs)
    }

    #[test]
    fn rest_shapes() {
        let r = c("GET", "/api/v1/contacts/42");
        assert_eq!(
            (r.kind.as_str(), r.id.as_deref(), r.operation.as_str()),
            ("contacts", Some("42"), "read")
        );
        assert_eq!(c("GET", "/api/contacts").operation, "list");
        assert_eq!(c("POST", "/api/contacts").operation, "create");
        assert_eq!(c("PATCH", "/api/contacts/1").operation, "update");
        assert_eq!(c("DELETE", "/api/contacts/1").operation, "delete");
        assert!(!c("DELETE", "/api/contacts/1").bulk);
        assert!(c("DELETE", "/api/contacts").bulk);
        let e = c("GET", "/api/contacts/export");
        assert_eq!(e.operation, "export");
        assert!(e.bulk);
        assert_eq!(c("OPTIONS", "/x").operation, "other");
        assert_eq!(c("GET", "/").kind, "unknown");
    }
}
