//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Every label combination used on the request path is resolved once here,
//! so that counting a request is an atomic add, not a map lookup.
//!
//! The metrics every request moves (requests, decision cache, the policy
//! evaluation and upstream histograms) are not even that: each worker
//! thread counts them in a shard of its own ([`HotShard`]), and rendering
//! folds the shards into the registry first, so a scrape still sees every
//! request answered before it. An atomic add on a counter that both
//! workers write moves the counter's cache line between the cores; about
//! ten of those per request cost 0.2–0.3 µs (docs/performance.md,
//! session 13).

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::input::Direction;
use crate::policy::CacheUse;

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

/// Sets gauges from a source outside the registry, just before rendering.
type Refresher = Box<dyn Fn(&Metrics) + Send + Sync>;

/// One thread's counts of the metrics every request moves, since the last
/// rendering (see the module's documentation).
struct HotShard {
    /// As `Metrics::requests`.
    requests: [[u64; 4]; 2],
    /// As `Metrics::policy_decision_cache`.
    decision_cache: [u64; 3],
    evaluation: prometheus::local::LocalHistogram,
    upstream: prometheus::local::LocalHistogram,
}

static NEXT_METRICS_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard of each `Metrics` it counted for (one, but for
    /// tests that run several gateways in one process).
    static HOT_SHARDS: RefCell<Vec<(usize, Arc<Mutex<HotShard>>)>> =
        const { RefCell::new(Vec::new()) };
}

pub struct Metrics {
    registry: Registry,
    /// Run before each rendering, to set gauges whose source is elsewhere
    /// (the audit queue's depth).
    refreshers: std::sync::Mutex<Vec<Refresher>>,
    requests: [[IntCounter; 4]; 2],
    policy_evaluation_seconds: Histogram,
    pub policy_evaluation_errors: IntCounter,
    /// By [`crate::policy::CacheUse`]: hit, miss, bypassed.
    policy_decision_cache: [IntCounter; 3],
    upstream_duration_seconds: Histogram,
    /// This instance's number, which finds its shards in each thread.
    hot_id: usize,
    /// Every thread's shard of the request metrics, folded by `render`.
    hot_shards: Mutex<Vec<Arc<Mutex<HotShard>>>>,
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
    pub audit_queue_records: IntGauge,
    pub audit_queue_records_peak: IntGauge,
    pub audit_queue_capacity: IntGauge,
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
    pub decision_log: DecisionLogMetrics,
    pub bundle: BundleMetrics,
    decision_reasons: IntCounterVec,
    reason_codes: BoundedLabel,
    egress_decisions: IntCounterVec,
    egress_countries: BoundedLabel,
    egress_jurisdictions: BoundedLabel,
}

/// The OPA-compatible decision-log upload (`[audit.decision_log]`).
pub struct DecisionLogMetrics {
    pub spool_bytes: IntGauge,
    pub spool_files: IntGauge,
    pub upload_success: IntCounter,
    pub upload_http_error: IntCounter,
    pub upload_network_error: IntCounter,
    pub events_spooled: IntCounter,
    pub events_delivered: IntCounter,
    pub recovered: IntCounter,
    pub spool_full: IntCounter,
    pub spool_write_error: IntCounter,
    pub dropped_not_in_trail: IntCounter,
    pub dropped_unreadable: IntCounter,
}

impl DecisionLogMetrics {
    fn new(registry: &Registry) -> Self {
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            reg(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            reg(Box::new(c.clone()));
            c
        };
        let vec = |name: &str, help: &str, label: &str| {
            let v = must(IntCounterVec::new(Opts::new(name, help), &[label]));
            reg(Box::new(v.clone()));
            v
        };
        let uploads = vec(
            "rempart_audit_decision_log_uploads_total",
            "Decision-log batch uploads by outcome: success (2xx), http_error (any other status; retried), network_error (connect, TLS, timeout; retried).",
            "outcome",
        );
        let refusals = vec(
            "rempart_audit_decision_log_spool_refusals_total",
            "Times a decision-log batch could not be spooled: full (spool_max_bytes reached) or write_error; the events wait in the trail and are read back later.",
            "reason",
        );
        let dropped = vec(
            "rempart_audit_decision_log_dropped_total",
            "Trail lines the decision-log upload will never send, by reason: not_in_trail (removed by rotate_keep before they were spooled), unreadable (a trail line that does not parse).",
            "reason",
        );
        DecisionLogMetrics {
            spool_bytes: gauge(
                "rempart_audit_decision_log_spool_bytes",
                "Bytes of decision-log batches waiting in the spool directory.",
            ),
            spool_files: gauge(
                "rempart_audit_decision_log_spool_files",
                "Decision-log batch files waiting in the spool directory.",
            ),
            upload_success: uploads.with_label_values(&["success"]),
            upload_http_error: uploads.with_label_values(&["http_error"]),
            upload_network_error: uploads.with_label_values(&["network_error"]),
            events_spooled: counter(
                "rempart_audit_decision_log_events_spooled_total",
                "Decision-log events written to the spool.",
            ),
            events_delivered: counter(
                "rempart_audit_decision_log_events_delivered_total",
                "Decision-log events the collector acknowledged (2xx).",
            ),
            recovered: counter(
                "rempart_audit_decision_log_recovered_total",
                "Trail lines the decision-log upload read back from the trail file (after a restart, a full sink queue or a full spool).",
            ),
            spool_full: refusals.with_label_values(&["full"]),
            spool_write_error: refusals.with_label_values(&["write_error"]),
            dropped_not_in_trail: dropped.with_label_values(&["not_in_trail"]),
            dropped_unreadable: dropped.with_label_values(&["unreadable"]),
        }
    }
}

/// The audit sinks besides the file (`sink` label of
/// `rempart_audit_sink_dropped_total` and `rempart_audit_sink_errors_total`).
pub const AUDIT_SINKS: [&str; 2] = ["stdout", "syslog"];

/// The label value that stands for every value past a [`BoundedLabel`]'s
/// cap, and for values that are not well-formed label values.
pub const OTHER_LABEL: &str = "other";
/// Distinct reason codes in `rempart_decision_reasons_total{code}`.
pub const MAX_REASON_CODES: usize = 64;
/// Distinct countries in `rempart_egress_decisions_total{country}`.
pub const MAX_EGRESS_COUNTRIES: usize = 64;
/// Distinct jurisdictions in `rempart_egress_decisions_total{jurisdiction}`.
pub const MAX_EGRESS_JURISDICTIONS: usize = 32;

/// A label whose values come from outside rempart (the policy's reason
/// codes, the geo data's countries): the first `cap` distinct well-formed
/// values get their own series, every later one is counted as `other`, so
/// that a policy inventing codes cannot grow the scrape without bound.
struct BoundedLabel {
    admitted: RwLock<HashSet<Box<str>>>,
    cap: usize,
}

impl BoundedLabel {
    fn new(cap: usize) -> Self {
        BoundedLabel {
            admitted: RwLock::new(HashSet::new()),
            cap,
        }
    }

    /// `value` itself if it has (or may take) a series of its own, else
    /// [`OTHER_LABEL`].
    fn get<'a>(&self, value: &'a str) -> &'a str {
        let well_formed = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !well_formed || value == OTHER_LABEL {
            return OTHER_LABEL;
        }
        // A poisoned lock only means another thread panicked mid-insert;
        // the set itself is still a valid set.
        let admitted = self.admitted.read().unwrap_or_else(|e| e.into_inner());
        if admitted.contains(value) {
            return value;
        }
        drop(admitted);
        let mut admitted = self.admitted.write().unwrap_or_else(|e| e.into_inner());
        if admitted.contains(value) {
            value
        } else if admitted.len() < self.cap {
            admitted.insert(value.into());
            value
        } else {
            OTHER_LABEL
        }
    }
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
    pub tunnel_pipe_bytes: IntGauge,
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
        let tunnel_pipe_bytes = must(IntGauge::new(
            "rempart_egress_tunnel_pipe_bytes",
            "Bytes of enlarged tunnel pipes held now, out of [egress] tunnel_pipe_budget.",
        ));
        reg(Box::new(tunnel_pipe_bytes.clone()));
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
            tunnel_pipe_bytes,
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

    /// Counts one policy decision: how the cache served it, and how long
    /// it took.
    pub fn count_decision(&self, used: CacheUse, seconds: f64) {
        self.with_shard(|s| {
            s.decision_cache[used as usize] += 1;
            s.evaluation.observe(seconds);
        });
    }

    /// Counts one upstream exchange's time to the response head.
    pub fn observe_upstream(&self, seconds: f64) {
        self.with_shard(|s| s.upstream.observe(seconds));
    }

    /// Runs `f` on this thread's shard of the request metrics, made on
    /// the thread's first request.
    fn with_shard(&self, f: impl FnOnce(&mut HotShard)) {
        let mut f = Some(f);
        let counted = HOT_SHARDS.try_with(|shards| {
            let mut shards = shards.borrow_mut();
            let i = match shards.iter().position(|(id, _)| *id == self.hot_id) {
                Some(i) => i,
                None => {
                    let shard = Arc::new(Mutex::new(self.new_shard()));
                    if let Ok(mut all) = self.hot_shards.lock() {
                        all.push(Arc::clone(&shard));
                    }
                    shards.push((self.hot_id, shard));
                    shards.len() - 1
                }
            };
            // Only this thread and a rendering ever take it.
            if let (Ok(mut s), Some(f)) = (shards[i].1.lock(), f.take()) {
                f(&mut s);
            };
        });
        // A thread being torn down has no shard left: count straight
        // into the registry.
        if let (Err(_), Some(f)) = (counted, f) {
            let mut shard = self.new_shard();
            f(&mut shard);
            self.fold(&mut shard);
        }
    }

    fn new_shard(&self) -> HotShard {
        HotShard {
            requests: [[0; 4]; 2],
            decision_cache: [0; 3],
            evaluation: self.policy_evaluation_seconds.local(),
            upstream: self.upstream_duration_seconds.local(),
        }
    }

    /// Adds `s` into the registry's metrics and empties it.
    fn fold(&self, s: &mut HotShard) {
        for (counters, counts) in self.requests.iter().zip(&mut s.requests) {
            for (counter, n) in counters.iter().zip(counts.iter_mut()) {
                counter.inc_by(std::mem::take(n));
            }
        }
        for (counter, n) in self.policy_decision_cache.iter().zip(&mut s.decision_cache) {
            counter.inc_by(std::mem::take(n));
        }
        s.evaluation.flush();
        s.upstream.flush();
    }

    /// Adds every thread's shard into the registry's metrics, and empties
    /// the shards.
    fn fold_shards(&self) {
        let Ok(all) = self.hot_shards.lock() else {
            return;
        };
        for shard in all.iter() {
            if let Ok(mut s) = shard.lock() {
                self.fold(&mut s);
            }
        }
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
        let decision_cache_vec = must(IntCounterVec::new(
            Opts::new(
                "rempart_policy_decision_cache_total",
                "Decisions by cache use: hit (no evaluation), miss (evaluated, then kept), bypassed (the policy set cannot be cached, or the cache is off).",
            ),
            &["result"],
        ));
        reg(Box::new(decision_cache_vec.clone()));
        let policy_decision_cache = [CacheUse::Hit, CacheUse::Miss, CacheUse::Bypassed]
            .map(|u| decision_cache_vec.with_label_values(&[u.as_str()]));

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
        let audit_queue_records = must(IntGauge::new(
            "rempart_audit_queue_records",
            "Audit records waiting for the trail: queued, in the batch being written, or kept after a failed write.",
        ));
        reg(Box::new(audit_queue_records.clone()));
        let audit_queue_records_peak = must(IntGauge::new(
            "rempart_audit_queue_records_peak",
            "The most audit records found waiting for the trail since start.",
        ));
        reg(Box::new(audit_queue_records_peak.clone()));
        let audit_queue_capacity = must(IntGauge::new(
            "rempart_audit_queue_capacity",
            "Records the audit queue holds before [audit] on_full applies ([audit] queue_capacity).",
        ));
        reg(Box::new(audit_queue_capacity.clone()));
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
        // Exported at 0 from the start, so that an alert on increase() sees
        // the first drop or error (a series born at 1 has no increase).
        for sink in AUDIT_SINKS {
            audit_sink_dropped.with_label_values(&[sink]);
            audit_sink_errors.with_label_values(&[sink]);
        }

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

        let decision_reasons = must(IntCounterVec::new(
            Opts::new(
                "rempart_decision_reasons_total",
                "Reasons given by decisions, by direction, request outcome, kind (deny, warn) and reason code \
                 (at most 64 distinct codes; later ones are counted as \"other\").",
            ),
            &["direction", "outcome", "kind", "code"],
        ));
        reg(Box::new(decision_reasons.clone()));
        let egress_decisions = must(IntCounterVec::new(
            Opts::new(
                "rempart_egress_decisions_total",
                "Egress decisions by destination country, operator jurisdiction, sovereignty verdict \
                 and outcome (at most 64 countries and 32 jurisdictions; later ones are \"other\").",
            ),
            &["country", "jurisdiction", "sovereign", "outcome"],
        ));
        reg(Box::new(egress_decisions.clone()));

        let egress = EgressMetrics::new(&registry);
        let decision_log = DecisionLogMetrics::new(&registry);
        let bundle = BundleMetrics::new(&registry);
        Metrics {
            egress,
            bundle,
            decision_reasons,
            reason_codes: BoundedLabel::new(MAX_REASON_CODES),
            egress_decisions,
            egress_countries: BoundedLabel::new(MAX_EGRESS_COUNTRIES),
            egress_jurisdictions: BoundedLabel::new(MAX_EGRESS_JURISDICTIONS),
            registry,
            refreshers: std::sync::Mutex::new(Vec::new()),
            requests,
            policy_evaluation_seconds,
            policy_evaluation_errors,
            policy_decision_cache,
            upstream_duration_seconds,
            hot_id: NEXT_METRICS_ID.fetch_add(1, Ordering::Relaxed),
            hot_shards: Mutex::new(Vec::new()),
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
            audit_queue_records,
            audit_queue_records_peak,
            audit_queue_capacity,
            audit_sink_dropped,
            audit_sink_errors,
            decision_log,
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

    /// Counts one decided request.
    pub fn count_request(&self, direction: Direction, outcome: Outcome) {
        let d = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        let o = Outcome::ALL.iter().position(|x| *x == outcome).unwrap_or(3);
        self.with_shard(|s| s.requests[d][o] += 1);
    }

    /// Counts one reason of a decision (`kind`: "deny" or "warn").
    pub fn decision_reason(&self, direction: Direction, outcome: Outcome, kind: &str, code: &str) {
        let code = self.reason_codes.get(code);
        self.decision_reasons
            .with_label_values(&[direction.as_str(), outcome.as_str(), kind, code])
            .inc();
    }

    /// Counts one egress decision by where it was going. `country` and
    /// `jurisdiction` are `None` when unknown (not located, or no operator
    /// in the registry): counted as "unknown".
    pub fn egress_decision(
        &self,
        country: Option<&str>,
        jurisdiction: Option<&str>,
        sovereign: &str,
        outcome: Outcome,
    ) {
        let country = country.map_or("unknown", |c| self.egress_countries.get(c));
        let jurisdiction = jurisdiction.map_or("unknown", |j| self.egress_jurisdictions.get(j));
        let sovereign = match sovereign {
            crate::geo::EU_OPERATED_IN_EU
            | crate::geo::NON_EU_OPERATOR_IN_EU
            | crate::geo::OUTSIDE_EU
            | crate::geo::LOCAL => sovereign,
            _ => crate::geo::UNKNOWN,
        };
        self.egress_decisions
            .with_label_values(&[country, jurisdiction, sovereign, outcome.as_str()])
            .inc();
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

    /// Adds `refresh` to what runs before each rendering.
    pub fn refresh_before_render(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut r) = self.refreshers.lock() {
            r.push(Box::new(refresh));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        self.fold_shards();
        if let Ok(r) = self.refreshers.lock() {
            for refresh in r.iter() {
                refresh(self);
            }
        }
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
        m.count_request(Direction::Ingress, Outcome::Denied);
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

    #[test]
    fn every_threads_request_counts_are_in_each_rendering() {
        let m = Arc::new(Metrics::new());
        let other = Metrics::new();
        let count = |m: &Metrics, n: u64| {
            for i in 0..n {
                m.count_request(Direction::Ingress, Outcome::Allowed);
                m.count_decision(CacheUse::Hit, 2e-6 * i as f64);
                m.observe_upstream(3e-4);
            }
        };
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || count(&m, 1000))
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        // This thread counts for two instances: neither sees the other's.
        count(&m, 5);
        count(&other, 7);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            "rempart_requests_total{direction=\"ingress\",outcome=\"allowed\"} 3005",
            "rempart_policy_decision_cache_total{result=\"hit\"} 3005",
            "rempart_policy_evaluation_seconds_count 3005",
            "rempart_upstream_duration_seconds_count 3005",
            "rempart_upstream_duration_seconds_bucket{le=\"0.0005\"} 3005",
            // 0, 2 and 4 µs in each of the four runs that counted for `m`.
            "rempart_policy_evaluation_seconds_bucket{le=\"0.000005\"} 12",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Counted after a rendering: in the next one, once.
        count(&m, 1);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("outcome=\"allowed\"} 3006"), "{text}");
        let text = String::from_utf8(other.render()).unwrap();
        assert!(text.contains("outcome=\"allowed\"} 7"), "{text}");
    }

    #[test]
    fn reason_codes_are_capped_and_malformed_ones_are_other() {
        let m = Metrics::new();
        for i in 0..MAX_REASON_CODES + 10 {
            m.decision_reason(
                Direction::Ingress,
                Outcome::Denied,
                "deny",
                &format!("code_{i}"),
            );
        }
        m.decision_reason(Direction::Egress, Outcome::Monitored, "deny", "bad code\"}");
        m.decision_reason(Direction::Ingress, Outcome::Denied, "deny", "code_0");
        let text = String::from_utf8(m.render()).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("rempart_decision_reasons_total{"))
            .count();
        // 64 codes of their own, "other" for ingress and for egress.
        assert_eq!(series, MAX_REASON_CODES + 2, "{text}");
        assert!(text.contains(
            "rempart_decision_reasons_total{code=\"code_0\",direction=\"ingress\",kind=\"deny\",outcome=\"denied\"} 2"
        ));
        assert!(text.contains(
            "rempart_decision_reasons_total{code=\"other\",direction=\"ingress\",kind=\"deny\",outcome=\"denied\"} 10"
        ));
        assert!(text.contains(
            "rempart_decision_reasons_total{code=\"other\",direction=\"egress\",kind=\"deny\",outcome=\"monitored\"} 1"
        ));
    }

    #[test]
    fn egress_decisions_by_country_and_jurisdiction() {
        let m = Metrics::new();
        m.egress_decision(
            Some("DE"),
            Some("US"),
            "non_eu_operator_in_eu",
            Outcome::Denied,
        );
        m.egress_decision(None, None, "something new", Outcome::Error);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "rempart_egress_decisions_total{country=\"DE\",jurisdiction=\"US\",outcome=\"denied\",sovereign=\"non_eu_operator_in_eu\"} 1"
        ), "{text}");
        assert!(text.contains(
            "rempart_egress_decisions_total{country=\"unknown\",jurisdiction=\"unknown\",outcome=\"error\",sovereign=\"unknown\"} 1"
        ), "{text}");
    }
}
