//! The shape of one audit record (one JSON line). Documented in
//! `docs/audit.md`; field names are a contract with DPOs' tooling.

use serde::Serialize;

use crate::geo::Geo;
use crate::input::{Destination, Endpoint};
use crate::policy::Reason;

#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub decision_id: &'a str,
    /// RFC 3339, UTC, when the request was accepted.
    pub timestamp: &'a str,
    pub direction: &'static str,
    pub request: AuditRequest<'a>,
    pub source: AuditEndpoint<'a>,
    pub destination: AuditEndpoint<'a>,
    pub identity: AuditIdentity<'a>,
    /// What the request touched, as the classify stage saw it.
    pub resource: AuditResource<'a>,
    pub decision: AuditDecision<'a>,
    /// Status sent to the client; `None` (null) on a pending record, whose
    /// exchange has not happened yet.
    pub status: Option<u16>,
    /// From accepting the request to sending the response head.
    pub latency_ms: f64,
    pub policy_revision: &'a str,
    /// The OPA bundle the policy set came from, as OPA's decision logs
    /// name it: `{"<name>": {"revision": "…"}}`. Absent for a directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundles: Option<BundleRef<'a>>,
    /// `Some("pending")` on the record that sync durability writes, and
    /// makes durable, *before* forwarding a request; the request's complete
    /// record (no `exchange` field) follows with the same `decision_id`
    /// once the exchange is over. See [`crate::audit::exchange`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<&'static str>,
    /// Egress tunnels only, on the second record of a decision, written
    /// when the tunnel closed: what it carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

/// A bundle's name and manifest revision (absent when it has none).
#[derive(Debug, Clone, Copy)]
pub struct BundleRef<'a> {
    pub name: &'a str,
    pub revision: Option<&'a str>,
}

impl Serialize for BundleRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Revision<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            revision: Option<&'a str>,
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(
            self.name,
            &Revision {
                revision: self.revision,
            },
        )?;
        map.end()
    }
}

/// What an egress tunnel carried, counted when it closed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Transfer {
    /// Bytes from the CRM to the destination.
    pub bytes_to_destination: u64,
    /// Bytes from the destination back to the CRM.
    pub bytes_from_destination: u64,
    pub duration_ms: u64,
    /// completed | idle_timeout | max_duration | error
    pub closed_by: &'static str,
}

/// What was asked, without query values, bodies or credentials.
#[derive(Debug, Serialize)]
pub struct AuditRequest<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
}

#[derive(Debug, Serialize)]
pub struct AuditIdentity<'a> {
    pub method: &'a str,
    pub subject: Option<&'a str>,
    /// Why a presented credential was refused (e.g. "expired"); absent
    /// when there was nothing to refuse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// `input.resource`: what was touched and how.
#[derive(Debug, Serialize)]
pub struct AuditResource<'a> {
    pub crm: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub id: Option<&'a str>,
    pub operation: &'a str,
    pub bulk: bool,
    /// Present only when the route reads the body: "inspected", or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspection: Option<&'a str>,
}

impl<'a> From<&'a crate::input::Resource> for AuditResource<'a> {
    fn from(r: &'a crate::input::Resource) -> Self {
        AuditResource {
            crm: &r.crm,
            kind: &r.kind,
            id: r.id.as_deref(),
            operation: &r.operation,
            bulk: r.bulk,
            inspection: r.inspection.as_deref(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AuditDecision<'a> {
    /// allowed | denied | monitored | error
    pub outcome: &'static str,
    /// What the policy said (false when a deny reason exists).
    pub allow: bool,
    /// False when a deny was not applied (monitor mode) or a policy error
    /// was let through (`on_error = "allow"`, or monitor mode); true otherwise.
    pub enforced: bool,
    pub deny: &'a [Reason],
    pub warn: &'a [Reason],
    /// Evaluation or upstream error, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// An address as the trail keeps it: enough to answer "where did it go,
/// under which law" without the operator registry's sources on every line.
#[derive(Debug, Serialize)]
pub struct AuditEndpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub port: u16,
    pub scope: Option<&'a str>,
    pub geo: Option<AuditGeo<'a>>,
    /// Egress source: the calling workload, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<&'a str>,
    /// Egress: every address the host resolved to, when there were several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<AuditAddress<'a>>,
}

#[derive(Debug, Serialize)]
pub struct AuditAddress<'a> {
    pub ip: &'a str,
    pub scope: &'a str,
    pub geo: AuditGeo<'a>,
}

#[derive(Debug, Serialize)]
pub struct AuditGeo<'a> {
    pub country: Option<&'a str>,
    pub asn: Option<u32>,
    /// Operator id in the registry.
    pub operator: Option<&'a str>,
    pub jurisdiction: Option<&'a str>,
    pub cloud_act: Option<bool>,
    pub sovereign: &'a str,
}

impl<'a> AuditGeo<'a> {
    pub fn of(g: &'a Geo) -> Self {
        AuditGeo {
            country: g.country.as_deref(),
            asn: g.asn,
            operator: g.operator.as_ref().map(|o| o.id.as_str()),
            jurisdiction: g.operator.as_ref().map(|o| o.jurisdiction.as_str()),
            cloud_act: g.operator.as_ref().map(|o| o.cloud_act),
            sovereign: &g.sovereign,
        }
    }
}

impl<'a> From<&'a Endpoint> for AuditEndpoint<'a> {
    fn from(e: &'a Endpoint) -> Self {
        AuditEndpoint {
            host: None,
            ip: Some(&e.ip),
            port: e.port,
            scope: Some(&e.scope),
            geo: Some(AuditGeo::of(&e.geo)),
            workload: e.workload.as_deref(),
            addresses: Vec::new(),
        }
    }
}

impl<'a> From<&'a Destination> for AuditEndpoint<'a> {
    fn from(d: &'a Destination) -> Self {
        AuditEndpoint {
            host: Some(&d.host),
            ip: d.ip.as_deref(),
            port: d.port,
            scope: d.scope.as_deref(),
            geo: d.geo.as_ref().map(AuditGeo::of),
            workload: None,
            addresses: if d.addresses.len() > 1 {
                d.addresses
                    .iter()
                    .map(|a| AuditAddress {
                        ip: &a.ip,
                        scope: &a.scope,
                        geo: AuditGeo::of(&a.geo),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// The record's JSON, written by hand: the same bytes as `serde_json`'s
/// compact output of the derived `Serialize` (a test compares them), at
/// about half the cost. This runs once per request, on the request path;
/// through serde every field name went through the string escaper at run
/// time, and every field through the serializer's state machine.
impl AuditRecord<'_> {
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"decision_id\":");
        json_str(out, self.decision_id);
        out.extend_from_slice(b",\"timestamp\":");
        json_str(out, self.timestamp);
        out.extend_from_slice(b",\"direction\":");
        json_str(out, self.direction);
        let r = &self.request;
        out.extend_from_slice(b",\"request\":{\"method\":");
        json_str(out, r.method);
        out.extend_from_slice(b",\"host\":");
        json_str(out, r.host);
        out.extend_from_slice(b",\"path\":");
        json_str(out, r.path);
        out.extend_from_slice(b",\"protocol\":");
        json_str(out, r.protocol);
        out.extend_from_slice(b"},\"source\":");
        self.source.write_json(out);
        out.extend_from_slice(b",\"destination\":");
        self.destination.write_json(out);
        let i = &self.identity;
        out.extend_from_slice(b",\"identity\":{\"method\":");
        json_str(out, i.method);
        out.extend_from_slice(b",\"subject\":");
        json_opt_str(out, i.subject);
        json_opt_field(out, b",\"error\":", i.error);
        let r = &self.resource;
        out.extend_from_slice(b"},\"resource\":{\"crm\":");
        json_str(out, r.crm);
        out.extend_from_slice(b",\"type\":");
        json_str(out, r.kind);
        out.extend_from_slice(b",\"id\":");
        json_opt_str(out, r.id);
        out.extend_from_slice(b",\"operation\":");
        json_str(out, r.operation);
        out.extend_from_slice(b",\"bulk\":");
        json_bool(out, r.bulk);
        json_opt_field(out, b",\"inspection\":", r.inspection);
        let d = &self.decision;
        out.extend_from_slice(b"},\"decision\":{\"outcome\":");
        json_str(out, d.outcome);
        out.extend_from_slice(b",\"allow\":");
        json_bool(out, d.allow);
        out.extend_from_slice(b",\"enforced\":");
        json_bool(out, d.enforced);
        out.extend_from_slice(b",\"deny\":");
        json_reasons(out, d.deny);
        out.extend_from_slice(b",\"warn\":");
        json_reasons(out, d.warn);
        json_opt_field(out, b",\"error\":", d.error);
        out.extend_from_slice(b"},\"status\":");
        match self.status {
            Some(s) => json_uint(out, u64::from(s)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"latency_ms\":");
        json_f64(out, self.latency_ms);
        out.extend_from_slice(b",\"policy_revision\":");
        json_str(out, self.policy_revision);
        if let Some(b) = &self.bundles {
            out.extend_from_slice(b",\"bundles\":{");
            json_str(out, b.name);
            out.extend_from_slice(b":{");
            json_opt_field(out, b"\"revision\":", b.revision);
            out.extend_from_slice(b"}}");
        }
        json_opt_field(out, b",\"exchange\":", self.exchange);
        if let Some(t) = &self.transfer {
            out.extend_from_slice(b",\"transfer\":{\"bytes_to_destination\":");
            json_uint(out, t.bytes_to_destination);
            out.extend_from_slice(b",\"bytes_from_destination\":");
            json_uint(out, t.bytes_from_destination);
            out.extend_from_slice(b",\"duration_ms\":");
            json_uint(out, t.duration_ms);
            out.extend_from_slice(b",\"closed_by\":");
            json_str(out, t.closed_by);
            out.push(b'}');
        }
        out.push(b'}');
    }
}

impl AuditEndpoint<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        if let Some(h) = self.host {
            out.extend_from_slice(b"\"host\":");
            json_str(out, h);
            out.push(b',');
        }
        out.extend_from_slice(b"\"ip\":");
        json_opt_str(out, self.ip);
        out.extend_from_slice(b",\"port\":");
        json_uint(out, u64::from(self.port));
        out.extend_from_slice(b",\"scope\":");
        json_opt_str(out, self.scope);
        out.extend_from_slice(b",\"geo\":");
        match &self.geo {
            Some(g) => g.write_json(out),
            None => out.extend_from_slice(b"null"),
        }
        json_opt_field(out, b",\"workload\":", self.workload);
        if !self.addresses.is_empty() {
            out.extend_from_slice(b",\"addresses\":[");
            for (n, a) in self.addresses.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"ip\":");
                json_str(out, a.ip);
                out.extend_from_slice(b",\"scope\":");
                json_str(out, a.scope);
                out.extend_from_slice(b",\"geo\":");
                a.geo.write_json(out);
                out.push(b'}');
            }
            out.push(b']');
        }
        out.push(b'}');
    }
}

impl AuditGeo<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"country\":");
        json_opt_str(out, self.country);
        out.extend_from_slice(b",\"asn\":");
        match self.asn {
            Some(n) => json_uint(out, u64::from(n)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"operator\":");
        json_opt_str(out, self.operator);
        out.extend_from_slice(b",\"jurisdiction\":");
        json_opt_str(out, self.jurisdiction);
        out.extend_from_slice(b",\"cloud_act\":");
        match self.cloud_act {
            Some(b) => json_bool(out, b),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"sovereign\":");
        json_str(out, self.sovereign);
        out.push(b'}');
    }
}

fn json_reasons(out: &mut Vec<u8>, reasons: &[Reason]) {
    out.push(b'[');
    for (n, r) in reasons.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"code\":");
        json_str(out, &r.code);
        out.extend_from_slice(b",\"message\":");
        json_str(out, &r.message);
        out.push(b'}');
    }
    out.push(b']');
}

/// A JSON string. Most strings here (paths, hosts, ids) need no escaping
/// and are copied whole; the rest go through `serde_json`'s escaper, so
/// that both writers escape alike.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Every byte looked at, without an early exit: the compiler then checks
    // many bytes per instruction, and a record's strings nearly never need
    // escaping.
    let escapes = s.bytes().fold(false, |seen, b| {
        seen | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escapes {
        // Writing to a Vec cannot fail, and a str always serialises.
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// `key` (`,"name":`) and the string, or nothing when absent: the fields
/// serde skips when `None`.
fn json_opt_field(out: &mut Vec<u8>, key: &[u8], s: Option<&str>) {
    if let Some(s) = s {
        out.extend_from_slice(key);
        json_str(out, s);
    }
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_bool(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

pub(crate) fn json_uint(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// As `serde_json` writes an `f64`: its shortest round-trip form, `null`
/// when not finite.
fn json_f64(out: &mut Vec<u8>, f: f64) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &f);
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRINGS: &[&str] = &[
        "",
        "/api/contacts/42",
        "quote \" and backslash \\ inside",
        "control \n \r \t \u{8} \u{c} \u{1} \u{1f} and \u{7f}",
        "unicode: é, 東京, 🇪🇺",
        "</script>&'",
    ];
    const FLOATS: &[f64] = &[
        0.0,
        2.856,
        1e-7,
        123_456.789,
        1e21,
        -0.5,
        f64::NAN,
        f64::INFINITY,
    ];

    fn geo(k: usize) -> AuditGeo<'static> {
        let s = |i: usize| STRINGS[(k + i) % STRINGS.len()];
        AuditGeo {
            country: (k % 2 == 0).then(|| s(1)),
            asn: (k % 3 != 0).then_some(16_509 * k as u32),
            operator: (k % 4 != 1).then(|| s(2)),
            jurisdiction: (k % 5 != 2).then(|| s(3)),
            cloud_act: (k % 3 != 1).then_some(k % 2 == 0),
            sovereign: s(4),
        }
    }

    fn endpoint(k: usize) -> AuditEndpoint<'static> {
        let s = |i: usize| STRINGS[(k + i) % STRINGS.len()];
        AuditEndpoint {
            host: (k % 2 == 1).then(|| s(0)),
            ip: (k % 3 != 2).then(|| s(1)),
            port: (k * 4_099 % 65_536) as u16,
            scope: (k % 4 != 3).then(|| s(2)),
            geo: (k % 5 != 4).then(|| geo(k)),
            workload: (k % 3 == 0).then(|| s(3)),
            addresses: (0..k % 3)
                .map(|i| AuditAddress {
                    ip: s(i),
                    scope: s(i + 1),
                    geo: geo(k + i),
                })
                .collect(),
        }
    }

    /// The hand-written JSON is byte for byte what serde_json writes for
    /// the derived `Serialize`, over every optional field present and
    /// absent and strings that need each kind of escape.
    #[test]
    fn write_json_matches_serde_json_byte_for_byte() {
        let reasons: Vec<Reason> = STRINGS
            .iter()
            .zip(STRINGS.iter().rev())
            .map(|(c, m)| Reason {
                code: c.to_string(),
                message: m.to_string(),
            })
            .collect();
        for k in 0..240 {
            let s = |i: usize| STRINGS[(k + i) % STRINGS.len()];
            let record = AuditRecord {
                decision_id: s(0),
                timestamp: s(1),
                direction: if k % 2 == 0 { "ingress" } else { "egress" },
                request: AuditRequest {
                    method: s(2),
                    host: s(3),
                    path: s(4),
                    protocol: s(5),
                },
                source: endpoint(k),
                destination: endpoint(k + 1),
                identity: AuditIdentity {
                    method: s(1),
                    subject: (k % 2 == 0).then(|| s(2)),
                    error: (k % 3 == 0).then(|| s(3)),
                },
                resource: AuditResource {
                    crm: s(0),
                    kind: s(2),
                    id: (k % 4 != 0).then(|| s(4)),
                    operation: s(5),
                    bulk: k % 2 == 1,
                    inspection: (k % 5 == 0).then(|| s(1)),
                },
                decision: AuditDecision {
                    outcome: "denied",
                    allow: k % 2 == 0,
                    enforced: k % 3 == 0,
                    deny: &reasons[..k % 3],
                    warn: &reasons[k % reasons.len()..],
                    error: (k % 4 == 2).then(|| s(3)),
                },
                status: (k % 6 != 0).then_some((100 + k * 7) as u16),
                latency_ms: FLOATS[k % FLOATS.len()],
                policy_revision: s(3),
                bundles: (k % 4 != 0).then(|| BundleRef {
                    name: s(k),
                    revision: (k % 2 == 0).then(|| s(1)),
                }),
                exchange: (k % 5 == 1).then_some("pending"),
                transfer: (k % 3 == 2).then_some(Transfer {
                    bytes_to_destination: (k as u64) << 40,
                    bytes_from_destination: u64::MAX - k as u64,
                    duration_ms: k as u64,
                    closed_by: "idle_timeout",
                }),
            };
            let mut ours = Vec::new();
            record.write_json(&mut ours);
            let theirs = serde_json::to_vec(&record).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(theirs).unwrap(),
                "record {k}"
            );
        }
    }
}
