//! The egress road: the CRM's own outbound calls, through the forward
//! proxy it reaches with `HTTP_PROXY` / `HTTPS_PROXY`. The same stages as
//! ingress, in the same order, with `direction: "egress"`:
//!
//! 1. accept   — the proxy request and its destination, canonical;
//! 2. identify — which workload is calling out;
//! 3. classify — a tunnel or a plain HTTP request;
//! 4. locate   — resolve the name **once**, locate every address;
//! 5. decide   — each address in turn until one is allowed;
//! 6. enforce  — refuse, or connect to that very address and tunnel or
//!    forward;
//! 7. record   — the decision, and for a tunnel a second record with what
//!    it carried when it closed.
//!
//! Every refusal of rempart's own (bad request, proxy authentication,
//! limits, DNS, connect) also goes through decide-shaped rulings and the
//! record stage, each with its reason code, status and metric.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use super::accept::target::{self, Host, Target};
use super::accept::{self, Connection};
use super::decide::{self, Action, DecidePolicy, Ruling};
use super::enforce::tunnel::PipeBudget;
use super::enforce::{self, tunnel, ProxyBody, DECISION_ID};
use super::identify::egress::{Caller, EgressIdentifier};
use super::locate::resolve::{ResolveError, Resolver};
use super::record::{self, Evidence};
use super::{classify, decision_id, locate};
use crate::audit::{AuditSink, Transfer};
use crate::config::{AuditRecordScope, Config};
use crate::geo::GeoStore;
use crate::input::{Address, Direction, Identity, PolicyInput};
use crate::metrics::{Metrics, Outcome, Refusal};
use crate::policy::PolicyStore;

/// The egress limits, fixed for the process's life.
#[derive(Debug, Clone, Copy)]
pub struct EgressLimits {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub tunnel_max_duration: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// Egress slots in use, shared by every worker.
#[derive(Debug, Default)]
pub struct Slots(AtomicUsize);

/// One slot, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.0.fetch_sub(1, Ordering::AcqRel);
        self.metrics.egress.in_flight.dec();
    }
}

/// One worker's egress proxy.
pub struct EgressGateway {
    identifier: EgressIdentifier,
    resolver: Resolver,
    policies: Arc<PolicyStore>,
    how: DecidePolicy,
    geo: Arc<GeoStore>,
    redact: Vec<http::HeaderName>,
    audit: AuditSink,
    audit_scope: AuditRecordScope,
    audit_failure_status: u16,
    pub(crate) limits: EgressLimits,
    slots: Arc<Slots>,
    /// Room for large tunnel pipes, shared by every worker.
    pipes: Arc<PipeBudget>,
    tunnels: AtomicUsize,
    tunnels_closed: Notify,
    /// Cancelled when the shutdown drain ends: the tunnels still open close
    /// (`closed_by: "shutdown"`) and write their closing record.
    tunnels_cut: tokio_util::sync::CancellationToken,
    pub(crate) metrics: Arc<Metrics>,
}

/// A refusal of rempart's own, before or instead of the policy's answer.
struct Refused {
    refusal: Refusal,
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl EgressGateway {
    pub fn new(
        cfg: &Config,
        policies: Arc<PolicyStore>,
        geo: Arc<GeoStore>,
        audit: AuditSink,
        metrics: Arc<Metrics>,
        slots: Arc<Slots>,
        pipes: Arc<PipeBudget>,
    ) -> Self {
        let e = &cfg.egress;
        EgressGateway {
            identifier: EgressIdentifier::new(e),
            resolver: Resolver::new(&e.dns_servers, e.dns_timeout.0),
            policies,
            how: DecidePolicy::from_config(cfg),
            geo,
            redact: cfg.policy.redacted_headers(),
            audit,
            audit_scope: cfg.audit.record,
            audit_failure_status: cfg.audit.failure_status,
            limits: EgressLimits {
                connect_timeout: e.connect_timeout.0,
                response_timeout: e.response_timeout.0,
                tunnel_idle_timeout: e.tunnel_idle_timeout.0,
                tunnel_max_duration: e.tunnel_max_duration.0,
                max_connections: e.max_connections,
                max_header_bytes: e.max_header_bytes,
                header_read_timeout: e.header_read_timeout.0,
            },
            slots,
            pipes,
            tunnels: AtomicUsize::new(0),
            tunnels_closed: Notify::new(),
            tunnels_cut: tokio_util::sync::CancellationToken::new(),
            metrics,
        }
    }

    /// One proxy request, down the road.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Connection,
    ) -> Response<ProxyBody> {
        // 1. accept
        let accepted_at = Instant::now();
        let now = SystemTime::now();
        let id = decision_id::next(now);
        let is_tunnel = req.method() == Method::CONNECT;
        let upgrade = is_tunnel.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let client_version = parts.version;
        let target = target::of_proxy_request(&parts);
        let shown_target = match &target {
            Ok(t) => t.clone(),
            // Recorded as written (bounded), so that the trail shows what
            // was attempted.
            Err(_) => Target {
                host: Host::Name(
                    parts
                        .uri
                        .authority()
                        .map_or("", |a| a.as_str())
                        .chars()
                        .take(255)
                        .collect(),
                ),
                port: parts.uri.port_u16().unwrap_or(0),
            },
        };

        // 2. identify
        let caller = self.identifier.identify(&parts.headers, &conn);
        // The set that decides this request, loaded now: describing the
        // request depends on what it reads.
        let set = self.policies.current();
        let request = accept::describe_egress(
            &parts,
            id,
            &conn,
            &self.redact,
            &shown_target,
            set.request_reads(),
        );

        // 3. classify
        let resource = classify::classify_egress(is_tunnel);

        // 4. locate (the source now; the destination once it is resolved)
        let geo = self.geo.current();
        let mut source = locate::locate_source(&conn, &geo);
        let (identity, auth_failure) = match caller {
            Ok(Caller { identity, workload }) => {
                source.workload = workload;
                (identity, None)
            }
            Err(f) => (Identity::anonymous(), Some(f)),
        };
        let host = shown_target.host.to_string();
        let port = shown_target.port;
        let mut input = PolicyInput {
            direction: Direction::Egress,
            request,
            source,
            destination: Arc::new(locate::egress_destination(
                host.clone(),
                port,
                Vec::new(),
                None,
            )),
            identity,
            resource,
            time: crate::input::time_info(now),
        };

        let target = match target {
            Ok(t) => t,
            Err(e) => {
                return self
                    .refuse(
                        Refused {
                            refusal: Refusal::BadRequest,
                            status: StatusCode::BAD_REQUEST,
                            code: "egress_bad_request",
                            message: e.to_string(),
                        },
                        &input,
                        accepted_at,
                        client_version,
                    )
                    .await
            }
        };
        if let Some(f) = auth_failure {
            return self
                .refuse(
                    Refused {
                        refusal: Refusal::ProxyAuth,
                        status: StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                        code: "egress_proxy_auth",
                        message: f.message().to_string(),
                    },
                    &input,
                    accepted_at,
                    client_version,
                )
                .await;
        }
        let Some(slot) = self.take_slot() else {
            return self
                .refuse(
                    Refused {
                        refusal: Refusal::TooManyConnections,
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        code: "egress_too_many_connections",
                        message: format!(
                            "{} egress connections are already open",
                            self.limits.max_connections
                        ),
                    },
                    &input,
                    accepted_at,
                    client_version,
                )
                .await;
        };

        let ips: Vec<IpAddr> = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                let started = Instant::now();
                let resolved = self.resolver.resolve(name, target.port).await;
                self.metrics
                    .egress
                    .dns_seconds
                    .observe(started.elapsed().as_secs_f64());
                match resolved {
                    Ok(ips) => ips,
                    Err(e) => {
                        let (refusal, status) = match e {
                            ResolveError::Timeout => {
                                (Refusal::DnsTimeout, StatusCode::GATEWAY_TIMEOUT)
                            }
                            ResolveError::NotFound(_) => {
                                (Refusal::DnsNotFound, StatusCode::BAD_GATEWAY)
                            }
                            ResolveError::Failed(_) => {
                                (Refusal::DnsFailure, StatusCode::BAD_GATEWAY)
                            }
                        };
                        return self
                            .refuse(
                                Refused {
                                    refusal,
                                    status,
                                    code: e.code(),
                                    message: e.to_string(),
                                },
                                &input,
                                accepted_at,
                                client_version,
                            )
                            .await;
                    }
                }
            }
        };
        let located: Vec<Address> = ips
            .iter()
            .map(|ip| locate::locate_address(*ip, &geo))
            .collect();

        // 5. decide and 6. enforce, address by address in the resolver's
        //    order: the first address that the policy allows and that
        //    answers gets the data, and no other. An allowed address that
        //    cannot be reached hands over to the next one, as a browser
        //    would, so one dead replica does not fail the call.
        let deadline = Instant::now() + self.limits.connect_timeout;
        let mut first_refusal: Option<(Ruling, Arc<crate::input::Destination>)> = None;
        let mut unreachable: Vec<String> = Vec::new();
        let mut last_failure: Option<(Refusal, Ruling, Arc<crate::input::Destination>)> = None;
        let mut chosen = None;
        for (i, ip) in ips.iter().enumerate() {
            input.destination = Arc::new(locate::egress_destination(
                host.clone(),
                port,
                located.clone(),
                Some(i),
            ));
            let ruling = decide::decide(
                &set,
                decide::Document::AsRead(input.reading(None)),
                &self.how,
                &self.metrics,
            );
            if ruling.action != Action::Forward {
                if first_refusal.is_none() {
                    first_refusal = Some((ruling, Arc::clone(&input.destination)));
                }
                continue;
            }
            let addr = SocketAddr::new(*ip, target.port);
            let budget = attempt_budget(deadline, ips.len() - i);
            if budget.is_zero() {
                break;
            }
            let failure =
                match tokio::time::timeout(budget, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(stream)) => {
                        chosen = Some((ruling, Arc::clone(&input.destination), stream));
                        break;
                    }
                    Ok(Err(e)) => {
                        unreachable.push(format!("{addr}: {e}"));
                        Refusal::ConnectFailed
                    }
                    Err(_) => {
                        unreachable.push(format!(
                            "{addr}: no answer within {}",
                            humantime::format_duration(budget)
                        ));
                        Refusal::ConnectTimeout
                    }
                };
            last_failure = Some((failure, ruling, Arc::clone(&input.destination)));
        }

        let Some((ruling, destination, stream)) = chosen else {
            if let Some((refusal, ruling, destination)) = last_failure {
                // The policy allowed an address but none could be reached.
                input.destination = destination;
                let (status, code) = match refusal {
                    Refusal::ConnectTimeout => {
                        (StatusCode::GATEWAY_TIMEOUT, "egress_connect_timeout")
                    }
                    _ => (StatusCode::BAD_GATEWAY, "egress_connect_failed"),
                };
                return self
                    .failed(
                        Refused {
                            refusal,
                            status,
                            code,
                            message: format!("cannot connect to {}", unreachable.join("; ")),
                        },
                        &input,
                        &ruling,
                        accepted_at,
                        client_version,
                    )
                    .await;
            }
            // Every address refused: the first one's reasons are the
            // answer (`addresses` in the record shows them all).
            let Some((ruling, destination)) = first_refusal else {
                return enforce::internal_error();
            };
            input.destination = destination;
            let response = match ruling.action {
                Action::Unavailable => enforce::policy_unavailable(&id),
                _ => enforce::forbidden(&id, &ruling.decision.deny),
            };
            return self
                .finish(
                    response,
                    &input,
                    &ruling,
                    ruling.outcome,
                    accepted_at,
                    None,
                    client_version,
                )
                .await;
        };
        input.destination = destination;
        let _ = stream.set_nodelay(true);

        match upgrade {
            Some(upgrade) => {
                // The 200 goes out now; the tunnel starts once hyper hands
                // over the connection, in its own task, and is recorded
                // again when it closes.
                let response = self
                    .finish(
                        Response::new(ProxyBody::Full(None)),
                        &input,
                        &ruling,
                        ruling.outcome,
                        accepted_at,
                        None,
                        client_version,
                    )
                    .await;
                if response.status() == StatusCode::OK {
                    self.spawn_tunnel(upgrade, stream, input, ruling, slot, accepted_at);
                }
                response
            }
            None => {
                // Sync durability: no byte goes to the destination before
                // a record of the decision is on disk.
                let pending_durable = self.record_pending(&input, &ruling, accepted_at).await;
                if pending_durable == Some(false) {
                    drop(stream);
                    drop(slot);
                    return self.audit_refused(&input, &ruling, accepted_at, client_version);
                }
                let (response, error) = self.forward_plain(parts, body, &target, stream, &id).await;
                drop(slot);
                let outcome = if error.is_some() {
                    Outcome::Error
                } else {
                    ruling.outcome
                };
                let response = self.with_head(response, &input, client_version);
                let ack = self.record(
                    &input,
                    &ruling,
                    outcome,
                    &response,
                    accepted_at,
                    error.as_deref(),
                );
                match (pending_durable, ack) {
                    // No pending record: the answer waits for this one.
                    (None, Some(ack)) => {
                        self.withhold_unless_durable(ack, response, &input, client_version)
                            .await
                    }
                    // The pending record is on disk: the complete one goes
                    // with the next group commit.
                    _ => response,
                }
            }
        }
    }

    fn take_slot(&self) -> Option<Slot> {
        let taken = self.slots.0.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            slots: Arc::clone(&self.slots),
            metrics: Arc::clone(&self.metrics),
        };
        self.metrics.egress.in_flight.inc();
        if taken >= self.limits.max_connections {
            drop(slot);
            return None;
        }
        Some(slot)
    }

    /// Sets the decision id and protocol version, then records; in sync
    /// mode, answers only once the record is on disk (a tunnel whose
    /// decision could not be recorded is not opened).
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        response: Response<ProxyBody>,
        input: &PolicyInput,
        ruling: &Ruling,
        outcome: Outcome,
        accepted_at: Instant,
        error: Option<&str>,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        let response = self.with_head(response, input, client_version);
        // 7. record
        match self.record(input, ruling, outcome, &response, accepted_at, error) {
            Some(ack) => {
                self.withhold_unless_durable(ack, response, input, client_version)
                    .await
            }
            None => response,
        }
    }

    fn with_head(
        &self,
        mut response: Response<ProxyBody>,
        input: &PolicyInput,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        if let Ok(v) = HeaderValue::from_str(&input.request.id) {
            response.headers_mut().insert(DECISION_ID, v);
        }
        *response.version_mut() = client_version;
        response
    }

    /// The request's complete record (counted).
    fn record(
        &self,
        input: &PolicyInput,
        ruling: &Ruling,
        outcome: Outcome,
        response: &Response<ProxyBody>,
        accepted_at: Instant,
        error: Option<&str>,
    ) -> Option<crate::audit::AuditAck> {
        record::record(
            &Evidence {
                input,
                ruling,
                outcome,
                status: response.status().as_u16(),
                accepted_at,
                upstream_error: error,
                transfer: None,
                pending: false,
            },
            self.audit_scope,
            &self.audit,
            &self.metrics,
        )
    }

    /// Sync durability: writes the pending record of a plain request about
    /// to be forwarded and waits until it is on disk. `None` when there is
    /// nothing to wait for (buffered mode, or a request not recorded).
    async fn record_pending(
        &self,
        input: &PolicyInput,
        ruling: &Ruling,
        accepted_at: Instant,
    ) -> Option<bool> {
        record::record_pending(
            input,
            ruling,
            accepted_at,
            self.audit_scope,
            &self.audit,
            &self.metrics,
        )
        .await
    }

    /// The answer to a request whose pending record could not be made
    /// durable: not forwarded, `failure_status`, recorded as an error.
    fn audit_refused(
        &self,
        input: &PolicyInput,
        ruling: &Ruling,
        accepted_at: Instant,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        self.metrics.audit_sync_failures.inc();
        tracing::error!(decision_id = %input.request.id, "audit record not durable; request not forwarded");
        let response = self.with_head(
            enforce::audit_unavailable(&input.request.id, self.audit_failure_status),
            input,
            client_version,
        );
        // Attempted like any record: the first that reaches the disk
        // reopens the way. Nobody waits for it.
        let _ = self.record(
            input,
            ruling,
            Outcome::Error,
            &response,
            accepted_at,
            Some(enforce::AUDIT_UNAVAILABLE),
        );
        response
    }

    /// Sync durability: the answer goes out only once its record is on
    /// disk, else it is replaced by `failure_status`.
    async fn withhold_unless_durable(
        &self,
        ack: crate::audit::AuditAck,
        response: Response<ProxyBody>,
        input: &PolicyInput,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        if ack.durable().await {
            return response;
        }
        self.metrics.audit_sync_failures.inc();
        tracing::error!(decision_id = %input.request.id, "audit record not durable; response withheld");
        self.with_head(
            enforce::audit_unavailable(&input.request.id, self.audit_failure_status),
            input,
            client_version,
        )
    }

    /// Refuses before any policy answer, with rempart's own reason.
    async fn refuse(
        &self,
        refused: Refused,
        input: &PolicyInput,
        accepted_at: Instant,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        self.metrics.egress.refusal(refused.refusal).inc();
        let outcome = match refused.refusal {
            Refusal::BadRequest | Refusal::ProxyAuth => Outcome::Denied,
            _ => Outcome::Error,
        };
        let ruling = decide::refusal(
            refused.code,
            &refused.message,
            outcome,
            std::sync::Arc::clone(self.policies.current().stamp()),
        );
        let id = &input.request.id;
        let mut response = enforce::json_response(
            refused.status,
            id,
            serde_json::json!({"error": refused.code, "decision_id": id, "message": refused.message}),
        );
        if refused.refusal == Refusal::ProxyAuth {
            response.headers_mut().insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rempart egress\""),
            );
        }
        self.finish(
            response,
            input,
            &ruling,
            outcome,
            accepted_at,
            None,
            client_version,
        )
        .await
    }

    /// The policy allowed the destination but it could not be reached.
    async fn failed(
        &self,
        refused: Refused,
        input: &PolicyInput,
        ruling: &Ruling,
        accepted_at: Instant,
        client_version: http::Version,
    ) -> Response<ProxyBody> {
        self.metrics.egress.refusal(refused.refusal).inc();
        tracing::warn!(decision_id = %input.request.id, "egress: {}", refused.message);
        let id = &input.request.id;
        let response = enforce::json_response(
            refused.status,
            id,
            serde_json::json!({"error": refused.code, "decision_id": id, "message": refused.message}),
        );
        self.finish(
            response,
            input,
            ruling,
            Outcome::Error,
            accepted_at,
            Some(&refused.message),
            client_version,
        )
        .await
    }

    fn spawn_tunnel(
        self: &Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        destination: tokio::net::TcpStream,
        input: PolicyInput,
        ruling: Ruling,
        slot: Slot,
        accepted_at: Instant,
    ) {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        self.metrics.egress.tunnels_open.inc();
        let gw = Arc::clone(self);
        tokio::spawn(async move {
            let carried = match upgrade.await {
                Ok(client) => gw.carry(client, destination).await,
                Err(e) => {
                    tracing::debug!(decision_id = %input.request.id, "CONNECT upgrade failed: {e}");
                    tunnel::Carried {
                        to_destination: 0,
                        from_destination: 0,
                        duration: Duration::ZERO,
                        closed: tunnel::Closed::Error,
                    }
                }
            };
            let m = &gw.metrics.egress;
            m.bytes_to_destination.inc_by(carried.to_destination);
            m.bytes_from_destination.inc_by(carried.from_destination);
            m.tunnel_duration_seconds
                .observe(carried.duration.as_secs_f64());
            record::record(
                &Evidence {
                    input: &input,
                    ruling: &ruling,
                    outcome: ruling.outcome,
                    status: 200,
                    accepted_at,
                    upstream_error: None,
                    pending: false,
                    transfer: Some(Transfer {
                        bytes_to_destination: carried.to_destination,
                        bytes_from_destination: carried.from_destination,
                        duration_ms: u64::try_from(carried.duration.as_millis())
                            .unwrap_or(u64::MAX),
                        closed_by: carried.closed.as_str(),
                    }),
                },
                gw.audit_scope,
                &gw.audit,
                &gw.metrics,
            );
            drop(slot);
            m.tunnels_open.dec();
            gw.tunnels.fetch_sub(1, Ordering::AcqRel);
            gw.tunnels_closed.notify_waiters();
        });
    }

    /// Carries an upgraded `CONNECT` connection's bytes to and from
    /// `destination`. A client on plain TCP is taken back from hyper and
    /// tunnelled with `splice(2)` on Linux; a TLS client (an HTTPS proxy)
    /// goes through a copy.
    async fn carry(
        &self,
        client: hyper::upgrade::Upgraded,
        mut destination: tokio::net::TcpStream,
    ) -> tunnel::Carried {
        let (idle, max, cut) = (
            self.limits.tunnel_idle_timeout,
            self.limits.tunnel_max_duration,
            self.tunnels_cut.clone(),
        );
        let parts = match client.downcast::<accept::EgressIo>() {
            Ok(parts) => parts,
            // Not the listener's own stream type (never expected): copy.
            Err(client) => {
                return tunnel::carry(TokioIo::new(client), destination, idle, max, cut).await
            }
        };
        // Bytes the client sent right behind its CONNECT head, already read
        // by hyper: they go first.
        let early = parts.read_buf;
        if !early.is_empty() {
            use tokio::io::AsyncWriteExt;
            if destination.write_all(&early).await.is_err() {
                return tunnel::Carried {
                    to_destination: 0,
                    from_destination: 0,
                    duration: Duration::ZERO,
                    closed: tunnel::Closed::Error,
                };
            }
        }
        let mut carried = match parts.io.into_inner() {
            #[cfg(target_os = "linux")]
            tokio_util::either::Either::Left(tcp) => {
                tunnel::carry_tcp(tcp, destination, idle, max, cut, &self.pipes).await
            }
            #[cfg(not(target_os = "linux"))]
            tokio_util::either::Either::Left(tcp) => {
                tunnel::carry(tcp, destination, idle, max, cut).await
            }
            tokio_util::either::Either::Right(tls) => {
                tunnel::carry(tls, destination, idle, max, cut).await
            }
        };
        carried.to_destination += early.len() as u64;
        carried
    }

    /// Sends a plain HTTP proxy request on the connection to the checked
    /// address, in origin form, and returns the destination's response.
    async fn forward_plain(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        target: &Target,
        stream: tokio::net::TcpStream,
        id: &str,
    ) -> (Response<ProxyBody>, Option<String>) {
        let fail = |status: StatusCode, code: &str, message: String| {
            (
                enforce::json_response(
                    status,
                    id,
                    serde_json::json!({"error": code, "decision_id": id, "message": message}),
                ),
                Some(message),
            )
        };
        // RFC 9112 §3.2.2: a proxy sets Host from the absolute URI.
        let host = match target.port {
            80 => target.host_for_header(),
            p => format!("{}:{p}", target.host_for_header()),
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = match path.parse() {
            Ok(u) => u,
            Err(e) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "egress_bad_request",
                    format!("bad path: {e}"),
                )
            }
        };
        enforce::strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(http::header::HOST, v);
        }
        parts.version = http::Version::HTTP_11;
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    return fail(
                        StatusCode::BAD_GATEWAY,
                        "egress_destination_failed",
                        format!("HTTP handshake with the destination failed: {e}"),
                    )
                }
            };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("egress destination connection: {e}");
            }
        });
        let sent = tokio::time::timeout(
            self.limits.response_timeout,
            sender.send_request(Request::from_parts(
                parts,
                enforce::Metered::new(body, self.metrics.egress.bytes_to_destination.clone()),
            )),
        )
        .await;
        match sent {
            Ok(Ok(mut resp)) => {
                enforce::strip_hop_by_hop(resp.headers_mut());
                let counter = self.metrics.egress.bytes_from_destination.clone();
                (
                    resp.map(|b| ProxyBody::Metered(enforce::Metered::new(b, counter))),
                    None,
                )
            }
            Ok(Err(e)) => fail(
                StatusCode::BAD_GATEWAY,
                "egress_destination_failed",
                format!("the destination failed: {e}"),
            ),
            Err(_) => fail(
                StatusCode::GATEWAY_TIMEOUT,
                "egress_destination_timeout",
                format!(
                    "no response head within {}",
                    humantime::format_duration(self.limits.response_timeout)
                ),
            ),
        }
    }

    /// Waits until `deadline` (the end of the shutdown drain) for the open
    /// tunnels to close, then cuts the ones still open and waits for them
    /// to write their closing records (at most [`CUT_GRACE`] more).
    pub async fn wait_for_tunnels(&self, deadline: tokio::time::Instant) {
        if self.tunnels_closed_by(deadline).await {
            return;
        }
        tracing::warn!(
            open = self.tunnels.load(Ordering::Acquire),
            "drain timeout reached with egress tunnels still open: closing them"
        );
        self.tunnels_cut.cancel();
        if !self
            .tunnels_closed_by(tokio::time::Instant::now() + CUT_GRACE)
            .await
        {
            tracing::error!(
                open = self.tunnels.load(Ordering::Acquire),
                "egress tunnels did not close after being cut: their closing records are lost"
            );
        }
    }

    /// True once no tunnel is open, false if `deadline` came first.
    async fn tunnels_closed_by(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let closed = self.tunnels_closed.notified();
            if self.tunnels.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return false;
            }
        }
    }
}

/// How long cut tunnels get to write their closing records after the
/// drain: the cut ends them at once, so this only bounds a stuck writer.
pub const CUT_GRACE: Duration = Duration::from_secs(1);

/// The time one connection attempt may take when `left` addresses (this
/// one included) remain before `deadline`: an even share of what is left,
/// but at least two seconds when that much is left, so that one
/// black-holed address cannot eat the whole budget and a slow-but-alive
/// one still gets a fair chance (Go's dialer does the same).
fn attempt_budget(deadline: Instant, left: usize) -> Duration {
    const SANE_MINIMUM: Duration = Duration::from_secs(2);
    let remaining = deadline.saturating_duration_since(Instant::now());
    let share = remaining / u32::try_from(left.max(1)).unwrap_or(u32::MAX);
    share.max(remaining.min(SANE_MINIMUM))
}
