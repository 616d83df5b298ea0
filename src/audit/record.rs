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
    /// Status sent to the client.
    pub status: u16,
    /// From accepting the request to sending the response head.
    pub latency_ms: f64,
    pub policy_revision: &'a str,
    /// The OPA bundle the policy set came from, as OPA's decision logs
    /// name it: `{"<name>": {"revision": "…"}}`. Absent for a directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundles: Option<BundleRef<'a>>,
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
