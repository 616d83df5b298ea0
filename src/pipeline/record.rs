//! Stage 7, **record**: the evidence of each decision — one audit record
//! and the request metrics.

use std::time::Instant;

use crate::audit::{
    AuditAck, AuditDecision, AuditIdentity, AuditRecord, AuditRequest, AuditSink, BundleRef,
};
use crate::config::AuditRecordScope;
use crate::input::{Direction, PolicyInput};
use crate::metrics::{Metrics, Outcome};

use super::decide::Ruling;

/// Everything known about a request once its response head is chosen.
pub struct Evidence<'a> {
    pub input: &'a PolicyInput,
    pub ruling: &'a Ruling,
    /// The final outcome: the ruling's, or `Error` when the upstream failed.
    pub outcome: Outcome,
    pub status: u16,
    pub accepted_at: Instant,
    /// An upstream error, which overrides the ruling's error text.
    pub upstream_error: Option<&'a str>,
    /// Set on the closing record of an egress tunnel (whose decision was
    /// recorded and counted when it opened).
    pub transfer: Option<crate::audit::Transfer>,
    /// The sync-mode record written before forwarding (`"exchange":
    /// "pending"`, no status): not counted, since the request's complete
    /// record follows.
    pub pending: bool,
}

/// Whether a request with this ruling and final outcome gets a record.
pub fn worth_recording(scope: AuditRecordScope, ruling: &Ruling, outcome: Outcome) -> bool {
    let d = &ruling.decision;
    match scope {
        AuditRecordScope::All => true,
        AuditRecordScope::DenyAndWarn => {
            !d.deny.is_empty() || !d.warn.is_empty() || outcome == Outcome::Error
        }
    }
}

/// Counts one decision: its outcome, its reasons and, for egress, where
/// it was going. Called once per decision (not again when a tunnel closes).
fn count(ev: &Evidence<'_>, metrics: &Metrics) {
    let input = ev.input;
    metrics.count_request(input.direction, ev.outcome);
    let d = &ev.ruling.decision;
    for r in &d.deny {
        metrics.decision_reason(input.direction, ev.outcome, "deny", &r.code);
    }
    for r in &d.warn {
        metrics.decision_reason(input.direction, ev.outcome, "warn", &r.code);
    }
    if input.direction == Direction::Egress {
        let geo = input.destination.geo.as_ref();
        metrics.egress_decision(
            geo.and_then(|g| g.country.as_deref()),
            geo.and_then(|g| g.operator.as_ref())
                .map(|o| o.jurisdiction.as_str()),
            geo.map_or(crate::geo::UNKNOWN, |g| g.sovereign.as_ref()),
            ev.outcome,
        );
    }
}

/// Counts the request and queues its record. In sync durability mode,
/// returns the acknowledgement that the record is on disk: a pending
/// record's before forwarding, a refusal's before answering.
pub fn record(
    ev: &Evidence<'_>,
    scope: AuditRecordScope,
    audit: &AuditSink,
    metrics: &Metrics,
) -> Option<AuditAck> {
    let input = ev.input;
    let d = &ev.ruling.decision;
    if ev.transfer.is_none() && !ev.pending {
        count(ev, metrics);
    }
    if !worth_recording(scope, ev.ruling, ev.outcome) {
        return None;
    }
    let error = ev.upstream_error.or(ev.ruling.error.as_deref());
    let stamp = &ev.ruling.stamp;
    audit.record(
        &AuditRecord {
            decision_id: &input.request.id,
            timestamp: &input.time.rfc3339,
            direction: input.direction.as_str(),
            request: AuditRequest {
                method: &input.request.method,
                host: &input.request.host,
                path: &input.request.path,
                protocol: &input.request.protocol,
            },
            source: (&input.source).into(),
            destination: input.destination.as_ref().into(),
            identity: AuditIdentity {
                method: &input.identity.method,
                subject: input.identity.subject.as_deref(),
                error: input.identity.error.as_deref(),
            },
            resource: (&input.resource).into(),
            decision: AuditDecision {
                outcome: ev.outcome.as_str(),
                allow: d.allow,
                enforced: ev.ruling.enforced,
                deny: &d.deny,
                warn: &d.warn,
                error,
            },
            status: (!ev.pending).then_some(ev.status),
            latency_ms: (ev.accepted_at.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
            policy_revision: &stamp.revision,
            exchange: ev.pending.then_some(crate::audit::exchange::PENDING),
            bundles: stamp.bundle.as_ref().map(|(name, revision)| BundleRef {
                name,
                revision: revision.as_deref(),
            }),
            transfer: ev.transfer,
        },
        &stamp.minimise,
    )
}

/// Sync durability: writes the *pending* record of a request about to be
/// forwarded and waits until it is on disk, so that nothing reaches the
/// CRM or the destination before its decision is durable. `None` when
/// there is nothing to wait for (buffered mode, or a request not
/// recorded); `Some(false)` when the record could not be made durable.
pub async fn record_pending(
    input: &PolicyInput,
    ruling: &Ruling,
    accepted_at: Instant,
    scope: AuditRecordScope,
    audit: &AuditSink,
    metrics: &Metrics,
) -> Option<bool> {
    if !audit.is_sync() {
        return None;
    }
    let ack = record(
        &Evidence {
            input,
            ruling,
            outcome: ruling.outcome,
            status: 0,
            accepted_at,
            upstream_error: None,
            transfer: None,
            pending: true,
        },
        scope,
        audit,
        metrics,
    )?;
    Some(ack.durable().await)
}
