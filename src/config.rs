//! The configuration file (TOML) and the command-line overrides.
//!
//! Every key is documented in `docs/configuration.md`. Unknown keys are an
//! error: a misspelt `enforce` must never silently become the default.
//! Values that need parsing (addresses, URLs, durations, CIDRs) are parsed
//! while the TOML is read, so that an error names the file, line and column.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer};

/// The whole configuration, with every default filled in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub identity: IdentityConfig,
    pub geo: GeoConfig,
    pub egress: EgressConfig,
    pub report: ReportConfig,
    pub classify: ClassifyConfig,
}

/// The sovereignty report served at the admin listener's `/report`
/// (`rempart report` takes the same from its flags).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Declared-facts file (vendor, contracts, certifications); without
    /// it the declared criteria are not judged.
    pub facts: Option<PathBuf>,
    /// How far back `/report` reads the trail.
    pub window: Seconds,
    /// At most this many decision records are read per `/report` request.
    pub max_records: u64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            facts: None,
            window: Seconds(Duration::from_secs(7 * 86_400)),
            max_records: 200_000,
        }
    }
}

/// How requests are classified: which CRM profiles say what a request
/// touches (`input.resource`), and how much of a body they may read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Profiles tried in order: built-in names (`creme`, `generic`,
    /// `suitecrm`, `odoo`, `dolibarr`) or paths to profile files (`.json`).
    pub profiles: Vec<String>,
    /// A route that reads the body (JSON-RPC) reads at most this many
    /// bytes; a larger body is streamed on uninspected.
    pub body_inspect_max_bytes: usize,
    /// Bound on waiting for such a body before deciding without it.
    pub body_inspect_timeout: Seconds,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            profiles: vec!["generic".into()],
            body_inspect_max_bytes: 64 * 1024,
            body_inspect_timeout: Seconds(Duration::from_secs(5)),
        }
    }
}

/// The egress forward proxy: the listener the CRM reaches through
/// `HTTP_PROXY` / `HTTPS_PROXY` for its own outbound calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Address of the egress listener, e.g. `127.0.0.1:3128`. No egress
    /// listener when absent.
    pub listen: Option<SocketAddr>,
    /// DNS servers (`ip:port`, UDP then TCP) used to resolve destinations.
    /// Empty: the system resolver (`/etc/hosts`, `/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// Bound on resolving one destination name.
    pub dns_timeout: Seconds,
    /// Bound on connecting to the chosen destination address.
    pub connect_timeout: Seconds,
    /// Bound on waiting for a plain HTTP destination's response head.
    pub response_timeout: Seconds,
    /// A tunnel with no byte moving either way for this long is closed.
    pub tunnel_idle_timeout: Seconds,
    /// A tunnel is closed after this long whatever it does.
    pub tunnel_max_duration: Seconds,
    /// Open tunnels and plain requests in flight, over all workers; more
    /// are refused with `503`.
    pub max_connections: usize,
    /// Largest request head accepted, in bytes (hyper's minimum is 8192);
    /// larger ones are refused with `431`.
    pub max_header_bytes: usize,
    /// Bytes of enlarged (`pipe-max-size`) pipes that tunnels moving bulk
    /// data may hold at once, over all workers; 0 keeps every tunnel's
    /// pipes at the kernel's default 64 KiB.
    pub tunnel_pipe_budget: ByteSize,
    /// How long a client may take to send its request head.
    pub header_read_timeout: Seconds,
    /// Names of the workloads that use this proxy, by source address.
    pub workloads: Vec<WorkloadConfig>,
    /// Require `Proxy-Authorization: Basic` from one of `users`; `407`
    /// otherwise.
    pub require_proxy_auth: bool,
    /// Accounts for `Proxy-Authorization: Basic`.
    pub users: Vec<ProxyUser>,
    /// TLS on the egress listener (an HTTPS proxy), with optional client
    /// certificates that name the calling workload. Same keys as
    /// `[server.tls]`.
    pub tls: Option<ServerTlsConfig>,
}

/// A workload name for the egress requests coming from `sources`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    /// Source networks of this workload's requests.
    #[serde(default)]
    pub sources: Vec<Cidr>,
    /// Client certificates that stand for this workload (with
    /// `[egress.tls]` and a `client_ca`), each as `kind:value` with kind
    /// `uri`, `dns`, `email`, `ip` (subject alternative names), `cn`
    /// (subject common name) or `sha256` (certificate fingerprint, hex).
    #[serde(default)]
    pub certificates: Vec<String>,
}

/// The `kind:` prefixes a `[[egress.workloads]] certificates` entry may use.
pub const CERTIFICATE_MATCH_KINDS: &[&str] = &["uri", "dns", "email", "ip", "cn", "sha256"];

/// One `Proxy-Authorization: Basic` account. The password is stored as its
/// SHA-256 (hex), never in clear.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyUser {
    pub name: String,
    pub password_sha256: String,
    /// The workload this account stands for (overrides the source match).
    pub workload: Option<String>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            listen: None,
            dns_servers: Vec::new(),
            dns_timeout: Seconds(Duration::from_secs(2)),
            connect_timeout: Seconds(Duration::from_secs(5)),
            response_timeout: Seconds(Duration::from_secs(60)),
            tunnel_idle_timeout: Seconds(Duration::from_secs(300)),
            tunnel_max_duration: Seconds(Duration::from_secs(3600)),
            max_connections: 4096,
            max_header_bytes: 16 * 1024,
            tunnel_pipe_budget: ByteSize(16 << 20),
            header_read_timeout: Seconds(Duration::from_secs(10)),
            workloads: Vec::new(),
            require_proxy_auth: false,
            users: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// Country database: MaxMind GeoIP2/GeoLite2 Country or City, or an
    /// ip-location-db / DB-IP file (`{"country_code"}` records).
    pub country_db: Option<PathBuf>,
    /// ASN database (GeoLite2-ASN shape).
    pub asn_db: Option<PathBuf>,
    /// Country where each AS is registered (`{"country_code"}` records).
    pub as_country_db: Option<PathBuf>,
    /// Operator registry; the copy built into the binary when absent.
    pub operators: Option<PathBuf>,
    /// EU, EEA and adequacy lists; the built-in copy when absent.
    pub countries: Option<PathBuf>,
    /// Start even when a configured database is missing or unreadable
    /// (its fields are then null, which the shipped policies treat as
    /// not sovereign).
    pub optional: bool,
    /// How often the files are checked for changes; 0 disables.
    pub reload_interval: Seconds,
    /// Also look up private, loopback and other non-public addresses in
    /// the databases (for companies that map their internal networks to
    /// sites in their own MMDB). Off: such addresses have no location.
    pub locate_non_public: bool,
}

impl Default for GeoConfig {
    fn default() -> Self {
        GeoConfig {
            country_db: None,
            asn_db: None,
            as_country_db: None,
            operators: None,
            countries: None,
            optional: false,
            reload_interval: Seconds(Duration::from_secs(60)),
            locate_non_public: false,
        }
    }
}

impl GeoConfig {
    pub fn files(&self) -> crate::geo::GeoFiles {
        crate::geo::GeoFiles {
            country_db: self.country_db.clone(),
            asn_db: self.asn_db.clone(),
            as_country_db: self.as_country_db.clone(),
            operators: self.operators.clone(),
            countries: self.countries.clone(),
            locate_non_public: self.locate_non_public,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A non-empty `deny` set blocks the request.
    #[default]
    Enforce,
    /// Nothing is blocked; the audit record says what would have been.
    Monitor,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub mode: Mode,
    /// Worker threads, each with its own event loop and listening socket
    /// (`SO_REUSEPORT`). 0 means one per CPU core.
    pub workers: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Seconds,
    /// Timeout for reading a client's request head (and for the TLS
    /// handshake when `[server.tls]` is set).
    pub header_read_timeout: Seconds,
    /// TLS termination on the ingress listener; plain HTTP when absent.
    pub tls: Option<ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            mode: Mode::Enforce,
            workers: 0,
            drain_timeout: Seconds(Duration::from_secs(30)),
            header_read_timeout: Seconds(Duration::from_secs(30)),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the CRM, e.g. `http://127.0.0.1:8000`. Required.
    pub url: Option<UpstreamUrl>,
    pub connect_timeout: Seconds,
    /// Time allowed for the upstream to send its response head.
    pub response_timeout: Seconds,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Seconds,
    /// Pooled idle connections kept per worker.
    pub pool_max_idle: usize,
    /// Forward the client's `Host` header unchanged (CRMs check it for CSRF).
    pub preserve_host: bool,
    /// TLS to an `https://` upstream.
    pub tls: UpstreamTlsConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            connect_timeout: Seconds(Duration::from_secs(5)),
            response_timeout: Seconds(Duration::from_secs(60)),
            pool_idle_timeout: Seconds(Duration::from_secs(90)),
            pool_max_idle: 256,
            preserve_host: true,
            tls: UpstreamTlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// What to do when a policy cannot be evaluated (error or timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Refuse the request with `503` (fail closed).
    #[default]
    Deny,
    /// Let the request through and record the error (fail open).
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Directory of `.rego` and `data.json` files. When absent, `./policies`
    /// is used if it exists, else the set built into the binary.
    pub dir: Option<PathBuf>,
    pub on_error: OnError,
    /// Wall-clock limit of one evaluation.
    pub eval_timeout: Seconds,
    /// How often the policy directory is checked for changes; 0 disables.
    pub reload_interval: Seconds,
    /// Request headers whose values policies never see, in addition to
    /// the credentials always redacted (see [`ALWAYS_REDACTED`]).
    pub redact_headers: Vec<HeaderName>,
    /// Extra input shapes: `envoy` adds OPA-Envoy's `attributes`,
    /// `parsed_path` and `parsed_query` to every ingress input.
    pub input_compat: InputCompat,
    /// The rule whose value decides, as a slash path (`envoy/authz/allow`);
    /// `rempart/decision` when absent.
    pub decision: Option<String>,
    /// An OPA bundle (file, directory or bundle server) instead of `dir`.
    pub bundle: Option<BundleConfig>,
    /// Decisions each worker thread keeps, keyed on the input fields the
    /// policies read; 0 turns the cache off.
    pub decision_cache: usize,
}

/// `[policy] input_compat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputCompat {
    /// rempart's input only.
    #[default]
    None,
    /// rempart's input plus OPA-Envoy's fields.
    Envoy,
}

/// `envoy/authz/allow` (as OPA's `path` setting) or `data.envoy.authz.allow`
/// -> `data.envoy.authz.allow`.
pub fn decision_entry(path: &str) -> anyhow::Result<String> {
    let trimmed = path.trim_matches('/');
    let dotted = trimmed
        .strip_prefix("data.")
        .map(str::to_string)
        .unwrap_or_else(|| trimmed.replace('/', "."));
    let valid = !dotted.is_empty()
        && dotted.split('.').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with(|c: char| c.is_ascii_digit())
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !valid {
        anyhow::bail!(
            "{path:?} is not a rule path: write package and rule separated by '/', e.g. \"envoy/authz/allow\""
        );
    }
    Ok(format!("data.{dotted}"))
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            dir: None,
            on_error: OnError::Deny,
            eval_timeout: Seconds(Duration::from_millis(100)),
            reload_interval: Seconds(Duration::from_secs(2)),
            redact_headers: Vec::new(),
            input_compat: InputCompat::None,
            decision: None,
            decision_cache: 1024,
            bundle: None,
        }
    }
}

impl PolicyConfig {
    /// The decision rule as a `data.` path.
    pub fn entry(&self) -> anyhow::Result<String> {
        match &self.decision {
            None => Ok(crate::policy::ENTRY_POINT.to_string()),
            Some(d) => decision_entry(d).map_err(|e| anyhow::anyhow!("[policy] decision: {e}")),
        }
    }

    /// Every header whose value policies never see: the credentials
    /// always redacted, then the configured ones.
    pub fn redacted_headers(&self) -> Vec<http::HeaderName> {
        ALWAYS_REDACTED
            .iter()
            .map(|h| http::HeaderName::from_static(h))
            .chain(self.redact_headers.iter().map(|h| h.0.clone()))
            .collect()
    }
}

/// Credential headers whose values never reach a policy.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
];

/// Which decisions get an audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuditRecordScope {
    /// Every decision.
    #[default]
    All,
    /// Only decisions with a deny or warn reason, and errors.
    DenyAndWarn,
}

/// When a request's record must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Records are written in batches, without fsync; a crash loses at most
    /// the batch in flight (see docs/audit.md).
    #[default]
    #[serde(alias = "async")]
    Buffered,
    /// A response is sent only once its record is written and fsynced
    /// (group commit); if that fails the client gets `failure_status`.
    Sync,
}

/// What a request does when the audit queue is full (buffered mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Wait for the writer to make room: nothing is lost.
    #[default]
    Block,
    /// Drop the record, count it, and note the loss in the trail.
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub record: AuditRecordScope,
    pub durability: Durability,
    /// Status answered, in sync mode, when a record cannot be made durable.
    pub failure_status: u16,
    /// How long the writer lets records gather before writing a batch
    /// (buffered mode only).
    pub flush_interval: Seconds,
    /// Records queued in memory before `on_full` applies.
    pub queue_capacity: usize,
    pub on_full: OnFull,
    /// Rotate once the file would exceed this many bytes (0 = never).
    pub rotate_size: ByteSize,
    /// Rotate once the file's first record is this old (0 = never).
    pub rotate_age: Seconds,
    /// Rotated files kept; older ones are deleted (0 = keep all).
    pub rotate_keep: usize,
    /// Ed25519 private key signing periodic checkpoints (none: no checkpoints).
    pub checkpoint_key: Option<PathBuf>,
    /// Sign after this many records (0 = not by count).
    pub checkpoint_records: u64,
    /// Sign records this old at the latest (0 = not by time).
    pub checkpoint_interval: Seconds,
    /// Copy every record to standard output as a JSON line.
    pub stdout: bool,
    /// Copy every record to syslog: `udp://…`, `tcp://…` or `unix:///…`.
    pub syslog: Option<String>,
    pub syslog_facility: String,
    /// Batches each sink may hold before it drops (and counts) lines.
    pub sink_queue_capacity: usize,
    /// Data minimisation of `source.ip`: keep, truncate, remove.
    pub mask_source_ip: crate::audit::privacy::IpMasking,
    /// Data minimisation of `identity.subject`: keep, hash, remove.
    pub mask_subject: crate::audit::privacy::SubjectMasking,
    /// Secret key of the subject pseudonyms (`mask_subject = "hash"`).
    pub subject_hash_key: Option<PathBuf>,
    /// CA bundle verifying a `tls://` syslog collector (none: Mozilla roots).
    pub syslog_ca: Option<PathBuf>,
    /// Client certificate (PEM chain) presented to a `tls://` syslog collector.
    pub syslog_client_cert: Option<PathBuf>,
    pub syslog_client_key: Option<PathBuf>,
    /// OPA-compatible decision-log upload; off when the table is absent.
    pub decision_log: Option<DecisionLogConfig>,
}

/// `[audit.decision_log]`: decision-log events (OPA's format) uploaded as
/// gzip JSON arrays to a collector, through a disk spool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogConfig {
    /// Collector endpoint, `http://…` or `https://…` (e.g. `…/logs`).
    pub url: String,
    /// CA bundle verifying an https collector (none: Mozilla roots).
    pub ca: Option<PathBuf>,
    /// File holding a bearer token, read before each upload.
    pub bearer_token_file: Option<PathBuf>,
    /// Bound on one upload (connect, send, answer).
    pub timeout: Seconds,
    /// A batch is closed once its JSON reaches this size…
    pub batch_max_bytes: ByteSize,
    /// …or once its first event is this old.
    pub batch_interval: Seconds,
    /// Directory of batches waiting for the collector
    /// (default: the trail path + `.spool`).
    pub spool_dir: Option<PathBuf>,
    /// Bound on the spool directory's batch files.
    pub spool_max_bytes: ByteSize,
    /// First retry delay after a failed upload; doubled each failure…
    pub backoff_min: Seconds,
    /// …up to this.
    pub backoff_max: Seconds,
    /// Added to every event's `labels` (besides `id` and `version`).
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            url: String::new(),
            ca: None,
            bearer_token_file: None,
            timeout: Seconds(Duration::from_secs(10)),
            batch_max_bytes: ByteSize(512 * 1024),
            batch_interval: Seconds(Duration::from_secs(1)),
            spool_dir: None,
            spool_max_bytes: ByteSize(256 * 1024 * 1024),
            backoff_min: Seconds(Duration::from_secs(1)),
            backoff_max: Seconds(Duration::from_secs(120)),
            labels: Default::default(),
        }
    }
}

impl DecisionLogConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("[audit.decision_log] url = {:?}: {e}", self.url))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            bail!(
                "[audit.decision_log] url = {:?}: write http://HOST[:PORT]/PATH or https://HOST[:PORT]/PATH",
                self.url
            );
        }
        if self.batch_max_bytes.0 < 1024 {
            bail!("[audit.decision_log] batch_max_bytes must be at least 1KiB");
        }
        if self.spool_max_bytes.0 < 2 * self.batch_max_bytes.0 {
            bail!(
                "[audit.decision_log] spool_max_bytes ({}) must be at least twice batch_max_bytes ({})",
                self.spool_max_bytes.0,
                self.batch_max_bytes.0
            );
        }
        if self.timeout.0.is_zero() || self.batch_interval.0.is_zero() {
            bail!("[audit.decision_log] timeout and batch_interval must be more than 0s");
        }
        if self.backoff_min.0.is_zero() || self.backoff_min.0 > self.backoff_max.0 {
            bail!("[audit.decision_log] backoff_min must be more than 0s and at most backoff_max");
        }
        for key in ["id", "version"] {
            if self.labels.contains_key(key) {
                bail!("[audit.decision_log] labels: {key:?} is set by rempart and cannot be configured");
            }
        }
        Ok(())
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: PathBuf::from("./rempart-audit.jsonl"),
            record: AuditRecordScope::All,
            durability: Durability::Buffered,
            failure_status: 503,
            flush_interval: Seconds(Duration::from_millis(5)),
            queue_capacity: 16_384,
            on_full: OnFull::Block,
            rotate_size: ByteSize(0),
            rotate_age: Seconds(Duration::ZERO),
            rotate_keep: 0,
            checkpoint_key: None,
            checkpoint_records: 1000,
            checkpoint_interval: Seconds(Duration::from_secs(60)),
            stdout: false,
            syslog: None,
            syslog_facility: "local0".into(),
            sink_queue_capacity: 1024,
            mask_source_ip: Default::default(),
            mask_subject: Default::default(),
            subject_hash_key: None,
            syslog_ca: None,
            syslog_client_cert: None,
            syslog_client_key: None,
            decision_log: None,
        }
    }
}

/// A size written as `"100MB"`, `"64KiB"`, `"1GB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?} (write e.g. \"100MB\", \"64KiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1_000,
            "kib" => 1 << 10,
            "mb" | "m" => 1_000_000,
            "mib" => 1 << 20,
            "gb" | "g" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// A header set by an authenticating proxy in front of rempart, e.g.
    /// `x-remote-user`. Honoured only from `trusted_sources`; stripped from
    /// every other request before it reaches the CRM.
    pub trusted_header: Option<HeaderName>,
    /// Optional header carrying comma-separated roles, same trust rules.
    pub roles_header: Option<HeaderName>,
    /// Source networks allowed to set the trusted headers.
    pub trusted_sources: Vec<Cidr>,
    /// Remove the bearer token (the `Authorization` header, or the
    /// `[identity.jwt] cookie`) before forwarding, for a CRM that must not
    /// see it.
    pub strip_credentials: bool,
    /// JWT / OIDC bearer tokens.
    pub jwt: Option<JwtConfig>,
}

/// A duration written as `"250ms"`, `"5s"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Seconds).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (write e.g. \"250ms\", \"5s\", \"2m\")"
            ))
        })
    }
}

/// The upstream base URL: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path prefix without trailing slash ("" when none).
    pub prefix: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = s
            .parse()
            .with_context(|| format!("invalid upstream URL {s:?}"))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == http::uri::Scheme::HTTP => s.clone(),
            Some(s) if *s == http::uri::Scheme::HTTPS => s.clone(),
            _ => bail!("upstream URL {s:?} must start with http:// or https://"),
        };
        let Some(authority) = uri.authority().cloned() else {
            bail!("upstream URL {s:?} has no host");
        };
        if uri.query().is_some() {
            bail!("upstream URL {s:?} must not have a query string");
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            scheme,
            authority,
            prefix,
        })
    }

    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.is_https() { 443 } else { 80 })
    }

    pub fn is_https(&self) -> bool {
        self.scheme == http::uri::Scheme::HTTPS
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpstreamUrl::parse(&s).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// A lower-cased HTTP header name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub http::HeaderName);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
            .map(HeaderName)
            .map_err(|_| serde::de::Error::custom(format!("invalid header name {s:?}")))
    }
}

/// A network such as `10.0.0.0/8` or `::1/128`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Cidr(ipnet::IpNet::from(ip)))
            .map_err(|_| anyhow::anyhow!("invalid network {s:?} (write e.g. \"10.0.0.0/8\")"))
    }

    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        let ip = crate::pipeline::locate::canonical_ip(*ip);
        self.0.contains(&ip)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Config {
    /// Reads and checks a configuration file. Errors name the file and,
    /// for syntax and value errors, the line and column.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| {
            // toml's message reads "TOML parse error at line L, column C" plus a
            // snippet; keep it whole, it is the precise part.
            e.to_string().trim_end().to_string()
        })
    }

    /// Checks that need the whole configuration.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(b) = &self.policy.bundle {
            b.validate(self.policy.dir.is_some())?;
        }
        if self.upstream.url.is_none() && self.egress.listen.is_none() {
            bail!("no upstream and no egress listener: set [upstream] url (or pass --upstream URL to rempart serve) for the ingress proxy, and/or [egress] listen for the egress proxy");
        }
        if let (Some(e), Some(u)) = (self.egress.listen, self.upstream.url.as_ref()) {
            if e == self.server.listen {
                bail!("[egress] listen {e} is the same address as [server] listen (the ingress proxy to {u})");
            }
        }
        crate::profile::Profiles::load(&self.classify.profiles)?;
        if self.classify.body_inspect_max_bytes > 16 * 1024 * 1024 {
            bail!("[classify] body_inspect_max_bytes is at most 16 MiB (the body is held in memory while it is inspected)");
        }
        self.policy.entry()?;
        if self.egress.max_header_bytes < 8192 {
            bail!("[egress] max_header_bytes must be at least 8192");
        }
        if self.egress.max_connections == 0 {
            bail!("[egress] max_connections must be at least 1");
        }
        if self.egress.require_proxy_auth && self.egress.users.is_empty() {
            bail!("[egress] require_proxy_auth is set but no [[egress.users]] is configured");
        }
        for u in &self.egress.users {
            let h = &u.password_sha256;
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("[[egress.users]] {:?}: password_sha256 must be 64 hex digits (e.g. `printf %s PASSWORD | sha256sum`)", u.name);
            }
        }
        for w in &self.egress.workloads {
            if w.name.is_empty() || (w.sources.is_empty() && w.certificates.is_empty()) {
                bail!("[[egress.workloads]] entries need a name and at least one source network or certificate");
            }
            for c in &w.certificates {
                let kind = c.split_once(':').map(|(k, _)| k);
                if !kind.is_some_and(|k| CERTIFICATE_MATCH_KINDS.contains(&k)) {
                    bail!(
                        "[[egress.workloads]] {:?}: certificate {c:?} must be kind:value with kind one of {}",
                        w.name,
                        CERTIFICATE_MATCH_KINDS.join(", ")
                    );
                }
            }
            if !w.certificates.is_empty()
                && self
                    .egress
                    .tls
                    .as_ref()
                    .is_none_or(|t| t.client_ca.is_none())
            {
                bail!(
                    "[[egress.workloads]] {:?} names certificates but [egress.tls] has no client_ca: no client certificate would ever be checked",
                    w.name
                );
            }
        }
        if let Some(tls) = &self.egress.tls {
            tls.validate("egress.tls")?;
        }
        if self.identity.trusted_header.is_some() && self.identity.trusted_sources.is_empty() {
            bail!(
                "[identity] trusted_header is set but trusted_sources is empty: \
                 name the networks of the authenticating proxy allowed to set it"
            );
        }
        if self.identity.roles_header.is_some() && self.identity.trusted_header.is_none() {
            bail!(
                "[identity] roles_header is set without trusted_header: roles are only \
                 believed together with a trusted user header"
            );
        }
        if let Some(tls) = &self.server.tls {
            tls.validate("server.tls")?;
        }
        self.upstream.tls.validate()?;
        if let Some(jwt) = &self.identity.jwt {
            jwt.validate()?;
        }
        if self.identity.strip_credentials && self.identity.jwt.is_none() {
            bail!(
                "[identity] strip_credentials is set without [identity.jwt]: there is no \
                 token to strip"
            );
        }
        if self.audit.queue_capacity == 0 {
            bail!("[audit] queue_capacity must be at least 1");
        }
        if !(500..=599).contains(&self.audit.failure_status) {
            bail!(
                "[audit] failure_status = {}: must be a 5xx status (the request failed on rempart's side)",
                self.audit.failure_status
            );
        }
        if let Some(target) = &self.audit.syslog {
            crate::audit::sinks::SyslogTarget::parse(target)
                .map_err(|e| anyhow::anyhow!("[audit] syslog: {e:#}"))?;
        }
        if crate::audit::sinks::facility_code(&self.audit.syslog_facility).is_none() {
            bail!(
                "[audit] syslog_facility = {:?}: use kern, user, daemon, auth, authpriv or local0..local7",
                self.audit.syslog_facility
            );
        }
        if self.audit.mask_subject == crate::audit::privacy::SubjectMasking::Hash
            && self.audit.subject_hash_key.is_none()
        {
            bail!("[audit] mask_subject = \"hash\" needs subject_hash_key (a file of at least 16 random bytes)");
        }
        if let Some(dl) = &self.audit.decision_log {
            dl.validate()?;
        }
        if self.audit.syslog_client_cert.is_some() != self.audit.syslog_client_key.is_some() {
            bail!("[audit] syslog_client_cert and syslog_client_key go together");
        }
        let tls_target = self
            .audit
            .syslog
            .as_deref()
            .is_some_and(|t| t.starts_with("tls://"));
        if !tls_target
            && (self.audit.syslog_ca.is_some() || self.audit.syslog_client_cert.is_some())
        {
            bail!("[audit] syslog_ca / syslog_client_cert are only used with syslog = \"tls://HOST:PORT\"");
        }
        if self.audit.sink_queue_capacity == 0 {
            bail!("[audit] sink_queue_capacity must be at least 1");
        }
        if self.audit.checkpoint_key.is_some()
            && self.audit.checkpoint_records == 0
            && self.audit.checkpoint_interval.0.is_zero()
        {
            bail!(
                "[audit] checkpoint_key is set but checkpoint_records and checkpoint_interval \
                 are both 0: say how often to sign"
            );
        }
        if self.audit.durability == Durability::Sync && self.audit.on_full == OnFull::Drop {
            bail!(
                "[audit] on_full = \"drop\" cannot be combined with durability = \"sync\": \
                 in sync mode every response waits for its record, so a record is never dropped"
            );
        }
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        if self.server.workers > 0 {
            self.server.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

/// Whether the ingress listener asks for client certificates (mTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A certificate is asked for; a client without one still connects
    /// (identity method "none"), a client with an invalid one does not.
    Optional,
    /// A client without a valid certificate fails the handshake.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often `cert` and `key` are checked for changes (also on
    /// SIGHUP); 0 disables polling.
    #[serde(default = "default_tls_reload")]
    pub reload_interval: Seconds,
    /// PEM bundle of the CAs that sign client certificates (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
}

fn default_tls_reload() -> Seconds {
    Seconds(Duration::from_secs(10))
}

impl ServerTlsConfig {
    /// `table` names the configuration table in messages.
    fn validate(&self, table: &str) -> anyhow::Result<()> {
        match (self.client_auth, &self.client_ca) {
            (ClientAuth::None, Some(_)) => bail!(
                "[{table}] client_ca is set but client_auth = \"none\": \
                 say \"optional\" or \"required\""
            ),
            (ClientAuth::Optional | ClientAuth::Required, None) => bail!(
                "[{table}] client_auth = \"{}\" needs client_ca (the CA bundle that \
                 signs client certificates)",
                if self.client_auth == ClientAuth::Required {
                    "required"
                } else {
                    "optional"
                }
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CAs trusted for the upstream's certificate; the
    /// built-in Mozilla roots when absent.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) presented to the upstream.
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub client_key: Option<PathBuf>,
}

impl UpstreamTlsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            bail!("[upstream.tls] client_cert and client_key go together: set both or neither");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Expected `iss` claim. Required.
    pub issuer: String,
    /// Accepted `aud` values (one must match). Required.
    pub audiences: Vec<String>,
    /// JWKS from a file (reloaded on change)…
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// …or fetched from a URL (http:// or https://).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA bundle for an https `jwks_url`; the built-in roots when absent.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// How often the JWKS is fetched again (or the file checked).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval: Seconds,
    /// Least time between two fetches caused by an unknown `kid`.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_interval: Seconds,
    /// How long the last good keys are used after fetches start failing;
    /// past it every token is refused (`jwks_unavailable`).
    #[serde(default = "default_jwks_max_staleness")]
    pub jwks_max_staleness: Seconds,
    /// Time allowed for one JWKS fetch.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_fetch_timeout: Seconds,
    /// Tolerance on `exp` and `nbf`; at most 5 minutes.
    #[serde(default = "default_clock_skew")]
    pub clock_skew: Seconds,
    /// Longer tokens are refused without being parsed.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Read the token from this cookie when there is no
    /// `Authorization: Bearer` header.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Accepted signature algorithms (asymmetric only).
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// Dotted path of the roles claim, e.g. `realm_access.roles`.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Dotted path of the groups claim.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
}

fn default_jwks_refresh() -> Seconds {
    Seconds(Duration::from_secs(300))
}
fn default_jwks_min_refetch() -> Seconds {
    Seconds(Duration::from_secs(30))
}
fn default_jwks_max_staleness() -> Seconds {
    Seconds(Duration::from_secs(86_400))
}
fn default_jwks_timeout() -> Seconds {
    Seconds(Duration::from_secs(5))
}
fn default_clock_skew() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_jwt_algorithms() -> Vec<String> {
    [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ]
    .map(String::from)
    .to_vec()
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}

/// The most clock skew a JWT check tolerates.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

impl JwtConfig {
    fn validate(&self) -> anyhow::Result<()> {
        match (&self.jwks_file, &self.jwks_url) {
            (None, None) => bail!("[identity.jwt] needs jwks_file or jwks_url"),
            (Some(_), Some(_)) => bail!("[identity.jwt] set jwks_file or jwks_url, not both"),
            _ => {}
        }
        if let Some(url) = &self.jwks_url {
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("[identity.jwt] jwks_url {url:?} is not a URL"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                bail!("[identity.jwt] jwks_url {url:?} must be an http:// or https:// URL");
            }
        }
        if self.issuer.trim().is_empty() {
            bail!("[identity.jwt] issuer must not be empty");
        }
        if self.audiences.is_empty() {
            bail!("[identity.jwt] audiences must name at least one accepted audience");
        }
        if self.clock_skew.0 > MAX_CLOCK_SKEW {
            bail!("[identity.jwt] clock_skew must be at most 5m");
        }
        if self.max_token_bytes == 0 {
            bail!("[identity.jwt] max_token_bytes must be at least 1");
        }
        if self.algorithms.is_empty() {
            bail!("[identity.jwt] algorithms must not be empty");
        }
        for a in &self.algorithms {
            if a.starts_with("HS") || a.eq_ignore_ascii_case("none") {
                bail!(
                    "[identity.jwt] algorithm {a:?} is not accepted: only asymmetric \
                     signatures can be checked against a JWKS"
                );
            }
            if a.parse::<jsonwebtoken::Algorithm>().is_err() {
                bail!("[identity.jwt] unknown algorithm {a:?}");
            }
        }
        if let Some(c) = &self.cookie {
            if c.is_empty() || c.contains([';', '=', ' ', ',']) {
                bail!("[identity.jwt] cookie {c:?} is not a valid cookie name");
            }
        }
        for (key, path) in [
            ("roles_claim", &self.roles_claim),
            ("groups_claim", &self.groups_claim),
        ] {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                bail!("[identity.jwt] {key} {path:?} must be a dotted claim path like \"realm_access.roles\"");
            }
        }
        Ok(())
    }
}

/// `[policy.bundle]`: where the OPA bundle comes from and how it is
/// accepted (see docs/policies.md, "Distributing policies as bundles").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleConfig {
    /// A local bundle: `.tar.gz` file or directory (watched like `dir`).
    pub path: Option<PathBuf>,
    /// The bundle's name in decision-log events (`bundles.<name>`);
    /// default: the file name of `path` or `url` without `.tar.gz`.
    pub name: Option<String>,
    /// A bundle server URL polled with `ETag` / `If-None-Match`.
    pub url: Option<String>,
    /// Where the last good downloaded bundle is kept, so that rempart
    /// starts when the server is down.
    pub persist_dir: PathBuf,
    /// Polling waits a random time between these two after a success.
    pub poll_min: Seconds,
    pub poll_max: Seconds,
    /// After a failed download, waits double from `backoff_min` up to
    /// `backoff_max` (with jitter).
    pub backoff_min: Seconds,
    pub backoff_max: Seconds,
    /// Limit of one download, headers and body.
    pub timeout: Seconds,
    /// File holding a bearer token sent as `Authorization: Bearer`; read
    /// before every download so that it can be rotated.
    pub bearer_token_file: Option<PathBuf>,
    /// PEM CA bundle to verify an `https` server (default: the system's
    /// public roots).
    pub ca: Option<PathBuf>,
    /// Largest bundle accepted as stored or downloaded (compressed).
    pub max_bytes: u64,
    /// Largest total size its files may unpack to.
    pub max_uncompressed_bytes: u64,
    /// When present, only bundles signed with this key are accepted.
    pub signing: Option<BundleSigningConfig>,
}

impl Default for BundleConfig {
    fn default() -> Self {
        BundleConfig {
            path: None,
            name: None,
            url: None,
            persist_dir: PathBuf::from("rempart-bundle"),
            poll_min: Seconds(Duration::from_secs(60)),
            poll_max: Seconds(Duration::from_secs(120)),
            backoff_min: Seconds(Duration::from_secs(1)),
            backoff_max: Seconds(Duration::from_secs(120)),
            timeout: Seconds(Duration::from_secs(30)),
            bearer_token_file: None,
            ca: None,
            max_bytes: 32 << 20,
            max_uncompressed_bytes: 256 << 20,
            signing: None,
        }
    }
}

impl BundleConfig {
    fn validate(&self, has_dir: bool) -> anyhow::Result<()> {
        match (&self.path, &self.url) {
            (Some(_), Some(_)) => bail!("[policy.bundle] set path or url, not both"),
            (None, None) => bail!(
                "[policy.bundle] needs path (a bundle file or directory) or url (a bundle server)"
            ),
            _ => {}
        }
        if has_dir {
            bail!("[policy] dir and [policy.bundle] are both set: choose one source of policies");
        }
        if let Some(url) = &self.url {
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("[policy.bundle] url {url:?}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                bail!("[policy.bundle] url {url:?} must be an http:// or https:// URL");
            }
        }
        if self.poll_min.0.is_zero() || self.poll_max.0 < self.poll_min.0 {
            bail!("[policy.bundle] poll_min must be above zero and poll_max at least poll_min");
        }
        if self.backoff_min.0.is_zero() || self.backoff_max.0 < self.backoff_min.0 {
            bail!("[policy.bundle] backoff_min must be above zero and backoff_max at least backoff_min");
        }
        if self.max_bytes == 0 || self.max_uncompressed_bytes < self.max_bytes {
            bail!("[policy.bundle] max_bytes must be above zero and max_uncompressed_bytes at least max_bytes");
        }
        Ok(())
    }
}

/// `[policy.bundle.signing]`: the key `.signatures.json` must verify with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSigningConfig {
    /// PEM public key (RSA, EC, Ed25519), or the shared secret for HS*.
    pub public_key: PathBuf,
    /// JWT algorithm, as in OPA's `keys.<id>.algorithm`.
    #[serde(default = "default_bundle_algorithm")]
    pub algorithm: String,
    /// When set, a signature naming another key id (`kid`) is refused.
    pub keyid: Option<String>,
    /// The `scope` claim the signature must carry (OPA's `signing.scope`).
    pub scope: Option<String>,
}

fn default_bundle_algorithm() -> String {
    "RS256".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nmdoe = \"monitor\"\n")
            .unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("mdoe"), "{err}");
    }

    #[test]
    fn bad_values_name_their_line() {
        let err = Config::from_toml("[upstream]\n\nurl = \"ftp://x\"\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("http://"), "{err}");
        let err = Config::from_toml("[policy]\neval_timeout = \"fast\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("invalid duration"),
            "{err}"
        );
        let err = Config::from_toml("[server]\nmode = \"audit\"\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("enforce"), "{err}");
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::from_toml("[upstream]\nurl = \"http://127.0.0.1:8000/crm/\"\n").unwrap();
        assert_eq!(c.server.mode, Mode::Enforce);
        assert_eq!(c.policy.on_error, OnError::Deny);
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        let url = c.upstream.url.unwrap();
        assert_eq!(url.prefix, "/crm");
        assert_eq!(url.port(), 8000);
    }

    #[test]
    fn trusted_header_needs_trusted_sources() {
        let mut c =
            Config::from_toml("[upstream]\nurl = \"http://127.0.0.1:1\"\n[identity]\ntrusted_header = \"X-Remote-User\"\n")
                .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("trusted_sources"));
        c.identity.trusted_sources = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        c.validate().unwrap();
        assert_eq!(
            c.identity.trusted_header.unwrap().0.as_str(),
            "x-remote-user"
        );
    }

    #[test]
    fn audit_sizes_and_modes_parse_and_conflicts_are_refused() {
        let c = Config::from_toml(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[audit]\ndurability = \"sync\"\nrotate_size = \"64KiB\"\nrotate_age = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.audit.durability, Durability::Sync);
        assert_eq!(c.audit.rotate_size, ByteSize(65_536));
        assert_eq!(c.audit.rotate_age.0, Duration::from_secs(3600));
        c.validate().unwrap();
        assert_eq!(ByteSize::parse("100MB"), Ok(ByteSize(100_000_000)));
        assert_eq!(ByteSize::parse("12"), Ok(ByteSize(12)));
        assert!(ByteSize::parse("12 parsecs").unwrap_err().contains("unit"));
        let err = Config::from_toml("[audit]\nrotate_size = \"big\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("invalid size"),
            "{err}"
        );
        let c = Config::from_toml("[audit]\ndurability = \"async\"\n").unwrap();
        assert_eq!(c.audit.durability, Durability::Buffered);
        let mut c = Config::from_toml(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[audit]\ndurability = \"sync\"\non_full = \"drop\"\n",
        )
        .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("on_full"));
        c.audit.on_full = OnFull::Block;
        c.audit.failure_status = 200;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("failure_status"));
    }

    #[test]
    fn cidr_matches_ipv4_mapped_addresses() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(&"::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains(&"11.0.0.1".parse().unwrap()));
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    const BASE: &str = "[upstream]\nurl = \"https://crm.example.eu\"\n";

    #[test]
    fn https_upstream_defaults_to_port_443() {
        let c = Config::from_toml(BASE).unwrap();
        let url = c.upstream.url.unwrap();
        assert!(url.is_https());
        assert_eq!(url.port(), 443);
    }

    #[test]
    fn jwt_section_is_checked() {
        let ok = format!(
            "{BASE}[identity.jwt]\nissuer = \"https://idp\"\naudiences = [\"crm\"]\njwks_file = \"/x\"\n"
        );
        let c = Config::from_toml(&ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.identity.jwt.unwrap().max_token_bytes, 8192);
        let both = format!("{ok}jwks_url = \"http://idp/jwks\"\n");
        let err = Config::from_toml(&both).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let hs = format!("{ok}algorithms = [\"HS256\"]\n");
        let err = Config::from_toml(&hs).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("HS256"), "{err}");
        let skew = format!("{ok}clock_skew = \"10m\"\n");
        let err = Config::from_toml(&skew).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("clock_skew"), "{err}");
        let typo = format!("{ok}audience = \"crm\"\n");
        let err = Config::from_toml(&typo).unwrap_err();
        assert!(err.contains("audience") && err.contains("line 7"), "{err}");
    }

    #[test]
    fn mtls_needs_a_ca() {
        let t = format!(
            "{BASE}[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_auth = \"required\"\n"
        );
        let err = Config::from_toml(&t).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("client_ca"), "{err}");
    }
}
