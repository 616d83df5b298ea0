//! Reading a policy set from a directory or from the copy built into the binary.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use regorus::Value;
use sha2::{Digest, Sha256};

use super::PolicySet;

/// Where a policy set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// Every `*.rego` (except `*_test.rego`) and `data.json` below a directory.
    Dir(PathBuf),
    /// The shipped `policies/` directory, compiled into the binary.
    Builtin,
    /// An OPA bundle: `.tar.gz` file or directory (see [`super::bundle`]).
    Bundle(super::bundle::BundleSpec),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Dir(d) => write!(f, "{}", d.display()),
            PolicySource::Builtin => f.write_str("built-in policies"),
            PolicySource::Bundle(b) => f.write_str(&b.origin()),
        }
    }
}

/// The shipped policies, as files relative to `policies/`.
const BUILTIN: &[(&str, &str)] = &[
    (
        "decision.rego",
        include_str!("../../policies/decision.rego"),
    ),
    ("library.rego", include_str!("../../policies/library.rego")),
    (
        "identity.rego",
        include_str!("../../policies/identity.rego"),
    ),
    (
        "sovereignty.rego",
        include_str!("../../policies/sovereignty.rego"),
    ),
    ("egress.rego", include_str!("../../policies/egress.rego")),
    ("access.rego", include_str!("../../policies/access.rego")),
    ("data.json", include_str!("../../policies/data.json")),
];

/// Test files shipped beside the built-in set, for `policy test` of the
/// built-in policies.
pub const BUILTIN_TESTS: &[(&str, &str)] = &[
    (
        "library_test.rego",
        include_str!("../../policies/library_test.rego"),
    ),
    (
        "identity_test.rego",
        include_str!("../../policies/identity_test.rego"),
    ),
    (
        "sovereignty_test.rego",
        include_str!("../../policies/sovereignty_test.rego"),
    ),
    (
        "egress_test.rego",
        include_str!("../../policies/egress_test.rego"),
    ),
    (
        "access_test.rego",
        include_str!("../../policies/access_test.rego"),
    ),
];

/// A file of a policy set: its path relative to the set's root, the path
/// to show in messages, and its text.
pub struct SourceFile {
    pub rel: String,
    pub shown: String,
    pub text: String,
}

/// Lists a directory's policy files, sorted, so that a revision hash is
/// stable. Hidden entries (`.git`, Kubernetes' `..data`) are skipped.
pub(crate) fn read_dir_files(dir: &Path, with_tests: bool) -> anyhow::Result<Vec<SourceFile>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read policy directory {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            // metadata() follows symlinks, as ConfigMap mounts need.
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut paths = Vec::new();
    walk(dir, &mut paths)?;
    let mut files = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let is_test = name.ends_with("_test.rego");
        let wanted = (name.ends_with(".rego") && (with_tests || !is_test)) || name == "data.json";
        if !wanted {
            continue;
        }
        let rel = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read policy file {}", path.display()))?;
        files.push(SourceFile {
            rel,
            shown: path.display().to_string(),
            text,
        });
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
}

pub(crate) fn builtin_files(with_tests: bool) -> Vec<SourceFile> {
    let tests: &[(&str, &str)] = if with_tests { BUILTIN_TESTS } else { &[] };
    let mut files: Vec<SourceFile> = BUILTIN
        .iter()
        .chain(tests)
        .map(|(rel, text)| SourceFile {
            rel: rel.to_string(),
            shown: format!("<built-in>/policies/{rel}"),
            text: text.to_string(),
        })
        .collect();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    files
}

/// Merges `other` into `into`; objects merge key by key, anything else
/// given twice is a conflict.
fn merge(into: &mut serde_json::Value, other: serde_json::Value, at: &str) -> anyhow::Result<()> {
    match (into, other) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v, &format!("{at}.{k}"))?,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        _ => bail!("{at} is defined by two data files"),
    }
}

/// Builds the data document from the `data.json` files: a file in
/// directory `a/b` lands at `data.a.b`, as in OPA bundles.
fn data_document(files: &[SourceFile]) -> anyhow::Result<serde_json::Value> {
    let mut data = serde_json::Value::Object(Default::default());
    let mut earlier: Vec<(String, serde_json::Value)> = Vec::new();
    for f in files.iter().filter(|f| f.rel.ends_with("data.json")) {
        let mut doc: serde_json::Value =
            serde_json::from_str(&f.text).map_err(|e| anyhow!("{}: invalid JSON: {e}", f.shown))?;
        if !doc.is_object() {
            bail!("{}: a data file must hold a JSON object", f.shown);
        }
        let dirs: Vec<&str> = f.rel.split('/').collect();
        for dir in dirs[..dirs.len() - 1].iter().rev() {
            let mut wrap = serde_json::Map::new();
            wrap.insert(dir.to_string(), doc);
            doc = serde_json::Value::Object(wrap);
        }
        if let Err(e) = merge(&mut data, doc.clone(), "data") {
            // Name the file that gave the value first, too.
            let path = e.to_string();
            let first = earlier
                .iter()
                .find(|(_, d): &&(String, serde_json::Value)| {
                    path.split(' ').next().is_some_and(|p| {
                        p.split('.').skip(1).try_fold(d, |v, k| v.get(k)).is_some()
                    })
                })
                .map(|(shown, _)| format!(" (first given by {shown})"))
                .unwrap_or_default();
            return Err(anyhow!("in {}: {e}{first}", f.shown));
        }
        earlier.push((f.shown.clone(), doc));
    }
    Ok(data)
}

/// `"<file>: "` for the data file that defines
/// `data.settings.audit.minimise` (several cannot: that is a conflict).
fn minimise_file(files: &[SourceFile]) -> String {
    let wanted = crate::audit::minimise::DATA_PATH;
    files
        .iter()
        .filter(|f| f.rel.ends_with("data.json"))
        .find(|f| {
            let dirs: Vec<&str> = f.rel.split('/').collect();
            let dirs = &dirs[..dirs.len() - 1];
            if dirs.len() > wanted.len() || dirs != &wanted[..dirs.len()] {
                return false;
            }
            serde_json::from_str::<serde_json::Value>(&f.text)
                .ok()
                .and_then(|doc| {
                    wanted[dirs.len()..]
                        .iter()
                        .try_fold(&doc, |v, k| v.get(k))
                        .cloned()
                })
                .is_some()
        })
        .map(|f| format!("{}: ", f.shown))
        .unwrap_or_default()
}

pub(crate) fn revision(files: &[SourceFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.rel.as_bytes());
        h.update([0]);
        h.update(f.text.as_bytes());
        h.update([0]);
    }
    format!("sha256:{}", hex::encode(&h.finalize()[..8]))
}

/// Compiles a set's files for the decision rule `entry` (a `data.…`
/// path: [`super::ENTRY_POINT`] or the configured `[policy] decision`).
pub(crate) fn compile_files_for(
    entry: &str,
    origin: String,
    files: Vec<SourceFile>,
) -> anyhow::Result<PolicySet> {
    if !files.iter().any(|f| f.rel.ends_with(".rego")) {
        bail!("{origin}: no .rego files found");
    }
    let revision = revision(&files);
    let document = data_document(&files)?;
    let minimise = crate::audit::minimise::Rules::from_policy_data(&document).map_err(|e| {
        let at = minimise_file(&files);
        anyhow!("{at}{e}")
    })?;
    let data = Value::from(document);
    let names = files.iter().map(|f| f.rel.clone()).collect();
    let rego = files
        .into_iter()
        .filter(|f| f.rel.ends_with(".rego"))
        .map(|f| (f.shown, f.text))
        .collect();
    let mut set = PolicySet::compile_for(entry, origin, rego, data, revision)?;
    set.files = names;
    Ok(set.with_minimise(minimise))
}

/// The files of a source, optionally with its `*_test.rego` files.
pub fn source_files(source: &PolicySource, with_tests: bool) -> anyhow::Result<Vec<SourceFile>> {
    match source {
        PolicySource::Dir(dir) => read_dir_files(dir, with_tests),
        PolicySource::Builtin => Ok(builtin_files(with_tests)),
        PolicySource::Bundle(spec) => super::bundle::source_files(spec, with_tests),
    }
}

/// Loads and compiles a policy set. Errors say which file, line and column.
pub fn load(source: &PolicySource) -> anyhow::Result<PolicySet> {
    load_for(source, super::ENTRY_POINT)
}

/// As [`load`], for another entry point (`[policy] decision`, as a `data.…`
/// path): directories and bundles alike must define it.
pub fn load_for(source: &PolicySource, entry: &str) -> anyhow::Result<PolicySet> {
    if let PolicySource::Bundle(spec) = source {
        return Ok(super::bundle::load(spec, entry)?);
    }
    compile_files_for(entry, source.to_string(), source_files(source, false)?)
}
