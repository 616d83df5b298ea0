//! OPA-Envoy compatibility: the input shape of Envoy's ext_authz
//! `CheckRequest` as OPA-Envoy gives it to a policy, and the decision it
//! reads back (a boolean, or `{allowed, headers, http_status, body, ...}`).
//!
//! Only used when `[policy] input_compat = "envoy"` (input) or
//! `[policy] decision` names another rule than `rempart/decision` (result);
//! otherwise nothing here runs on the request path.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use percent_encoding::percent_decode_str;
use regorus::Value;

use super::{Decision, Reason};
use crate::input::RequestInfo;

/// What an OPA-Envoy decision object asks rempart to do besides allowing
/// or denying: Envoy's `CheckResponse` fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseOverride {
    /// Status of the denial (Envoy's `http_status`); 403 when absent.
    pub http_status: Option<u16>,
    /// Envoy's `headers`: added to the request sent upstream when allowed,
    /// to the denial when denied.
    pub headers: Vec<(String, String)>,
    /// Envoy's `response_headers_to_add`: added to the upstream's response
    /// when allowed.
    pub response_headers_to_add: Vec<(String, String)>,
    /// Envoy's `request_headers_to_remove`: removed from the request sent
    /// upstream when allowed.
    pub request_headers_to_remove: Vec<String>,
    /// Body of the denial (Envoy's `body`).
    pub body: Option<String>,
}

impl ResponseOverride {
    fn is_empty(&self) -> bool {
        *self == ResponseOverride::default()
    }
}

fn s(v: &str) -> Value {
    Value::from(v)
}

fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::from(
        fields
            .into_iter()
            .map(|(k, v)| (s(k), v))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

fn socket_address(addr: std::net::SocketAddr) -> Value {
    object([(
        "address",
        object([(
            "socketAddress",
            object([
                ("address", s(&addr.ip().to_canonical().to_string())),
                ("portValue", Value::from(addr.port() as u64)),
            ]),
        )]),
    )])
}

/// `parsed_path` as OPA-Envoy computes it: the decoded path, leading
/// slashes trimmed, split on `/` (so `/` gives `[""]`).
fn parsed_path(raw_path: &str) -> Value {
    let decoded = percent_decode_str(raw_path).decode_utf8_lossy();
    Value::from(
        decoded
            .trim_start_matches('/')
            .split('/')
            .map(s)
            .collect::<Vec<Value>>(),
    )
}

/// Adds OPA-Envoy's top-level fields (`attributes`, `parsed_path`,
/// `parsed_query`) to a rempart input document. The headers are rempart's
/// (lower-case, credentials redacted) plus Envoy's `:authority`, `:method`
/// and `:path` pseudo-headers.
pub fn add_envoy_input(
    input: &mut Value,
    parts: &http::request::Parts,
    request: &RequestInfo,
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
) {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let mut headers: BTreeMap<Value, Value> =
        request.headers.iter().map(|(k, v)| (s(k), s(v))).collect();
    headers.insert(s(":authority"), s(&authority));
    headers.insert(s(":method"), s(&request.method));
    headers.insert(s(":path"), s(path));
    let http = object([
        ("id", s(&request.id)),
        ("method", s(&request.method)),
        ("path", s(path)),
        ("host", s(&authority)),
        ("scheme", s(&request.scheme)),
        ("protocol", s(&request.protocol)),
        ("headers", Value::from(headers)),
    ]);
    let attributes = object([
        ("metadataContext", Value::new_object()),
        ("request", object([("http", http)])),
        ("source", socket_address(peer)),
        ("destination", socket_address(local)),
    ]);
    let query = Value::from(
        request
            .query
            .iter()
            .map(|(k, v)| {
                (
                    s(k),
                    Value::from(v.iter().map(|x| s(x)).collect::<Vec<_>>()),
                )
            })
            .collect::<BTreeMap<Value, Value>>(),
    );
    if let Ok(obj) = input.as_object_mut() {
        obj.insert(s("attributes"), attributes);
        obj.insert(s("parsed_path"), parsed_path(parts.uri.path()));
        obj.insert(s("parsed_query"), query);
        obj.insert(
            s("version"),
            object([("encoding", s("protojson")), ("ext_authz", s("v3"))]),
        );
    }
}

/// A header map of a decision: values are strings or arrays of strings
/// (OPA-Envoy accepts both; an array gives the header once per value).
fn header_pairs(v: &Value, field: &str, entry: &str) -> anyhow::Result<Vec<(String, String)>> {
    let map = match v {
        Value::Undefined | Value::Null => return Ok(Vec::new()),
        Value::Object(m) => m,
        other => bail!("{entry}.{field} must be an object of header names to values, got {other}"),
    };
    let mut out = Vec::new();
    for (k, v) in map.iter() {
        let name = k
            .as_string()
            .map_err(|_| anyhow!("{entry}.{field}: header name {k} is not a string"))?;
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow!("{entry}.{field}: {name:?} is not a valid header name"))?;
        let values: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            one => vec![one],
        };
        for value in values {
            let text = value.as_string().map_err(|_| {
                anyhow!(
                    "{entry}.{field}.{name} must be a string or an array of strings, got {value}"
                )
            })?;
            http::HeaderValue::from_str(text)
                .map_err(|_| anyhow!("{entry}.{field}.{name}: invalid header value"))?;
            out.push((name.to_string(), text.to_string()));
        }
    }
    Ok(out)
}

/// Reads an OPA-Envoy decision: `true`/`false`, or an object with a
/// boolean `allowed`. Anything else is an error (the request then fails
/// closed as any evaluation error does).
pub fn read_decision(entry: &str, v: &Value) -> anyhow::Result<Decision> {
    let denied = |message: String| Reason {
        code: "not_allowed".into(),
        message,
    };
    match v {
        Value::Bool(allowed) => Ok(Decision {
            allow: *allowed,
            deny: if *allowed {
                Vec::new()
            } else {
                vec![denied(format!("{entry} is false"))]
            },
            warn: Vec::new(),
            response: None,
        }),
        Value::Object(_) => {
            let allowed = match &v["allowed"] {
                Value::Bool(b) => *b,
                other => bail!("{entry}.allowed must be a boolean, got {other}"),
            };
            // OPA-Envoy reads `http_status`; its primer also documents
            // `status_code`: both are accepted, `http_status` first.
            let status = match &v["http_status"] {
                Value::Undefined | Value::Null => &v["status_code"],
                given => given,
            };
            let http_status = match status {
                Value::Undefined | Value::Null => None,
                n => {
                    let code = n
                        .as_u64()
                        .ok()
                        .and_then(|c| u16::try_from(c).ok())
                        .filter(|c| (100..=599).contains(c))
                        .ok_or_else(|| {
                            anyhow!("{entry}.http_status must be an HTTP status (100-599), got {n}")
                        })?;
                    Some(code)
                }
            };
            let body = match &v["body"] {
                Value::Undefined | Value::Null => None,
                Value::String(b) => Some(b.to_string()),
                other => bail!("{entry}.body must be a string, got {other}"),
            };
            let request_headers_to_remove = match &v["request_headers_to_remove"] {
                Value::Undefined | Value::Null => Vec::new(),
                Value::Array(a) => a
                    .iter()
                    .map(|h| {
                        h.as_string().map(|h| h.to_string()).map_err(|_| {
                            anyhow!("{entry}.request_headers_to_remove must hold strings, got {h}")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
                other => bail!("{entry}.request_headers_to_remove must be an array, got {other}"),
            };
            let response = ResponseOverride {
                http_status,
                headers: header_pairs(&v["headers"], "headers", entry)?,
                response_headers_to_add: header_pairs(
                    &v["response_headers_to_add"],
                    "response_headers_to_add",
                    entry,
                )?,
                request_headers_to_remove,
                body,
            };
            let message = match response.http_status {
                Some(code) => format!("{entry} denied the request (status {code})"),
                None => format!("{entry} denied the request"),
            };
            Ok(Decision {
                allow: allowed,
                deny: if allowed {
                    Vec::new()
                } else {
                    vec![denied(message)]
                },
                warn: Vec::new(),
                response: (!response.is_empty()).then(|| Box::new(response)),
            })
        }
        Value::Undefined => Err(anyhow!(
            "{entry} is undefined for this input (does the policy set define it, with a default?)"
        )),
        other => Err(anyhow!(
            "{entry} must be a boolean or an object with a boolean \"allowed\", got {other}"
        )),
    }
}

/// Applies an allowed decision's request changes before forwarding.
pub fn apply_to_request(over: &ResponseOverride, headers: &mut http::HeaderMap) {
    for name in &over.request_headers_to_remove {
        headers.remove(name.as_str());
    }
    let mut replaced = std::collections::HashSet::new();
    for (name, value) in &over.headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            // The first value replaces what the client sent (a client must
            // not pre-set a header the policy vouches for); later values of
            // the same name are appended.
            if replaced.insert(n.clone()) {
                headers.insert(n, v);
            } else {
                headers.append(n, v);
            }
        }
    }
}

/// Adds headers (already validated when the decision was read).
pub fn add_headers(pairs: &[(String, String)], headers: &mut http::HeaderMap) {
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(json: &str) -> Value {
        Value::from_json_str(json).unwrap()
    }

    #[test]
    fn reads_boolean_and_object_decisions() {
        let d = read_decision("data.envoy.authz.allow", &Value::Bool(true)).unwrap();
        assert!(d.allow && d.deny.is_empty() && d.response.is_none());
        let d = read_decision("data.envoy.authz.allow", &Value::Bool(false)).unwrap();
        assert!(!d.allow);
        assert_eq!(d.deny[0].code, "not_allowed");
        let d = read_decision(
            "e",
            &v(r#"{"allowed": false, "http_status": 401, "body": "nope",
                   "headers": {"x-a": "1", "x-b": ["2", "3"]}}"#),
        )
        .unwrap();
        assert!(!d.allow);
        let r = d.response.unwrap();
        assert_eq!(r.http_status, Some(401));
        assert_eq!(r.body.as_deref(), Some("nope"));
        assert_eq!(r.headers.len(), 3);
        let d = read_decision("e", &v(r#"{"allowed": true}"#)).unwrap();
        assert!(d.allow && d.response.is_none());
    }

    #[test]
    fn rejects_malformed_decisions() {
        for bad in [
            r#"{"allowed": "yes"}"#,
            r#"{"allowed": false, "http_status": 42}"#,
            r#"{"allowed": false, "body": {"a": 1}}"#,
            r#"{"allowed": true, "headers": {"bad name": "x"}}"#,
            r#"{"allowed": true, "headers": {"x": 1}}"#,
            r#""allow""#,
        ] {
            assert!(read_decision("e", &v(bad)).is_err(), "{bad}");
        }
        assert!(read_decision("e", &Value::Undefined).is_err());
    }

    #[test]
    fn parsed_path_matches_opa_envoy() {
        assert_eq!(parsed_path("/"), v(r#"[""]"#));
        assert_eq!(parsed_path("/people/a%20b"), v(r#"["people", "a b"]"#));
    }
}
