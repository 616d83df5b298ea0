//! The policy input document: what a DSI's Rego sees as `input`.
//!
//! It is assembled from the outputs of the pipeline stages, field for field,
//! so that the code's view and the policy's view are the same thing. The
//! contract is published as `docs/input.schema.json` and explained in
//! `docs/policies.md`; a test checks the two stay in step.
//!
//! Two renderings exist: serde JSON (for `rempart policy eval`, tests and
//! docs) and [`PolicyInput::to_value`], which builds the regorus value
//! directly on the request path without a JSON round trip. A unit test
//! proves they are identical.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use regorus::Value;
use serde::{Deserialize, Serialize};

use crate::geo::Geo;
use crate::policy::InputReads;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput {
    pub direction: Direction,
    pub request: RequestInfo,
    pub source: Endpoint,
    /// Shared: for ingress the destination is the upstream, located once
    /// per geo reload, not once per request.
    pub destination: Arc<Destination>,
    pub identity: Identity,
    pub resource: Resource,
    pub time: TimeInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// The decision id, also sent back as `x-rempart-decision-id`.
    pub id: String,
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// Percent-decoded path.
    pub path: String,
    /// `path` split on `/`, empty segments dropped.
    pub segments: Vec<String>,
    /// Query parameters, decoded; a key given twice has two values.
    pub query: BTreeMap<String, Vec<String>>,
    /// Lower-case header names; repeated headers joined with ", ";
    /// credential headers redacted (see `[policy] redact_headers`).
    pub headers: BTreeMap<String, String>,
    /// "HTTP/1.1", "HTTP/2".
    pub protocol: String,
}

/// Where a request comes from (the peer of the accepted connection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: String,
    pub port: u16,
    /// See [`crate::pipeline::locate::Scope`].
    pub scope: String,
    /// Location and jurisdiction of `ip`.
    pub geo: Geo,
    /// Egress: the workload the caller is (`[[egress.workloads]]`, or the
    /// proxy account's), null when unknown. Always null for ingress.
    pub workload: Option<String>,
}

/// Where a request goes: the upstream for ingress, the requested host for
/// egress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    /// Canonical host: lower-case ASCII name without trailing dot, or the
    /// address literal.
    pub host: String,
    /// The address this decision is about, which is the one connected to
    /// if it is allowed; null when nothing could be resolved.
    pub ip: Option<String>,
    pub port: u16,
    pub scope: Option<String>,
    /// Location and jurisdiction of `ip`, or null when `ip` is null.
    pub geo: Option<Geo>,
    /// Every address the host resolved to (once, before deciding), each
    /// located; `ip` is one of them.
    pub addresses: Vec<Address>,
}

/// One resolved address of a destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    pub ip: String,
    pub scope: String,
    pub geo: Geo,
}

impl Address {
    pub fn to_value(&self) -> Value {
        object([
            ("ip", s(&self.ip)),
            ("scope", s(&self.scope)),
            ("geo", self.geo.to_value()),
        ])
    }
}

/// Who is asking (see `crate::pipeline::identify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Identity {
    pub authenticated: bool,
    /// "jwt" | "mtls" | "header" | "none".
    pub method: String,
    /// JWT `sub`, certificate subject DN, or the trusted header's value.
    pub subject: Option<String>,
    /// Display name (JWT `name` / `preferred_username`, certificate CN).
    pub name: Option<String>,
    pub email: Option<String>,
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    /// Every claim of a verified JWT; for mTLS the certificate's subject,
    /// issuer, SANs and fingerprint.
    pub claims: BTreeMap<String, serde_json::Value>,
    /// JWT `iss`, or the certificate's issuer DN.
    pub issuer: Option<String>,
    /// Why the presented credential was not accepted (then
    /// `authenticated` is false), e.g. "expired", "bad_signature".
    pub error: Option<String>,
    /// The identity sources configured on this gateway ("jwt", "mtls",
    /// "header"); empty when none is, which keeps the shipped
    /// authentication rules inactive.
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub crm: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub id: Option<String>,
    /// read | list | create | update | delete | export | import | search |
    /// login | admin | other (see `crate::profile::Operation`).
    pub operation: String,
    pub bulk: bool,
    /// Null unless the matched route reads the request body (JSON-RPC):
    /// then "inspected", or why not: "too_large", "malformed", "timeout",
    /// "unreadable" (see `crate::profile::inspection`).
    pub inspection: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeInfo {
    /// RFC 3339, UTC.
    pub rfc3339: String,
    pub unix_ns: i64,
    /// 0 = Sunday … 6 = Saturday, UTC.
    pub weekday: u8,
    /// 0–23, UTC.
    pub hour: u8,
}

/// Small builders of regorus values, shared with [`crate::geo`].
pub mod value {
    use std::collections::BTreeMap;

    use regorus::Value;

    pub fn s(v: &str) -> Value {
        Value::from(v)
    }

    pub fn opt(v: &Option<String>) -> Value {
        match v {
            Some(v) => Value::from(v.as_str()),
            None => Value::Null,
        }
    }

    pub fn strings(v: &[String]) -> Value {
        Value::from(v.iter().map(|x| s(x)).collect::<Vec<_>>())
    }

    pub fn obj<const N: usize>(fields: [(&str, Value); N]) -> Value {
        Value::from(
            fields
                .into_iter()
                .map(|(k, v)| (s(k), v))
                .collect::<BTreeMap<Value, Value>>(),
        )
    }
}

use value::{obj as object, opt, s, strings};

impl Destination {
    pub fn to_value(&self) -> Value {
        object([
            ("host", s(&self.host)),
            ("ip", opt(&self.ip)),
            ("port", Value::from(self.port as u64)),
            ("scope", opt(&self.scope)),
            ("geo", self.geo.as_ref().map_or(Value::Null, Geo::to_value)),
            (
                "addresses",
                Value::from(
                    self.addresses
                        .iter()
                        .map(Address::to_value)
                        .collect::<Vec<_>>(),
                ),
            ),
        ])
    }
}

impl PolicyInput {
    /// The regorus value of this document, built field by field.
    pub fn to_value(&self) -> Value {
        self.to_value_reading(&InputReads::Whole, None)
    }

    /// The regorus value of the fields `reads` selects (see
    /// [`crate::policy::reads`]): a field no policy reads is never built.
    /// `destination` is the destination's value when the caller keeps it
    /// built (the ingress upstream, located once per geo reload).
    pub fn to_value_reading(&self, reads: &InputReads, destination: Option<&Value>) -> Value {
        let r = &self.request;
        let request = || {
            select(
                reads.field("request"),
                &[
                    ("id", &|| s(&r.id)),
                    ("method", &|| s(&r.method)),
                    ("scheme", &|| s(&r.scheme)),
                    ("host", &|| s(&r.host)),
                    ("port", &|| Value::from(r.port as u64)),
                    ("path", &|| s(&r.path)),
                    ("segments", &|| strings(&r.segments)),
                    ("query", &|| {
                        Value::from(
                            r.query
                                .iter()
                                .map(|(k, v)| (s(k), strings(v)))
                                .collect::<BTreeMap<_, _>>(),
                        )
                    }),
                    ("headers", &|| {
                        Value::from(
                            r.headers
                                .iter()
                                .map(|(k, v)| (s(k), s(v)))
                                .collect::<BTreeMap<_, _>>(),
                        )
                    }),
                    ("protocol", &|| s(&r.protocol)),
                ],
            )
        };
        let src = &self.source;
        let source = || {
            select(
                reads.field("source"),
                &[
                    ("ip", &|| s(&src.ip)),
                    ("port", &|| Value::from(src.port as u64)),
                    ("scope", &|| s(&src.scope)),
                    ("geo", &|| src.geo.to_value()),
                    ("workload", &|| opt(&src.workload)),
                ],
            )
        };
        let destination = || {
            let built;
            let whole = match destination {
                Some(v) => v,
                None => {
                    built = self.destination.to_value();
                    &built
                }
            };
            reads
                .field("destination")
                .map_or(Value::Undefined, |r| r.prune(whole))
        };
        let i = &self.identity;
        let identity = || {
            select(
                reads.field("identity"),
                &[
                    ("authenticated", &|| Value::from(i.authenticated)),
                    ("method", &|| s(&i.method)),
                    ("subject", &|| opt(&i.subject)),
                    ("name", &|| opt(&i.name)),
                    ("email", &|| opt(&i.email)),
                    ("roles", &|| strings(&i.roles)),
                    ("groups", &|| strings(&i.groups)),
                    ("claims", &|| {
                        Value::from(
                            i.claims
                                .iter()
                                .map(|(k, v)| (s(k), Value::from(v.clone())))
                                .collect::<BTreeMap<_, _>>(),
                        )
                    }),
                    ("issuer", &|| opt(&i.issuer)),
                    ("error", &|| opt(&i.error)),
                    ("sources", &|| strings(&i.sources)),
                ],
            )
        };
        let res = &self.resource;
        let resource = || {
            select(
                reads.field("resource"),
                &[
                    ("crm", &|| s(&res.crm)),
                    ("type", &|| s(&res.kind)),
                    ("id", &|| opt(&res.id)),
                    ("operation", &|| s(&res.operation)),
                    ("bulk", &|| Value::from(res.bulk)),
                    ("inspection", &|| opt(&res.inspection)),
                ],
            )
        };
        let t = &self.time;
        let time = || {
            select(
                reads.field("time"),
                &[
                    ("rfc3339", &|| s(&t.rfc3339)),
                    ("unix_ns", &|| Value::from(t.unix_ns)),
                    ("weekday", &|| Value::from(t.weekday as u64)),
                    ("hour", &|| Value::from(t.hour as u64)),
                ],
            )
        };
        select_built(
            reads,
            &[
                ("direction", &|| s(self.direction.as_str())),
                ("request", &request),
                ("source", &source),
                ("destination", &destination),
                ("identity", &identity),
                ("resource", &resource),
                ("time", &time),
            ],
        )
    }
}

/// The object of those `fields` that `reads` selects, each built only
/// when selected and reduced to what is read of it; `Undefined` when
/// nothing is read (the field is then left out of its parent).
fn select(reads: Option<&InputReads>, fields: &[(&str, &dyn Fn() -> Value)]) -> Value {
    select_with(reads, fields, |sub, v| {
        if sub.is_whole() {
            v
        } else {
            sub.prune(&v)
        }
    })
}

/// As [`select`], for fields whose builders already apply what is read.
fn select_built(reads: &InputReads, fields: &[(&str, &dyn Fn() -> Value)]) -> Value {
    select_with(Some(reads), fields, |_, v| v)
}

fn select_with(
    reads: Option<&InputReads>,
    fields: &[(&str, &dyn Fn() -> Value)],
    reduce: impl Fn(&InputReads, Value) -> Value,
) -> Value {
    let Some(reads) = reads else {
        return Value::Undefined;
    };
    let object: BTreeMap<Value, Value> = fields
        .iter()
        .filter_map(|(name, build)| {
            let sub = reads.field(name)?;
            let v = reduce(sub, build());
            (!matches!(v, Value::Undefined)).then(|| (s(name), v))
        })
        .collect();
    Value::from(object)
}

/// The time fields of the input, from a wall-clock instant.
pub fn time_info(now: std::time::SystemTime) -> TimeInfo {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    TimeInfo {
        rfc3339: humantime::format_rfc3339_micros(now).to_string(),
        unix_ns: i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
        // 1970-01-01 was a Thursday (4).
        weekday: ((days + 4) % 7) as u8,
        hour: ((secs % 86_400) / 3600) as u8,
    }
}

/// Renders an address the way policies compare it: IPv4-mapped IPv6
/// addresses as plain IPv4.
pub fn ip_string(ip: IpAddr) -> String {
    crate::pipeline::locate::canonical_ip(ip).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> PolicyInput {
        PolicyInput {
            direction: Direction::Ingress,
            request: RequestInfo {
                id: "0190-test".into(),
                method: "GET".into(),
                scheme: "http".into(),
                host: "crm.example.eu".into(),
                port: 8080,
                path: "/api/contacts/42".into(),
                segments: vec!["api".into(), "contacts".into(), "42".into()],
                query: BTreeMap::from([("q".into(), vec!["a".into(), "b".into()])]),
                headers: BTreeMap::from([("accept".into(), "*/*".into())]),
                protocol: "HTTP/1.1".into(),
            },
            source: Endpoint {
                ip: "127.0.0.1".into(),
                port: 50000,
                scope: "loopback".into(),
                geo: Geo::local(crate::pipeline::locate::Scope::Loopback),
                workload: None,
            },
            destination: Arc::new(Destination {
                host: "52.28.0.1".into(),
                ip: Some("52.28.0.1".into()),
                port: 443,
                scope: Some("public".into()),
                geo: Some(Geo {
                    scope: "public".into(),
                    country: Some("DE".into()),
                    in_eu: true,
                    in_eea: true,
                    adequacy: None,
                    asn: Some(16509),
                    as_org: Some("AMAZON-02".into()),
                    as_country: Some("US".into()),
                    operator: Some(crate::geo::Operator {
                        id: "amazon".into(),
                        name: "Amazon Web Services".into(),
                        parent: "Amazon.com, Inc.".into(),
                        jurisdiction: "US".into(),
                        jurisdiction_in_eea: false,
                        cloud_act: true,
                        other_laws: vec![],
                        sources: vec!["https://www.peeringdb.com/asn/16509".into()],
                    }),
                    sovereign: "non_eu_operator_in_eu".into(),
                }),
                addresses: vec![Address {
                    ip: "52.28.0.1".into(),
                    scope: "public".into(),
                    geo: Geo::local(crate::pipeline::locate::Scope::Public),
                }],
            }),
            identity: Identity {
                authenticated: true,
                method: "jwt".into(),
                subject: Some("alice".into()),
                name: Some("Alice Martin".into()),
                email: Some("alice@example.eu".into()),
                roles: vec!["sales".into()],
                groups: vec!["/eu/sales".into()],
                claims: BTreeMap::from([
                    ("sub".into(), serde_json::json!("alice")),
                    ("exp".into(), serde_json::json!(1_900_000_000u64)),
                    ("ratio".into(), serde_json::json!(0.5)),
                    (
                        "realm_access".into(),
                        serde_json::json!({"roles": ["sales"], "nested": {"ok": true, "none": null}}),
                    ),
                ]),
                issuer: Some("https://idp.example.eu/realms/crm".into()),
                error: None,
                sources: vec!["jwt".into(), "mtls".into()],
            },
            resource: Resource {
                crm: "generic".into(),
                kind: "contacts".into(),
                id: Some("42".into()),
                operation: "read".into(),
                bulk: false,
                inspection: None,
            },
            time: time_info(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 3 + 7200),
            ),
        }
    }

    #[test]
    fn direct_value_equals_json_rendering() {
        let input = sample();
        let via_json = Value::from_json_str(&serde_json::to_string(&input).unwrap()).unwrap();
        assert_eq!(input.to_value(), via_json);
        let mut none = sample();
        none.identity = Identity {
            method: "none".into(),
            error: Some("expired".into()),
            ..Identity::default()
        };
        let d = Arc::make_mut(&mut none.destination);
        d.ip = None;
        d.scope = None;
        d.geo = None;
        d.addresses.clear();
        none.source.workload = Some("crm".into());
        none.resource.inspection = Some("too_large".into());
        let via_json = Value::from_json_str(&serde_json::to_string(&none).unwrap()).unwrap();
        assert_eq!(none.to_value(), via_json);
    }

    #[test]
    fn time_fields() {
        let t =
            time_info(std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 3 + 7200));
        // 1970-01-04 was a Sunday.
        assert_eq!(t.weekday, 0);
        assert_eq!(t.hour, 2);
        assert_eq!(t.rfc3339, "1970-01-04T02:00:00.000000Z");
    }
}
