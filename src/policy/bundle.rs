//! OPA bundles: a policy set shipped as one `.tar.gz` (or directory) with a
//! `.manifest` (`revision`, `roots`), `*.rego` files and `data.json` /
//! `data.yaml` documents placed at their directory's path in `data`.
//!
//! A bundle goes through the same gate wherever it comes from (a file, a
//! directory, the bundle server, the copy persisted on disk): bounded
//! reading with safe names ([`read`]), the signature check when one is
//! configured ([`sign`]), the manifest's roots, then compilation. Only a
//! bundle that passes every step is activated; otherwise the set already
//! serving stays.

pub mod build;
pub mod fetch;
pub mod read;
pub mod sign;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use serde::Deserialize;

use super::load::{compile_files_for, SourceFile};
use super::PolicySet;
use read::RawFile;
pub use sign::{SigningKey, VerificationKey};

/// Size bounds on a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// The bundle file (or download) as stored: compressed.
    pub max_bytes: u64,
    /// Everything it unpacks to: the bound a zip bomb hits.
    pub max_uncompressed_bytes: u64,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            max_bytes: 32 << 20,
            max_uncompressed_bytes: 256 << 20,
        }
    }
}

/// Why a bundle was refused; the `reason` label of
/// `rempart_policy_bundle_activation_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a readable gzip-compressed tarball, or unreadable files.
    Unreadable,
    /// An entry with `..`, a link or a device.
    UnsafePath,
    /// Above `max_bytes` or `max_uncompressed_bytes`.
    TooLarge,
    /// Unsigned, badly signed or tampered, when signatures are required.
    Signature,
    /// A bad manifest or data file, or content outside the manifest's roots.
    Invalid,
    /// Rego that does not compile (or data that conflicts with it).
    Compile,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Unreadable,
        Rejection::UnsafePath,
        Rejection::TooLarge,
        Rejection::Signature,
        Rejection::Invalid,
        Rejection::Compile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Unreadable => "unreadable",
            Rejection::UnsafePath => "unsafe_path",
            Rejection::TooLarge => "too_large",
            Rejection::Signature => "signature",
            Rejection::Invalid => "invalid",
            Rejection::Compile => "compile",
        }
    }
}

/// A refused bundle: why (for the metric) and what (for the log).
#[derive(Debug)]
pub struct BundleError {
    pub reason: Rejection,
    pub error: anyhow::Error,
}

impl BundleError {
    pub fn new(reason: Rejection, error: anyhow::Error) -> Self {
        BundleError { reason, error }
    }
}

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for BundleError {}

/// The reason a policy load failed, when it was a bundle that was refused.
pub fn rejection_of(e: &anyhow::Error) -> Option<Rejection> {
    e.chain()
        .find_map(|c| c.downcast_ref::<BundleError>())
        .map(|b| b.reason)
}

/// A bundle on disk (file or directory) and how to accept it.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub path: PathBuf,
    pub limits: BundleLimits,
    /// When set, only bundles signed with this key are accepted.
    pub verification: Option<Arc<VerificationKey>>,
    /// What to call the set in logs and `/readyz` (the server's URL when
    /// this is the persisted copy of a downloaded bundle).
    pub origin: Option<String>,
    /// The bundle's name in decision-log events (`bundles.<name>`).
    pub name: String,
}

/// A bundle's default name: the last segment of its path or URL, without
/// `.tar.gz` / `.tgz` (`crm.tar.gz` → `crm`).
pub fn default_name(path_or_url: &str) -> String {
    let last = path_or_url
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let name = last
        .strip_suffix(".tar.gz")
        .or_else(|| last.strip_suffix(".tgz"))
        .unwrap_or(last);
    if name.is_empty() {
        "rempart".into()
    } else {
        name.into()
    }
}

impl BundleSpec {
    pub fn local(path: PathBuf) -> Self {
        BundleSpec {
            name: default_name(&path.to_string_lossy()),
            path,
            limits: BundleLimits::default(),
            verification: None,
            origin: None,
        }
    }

    pub fn origin(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| format!("bundle {}", self.path.display()))
    }
}

impl PartialEq for BundleSpec {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && self.limits == other.limits
            && self.verification.is_some() == other.verification.is_some()
            && self.origin == other.origin
            && self.name == other.name
    }
}

impl Eq for BundleSpec {}

/// The bundle `[policy.bundle]` names: its `path`, or for a bundle
/// server the persisted copy of the last good download.
pub fn spec_from_config(cfg: &crate::config::BundleConfig) -> anyhow::Result<BundleSpec> {
    let verification = cfg
        .signing
        .as_ref()
        .map(|s| {
            VerificationKey::open(
                &s.public_key,
                &s.algorithm,
                s.keyid.clone(),
                s.scope.clone(),
            )
            .map(Arc::new)
        })
        .transpose()
        .context("[policy.bundle.signing]")?;
    let limits = BundleLimits {
        max_bytes: cfg.max_bytes,
        max_uncompressed_bytes: cfg.max_uncompressed_bytes,
    };
    Ok(match (&cfg.path, &cfg.url) {
        (Some(path), _) => BundleSpec {
            name: cfg
                .name
                .clone()
                .unwrap_or_else(|| default_name(&path.to_string_lossy())),
            path: path.clone(),
            limits,
            verification,
            origin: None,
        },
        (None, Some(url)) => BundleSpec {
            name: cfg.name.clone().unwrap_or_else(|| default_name(url)),
            path: fetch::persisted_bundle(&cfg.persist_dir),
            limits,
            verification,
            origin: Some(format!("bundle {url}")),
        },
        (None, None) => anyhow::bail!("needs path or url"),
    })
}

/// True when `path` names a bundle file rather than a policy directory.
pub fn looks_like_bundle_file(path: &Path) -> bool {
    let name = path.to_string_lossy();
    (name.ends_with(".tar.gz") || name.ends_with(".tgz")) && !path.is_dir()
}

/// Reads a bundle file or directory, within `spec.limits`.
pub fn read_spec(spec: &BundleSpec) -> Result<Vec<RawFile>, BundleError> {
    let meta = std::fs::metadata(&spec.path).map_err(|e| {
        BundleError::new(
            Rejection::Unreadable,
            anyhow!("cannot read bundle {}: {e}", spec.path.display()),
        )
    })?;
    if meta.is_dir() {
        return read::from_dir(&spec.path, &spec.limits);
    }
    if meta.len() > spec.limits.max_bytes {
        return Err(BundleError::new(
            Rejection::TooLarge,
            anyhow!(
                "bundle {} is {} bytes, above the limit of {} (max_bytes); bundle refused",
                spec.path.display(),
                meta.len(),
                spec.limits.max_bytes
            ),
        ));
    }
    let bytes = std::fs::read(&spec.path).map_err(|e| {
        BundleError::new(
            Rejection::Unreadable,
            anyhow!("cannot read bundle {}: {e}", spec.path.display()),
        )
    })?;
    read::from_tarball(&bytes, &spec.limits)
}

/// Loads, checks and compiles the bundle `spec` names, for the decision
/// rule `entry` (a `data.` path: [`super::ENTRY_POINT`] or the configured
/// `[policy] decision`).
pub fn load(spec: &BundleSpec, entry: &str) -> Result<PolicySet, BundleError> {
    let files = read_spec(spec)?;
    activate(files, spec.verification.as_deref(), spec.origin(), entry)
}

/// Checks and compiles a downloaded bundle for the decision rule `entry`.
pub fn load_bytes(
    bytes: &[u8],
    limits: &BundleLimits,
    verification: Option<&VerificationKey>,
    origin: String,
    entry: &str,
) -> Result<PolicySet, BundleError> {
    let files = read::from_tarball(bytes, limits)?;
    activate(files, verification, origin, entry)
}

#[derive(Debug, Default, Deserialize)]
struct Manifest {
    #[serde(default)]
    revision: String,
    roots: Option<Vec<String>>,
}

fn invalid(e: anyhow::Error) -> BundleError {
    BundleError::new(Rejection::Invalid, e)
}

fn read_manifest(files: &[RawFile]) -> Result<Manifest, BundleError> {
    let Some(m) = files.iter().find(|f| f.name == ".manifest") else {
        return Ok(Manifest::default());
    };
    serde_json::from_slice(&m.bytes).map_err(|e| {
        invalid(anyhow!(
            ".manifest: {e} (expected {{\"revision\": \"...\", \"roots\": [\"...\"]}})"
        ))
    })
}

/// `path` is `root` or below it (`""` is the root of everything).
fn root_contains(root: &str, path: &str) -> bool {
    root.is_empty() || path == root || path.starts_with(&format!("{root}/"))
}

/// The package a Rego file declares, as a `/` path (`package a.b` -> `a/b`).
fn package_path(text: &str) -> Option<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .find_map(|l| l.strip_prefix("package "))
        .map(|p| {
            p.split(|c: char| c.is_whitespace() || c == '{')
                .next()
                .unwrap_or("")
                .replace('.', "/")
        })
}

/// Checks, as OPA does, that every package and every data path lies
/// inside the manifest's roots, so that a bundle cannot define what it
/// has not declared.
fn check_roots(
    roots: &[String],
    rego: &[SourceFile],
    data: &[(String, serde_json::Value)],
) -> Result<(), BundleError> {
    for (i, a) in roots.iter().enumerate() {
        for b in &roots[i + 1..] {
            if root_contains(a, b) || root_contains(b, a) {
                return Err(invalid(anyhow!(".manifest: roots {a:?} and {b:?} overlap")));
            }
        }
    }
    for f in rego {
        let Some(pkg) = package_path(&f.text) else {
            continue; // the compiler reports the missing package
        };
        if !roots.iter().any(|r| root_contains(r, &pkg)) {
            return Err(invalid(anyhow!(
                "{}: package {} is outside the manifest roots {roots:?}",
                f.rel,
                pkg.replace('/', ".")
            )));
        }
    }
    fn walk(
        roots: &[String],
        path: &str,
        v: &serde_json::Value,
        file: &str,
    ) -> Result<(), BundleError> {
        if !path.is_empty() && roots.iter().any(|r| root_contains(r, path)) {
            return Ok(());
        }
        let leads_to_root = roots
            .iter()
            .any(|r| path.is_empty() || r.starts_with(&format!("{path}/")));
        match v {
            serde_json::Value::Object(map) if leads_to_root => {
                for (k, child) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}/{k}")
                    };
                    walk(roots, &p, child, file)?;
                }
                Ok(())
            }
            _ => Err(invalid(anyhow!(
                "{file}: data at /{path} is outside the manifest roots {roots:?}"
            ))),
        }
    }
    for (name, doc) in data {
        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
        walk(roots, dir, doc, name)?;
    }
    Ok(())
}

/// Splits a bundle's files into Rego sources and data documents.
/// Anything else (.manifest, .signatures.json, README, wasm) is not part
/// of the policy set, as in OPA.
#[allow(clippy::type_complexity)]
fn split(
    files: Vec<RawFile>,
    origin: &str,
    with_tests: bool,
) -> Result<(Vec<SourceFile>, Vec<(String, serde_json::Value)>), BundleError> {
    let mut rego = Vec::new();
    let mut data = Vec::new();
    for f in files {
        let base = f.name.rsplit('/').next().unwrap_or(&f.name);
        if base.ends_with(".rego") {
            if base.ends_with("_test.rego") && !with_tests {
                continue;
            }
            let text = String::from_utf8(f.bytes)
                .map_err(|_| invalid(anyhow!("{}: not UTF-8 text", f.name)))?;
            rego.push(SourceFile {
                shown: format!("{origin}:{}", f.name),
                rel: f.name,
                text,
            });
        } else if matches!(base, "data.json" | "data.yaml" | "data.yml") {
            let doc = sign::parse_structured(&f.name, &f.bytes).map_err(invalid)?;
            if !doc.is_object() {
                return Err(invalid(anyhow!(
                    "{}: a data file must hold an object",
                    f.name
                )));
            }
            data.push((f.name, doc));
        }
    }
    Ok((rego, data))
}

/// Rego and data as the policy set loader takes them: it places
/// `dir/data.json` at `data.dir`, so YAML documents go through as JSON.
fn sources(
    mut rego: Vec<SourceFile>,
    data: Vec<(String, serde_json::Value)>,
    origin: &str,
) -> Vec<SourceFile> {
    for (name, doc) in data {
        let rel = match name.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/data.json"),
            None => "data.json".to_string(),
        };
        rego.push(SourceFile {
            shown: format!("{origin}:{name}"),
            rel,
            text: doc.to_string(),
        });
    }
    rego.sort_by(|a, b| a.rel.cmp(&b.rel));
    rego
}

/// A bundle's files for `rempart policy test` (tests included).
pub(crate) fn source_files(spec: &BundleSpec, with_tests: bool) -> anyhow::Result<Vec<SourceFile>> {
    let files = read_spec(spec)?;
    if let Some(key) = &spec.verification {
        key.verify(&files)?;
    }
    let origin = spec.origin();
    let (rego, data) = split(files, &origin, with_tests)?;
    Ok(sources(rego, data, &origin))
}

/// The common gate: signature, manifest, roots, compilation for `entry`
/// (a bundle that does not define that rule is refused, as `compile`).
pub(crate) fn activate(
    files: Vec<RawFile>,
    verification: Option<&VerificationKey>,
    origin: String,
    entry: &str,
) -> Result<PolicySet, BundleError> {
    if let Some(key) = verification {
        key.verify(&files)?;
    }
    let manifest = read_manifest(&files)?;
    let roots: Vec<String> = manifest
        .roots
        .unwrap_or_else(|| vec![String::new()])
        .into_iter()
        .map(|r| r.trim_matches('/').to_string())
        .collect();
    let (rego, data) = split(files, &origin, false)?;
    check_roots(&roots, &rego, &data)?;
    let all = sources(rego, data, &origin);
    let mut set = compile_files_for(entry, origin, all)
        .map_err(|e| BundleError::new(Rejection::Compile, e))?;
    let revision = Some(manifest.revision).filter(|r| !r.is_empty());
    if let Some(r) = &revision {
        set = set.with_revision(r.clone());
    }
    Ok(set.with_bundle_revision(revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_and_roots() {
        assert_eq!(
            package_path("# c\npackage rempart.decision\n").as_deref(),
            Some("rempart/decision")
        );
        assert!(root_contains("", "a/b"));
        assert!(root_contains("rempart", "rempart/x"));
        assert!(!root_contains("rempart", "rempartx"));
    }

    fn envoy_bundle() -> Vec<u8> {
        let policy = "package envoy.authz\n\nimport rego.v1\n\ndefault allow := false\n\n\
                      allow if input.parsed_path[0] in data.partners.open\n";
        build::tarball(&[
            RawFile {
                name: "authz.rego".into(),
                bytes: policy.as_bytes().to_vec(),
            },
            RawFile {
                name: "partners/data.json".into(),
                bytes: br#"{"open": ["people"]}"#.to_vec(),
            },
        ])
        .expect("tarball")
    }

    #[test]
    fn a_bundle_is_compiled_for_the_configured_decision() {
        let limits = BundleLimits::default();
        let set = load_bytes(
            &envoy_bundle(),
            &limits,
            None,
            "t".into(),
            "data.envoy.authz.allow",
        )
        .expect("the bundle defines the configured decision");
        assert_eq!(set.entry(), "data.envoy.authz.allow");
        let allowed = |path: &str| {
            let input = serde_json::json!({ "parsed_path": [path] });
            set.evaluate(input.into(), &crate::policy::EvalLimits::default())
                .expect("evaluates")
                .allow
        };
        assert!(allowed("people"));
        assert!(!allowed("admin"));

        // A bundle without the rule is refused for it, saying which rule.
        let e = load_bytes(
            &envoy_bundle(),
            &limits,
            None,
            "bundle t".into(),
            "data.envoy.authz.result",
        )
        .expect_err("no rule defines the decision");
        assert_eq!(e.reason, Rejection::Compile);
        let text = e.to_string();
        assert!(
            text.contains("bundle t") && text.contains("no rule defines data.envoy.authz.result"),
            "{text}"
        );
    }
}
