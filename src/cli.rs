//! The command line: `rempart serve | check | policy eval | test | lint | fmt | …`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Mode, UpstreamUrl};
use crate::policy::{self, PolicySource};

#[derive(Parser, Debug)]
#[command(
    name = "rempart",
    version,
    about = "Sovereignty gateway: decides, with your Rego policies, who may touch your CRM's data and where it may go",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the policy-checked reverse proxy in front of a CRM, and/or the
    /// egress forward proxy for its outbound calls.
    Serve(ServeArgs),
    /// Validate a configuration file and the policies it names, then exit.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Policy directory (overrides the config file).
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
    },
    /// Work with policies without traffic.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Inspect the geo and jurisdiction data a policy sees.
    #[command(subcommand)]
    Geoip(GeoipCommand),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Score sovereignty on the 100-point, 11-criteria grid (docs/report.md)
    /// from the audit trail, the configuration and policies, and a
    /// declared-facts file.
    Report(ReportArgs),
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The deployment's configuration: mode, TLS, identity, audit, geo data
    /// and policies are judged, and its [audit] path is read when no
    /// --audit is given. Without it, enforcement is not judged.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Policy directory (overrides the config file's).
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Trail files or directories, oldest first (`.gz` accepted)
    /// [default: the config's [audit] path and its rotated files]
    #[arg(long, value_name = "FILE|DIR", num_args = 1..)]
    audit: Vec<PathBuf>,
    /// Declared facts (TOML: [vendor], [hosting]; docs/report.md)
    /// [default: the config's [report] facts]
    #[arg(long, value_name = "FILE")]
    facts: Option<PathBuf>,
    /// Records at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<std::time::SystemTime>,
    /// Records before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<std::time::SystemTime>,
    #[arg(long, value_enum, default_value = "markdown")]
    format: ReportFormat,
    /// Write here instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum ReportFormat {
    Markdown,
    Json,
    Html,
}

// Parsed once at start-up: the size of the query variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Walk the hash chain of one or more trail files (oldest first; `.gz`
    /// accepted; a directory stands for its trail files in chain order) and
    /// report the first broken link; exit non-zero if there is one.
    Verify {
        #[arg(required = true, value_name = "FILE|DIR")]
        files: Vec<PathBuf>,
        /// Ed25519 public key (PEM, raw or hex): also check the signed
        /// checkpoints, and require at least one.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// With --public-key: fail unless a checkpoint signs at least this
        /// seq (the last `rempart_audit_signed_seq` your monitoring saw).
        #[arg(long, value_name = "SEQ", requires = "public_key")]
        min_signed_seq: Option<u64>,
        /// With --public-key: fail if records follow the last checkpoint
        /// (a trail written up to a clean stop ends with one).
        #[arg(long, requires = "public_key")]
        strict: bool,
    },
    /// Print the decision records matching every filter given, as JSON
    /// lines (files oldest first; `.gz` accepted; a directory stands for
    /// its trail files in chain order).
    Query {
        #[arg(required = true, value_name = "FILE|DIR")]
        files: Vec<PathBuf>,
        /// Records at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<std::time::SystemTime>,
        /// Records before this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<std::time::SystemTime>,
        /// decision.outcome: allowed, denied, monitored or error.
        #[arg(long, value_name = "OUTCOME", value_parser = ["allowed", "denied", "monitored", "error"])]
        decision: Option<String>,
        /// identity.subject (the user name).
        #[arg(long)]
        subject: Option<String>,
        /// destination.geo.country (ISO 3166-1 alpha-2).
        #[arg(long, value_name = "CC")]
        country: Option<String>,
        /// destination.geo.operator (registry id, e.g. amazon).
        #[arg(long)]
        operator: Option<String>,
        /// destination.geo.sovereign (e.g. outside_eu).
        #[arg(long, value_name = "VERDICT")]
        sovereign: Option<String>,
        /// destination.geo.jurisdiction: the country whose law governs the
        /// destination's operator (e.g. US).
        #[arg(long, value_name = "CC")]
        jurisdiction: Option<String>,
        /// Destinations run by a known operator that is not an EU one (law
        /// of a country outside the EEA, or CLOUD Act), inside or outside
        /// the EU.
        #[arg(long)]
        non_eu_operator: bool,
        /// request.method (e.g. DELETE).
        #[arg(long)]
        method: Option<String>,
        /// request.path starts with this (e.g. /api/contacts).
        #[arg(long, value_name = "PREFIX")]
        path: Option<String>,
        /// ingress or egress.
        #[arg(long)]
        direction: Option<String>,
        /// resource.type (e.g. contact).
        #[arg(long = "type", value_name = "TYPE")]
        resource_type: Option<String>,
        /// resource.id.
        #[arg(long = "id", value_name = "ID")]
        resource_id: Option<String>,
        /// resource.operation (e.g. export, delete).
        #[arg(long)]
        operation: Option<String>,
        /// json: each record as in the trail; table: one aligned line a record.
        #[arg(long, value_parser = ["json", "table"], default_value = "json")]
        format: String,
    },
    /// Create an Ed25519 key pair for signed checkpoints: the private key
    /// (PKCS#8 PEM, mode 0600) at OUT, the public key at OUT.pub.
    Keygen {
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
}

/// Where the geo data comes from: the config file's [geo] table, with
/// flags overriding it.
#[derive(Args, Debug, Default)]
struct GeoArgs {
    /// Read [geo] from this configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Country database (GeoIP2/GeoLite2 Country or City, or ip-location-db).
    #[arg(long, value_name = "MMDB")]
    country_db: Option<PathBuf>,
    /// ASN database (GeoLite2-ASN shape).
    #[arg(long, value_name = "MMDB")]
    asn_db: Option<PathBuf>,
    /// AS registration country database (ip-location-db shape).
    #[arg(long, value_name = "MMDB")]
    as_country_db: Option<PathBuf>,
    /// Operator registry [default: built in]
    #[arg(long, value_name = "JSON")]
    operators: Option<PathBuf>,
    /// EU/EEA/adequacy lists [default: built in]
    #[arg(long, value_name = "JSON")]
    countries: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum GeoipCommand {
    /// Print, one JSON object per line, the `geo` object a policy sees for each address.
    Lookup {
        #[command(flatten)]
        geo: GeoArgs,
        #[arg(required = true, value_name = "IP")]
        ips: Vec<String>,
    },
    /// Print each loaded database's type, build date and record count, and the registry's version.
    Info {
        #[command(flatten)]
        geo: GeoArgs,
    },
    /// Build a GeoLite2-ASN-shaped MMDB from ip-location-db ASN CSV files
    /// (ip_range_start,ip_range_end,asn,as_organisation); used by geoip/fetch.sh.
    BuildAsn {
        #[arg(long = "csv", required = true, value_name = "CSV")]
        csv: Vec<PathBuf>,
        #[arg(long, value_name = "MMDB")]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file; flags below override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Ingress address [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// The CRM's base URL, e.g. http://127.0.0.1:8000
    #[arg(long, value_name = "URL", value_parser = parse_upstream)]
    upstream: Option<UpstreamUrl>,
    /// Admin address for /metrics, /healthz, /readyz [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
    /// Egress forward proxy address for the CRM's HTTP_PROXY/HTTPS_PROXY,
    /// e.g. 127.0.0.1:3128 [default: none]
    #[arg(long, value_name = "ADDR")]
    egress: Option<std::net::SocketAddr>,
    /// Policy directory [default: ./policies if present, else the built-in set]
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Audit trail file [default: ./rempart-audit.jsonl]
    #[arg(long, value_name = "PATH")]
    audit: Option<PathBuf>,
    /// enforce: deny blocks; monitor: nothing blocks, the trail says what would have [default: enforce]
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Worker threads [default: one per core]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Print the decision document for one input document.
    Eval {
        /// Policy directory [default: ./policies if present, else the built-in set]
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// Input JSON file, or - for standard input.
        #[arg(long, value_name = "FILE.json")]
        input: PathBuf,
        /// Evaluate with the tree-walking interpreter instead of the VM.
        #[arg(long)]
        interpreter: bool,
        /// Also print which deny/warn/allow definitions fired, with file
        /// and line, and the input values they read.
        #[arg(long)]
        explain: bool,
        /// Decision rule, as in `[policy] decision` [default: rempart/decision]
        #[arg(long, value_name = "PATH")]
        decision: Option<String>,
    },
    /// Build an OPA bundle (`.manifest`, `*.rego`, data files at their
    /// paths) from a policy directory, optionally signed; OPA accepts it too.
    Build {
        /// Policy directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The bundle to write, e.g. bundle.tar.gz.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        out: PathBuf,
        /// Manifest revision [default: sha256: digest of the sources]
        #[arg(long)]
        revision: Option<String>,
        /// Manifest root (repeatable) [default: everything]
        #[arg(long = "root", value_name = "PATH")]
        roots: Vec<String>,
        /// Sign the bundle (.signatures.json) with this PEM private key
        /// (or HMAC secret file for HS*).
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// JWT algorithm of the signature.
        #[arg(long, default_value = "RS256", requires = "signing_key")]
        signing_alg: String,
        /// Key id written in the signature's `kid` header.
        #[arg(long, requires = "signing_key")]
        signing_keyid: Option<String>,
        /// `scope` claim written in the signature.
        #[arg(long, requires = "signing_key")]
        signing_scope: Option<String>,
        /// Decision rule the bundle must define, as in `[policy] decision`
        /// [default: rempart/decision]
        #[arg(long, value_name = "PATH")]
        decision: Option<String>,
    },
    /// Run every `test_*` rule; exit non-zero if any fails.
    Test {
        /// Policy directories [default: ./policies if present, else the built-in set]
        dirs: Vec<PathBuf>,
        /// Decision rule the set defines, as in `[policy] decision`
        /// [default: rempart/decision]
        #[arg(long, value_name = "PATH")]
        decision: Option<String>,
    },
    /// Report syntax and compile errors, forbidden or unimplemented
    /// builtins (errors) and unused rules (warnings), as file:line:col;
    /// exit 1 on any error (on any warning too with --strict).
    Lint {
        /// Policy directories [default: ./policies if present, else the built-in set]
        dirs: Vec<PathBuf>,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
        /// Decision rule, as in `[policy] decision` [default: rempart/decision]
        #[arg(long, value_name = "PATH")]
        decision: Option<String>,
    },
    /// Fix the layout of .rego files (tabs, trailing whitespace, blank
    /// lines, final newline); with --check, only report and exit 1 if a
    /// file would change.
    Fmt {
        /// Policy directories [default: ./policies]
        dirs: Vec<PathBuf>,
        #[arg(long)]
        check: bool,
    },
}

fn parse_upstream(s: &str) -> Result<UpstreamUrl, String> {
    UpstreamUrl::parse(s).map_err(|e| format!("{e:#}"))
}

/// Policy directory resolution shared by every command.
pub fn policy_source(flag: Option<&Path>, config: Option<&Path>) -> PolicySource {
    if let Some(d) = flag.or(config) {
        if policy::bundle::looks_like_bundle_file(d) {
            return PolicySource::Bundle(policy::bundle::BundleSpec::local(d.to_path_buf()));
        }
        return PolicySource::Dir(d.to_path_buf());
    }
    let local = Path::new("./policies");
    if local.is_dir() {
        PolicySource::Dir(local.to_path_buf())
    } else {
        PolicySource::Builtin
    }
}

/// The policy source of serve and check: a `--policies` flag wins, then
/// `[policy.bundle]`, then `[policy] dir`.
fn configured_source(flag: Option<&Path>, cfg: &Config) -> anyhow::Result<PolicySource> {
    match (flag, &cfg.policy.bundle) {
        (None, Some(b)) => Ok(PolicySource::Bundle(
            policy::bundle::spec_from_config(b).context("[policy.bundle]")?,
        )),
        _ => Ok(policy_source(flag, cfg.policy.dir.as_deref())),
    }
}

/// Writes one line to standard output. A closed pipe (`| head`) ends the
/// command quietly instead of panicking.
fn emit(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(anyhow::Error::from)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logging();
            serve(args)
        }
        Command::Check { config, policies } => check(&config, policies.as_deref()),
        Command::Policy(PolicyCommand::Eval {
            policies,
            input,
            interpreter,
            explain,
            decision,
        }) => eval(
            policies.as_deref(),
            &input,
            interpreter,
            explain,
            decision.as_deref(),
        ),
        Command::Policy(PolicyCommand::Test { dirs, decision }) => test(&dirs, decision.as_deref()),
        Command::Policy(PolicyCommand::Lint {
            dirs,
            strict,
            decision,
        }) => lint(&dirs, strict, decision.as_deref()),
        Command::Policy(PolicyCommand::Fmt { dirs, check }) => fmt(&dirs, check),
        Command::Policy(PolicyCommand::Build {
            dir,
            out,
            revision,
            roots,
            signing_key,
            signing_alg,
            signing_keyid,
            signing_scope,
            decision,
        }) => (|| {
            let signing = signing_key
                .map(|k| {
                    policy::bundle::SigningKey::open(&k, &signing_alg, signing_keyid, signing_scope)
                })
                .transpose()?;
            let opts = policy::bundle::build::BuildOptions {
                revision,
                roots,
                signing,
                entry: entry_of(decision.as_deref())?,
            };
            let built = policy::bundle::build::build(&dir, &out, &opts)?;
            emit(&format!(
                "ok: {} (revision {}, {} files, {} bytes)",
                out.display(),
                built.revision,
                built.files,
                built.bytes
            ))?;
            Ok(ExitCode::SUCCESS)
        })(),
        Command::Geoip(GeoipCommand::Lookup { geo, ips }) => geoip_lookup(&geo, &ips),
        Command::Geoip(GeoipCommand::Info { geo }) => geoip_info(&geo),
        Command::Audit(AuditCommand::Verify {
            files,
            public_key,
            min_signed_seq,
            strict,
        }) => audit_verify(&files, public_key.as_deref(), min_signed_seq, strict),
        Command::Audit(AuditCommand::Keygen { out }) => audit_keygen(&out),
        Command::Audit(AuditCommand::Query {
            files,
            since,
            until,
            decision,
            subject,
            country,
            operator,
            sovereign,
            jurisdiction,
            non_eu_operator,
            method,
            path,
            direction,
            resource_type,
            resource_id,
            operation,
            format,
        }) => audit_query(
            &files,
            if format == "table" {
                crate::audit::query::Format::Table
            } else {
                crate::audit::query::Format::Json
            },
            &crate::audit::query::Filter {
                since,
                until,
                outcome: decision,
                subject,
                country,
                operator,
                sovereign,
                jurisdiction,
                non_eu_operator: match non_eu_operator {
                    true => match crate::geo::registry::Registry::builtin() {
                        Ok(r) => Some(std::sync::Arc::new(r)),
                        Err(e) => {
                            eprintln!("rempart: the built-in operator registry: {e:#}");
                            return ExitCode::FAILURE;
                        }
                    },
                    false => None,
                },
                method,
                path_prefix: path,
                direction,
                resource_type,
                resource_id,
                operation,
            },
        ),
        Command::Report(args) => report(&args),
        Command::Geoip(GeoipCommand::BuildAsn { csv, out }) => {
            crate::geo::build::asn_from_csv(&csv, &out).and_then(|n| {
                emit(&format!("wrote {} ({n} ranges)", out.display()))?;
                Ok(ExitCode::SUCCESS)
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rempart: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(v) = a.listen {
        cfg.server.listen = v;
    }
    if let Some(v) = a.upstream {
        cfg.upstream.url = Some(v);
    }
    if let Some(v) = a.admin {
        cfg.admin.listen = v;
    }
    if let Some(v) = a.egress {
        cfg.egress.listen = Some(v);
    }
    if let Some(v) = a.audit {
        cfg.audit.path = v;
    }
    if let Some(v) = a.mode {
        cfg.server.mode = v;
    }
    if let Some(v) = a.workers {
        cfg.server.workers = v;
    }
    let source = configured_source(a.policies.as_deref(), &cfg)?;
    crate::serve::run(cfg, source)?;
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path, policies: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = Config::from_file(path)?;
    cfg.validate()
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
    if let Some(parent) = cfg
        .audit
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        if !parent.is_dir() {
            return Err(anyhow!(
                "{}: [audit] path {}: directory {} does not exist",
                path.display(),
                cfg.audit.path.display(),
                parent.display()
            ));
        }
    }
    let source = configured_source(policies, &cfg)?;
    let set = policy::load_for(&source, &cfg.policy.entry()?)
        .with_context(|| format!("policies from {source}"))?;
    // The geo files are opened as serve opens them (a missing database is
    // an error unless [geo] optional = true).
    let geo = if cfg.geo.optional {
        crate::geo::GeoDb::open_lenient(&cfg.geo.files())
    } else {
        crate::geo::GeoDb::open(&cfg.geo.files())
    }
    .map_err(|e| anyhow!("{}: [geo] {e:#}", path.display()))?;
    check_identity_and_tls(&cfg).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
    if geo.country.is_none() {
        eprintln!(
            "warning: no country database ([geo] country_db): every public address is \
             located as unknown, which the shipped sovereignty rules deny; see docs/geo.md"
        );
    }
    emit(&format!(
        "ok: {} (upstream {}, mode {}); policies {} from {} ({} files)",
        path.display(),
        cfg.upstream
            .url
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_default(),
        cfg.server.mode,
        set.revision,
        source,
        set.files.len()
    ))?;
    // What the DSI needs to know to predict the cost of each request: does
    // a repeated request skip the policy, and on which fields.
    let cache = if cfg.policy.decision_cache == 0 {
        "off ([policy] decision_cache = 0)".to_string()
    } else if cfg.policy.input_compat == crate::config::InputCompat::Envoy {
        "off (input_compat = \"envoy\" builds the whole input)".to_string()
    } else {
        match set.cache_bypass() {
            Some(why) => format!("off ({why})"),
            None => format!(
                "{} decisions per worker thread, keyed on {}",
                cfg.policy.decision_cache,
                set.reads().paths().join(", ")
            ),
        }
    };
    emit(&format!("decision cache: {cache}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Opens the certificate, key, CA and JWKS files as serve would, and warns
/// when no identity source is configured.
fn check_identity_and_tls(cfg: &Config) -> anyhow::Result<()> {
    if let Some(tls) = &cfg.server.tls {
        crate::tls::ingress(tls).context("[server.tls]")?;
    }
    if let Some(tls) = &cfg.egress.tls {
        crate::tls::egress(tls).context("[egress.tls]")?;
    }
    crate::tls::upstream_client_config(&cfg.upstream.tls)?;
    if let Some(jwt) = &cfg.identity.jwt {
        if let Some(file) = &jwt.jwks_file {
            crate::pipeline::identify::jwt::read_jwks_file(file).context("[identity.jwt]")?;
        }
        if let Some(ca) = &jwt.jwks_ca {
            crate::tls::read_roots(ca).context("[identity.jwt] jwks_ca")?;
        }
    }
    let mtls = cfg
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some());
    if cfg.identity.jwt.is_none() && !mtls && cfg.identity.trusted_header.is_none() {
        eprintln!(
            "warning: no identity source ([identity.jwt], [server.tls] client_ca or \
             [identity] trusted_header): every request is anonymous and the shipped \
             authentication rules stay inactive; see docs/configuration.md"
        );
    }
    Ok(())
}

/// The entry point of a `--decision` flag (`envoy/authz/allow`).
fn entry_of(decision: Option<&str>) -> anyhow::Result<String> {
    match decision {
        None => Ok(policy::ENTRY_POINT.to_string()),
        Some(d) => crate::config::decision_entry(d).map_err(|e| anyhow!("--decision: {e}")),
    }
}

/// The sources named on a command line, or the default one.
fn sources_of(dirs: &[PathBuf]) -> Vec<PolicySource> {
    if dirs.is_empty() {
        vec![policy_source(None, None)]
    } else {
        dirs.iter().map(|d| policy_source(Some(d), None)).collect()
    }
}

fn lint(dirs: &[PathBuf], strict: bool, decision: Option<&str>) -> anyhow::Result<ExitCode> {
    let entry = entry_of(decision)?;
    let (mut errors, mut warnings) = (0usize, 0usize);
    for source in sources_of(dirs) {
        let files = policy::source_files(&source, true)
            .with_context(|| format!("policies from {source}"))?;
        for f in policy::lint::lint(&source.to_string(), files, &entry) {
            match f.severity {
                policy::lint::Severity::Error => errors += 1,
                policy::lint::Severity::Warning => warnings += 1,
            }
            emit(&f.to_string())?;
        }
    }
    emit(&format!("lint: {errors} error(s), {warnings} warning(s)"))?;
    Ok(if errors > 0 || (strict && warnings > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn fmt(dirs: &[PathBuf], check: bool) -> anyhow::Result<ExitCode> {
    let dirs: Vec<PathBuf> = if dirs.is_empty() {
        vec![PathBuf::from("./policies")]
    } else {
        dirs.to_vec()
    };
    let (mut changed, mut unfixable) = (0usize, 0usize);
    for dir in &dirs {
        let files = policy::source_files(&PolicySource::Dir(dir.clone()), true)?;
        for f in files.iter().filter(|f| f.rel.ends_with(".rego")) {
            let (findings, fixed) = policy::lint::fmt_file(f);
            for finding in &findings {
                emit(&finding.to_string())?;
            }
            unfixable += findings.iter().filter(|f| f.code == "indent").count();
            if fixed != f.text {
                changed += 1;
                if !check {
                    let path = dir.join(&f.rel);
                    std::fs::write(&path, fixed)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    emit(&format!("fixed {}", f.shown))?;
                }
            }
        }
    }
    let verb = if check { "would change" } else { "changed" };
    emit(&format!(
        "fmt: {changed} file(s) {verb}, {unfixable} line(s) indented with spaces (fix by hand)"
    ))?;
    Ok(if check && (changed > 0 || unfixable > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn eval(
    policies: Option<&Path>,
    input: &Path,
    interpreter: bool,
    explain: bool,
    decision: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let text = if input.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
    } else {
        std::fs::read_to_string(input)
            .with_context(|| format!("cannot read input file {}", input.display()))?
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", input.display()))?;
    let source = policy_source(policies, None);
    let entry = entry_of(decision)?;
    let set =
        policy::load_for(&source, &entry).with_context(|| format!("policies from {source}"))?;
    let value = regorus::Value::from(json.clone());
    let out = if interpreter {
        set.evaluate_with_interpreter(value)?
    } else {
        set.evaluate_raw(value, &policy::EvalLimits::default())?
    };
    // Read the result as serve does, so a DSI sees the decision that
    // would be applied (and the same errors).
    let decision = set.read_decision(&out)?;
    let mut doc: serde_json::Value = serde_json::to_value(&decision)?;
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("policy_revision".into(), set.revision.clone().into());
        if let Some(r) = &decision.response {
            obj.insert(
                "response".into(),
                serde_json::json!({
                    "http_status": r.http_status,
                    "headers": r.headers,
                    "response_headers_to_add": r.response_headers_to_add,
                    "request_headers_to_remove": r.request_headers_to_remove,
                    "body": r.body,
                }),
            );
        }
        if explain {
            let files = policy::source_files(&source, false)?;
            let explanation = policy::explain::explain(&source.to_string(), files, &entry, &json)?;
            obj.insert("explain".into(), serde_json::to_value(&explanation)?);
        }
    }
    emit(&serde_json::to_string_pretty(&doc)?)?;
    Ok(ExitCode::SUCCESS)
}

fn test(dirs: &[PathBuf], decision: Option<&str>) -> anyhow::Result<ExitCode> {
    let entry = entry_of(decision)?;
    let sources = sources_of(dirs);
    let (mut passed, mut failed) = (0usize, 0usize);
    for source in &sources {
        let results = policy::testing::run(source, &entry)
            .with_context(|| format!("policies from {source}"))?;
        if results.is_empty() {
            return Err(anyhow!("{source}: no test_* rules found"));
        }
        for r in results {
            if r.passed {
                passed += 1;
                emit(&format!("PASS {}:{} {}", r.file, r.line, r.rule))?;
            } else {
                failed += 1;
                emit(&format!(
                    "FAIL {}:{} {}: {}",
                    r.file, r.line, r.rule, r.detail
                ))?;
            }
        }
    }
    emit(&format!("policy: {passed} passed, {failed} failed"))?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn geo_files(a: &GeoArgs) -> anyhow::Result<crate::geo::GeoFiles> {
    let mut files = match &a.config {
        Some(path) => Config::from_file(path)?.geo.files(),
        None => crate::geo::GeoFiles::default(),
    };
    let over = |slot: &mut Option<PathBuf>, v: &Option<PathBuf>| {
        if let Some(v) = v {
            *slot = Some(v.clone());
        }
    };
    over(&mut files.country_db, &a.country_db);
    over(&mut files.asn_db, &a.asn_db);
    over(&mut files.as_country_db, &a.as_country_db);
    over(&mut files.operators, &a.operators);
    over(&mut files.countries, &a.countries);
    Ok(files)
}

fn geoip_lookup(a: &GeoArgs, ips: &[String]) -> anyhow::Result<ExitCode> {
    let db = crate::geo::GeoDb::open(&geo_files(a)?)?;
    for raw in ips {
        let ip: std::net::IpAddr = raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| anyhow!("{raw:?} is not an IP address"))?;
        emit(&serde_json::to_string(&db.lookup(ip))?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn geoip_info(a: &GeoArgs) -> anyhow::Result<ExitCode> {
    let db = crate::geo::GeoDb::open(&geo_files(a)?)?;
    for (role, d) in [
        ("country", &db.country),
        ("asn", &db.asn),
        ("as_country", &db.as_country),
    ] {
        match d {
            Some(d) => emit(&serde_json::to_string(&d.info(role, true))?)?,
            None => emit(&format!(
                "{}",
                serde_json::json!({"role": role, "path": null, "loaded": false})
            ))?,
        }
    }
    emit(&format!(
        "{}",
        serde_json::json!({
            "role": "registry",
            "operators_version": db.registry.version,
            "operators": db.registry.operator_count(),
            "countries_version": db.registry.countries_version,
        })
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("invalid time {s:?}: {e} (write e.g. 2026-11-01T00:00:00Z)"))
}

fn audit_query(
    args: &[PathBuf],
    format: crate::audit::query::Format,
    filter: &crate::audit::query::Filter,
) -> anyhow::Result<ExitCode> {
    let files = crate::audit::verify::expand(args).map_err(|b| anyhow!("{b}"))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let n = crate::audit::query::query(&files, filter, format, &mut out)?;
    std::io::Write::flush(&mut out)?;
    eprintln!("rempart: {n} matching record(s)");
    Ok(ExitCode::SUCCESS)
}

fn report(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let cfg = a.config.as_deref().map(Config::from_file).transpose()?;
    let files = if !a.audit.is_empty() {
        crate::audit::verify::expand(&a.audit).map_err(|b| anyhow!("{b}"))?
    } else if let Some(cfg) = &cfg {
        let active = &cfg.audit.path;
        let files = crate::report::live_files(active, std::time::UNIX_EPOCH)
            .with_context(|| format!("cannot list the trail files of {}", active.display()))?;
        if files.is_empty() {
            anyhow::bail!(
                "[audit] path {}: no trail file there; give the trail with --audit",
                active.display()
            );
        }
        files
    } else {
        anyhow::bail!(
            "give the audit trail (--audit FILE|DIR...) or the configuration (--config FILE)"
        );
    };
    let geo = match &cfg {
        Some(c) if c.geo.optional => crate::geo::GeoDb::open_lenient(&c.geo.files()),
        Some(c) => crate::geo::GeoDb::open(&c.geo.files()),
        None => crate::geo::GeoDb::open(&crate::geo::GeoFiles::default()),
    }
    .context("[geo]")?;
    let set = match &cfg {
        Some(c) => {
            let source = policy_source(a.policies.as_deref(), c.policy.dir.as_deref());
            Some(policy::load(&source).with_context(|| format!("policies from {source}"))?)
        }
        None => None,
    };
    let facts_path = a
        .facts
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.report.facts.clone()));
    let facts = facts_path
        .as_deref()
        .map(crate::report::facts::Facts::from_file)
        .transpose()?;
    let report = crate::report::generate(crate::report::Sources {
        config: cfg.as_ref(),
        policies: set.as_ref(),
        geo: &geo,
        facts: facts.as_ref(),
        files,
        filter: crate::audit::query::Filter {
            since: a.since,
            until: a.until,
            ..Default::default()
        },
        max_records: None,
        now: std::time::SystemTime::now(),
    })?;
    let text = match a.format {
        ReportFormat::Markdown => crate::report::render::markdown(&report),
        ReportFormat::Json => crate::report::render::json(&report),
        ReportFormat::Html => crate::report::render::html(&report),
    };
    match &a.output {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => emit(text.trim_end())?,
    }
    eprintln!(
        "rempart: score {} / 100 ({}); {} decisions read",
        report.score, report.verdict, report.observations.decisions
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_keygen(out: &Path) -> anyhow::Result<ExitCode> {
    let mut public_path = out.as_os_str().to_os_string();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    for p in [out, public_path.as_path()] {
        if p.exists() {
            anyhow::bail!("{} already exists; not overwriting a key", p.display());
        }
    }
    let (private, public, id) = crate::audit::checkpoint::generate()?;
    let mut f = crate::audit::files::create_private(out)?;
    std::io::Write::write_all(&mut f, private.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    std::fs::write(&public_path, public)
        .with_context(|| format!("cannot write {}", public_path.display()))?;
    emit(&format!(
        "private key {} (keep it where only rempart can read it), public key {}, key id {id}",
        out.display(),
        public_path.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(
    args: &[PathBuf],
    public_key: Option<&Path>,
    min_signed_seq: Option<u64>,
    strict: bool,
) -> anyhow::Result<ExitCode> {
    let key = public_key
        .map(crate::audit::checkpoint::load_verifying_key)
        .transpose()?;
    let files = match crate::audit::verify::expand(args) {
        Ok(f) => f,
        Err(broken) => {
            eprintln!("rempart: audit trail broken: {broken}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match crate::audit::verify::verify_with(&files, key.as_ref(), min_signed_seq) {
        Ok(r) => {
            let unsigned_tail = r
                .last_signed_seq
                .map_or(0, |s| r.last_seq.saturating_sub(s + 1));
            if strict && unsigned_tail > 0 {
                eprintln!(
                    "rempart: audit trail not fully signed: {unsigned_tail} record(s) after the last \
                     checkpoint (seq {}..{}) are not covered by a signature",
                    r.last_seq - unsigned_tail + 1,
                    r.last_seq
                );
                return Ok(ExitCode::FAILURE);
            }
            let signed = match (&key, r.last_signed_seq) {
                (Some(k), Some(s)) => format!(
                    "; {} checkpoint(s) verified with key {}, the last signing seq {s}{}",
                    r.checkpoints,
                    crate::audit::checkpoint::key_id(k),
                    if r.last_seq > s + 1 {
                        format!(
                            "; WARNING: the {} record(s) after it are not covered by a signature \
                             (a crash, or records cut off and rewritten)",
                            r.last_seq - s - 1
                        )
                    } else {
                        String::new()
                    }
                ),
                _ if r.checkpoints > 0 => format!(
                    "; {} checkpoint(s) not checked (no --public-key)",
                    r.checkpoints
                ),
                _ => String::new(),
            };
            if r.checkpoints == 0 {
                // The chain proves what is there was not edited, not that
                // nothing is missing at the end: say so where it is read.
                eprintln!(
                    "rempart: hint: this trail is not signed: whole records cut off the end \
                     leave a valid, shorter chain that cannot be detected. Signed checkpoints \
                     ([audit] checkpoint_key) and --public-key with --min-signed-seq or --strict \
                     close this (docs/audit.md#signed-checkpoints)."
                );
            }
            emit(&format!(
                "ok: {} records in {} file(s), seq {}..{}, from {} to {}{signed}",
                r.records,
                r.files,
                r.first_seq,
                r.last_seq,
                r.first_time.as_deref().unwrap_or("-"),
                r.last_time.as_deref().unwrap_or("-"),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(broken) => {
            eprintln!("rempart: audit trail broken: {broken}");
            Ok(ExitCode::FAILURE)
        }
    }
}
