//! `rempart policy build DIR -o bundle.tar.gz`: a bundle OPA also accepts.
//!
//! The tarball holds `.manifest`, every `*.rego` (tests included, as
//! `opa build` does) and every `data.json` / `data.yaml` at its path below
//! DIR, plus `.signatures.json` when a signing key is given. Entries are
//! sorted with fixed times and modes, so the same sources give the same
//! bytes. The bundle is loaded back through the same gate as at run time
//! before it is written: a build never produces what serve would refuse.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context};

use super::read::RawFile;
use super::{BundleLimits, SigningKey};
use crate::policy::PolicySet;

pub struct BuildOptions {
    /// `.manifest` revision; default: `sha256:` + a digest of the sources.
    pub revision: Option<String>,
    /// `.manifest` roots; default: everything (`[""]`).
    pub roots: Vec<String>,
    pub signing: Option<SigningKey>,
    /// The decision rule the bundle must define (`--decision`, as
    /// `[policy] decision` of the instances that will serve it).
    pub entry: String,
}

/// What was built.
pub struct Built {
    pub revision: String,
    pub files: usize,
    pub bytes: usize,
}

fn wanted(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.ends_with(".rego") || matches!(base, "data.json" | "data.yaml" | "data.yml")
}

/// A deterministic gzip-compressed tarball of `files`.
pub fn tarball(files: &[RawFile]) -> anyhow::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(f.bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &f.name, f.bytes.as_slice())
            .with_context(|| format!("cannot add {} to the tarball", f.name))?;
    }
    let gz = tar.into_inner().context("cannot finish the tarball")?;
    let mut bytes = gz.finish().context("cannot finish the gzip stream")?;
    bytes.flush()?;
    Ok(bytes)
}

/// The bundle's files (signature excluded), sorted, with its manifest.
pub fn bundle_files(dir: &Path, opts: &BuildOptions) -> anyhow::Result<(Vec<RawFile>, String)> {
    let limits = BundleLimits::default();
    let mut files: Vec<RawFile> = super::read::from_dir(dir, &limits)
        .map_err(|e| anyhow!("{}: {e}", dir.display()))?
        .into_iter()
        .filter(|f| wanted(&f.name))
        .collect();
    if !files.iter().any(|f| f.name.ends_with(".rego")) {
        return Err(anyhow!("{}: no .rego files found", dir.display()));
    }
    let revision = match &opts.revision {
        Some(r) => r.clone(),
        None => {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for f in &files {
                h.update(f.name.as_bytes());
                h.update([0]);
                h.update(&f.bytes);
                h.update([0]);
            }
            format!("sha256:{}", hex::encode(&h.finalize()[..8]))
        }
    };
    let roots = if opts.roots.is_empty() {
        vec![String::new()]
    } else {
        opts.roots.clone()
    };
    let manifest = serde_json::json!({ "revision": revision, "roots": roots });
    files.push(RawFile {
        name: ".manifest".into(),
        bytes: serde_json::to_vec(&manifest)?,
    });
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, revision))
}

/// Builds the bundle of `dir` into `out`, after checking that it loads.
pub fn build(dir: &Path, out: &Path, opts: &BuildOptions) -> anyhow::Result<Built> {
    let (mut files, _) = bundle_files(dir, opts)?;
    let count = files.len();
    if let Some(key) = &opts.signing {
        let sig = key.sign(&files)?;
        files.push(RawFile {
            name: super::sign::SIGNATURES_FILE.into(),
            bytes: sig,
        });
        files.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let bytes = tarball(&files)?;
    // Load it back exactly as serve would (signature checked by its own
    // verification step at run time; here the content must compile).
    let set: PolicySet = super::load_bytes(
        &bytes,
        &BundleLimits::default(),
        None,
        format!("bundle {}", out.display()),
        &opts.entry,
    )
    .map_err(|e| anyhow!("{}: the bundle would be refused: {e}", dir.display()))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(Built {
        revision: set.revision,
        files: count,
        bytes: bytes.len(),
    })
}
