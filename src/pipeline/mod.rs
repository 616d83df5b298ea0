//! The road every request travels, ingress and egress alike:
//!
//! 1. [`accept`]   — take the connection and the request, give it an id;
//! 2. [`identify`] — who is asking;
//! 3. [`classify`] — what is being touched;
//! 4. [`locate`]   — where the source and the destination are;
//! 5. [`decide`]   — evaluate the policy set on the input document;
//! 6. [`enforce`]  — answer 403/503, or forward and stream the response;
//! 7. [`record`]   — write the audit record and count the metrics (in sync
//!    durability mode, a record of the decision is also made durable
//!    before step 6 forwards anything).
//!
//! [`Gateway::handle`] calls the stages in that order and nothing else; the
//! policy input document ([`crate::input::PolicyInput`]) is made of the
//! stages' outputs.

pub mod accept;
pub mod classify;
pub mod decide;
pub mod decision_id;
pub mod egress;
pub mod enforce;
pub mod identify;
pub mod locate;
pub mod record;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::audit::AuditSink;
use crate::config::{AuditRecordScope, Config};
use arc_swap::ArcSwap;

use crate::geo::{GeoDb, GeoStore};
use crate::input::{Destination, Direction, PolicyInput};
use crate::metrics::{Metrics, Outcome};
use crate::policy::PolicyStore;
use crate::policy::{InputReads, RequestReads};
use accept::Connection;
use decide::{Action, DecidePolicy};
use enforce::{Forwarded, ProxyBody, Upstream, AUDIT_UNAVAILABLE, DECISION_ID};
use identify::Identifier;
use record::Evidence;

/// The reason code of a request refused as malformed before the policy.
const BAD_REQUEST: &str = "bad_request";

/// The upstream located with one generation of geo data (kept alive
/// here, so that the pointer comparison cannot be fooled by reuse).
struct LocatedUpstream {
    geo: Arc<GeoDb>,
    destination: Arc<Destination>,
    value: regorus::Value,
    /// Keys `value` in the decision cache (see `crate::policy::cache::digest`).
    digest: u128,
}

/// What every worker shares about identities, TLS and classification: one
/// identifier (one JWKS cache), one upstream TLS client configuration and
/// the compiled CRM profiles.
pub struct Security {
    pub identifier: Arc<Identifier>,
    pub upstream_tls: Arc<rustls::ClientConfig>,
    pub profiles: Arc<crate::profile::Profiles>,
}

/// One worker's view of the gateway: shared state plus its own upstream pool.
pub struct Gateway {
    identifier: Arc<Identifier>,
    policies: Arc<PolicyStore>,
    how: DecidePolicy,
    upstream: Upstream,
    upstream_url: crate::config::UpstreamUrl,
    upstream_ip: std::net::IpAddr,
    geo: Arc<GeoStore>,
    upstream_located: ArcSwap<LocatedUpstream>,
    redact: Vec<http::HeaderName>,
    profiles: Arc<crate::profile::Profiles>,
    body_limits: classify::BodyLimits,
    /// `[policy] input_compat = "envoy"`: add OPA-Envoy's input fields.
    envoy_input: bool,
    audit: AuditSink,
    audit_scope: AuditRecordScope,
    /// Status answered in sync durability mode when a record cannot be made durable.
    audit_failure_status: u16,
    pub(crate) metrics: Arc<Metrics>,
}

impl Gateway {
    pub fn new(
        cfg: &Config,
        policies: Arc<PolicyStore>,
        geo: Arc<GeoStore>,
        audit: AuditSink,
        metrics: Arc<Metrics>,
        upstream_ip: std::net::IpAddr,
        security: &Security,
    ) -> anyhow::Result<Self> {
        let Some(url) = cfg.upstream.url.clone() else {
            anyhow::bail!("no upstream configured");
        };
        let redact = cfg.policy.redacted_headers();
        Ok(Gateway {
            identifier: Arc::clone(&security.identifier),
            policies,
            how: DecidePolicy::from_config(cfg),
            upstream: Upstream::new(
                &cfg.upstream,
                url.clone(),
                upstream_ip,
                Arc::clone(&security.upstream_tls),
            )?,
            upstream_ip,
            upstream_located: ArcSwap::from_pointee({
                let g = geo.current();
                let destination = Arc::new(locate::locate_upstream(&url, upstream_ip, &g));
                let value = destination.to_value();
                LocatedUpstream {
                    geo: g,
                    digest: crate::policy::cache::digest(&value),
                    value,
                    destination,
                }
            }),
            upstream_url: url,
            geo,
            redact,
            profiles: Arc::clone(&security.profiles),
            body_limits: classify::BodyLimits {
                max_bytes: cfg.classify.body_inspect_max_bytes,
                timeout: cfg.classify.body_inspect_timeout.0,
            },
            envoy_input: cfg.policy.input_compat == crate::config::InputCompat::Envoy,
            audit,
            audit_scope: cfg.audit.record,
            audit_failure_status: cfg.audit.failure_status,
            metrics,
        })
    }

    /// The upstream's location, computed once per geo data generation.
    fn located_upstream(&self, geo: &Arc<GeoDb>) -> Arc<LocatedUpstream> {
        let cached = self.upstream_located.load_full();
        if Arc::ptr_eq(&cached.geo, geo) {
            return cached;
        }
        let destination = Arc::new(locate::locate_upstream(
            &self.upstream_url,
            self.upstream_ip,
            geo,
        ));
        let value = destination.to_value();
        let fresh = Arc::new(LocatedUpstream {
            geo: Arc::clone(geo),
            digest: crate::policy::cache::digest(&value),
            value,
            destination,
        });
        self.upstream_located.store(Arc::clone(&fresh));
        fresh
    }

    /// One request, down the road.
    pub async fn handle(&self, req: Request<Incoming>, conn: Connection) -> Response<ProxyBody> {
        // 1. accept
        let accepted_at = Instant::now();
        let now = SystemTime::now();
        let id = decision_id::next(now);
        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;

        // 2. identify (strips identity headers the peer may not set, so it
        //    runs before the request is described to the policy)
        let identity = self.identifier.identify(&mut parts.headers, &conn).await;
        // The set that decides this request, loaded now: describing the
        // request depends on what it reads.
        let set = self.policies.current();
        let read = if self.envoy_input {
            RequestReads::ALL
        } else {
            set.request_reads()
        };
        let request = accept::describe(&parts, id, &conn, &self.redact, read);

        // 3. classify
        let (resource, body) =
            classify::classify(&self.profiles, &parts, body, &self.body_limits).await;

        // 4. locate
        let geo = self.geo.current();
        let source = locate::locate_source(&conn, &geo);
        let upstream = self.located_upstream(&geo);

        // Boxed: it lives across the upstream call, and a kilobyte held
        // inline in this future is a kilobyte copied each time it moves.
        let input = Box::new(PolicyInput {
            direction: Direction::Ingress,
            request,
            source,
            destination: Arc::clone(&upstream.destination),
            identity,
            resource,
            time: crate::input::time_info(now),
        });
        let id = input.request.id.as_str();

        // 5. decide (a request whose host is ambiguous is refused whatever
        //    the mode, before any document is built: rempart's own check,
        //    not the policy's)
        let refused = accept::ambiguous_host(&parts);
        let ruling = match refused {
            Some(reason) => decide::refusal(
                BAD_REQUEST,
                reason,
                Outcome::Denied,
                Arc::clone(set.stamp()),
            ),
            None => {
                let document = if self.envoy_input {
                    let mut value =
                        input.to_value_reading(&InputReads::Whole, Some(&upstream.value));
                    crate::policy::envoy::add_envoy_input(
                        &mut value,
                        &parts,
                        &input.request,
                        conn.peer,
                        conn.local,
                    );
                    decide::Document::Whole(value)
                } else {
                    decide::Document::AsRead(
                        input.reading(Some((&upstream.value, upstream.digest))),
                    )
                };
                decide::decide(&set, document, &self.how, &self.metrics)
            }
        };

        // 6. enforce
        let mut upstream_error = None;
        let mut outcome = ruling.outcome;
        // Sync durability: a request that would be recorded is forwarded
        // only once a record of its decision is on disk (the pending
        // record; its complete record follows the exchange). If that record
        // cannot be made durable, the request is not forwarded (fail
        // closed) and is answered `failure_status`.
        let pending_durable = match ruling.action {
            Action::Forward => {
                record::record_pending(
                    &input,
                    &ruling,
                    accepted_at,
                    self.audit_scope,
                    &self.audit,
                    &self.metrics,
                )
                .await
            }
            _ => None,
        };
        let audit_refused = pending_durable == Some(false);
        let overrides = ruling.decision.response.as_deref();
        let mut response = match ruling.action {
            Action::Deny if refused.is_some() => {
                enforce::bad_request(id, BAD_REQUEST, refused.unwrap_or_default())
            }
            Action::Deny => match overrides {
                Some(o) => enforce::envoy_denial(id, o, &ruling.decision.deny),
                None => enforce::forbidden(id, &ruling.decision.deny),
            },
            Action::Unavailable => enforce::policy_unavailable(id),
            Action::Forward if audit_refused => {
                self.metrics.audit_sync_failures.inc();
                tracing::error!(decision_id = %id, "audit record not durable; request not forwarded");
                outcome = Outcome::Error;
                upstream_error = Some(AUDIT_UNAVAILABLE.to_string());
                enforce::audit_unavailable(id, self.audit_failure_status)
            }
            Action::Forward => {
                // An OPA-Envoy decision may add or remove request headers
                // (only when it allowed: a monitored denial changes nothing).
                if let Some(o) = overrides.filter(|_| ruling.decision.allow) {
                    crate::policy::envoy::apply_to_request(o, &mut parts.headers);
                }
                match self
                    .upstream
                    .forward(parts, body, &conn.peer_ip, conn.tls, &self.metrics)
                    .await
                {
                    Forwarded::Response(mut resp) => {
                        if let Some(o) = overrides.filter(|_| ruling.decision.allow) {
                            crate::policy::envoy::add_headers(
                                &o.response_headers_to_add,
                                resp.headers_mut(),
                            );
                        }
                        resp.map(ProxyBody::Upstream)
                    }
                    Forwarded::Failed { kind, message } => {
                        self.metrics.upstream_error(kind).inc();
                        tracing::warn!(decision_id = %id, "upstream failed: {message}");
                        outcome = Outcome::Error;
                        upstream_error = Some(message);
                        enforce::upstream_failure(id, kind)
                    }
                }
            }
        };
        if let Ok(v) = http::HeaderValue::from_str(id) {
            response.headers_mut().insert(DECISION_ID, v);
        }
        // Answer in the client's protocol, whatever the upstream spoke.
        *response.version_mut() = client_version;

        // 7. record
        let ack = record::record(
            &Evidence {
                input: &input,
                ruling: &ruling,
                outcome,
                status: response.status().as_u16(),
                accepted_at,
                upstream_error: upstream_error.as_deref(),
                transfer: None,
                pending: false,
            },
            self.audit_scope,
            &self.audit,
            &self.metrics,
        );
        // Sync durability: the answer waits until its record is on disk
        // (one group commit). Without a durable pending record, a record
        // that cannot be made durable replaces the answer with
        // `failure_status`; after one (the request was forwarded, the CRM
        // acted), the CRM's answer goes out and the pending record stands.
        if let Some(ack) = ack {
            let durable = ack.durable().await;
            match pending_durable {
                None if !durable => {
                    self.metrics.audit_sync_failures.inc();
                    tracing::error!(decision_id = %id, "audit record not durable; response withheld");
                    response = enforce::audit_unavailable(id, self.audit_failure_status);
                    *response.version_mut() = client_version;
                }
                Some(true) if !durable => {
                    tracing::error!(decision_id = %id, "complete audit record not durable; its pending record stands");
                }
                _ => {}
            }
        }
        response
    }
}
