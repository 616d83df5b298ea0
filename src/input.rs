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

/// A short text that is nearly always one of a few constants (a method, a
/// scheme, an address scope): borrowed then, so that describing a request
/// does not allocate it, and owned for the rare other value.
pub type Name = std::borrow::Cow<'static, str>;

/// A short text of the request (its host, path and segments, the peer's
/// address, the resource's names): kept inline up to 24 bytes and on the
/// heap beyond, so that describing a typical request allocates none of
/// them (each allocation cost about 40 ns per request).
pub type Text = compact_str::CompactString;

/// The request's id, inline: a decision id is a UUID's 36 characters.
/// Longer ids (only a hand-written input could have one) are refused when
/// the input is read.
pub type RequestId = arrayvec::ArrayString<64>;

/// An RFC 3339 time with microseconds (27 characters), inline.
pub type Timestamp = arrayvec::ArrayString<32>;

/// A path's segments: inline for up to six, which covers CRM APIs' paths.
pub type Segments = smallvec::SmallVec<[Text; 6]>;

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
    pub id: RequestId,
    pub method: Name,
    pub scheme: Name,
    pub host: Text,
    pub port: u16,
    /// Percent-decoded path.
    pub path: Text,
    /// `path` split on `/`, empty segments dropped.
    pub segments: Segments,
    /// Query parameters, decoded; a key given twice has two values.
    pub query: BTreeMap<String, Vec<String>>,
    /// Lower-case header names; repeated headers joined with ", ";
    /// credential headers redacted (see `[policy] redact_headers`).
    pub headers: BTreeMap<Name, String>,
    /// "HTTP/1.1", "HTTP/2".
    pub protocol: Name,
}

/// Where a request comes from (the peer of the accepted connection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Text,
    pub port: u16,
    /// See [`crate::pipeline::locate::Scope`].
    pub scope: Name,
    /// Location and jurisdiction of `ip` (shared by the requests of one
    /// connection).
    pub geo: Arc<Geo>,
    /// Egress: the workload the caller is (`[[egress.workloads]]`, or the
    /// proxy account's), null when unknown. Always null for ingress.
    pub workload: Option<String>,
}

/// Where a request goes: the upstream for ingress, the requested host for
/// egress.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    /// Canonical host: lower-case ASCII name without trailing dot, or the
    /// address literal.
    pub host: String,
    /// The address this decision is about, which is the one connected to
    /// if it is allowed; null when nothing could be resolved.
    pub ip: Option<String>,
    pub port: u16,
    pub scope: Option<Name>,
    /// Location and jurisdiction of `ip`, or null when `ip` is null.
    pub geo: Option<Geo>,
    /// Every address the host resolved to (once, before deciding), each
    /// located; `ip` is one of them.
    pub addresses: Vec<Address>,
}

/// One resolved address of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    pub ip: String,
    pub scope: Name,
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
    /// "jwt" | "mtls" | "header" | "none" (egress: "proxy_basic" too).
    pub method: Name,
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
    pub sources: Sources,
}

/// The identity sources configured on a gateway: at most the three.
pub type Sources = smallvec::SmallVec<[Name; 3]>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub crm: Text,
    #[serde(rename = "type")]
    pub kind: Text,
    pub id: Option<Text>,
    /// read | list | create | update | delete | export | import | search |
    /// login | admin | other (see `crate::profile::Operation`).
    pub operation: Name,
    pub bulk: bool,
    /// Null unless the matched route reads the request body (JSON-RPC):
    /// then "inspected", or why not: "too_large", "malformed", "timeout",
    /// "unreadable" (see `crate::profile::inspection`).
    pub inspection: Option<Name>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeInfo {
    /// RFC 3339, UTC.
    pub rfc3339: Timestamp,
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

    pub fn opt<T: AsRef<str>>(v: &Option<T>) -> Value {
        match v {
            Some(v) => Value::from(v.as_ref()),
            None => Value::Null,
        }
    }

    pub fn strings<T: AsRef<str>>(v: &[T]) -> Value {
        Value::from(v.iter().map(|x| s(x.as_ref())).collect::<Vec<_>>())
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
        // The digest only keys; building never reads it.
        self.with_fields(destination.map(|v| (v, 0)), |top| build_object(reads, top))
    }

    /// This document as the policy set reading `reads` sees it, for
    /// [`crate::policy::PolicySet::decide`]: keyed for the decision cache
    /// straight from these fields, and built only on a cache miss.
    /// `destination` is the destination's value kept built by the caller,
    /// with its [`crate::policy::cache::digest`], which keys it.
    pub fn reading<'a>(&'a self, destination: Option<(&'a Value, u128)>) -> Reading<'a> {
        Reading {
            input: self,
            destination,
        }
    }

    /// Calls `f` with the document's fields. The one list of fields that
    /// both building and keying walk, so the two cannot disagree.
    fn with_fields<R>(
        &self,
        destination: Option<(&Value, u128)>,
        f: impl FnOnce(&[Named]) -> R,
    ) -> R {
        let r = &self.request;
        let query = || {
            Value::from(
                r.query
                    .iter()
                    .map(|(k, v)| (s(k), strings(v)))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let headers = || {
            Value::from(
                r.headers
                    .iter()
                    .map(|(k, v)| (s(k), s(v)))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let request = [
            ("id", Field::Str(&r.id)),
            ("method", Field::Str(&r.method)),
            ("scheme", Field::Str(&r.scheme)),
            ("host", Field::Str(&r.host)),
            ("port", Field::U64(r.port.into())),
            ("path", Field::Str(&r.path)),
            ("segments", Field::Texts(&r.segments)),
            ("query", Field::Lazy(&query)),
            ("headers", Field::Lazy(&headers)),
            ("protocol", Field::Str(&r.protocol)),
        ];
        let src = &self.source;
        let source = [
            ("ip", Field::Str(&src.ip)),
            ("port", Field::U64(src.port.into())),
            ("scope", Field::Str(&src.scope)),
            ("geo", Field::Geo(&src.geo)),
            ("workload", Field::OptStr(src.workload.as_deref())),
        ];
        let destination = match destination {
            Some((value, digest)) => Field::Built(value, digest),
            None => Field::Destination(&self.destination),
        };
        let i = &self.identity;
        let claims = || {
            Value::from(
                i.claims
                    .iter()
                    .map(|(k, v)| (s(k), Value::from(v.clone())))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let identity = [
            ("authenticated", Field::Bool(i.authenticated)),
            ("method", Field::Str(&i.method)),
            ("subject", Field::OptStr(i.subject.as_deref())),
            ("name", Field::OptStr(i.name.as_deref())),
            ("email", Field::OptStr(i.email.as_deref())),
            ("roles", Field::Strs(&i.roles)),
            ("groups", Field::Strs(&i.groups)),
            ("claims", Field::Lazy(&claims)),
            ("issuer", Field::OptStr(i.issuer.as_deref())),
            ("error", Field::OptStr(i.error.as_deref())),
            ("sources", Field::Names(&i.sources)),
        ];
        let res = &self.resource;
        let resource = [
            ("crm", Field::Str(&res.crm)),
            ("type", Field::Str(&res.kind)),
            ("id", Field::OptStr(res.id.as_deref())),
            ("operation", Field::Str(&res.operation)),
            ("bulk", Field::Bool(res.bulk)),
            ("inspection", Field::OptStr(res.inspection.as_deref())),
        ];
        let t = &self.time;
        let time = [
            ("rfc3339", Field::Str(&t.rfc3339)),
            ("unix_ns", Field::I64(t.unix_ns)),
            ("weekday", Field::U64(t.weekday.into())),
            ("hour", Field::U64(t.hour.into())),
        ];
        f(&[
            ("direction", Field::Str(self.direction.as_str())),
            ("request", Field::Object(&request)),
            ("source", Field::Object(&source)),
            ("destination", destination),
            ("identity", Field::Object(&identity)),
            ("resource", Field::Object(&resource)),
            ("time", Field::Object(&time)),
        ])
    }
}

/// A [`PolicyInput`] ready to be keyed and built to what a policy set
/// reads (see [`PolicyInput::reading`]).
pub struct Reading<'a> {
    input: &'a PolicyInput,
    destination: Option<(&'a Value, u128)>,
}

impl crate::policy::ReadableInput for Reading<'_> {
    fn build(&self, reads: &InputReads) -> Value {
        self.input
            .with_fields(self.destination, |top| build_object(reads, top))
    }

    fn hash_key(&self, reads: &InputReads, h: &mut crate::policy::KeyHasher) {
        self.input
            .with_fields(self.destination, |top| hash_object(reads, top, h))
    }
}

type Named<'a> = (&'static str, Field<'a>);

/// One field of the input document, borrowed from the stages' outputs.
enum Field<'a> {
    Str(&'a str),
    OptStr(Option<&'a str>),
    U64(u64),
    I64(i64),
    Bool(bool),
    Strs(&'a [String]),
    Texts(&'a [Text]),
    Names(&'a [Name]),
    Object(&'a [Named<'a>]),
    /// A value built only when read (maps).
    Lazy(&'a dyn Fn() -> Value),
    /// A geo record, built only when read. Keyed whole, even when only
    /// some of its fields are read: a difference in an unread field costs
    /// a cache miss, never a wrong hit.
    Geo(&'a Geo),
    /// The destination, built only when read; keyed whole, as `Geo`.
    Destination(&'a Destination),
    /// A value the caller keeps built, and its digest, which keys it.
    Built(&'a Value, u128),
}

/// The object of those `fields` that `reads` selects, each reduced to what
/// is read of it; a field whose value is undefined is left out.
fn build_object(reads: &InputReads, fields: &[Named]) -> Value {
    let object: BTreeMap<Value, Value> = fields
        .iter()
        .filter_map(|(name, field)| {
            let sub = reads.field(name)?;
            let v = match field {
                Field::Str(v) => s(v),
                Field::OptStr(v) => v.map_or(Value::Null, s),
                Field::U64(n) => Value::from(*n),
                Field::I64(n) => Value::from(*n),
                Field::Bool(b) => Value::from(*b),
                Field::Strs(v) => strings(v),
                Field::Texts(v) => strings(v),
                Field::Names(v) => strings(v),
                Field::Object(fields) => build_object(sub, fields),
                Field::Lazy(build) => sub.prune(&build()),
                Field::Geo(geo) => sub.prune(&geo.to_value()),
                Field::Destination(d) => sub.prune(&d.to_value()),
                Field::Built(v, _) => sub.prune(v),
            };
            (!matches!(v, Value::Undefined)).then(|| (s(name), v))
        })
        .collect();
    Value::from(object)
}

/// Feeds `h` with what [`build_object`] would build, without building it:
/// documents that build different values feed different bytes (every part
/// is tagged or delimited), and equal documents feed equal bytes (but for
/// the parts keyed whole, see [`Field::Geo`]).
fn hash_object(reads: &InputReads, fields: &[Named], h: &mut crate::policy::KeyHasher) {
    use crate::policy::cache::tag;
    use std::hash::Hash;
    tag::OBJECT.hash(h);
    match reads {
        InputReads::Whole => {
            for (name, field) in fields {
                name.hash(h);
                hash_field(reads, field, h);
            }
        }
        // Walks the few fields read, in the read set's (sorted) order, and
        // finds each among the document's by name: this runs on every
        // request, and a map lookup per document field cost more (an
        // ordered string comparison is a `memcmp` even when the lengths
        // differ). Names of one length ("host", "port", "path") are told
        // apart by their first byte before a `memcmp` call is paid.
        InputReads::Fields(read) => {
            for (name, sub) in read {
                let wanted = name.as_bytes();
                if let Some((name, field)) = fields.iter().find(|(n, _)| {
                    n.len() == wanted.len()
                        && n.as_bytes().first() == wanted.first()
                        && n.as_bytes() == wanted
                }) {
                    name.hash(h);
                    hash_field(sub, field, h);
                }
            }
        }
    }
    tag::END.hash(h);
}

fn hash_field(sub: &InputReads, field: &Field<'_>, h: &mut crate::policy::KeyHasher) {
    use crate::policy::cache::{hash_pruned, tag, tagged};
    use std::hash::Hash;
    match field {
        Field::Str(v) | Field::OptStr(Some(v)) => tagged(tag::STRING, v, h),
        Field::OptStr(None) => tag::NULL.hash(h),
        Field::U64(n) => tagged(tag::UINT, n, h),
        Field::I64(n) => tagged(tag::INT, n, h),
        Field::Bool(b) => tagged(tag::BOOL, b, h),
        Field::Strs(v) => hash_strs(v, h),
        Field::Texts(v) => hash_strs(v, h),
        Field::Names(v) => hash_strs(v, h),
        Field::Object(fields) => hash_object(sub, fields, h),
        Field::Lazy(build) => hash_pruned(sub, &build(), h),
        Field::Geo(geo) => tagged(tag::RECORD, geo, h),
        Field::Destination(d) => tagged(tag::RECORD, d, h),
        Field::Built(_, digest) => tagged(tag::DIGEST, digest, h),
    }
}

/// An array of strings, keyed as one whatever the strings' type.
fn hash_strs<T: AsRef<str>>(items: &[T], h: &mut crate::policy::KeyHasher) {
    use crate::policy::cache::{tag, tagged};
    use std::hash::Hash;
    tag::ARRAY.hash(h);
    items.len().hash(h);
    for item in items {
        tagged(tag::STRING, item.as_ref(), h);
    }
}

/// The time fields of the input, from a wall-clock instant.
pub fn time_info(now: std::time::SystemTime) -> TimeInfo {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    TimeInfo {
        rfc3339: {
            // "2026-11-28T14:49:18.497935Z": 27 characters, which fit.
            use std::fmt::Write;
            let mut text = Timestamp::new();
            let _ = write!(text, "{}", humantime::format_rfc3339_micros(now));
            text
        },
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
                id: RequestId::from("0190-test").unwrap(),
                method: "GET".into(),
                scheme: "http".into(),
                host: "crm.example.eu".into(),
                port: 8080,
                path: "/api/contacts/42".into(),
                segments: ["api", "contacts", "42"]
                    .into_iter()
                    .map(Text::from)
                    .collect(),
                query: BTreeMap::from([("q".into(), vec!["a".into(), "b".into()])]),
                headers: BTreeMap::from([("accept".into(), "*/*".into())]),
                protocol: "HTTP/1.1".into(),
            },
            source: Endpoint {
                ip: "127.0.0.1".into(),
                port: 50000,
                scope: "loopback".into(),
                geo: Arc::new(Geo::local(crate::pipeline::locate::Scope::Loopback)),
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
                sources: ["jwt".into(), "mtls".into()].into_iter().collect(),
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

    /// The decision cache keys a document from the typed fields without
    /// building it: two documents must share a key exactly when they
    /// build equal values, for any selection of fields.
    #[test]
    fn cache_keys_agree_with_the_documents_they_stand_for() {
        use crate::policy::ReadableInput;
        let cache = crate::policy::cache::DecisionCache::new(8);
        let mutations: Vec<fn(&mut PolicyInput)> = vec![
            |_| {},
            |i| i.request.id = RequestId::from("other").unwrap(),
            |i| i.request.path = "/api/contacts/43".into(),
            |i| {
                i.request.segments = ["api", "contacts4", "2"]
                    .into_iter()
                    .map(Text::from)
                    .collect()
            },
            |i| i.request.segments.push(Text::default()),
            |i| i.source.port = 50001,
            |i| i.identity.subject = None,
            |i| i.identity.subject = Some(String::new()),
            |i| i.identity.roles = vec![],
            |i| i.identity.roles = vec!["sal".into(), "es".into()],
            |i| i.time.hour = 3,
            |i| i.resource.bulk = true,
            |i| Arc::make_mut(&mut i.destination).geo = None,
            |i| i.source.workload = Some("crm".into()),
            |i| {
                i.request.headers.insert("x-a".into(), "1".into());
            },
            |i| {
                i.identity.claims.insert("k".into(), serde_json::json!(1));
            },
        ];
        let variants: Vec<PolicyInput> = mutations
            .iter()
            .map(|m| {
                let mut i = sample();
                m(&mut i);
                i
            })
            .collect();
        let mut some = InputReads::nothing();
        for path in [
            "request.path",
            "request.segments",
            "identity.roles",
            "identity.subject",
            "destination.geo.country",
            "source.geo",
        ] {
            some.add(&path.split('.').map(String::from).collect::<Vec<_>>());
        }
        let mut direction_only = InputReads::nothing();
        direction_only.add(&["direction".into()]);
        for reads in [InputReads::Whole, some, direction_only] {
            let key = |i: &PolicyInput, dest: Option<(&Value, u128)>| {
                cache.key(|h| i.reading(dest).hash_key(&reads, h))
            };
            for a in &variants {
                // A destination the caller keeps built keys as one built here.
                let dest = a.destination.to_value();
                let digest = crate::policy::cache::digest(&dest);
                let built = |i: &PolicyInput| {
                    cache.key(|h| i.reading(Some((&dest, digest))).hash_key(&reads, h))
                };
                assert_eq!(
                    a.reading(Some((&dest, digest))).build(&reads),
                    a.to_value_reading(&reads, None)
                );
                if a.destination == variants[0].destination {
                    assert_eq!(
                        built(a) == built(&variants[0]),
                        key(a, None) == key(&variants[0], None)
                    );
                }
                for b in &variants {
                    let same_doc =
                        a.to_value_reading(&reads, None) == b.to_value_reading(&reads, None);
                    assert_eq!(
                        same_doc,
                        key(a, None) == key(b, None),
                        "reads {:?}: {} vs {}",
                        reads.paths(),
                        serde_json::to_string(a).unwrap(),
                        serde_json::to_string(b).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn time_fields() {
        let t =
            time_info(std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 3 + 7200));
        // 1970-01-04 was a Sunday.
        assert_eq!(t.weekday, 0);
        assert_eq!(t.hour, 2);
        assert_eq!(t.rfc3339.as_str(), "1970-01-04T02:00:00.000000Z");
    }
}
