//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every label combination used on the request path is resolved once here,
//! so that counting a request is an atomic add, not a map lookup.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::input::Direction;

/// Outcome label of `rempart_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Monitored,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Monitored => "monitored",
            Outcome::Error => "error",
        }
    }
    const ALL: [Outcome; 4] = [
        Outcome::Allowed,
        Outcome::Denied,
        Outcome::Monitored,
        Outcome::Error,
    ];
}

/// Kind label of `rempart_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    Connect,
    Timeout,
    Protocol,
}

pub struct Metrics {
    registry: Registry,
    requests: [[IntCounter; 4]; 2],
    pub policy_evaluation_seconds: Histogram,
    pub policy_evaluation_errors: IntCounter,
    pub upstream_duration_seconds: Histogram,
    upstream_errors: [IntCounter; 3],
    pub policy_reloads_success: IntCounter,
    pub policy_reloads_failure: IntCounter,
    policy_revision: IntGaugeVec,
    pub audit_records: IntCounter,
    pub audit_write_errors: IntCounter,
    pub audit_queue_full: IntCounter,
    pub audit_dropped: IntCounter,
    pub audit_sync_failures: IntCounter,
    pub audit_rotations: IntCounter,
    pub audit_signed_seq: IntGauge,
    audit_sink_dropped: IntCounterVec,
    audit_sink_errors: IntCounterVec,
    pub connections_open: IntGauge,
    pub geo_reloads_success: IntCounter,
    pub geo_reloads_failure: IntCounter,
    geo_build_time: IntGaugeVec,
    tls_handshake_failures: IntCounterVec,
    pub tls_cert_reloads_success: IntCounter,
    pub tls_cert_reloads_failure: IntCounter,
    jwt_failures: IntCounterVec,
    pub jwks_refresh_success: IntCounter,
    pub jwks_refresh_failure: IntCounter,
    pub jwks_last_success_timestamp: IntGauge,
    pub egress: EgressMetrics,
    pub bundle: BundleMetrics,
}

/// Why the egress proxy refused a request before or instead of a policy
/// decision (`rempart_egress_refusals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    ProxyAuth,
    TooManyConnections,
    DnsNotFound,
    DnsTimeout,
    DnsFailure,
    ConnectFailed,
    ConnectTimeout,
    HeaderTooLarge,
    HeaderTimeout,
    Malformed,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::BadRequest,
        Refusal::ProxyAuth,
        Refusal::TooManyConnections,
        Refusal::DnsNotFound,
        Refusal::DnsTimeout,
        Refusal::DnsFailure,
        Refusal::ConnectFailed,
        Refusal::ConnectTimeout,
        Refusal::HeaderTooLarge,
        Refusal::HeaderTimeout,
        Refusal::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::ProxyAuth => "proxy_auth",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::DnsNotFound => "dns_not_found",
            Refusal::DnsTimeout => "dns_timeout",
            Refusal::DnsFailure => "dns_failure",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::Malformed => "malformed",
        }
    }
}

/// The egress proxy's own metrics (its decisions are counted in
/// `rempart_requests_total{direction="egress"}`).
pub struct EgressMetrics {
    refusals: Vec<IntCounter>,
    pub tunnels_open: IntGauge,
    pub in_flight: IntGauge,
    pub bytes_to_destination: IntCounter,
    pub bytes_from_destination: IntCounter,
    pub tunnel_duration_seconds: Histogram,
    pub dns_seconds: Histogram,
}

impl EgressMetrics {
    fn new(registry: &Registry) -> Self {
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let refusals_vec = must(IntCounterVec::new(
            Opts::new(
                "rempart_egress_refusals_total",
                "Egress requests refused by rempart itself, by reason (bad_request, proxy_auth, too_many_connections, dns_*, connect_*, header_too_large, header_timeout, malformed).",
            ),
            &["reason"],
        ));
        reg(Box::new(refusals_vec.clone()));
        let refusals = Refusal::ALL
            .iter()
            .map(|r| refusals_vec.with_label_values(&[r.as_str()]))
            .collect();
        let tunnels_open = must(IntGauge::new(
            "rempart_egress_tunnels_open",
            "CONNECT tunnels currently open.",
        ));
        reg(Box::new(tunnels_open.clone()));
        let in_flight = must(IntGauge::new(
            "rempart_egress_connections_in_use",
            "Egress slots in use (open tunnels and plain requests in flight), bounded by [egress] max_connections.",
        ));
        reg(Box::new(in_flight.clone()));
        let bytes = must(IntCounterVec::new(
            Opts::new(
                "rempart_egress_bytes_total",
                "Bytes carried through egress CONNECT tunnels, by flow (to_destination, from_destination).",
            ),
            &["flow"],
        ));
        reg(Box::new(bytes.clone()));
        let tunnel_duration_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "rempart_egress_tunnel_duration_seconds",
                "Lifetime of CONNECT tunnels.",
            )
            .buckets(vec![
                0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
        ));
        reg(Box::new(tunnel_duration_seconds.clone()));
        let dns_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "rempart_egress_dns_seconds",
                "Time to resolve an egress destination name.",
            )
            .buckets(vec![1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
        ));
        reg(Box::new(dns_seconds.clone()));
        EgressMetrics {
            refusals,
            tunnels_open,
            in_flight,
            bytes_to_destination: bytes.with_label_values(&["to_destination"]),
            bytes_from_destination: bytes.with_label_values(&["from_destination"]),
            tunnel_duration_seconds,
            dns_seconds,
        }
    }

    pub fn refusal(&self, r: Refusal) -> &IntCounter {
        &self.refusals[r as usize]
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static: a failure is a programming error that
    // the unit test below catches, never a run-time condition.
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Metrics {
    pub fn audit_sink_dropped(&self, sink: &str) -> IntCounter {
        self.audit_sink_dropped.with_label_values(&[sink])
    }

    pub fn audit_sink_errors(&self, sink: &str) -> IntCounter {
        self.audit_sink_errors.with_label_values(&[sink])
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));

        let requests_vec = must(IntCounterVec::new(
            Opts::new(
                "rempart_requests_total",
                "Requests decided, by direction and outcome (allowed, denied, monitored, error).",
            ),
            &["direction", "outcome"],
        ));
        reg(Box::new(requests_vec.clone()));
        let per_dir = |d: Direction| {
            Outcome::ALL.map(|o| requests_vec.with_label_values(&[d.as_str(), o.as_str()]))
        };
        let requests = [per_dir(Direction::Ingress), per_dir(Direction::Egress)];

        let policy_evaluation_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "rempart_policy_evaluation_seconds",
                "Time to evaluate the policy set for one request.",
            )
            .buckets(vec![
                5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1,
            ]),
        ));
        reg(Box::new(policy_evaluation_seconds.clone()));
        let policy_evaluation_errors = must(IntCounter::new(
            "rempart_policy_evaluation_errors_total",
            "Evaluations that failed or timed out (handled per [policy] on_error).",
        ));
        reg(Box::new(policy_evaluation_errors.clone()));

        let upstream_duration_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "rempart_upstream_duration_seconds",
                "Time from sending a request upstream to receiving its response head.",
            )
            .buckets(vec![
                1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0,
            ]),
        ));
        reg(Box::new(upstream_duration_seconds.clone()));
        let upstream_errors_vec = must(IntCounterVec::new(
            Opts::new(
                "rempart_upstream_errors_total",
                "Requests that got no response from the upstream, by kind (connect, timeout, protocol).",
            ),
            &["kind"],
        ));
        reg(Box::new(upstream_errors_vec.clone()));
        let upstream_errors =
            ["connect", "timeout", "protocol"].map(|k| upstream_errors_vec.with_label_values(&[k]));

        let reloads = must(IntCounterVec::new(
            Opts::new(
                "rempart_policy_reloads_total",
                "Policy reloads by result (success, failure). A failure keeps the previous set.",
            ),
            &["result"],
        ));
        reg(Box::new(reloads.clone()));
        let policy_reloads_success = reloads.with_label_values(&["success"]);
        let policy_reloads_failure = reloads.with_label_values(&["failure"]);
        let policy_revision = must(IntGaugeVec::new(
            Opts::new(
                "rempart_policy_revision_info",
                "The revision of the serving policy set (value 1).",
            ),
            &["revision"],
        ));
        reg(Box::new(policy_revision.clone()));

        let audit_records = must(IntCounter::new(
            "rempart_audit_records_total",
            "Audit records written to the trail.",
        ));
        reg(Box::new(audit_records.clone()));
        let audit_write_errors = must(IntCounter::new(
            "rempart_audit_write_errors_total",
            "Failed writes to the audit trail.",
        ));
        reg(Box::new(audit_write_errors.clone()));
        let audit_queue_full = must(IntCounter::new(
            "rempart_audit_queue_full_total",
            "Times a request waited because the audit queue was full.",
        ));
        reg(Box::new(audit_queue_full.clone()));
        let audit_dropped = must(IntCounter::new(
            "rempart_audit_dropped_total",
            "Audit records dropped because the queue was full ([audit] on_full = \"drop\").",
        ));
        reg(Box::new(audit_dropped.clone()));
        let audit_sync_failures = must(IntCounter::new(
            "rempart_audit_sync_failures_total",
            "Requests answered with [audit] failure_status because their record could not be made durable (sync mode).",
        ));
        reg(Box::new(audit_sync_failures.clone()));
        let audit_rotations = must(IntCounter::new(
            "rempart_audit_rotations_total",
            "Audit trail files rotated.",
        ));
        reg(Box::new(audit_rotations.clone()));
        let audit_signed_seq = must(IntGauge::new(
            "rempart_audit_signed_seq",
            "Sequence number signed by the last audit checkpoint written (0: none yet).",
        ));
        reg(Box::new(audit_signed_seq.clone()));
        let audit_sink_dropped = must(IntCounterVec::new(
            Opts::new(
                "rempart_audit_sink_dropped_total",
                "Audit records not copied to a sink (stdout, syslog) because its queue was full; the file has them.",
            ),
            &["sink"],
        ));
        reg(Box::new(audit_sink_dropped.clone()));
        let audit_sink_errors = must(IntCounterVec::new(
            Opts::new(
                "rempart_audit_sink_errors_total",
                "Audit records a sink (stdout, syslog) failed to send; the file has them.",
            ),
            &["sink"],
        ));
        reg(Box::new(audit_sink_errors.clone()));

        let connections_open = must(IntGauge::new(
            "rempart_connections_open",
            "Client connections currently open.",
        ));
        reg(Box::new(connections_open.clone()));

        let geo_reloads = must(IntCounterVec::new(
            Opts::new(
                "rempart_geo_reloads_total",
                "Reloads of the GeoIP databases and operator registry, by result (success, failure).",
            ),
            &["result"],
        ));
        reg(Box::new(geo_reloads.clone()));
        let geo_reloads_success = geo_reloads.with_label_values(&["success"]);
        let geo_reloads_failure = geo_reloads.with_label_values(&["failure"]);
        let geo_build_time = must(IntGaugeVec::new(
            Opts::new(
                "rempart_geo_database_build_timestamp_seconds",
                "Build time (Unix seconds) of each loaded GeoIP database, by role (country, asn, as_country).",
            ),
            &["role"],
        ));
        reg(Box::new(geo_build_time.clone()));

        let tls_handshake_failures = must(IntCounterVec::new(
            Opts::new(
                "rempart_tls_handshake_failures_total",
                "Ingress TLS handshakes that failed, by reason (client_cert_missing, \
                 client_cert_invalid, incompatible, alert_received, protocol, timeout, \
                 client_closed, io). Such clients never reach the policy.",
            ),
            &["reason"],
        ));
        reg(Box::new(tls_handshake_failures.clone()));
        let tls_reloads = must(IntCounterVec::new(
            Opts::new(
                "rempart_tls_certificate_reloads_total",
                "Reloads of the ingress certificate and key, by result (success, failure). \
                 A failure keeps the previous certificate.",
            ),
            &["result"],
        ));
        reg(Box::new(tls_reloads.clone()));
        let tls_cert_reloads_success = tls_reloads.with_label_values(&["success"]);
        let tls_cert_reloads_failure = tls_reloads.with_label_values(&["failure"]);
        let jwt_failures = must(IntCounterVec::new(
            Opts::new(
                "rempart_jwt_validation_failures_total",
                "Bearer tokens refused, by reason (the value of input.identity.error).",
            ),
            &["reason"],
        ));
        reg(Box::new(jwt_failures.clone()));
        let jwks_refresh = must(IntCounterVec::new(
            Opts::new(
                "rempart_jwks_refresh_total",
                "JWKS loads (file) and fetches (URL), by result (success, failure).",
            ),
            &["result"],
        ));
        reg(Box::new(jwks_refresh.clone()));
        let jwks_refresh_success = jwks_refresh.with_label_values(&["success"]);
        let jwks_refresh_failure = jwks_refresh.with_label_values(&["failure"]);
        let jwks_last_success_timestamp = must(IntGauge::new(
            "rempart_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS load or fetch (0: never).",
        ));
        reg(Box::new(jwks_last_success_timestamp.clone()));

        let build_info = must(IntGaugeVec::new(
            Opts::new("rempart_build_info", "Build information (value 1)."),
            &["version"],
        ));
        reg(Box::new(build_info.clone()));
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let egress = EgressMetrics::new(&registry);
        let bundle = BundleMetrics::new(&registry);
        Metrics {
            egress,
            bundle,
            registry,
            requests,
            policy_evaluation_seconds,
            policy_evaluation_errors,
            upstream_duration_seconds,
            upstream_errors,
            policy_reloads_success,
            policy_reloads_failure,
            policy_revision,
            audit_records,
            audit_write_errors,
            audit_queue_full,
            audit_dropped,
            audit_sync_failures,
            audit_rotations,
            audit_signed_seq,
            audit_sink_dropped,
            audit_sink_errors,
            connections_open,
            geo_reloads_success,
            geo_reloads_failure,
            geo_build_time,
            tls_handshake_failures,
            tls_cert_reloads_success,
            tls_cert_reloads_failure,
            jwt_failures,
            jwks_refresh_success,
            jwks_refresh_failure,
            jwks_last_success_timestamp,
        }
    }

    /// The counter of failed TLS handshakes for `reason`
    /// ([`crate::tls::handshake_failure_reason`]).
    pub fn tls_handshake_failure(&self, reason: &str) -> IntCounter {
        self.tls_handshake_failures.with_label_values(&[reason])
    }

    /// The counter of refused tokens for `reason`.
    pub fn jwt_failure(&self, reason: &str) -> IntCounter {
        self.jwt_failures.with_label_values(&[reason])
    }

    pub fn request(&self, direction: Direction, outcome: Outcome) -> &IntCounter {
        let d = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(3);
        &self.requests[d][o]
    }

    pub fn upstream_error(&self, kind: UpstreamError) -> &IntCounter {
        &self.upstream_errors[kind as usize]
    }

    pub fn set_policy_revision(&self, revision: &str) {
        self.policy_revision.reset();
        self.policy_revision.with_label_values(&[revision]).set(1);
    }

    pub fn set_geo_build_times(&self, db: &crate::geo::GeoDb) {
        self.geo_build_time.reset();
        for (role, d) in [
            ("country", &db.country),
            ("asn", &db.asn),
            ("as_country", &db.as_country),
        ] {
            if let Some(d) = d {
                let epoch = d.info(role, false).build_epoch;
                self.geo_build_time
                    .with_label_values(&[role])
                    .set(i64::try_from(epoch).unwrap_or(i64::MAX));
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a failure would only come
        // from an invalid metric family, which leaves a partial body.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// OPA bundle activations and downloads (see docs/metrics.md).
pub struct BundleMetrics {
    activation_failures: IntCounterVec,
    download_failures: IntCounterVec,
    downloads: IntCounterVec,
    pub last_activation_timestamp: IntGauge,
    pub last_download_timestamp: IntGauge,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl BundleMetrics {
    /// Reasons a download fails (`reason` label).
    pub const DOWNLOAD_FAILURES: [&'static str; 6] =
        ["connect", "timeout", "status", "too_large", "body", "token"];

    fn new(registry: &Registry) -> Self {
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let activation_failures = must(IntCounterVec::new(
            Opts::new(
                "rempart_policy_bundle_activation_failures_total",
                "Bundles refused (the previous policy set kept serving), by reason.",
            ),
            &["reason"],
        ));
        reg(Box::new(activation_failures.clone()));
        for r in crate::policy::bundle::Rejection::ALL {
            activation_failures.with_label_values(&[r.as_str()]);
        }
        activation_failures.with_label_values(&["persist"]);
        let download_failures = must(IntCounterVec::new(
            Opts::new(
                "rempart_policy_bundle_download_failures_total",
                "Failed bundle downloads from the bundle server, by reason.",
            ),
            &["reason"],
        ));
        reg(Box::new(download_failures.clone()));
        for r in Self::DOWNLOAD_FAILURES {
            download_failures.with_label_values(&[r]);
        }
        let downloads = must(IntCounterVec::new(
            Opts::new(
                "rempart_policy_bundle_downloads_total",
                "Successful bundle server answers, by result (updated, not_modified).",
            ),
            &["result"],
        ));
        reg(Box::new(downloads.clone()));
        for r in ["updated", "not_modified"] {
            downloads.with_label_values(&[r]);
        }
        let last_activation_timestamp = must(IntGauge::new(
            "rempart_policy_bundle_last_activation_timestamp_seconds",
            "Unix time a bundle was last activated (0: never).",
        ));
        reg(Box::new(last_activation_timestamp.clone()));
        let last_download_timestamp = must(IntGauge::new(
            "rempart_policy_bundle_last_download_timestamp_seconds",
            "Unix time of the last successful answer of the bundle server, 200 or 304 (0: never).",
        ));
        reg(Box::new(last_download_timestamp.clone()));
        BundleMetrics {
            activation_failures,
            download_failures,
            downloads,
            last_activation_timestamp,
            last_download_timestamp,
        }
    }

    pub fn activated(&self) {
        self.last_activation_timestamp.set(unix_now());
    }

    pub fn activation_failure(&self, reason: &str) {
        self.activation_failures.with_label_values(&[reason]).inc();
    }

    pub fn download_failure(&self, reason: &str) {
        self.download_failures.with_label_values(&[reason]).inc();
    }

    pub fn downloaded(&self, result: &str) {
        self.downloads.with_label_values(&[result]).inc();
        self.last_download_timestamp.set(unix_now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_render() {
        let m = Metrics::new();
        m.request(Direction::Ingress, Outcome::Denied).inc();
        m.set_policy_revision("sha256:abc");
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "rempart_requests_total{direction=\"ingress\",outcome=\"denied\"} 1",
            "rempart_policy_evaluation_seconds_bucket",
            "rempart_upstream_duration_seconds_bucket",
            "rempart_policy_reloads_total{result=\"failure\"} 0",
            "rempart_audit_records_total 0",
            "rempart_audit_dropped_total 0",
            "rempart_audit_sync_failures_total 0",
            "rempart_build_info{version=",
            "rempart_policy_revision_info{revision=\"sha256:abc\"} 1",
            "rempart_tls_certificate_reloads_total{result=\"failure\"} 0",
            "rempart_jwks_refresh_total{result=\"success\"} 0",
            "rempart_jwks_last_success_timestamp_seconds 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
