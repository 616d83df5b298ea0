//! The shape of one audit record (one JSON line). Documented in
//! `docs/audit.md`; field names are a contract with DPOs' tooling.

use serde::Serialize;

use crate::input::{Destination, Endpoint};
use crate::policy::Reason;

#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub decision_id: &'a str,
    /// RFC 3339, UTC, when the request was accepted.
    pub timestamp: &'a str,
    pub direction: &'static str,
    pub request: AuditRequest<'a>,
    pub source: &'a Endpoint,
    pub destination: &'a Destination,
    pub identity: AuditIdentity<'a>,
    pub decision: AuditDecision<'a>,
    /// Status sent to the client.
    pub status: u16,
    /// From accepting the request to sending the response head.
    pub latency_ms: f64,
    pub policy_revision: &'a str,
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
