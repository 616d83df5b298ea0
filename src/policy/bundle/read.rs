//! Reading a bundle's files from a `.tar.gz` or a directory, within bounds.
//!
//! Nothing is ever written to disk under an entry's name: entries are read
//! into memory. Names are still checked (no `..`, no links, no devices) so
//! that a bundle means the same thing to rempart and to any tool that
//! unpacks it, and so that a tampered archive is refused loudly.

use std::cell::Cell;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use anyhow::anyhow;

use super::{BundleError, BundleLimits, Rejection};

/// One file of a bundle: its name relative to the bundle root (`/`
/// separated, no leading `/`), and its bytes.
#[derive(Debug, Clone)]
pub struct RawFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// A reader that stops with an error once more than `left` bytes came
/// through, and remembers that it did: the gzip stream of a zip bomb is
/// small, its output is not.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(std::io::Error::other("decompressed size limit exceeded"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Checks and normalises an entry name: `/a/b`, `./a/b` and `a/b` are the
/// same file (OPA writes a leading `/`); `..`, backslashes and empty names
/// are refused.
pub fn clean_name(raw: &str) -> Result<String, BundleError> {
    let unsafe_path = |why: &str| {
        BundleError::new(
            Rejection::UnsafePath,
            anyhow!("entry {raw:?}: {why}; bundle refused"),
        )
    };
    if raw.contains('\\') {
        return Err(unsafe_path("backslash in the path"));
    }
    if raw.contains('\0') {
        return Err(unsafe_path("NUL byte in the path"));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(unsafe_path("path traversal (`..`)")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(unsafe_path("empty path"));
    }
    Ok(parts.join("/"))
}

fn too_large(what: String) -> BundleError {
    BundleError::new(Rejection::TooLarge, anyhow!("{what}; bundle refused"))
}

/// Reads every regular file of a gzip-compressed tarball.
pub fn from_tarball(bytes: &[u8], limits: &BundleLimits) -> Result<Vec<RawFile>, BundleError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(too_large(format!(
            "the bundle is {} bytes, above the limit of {} (max_bytes)",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let exceeded = Rc::new(Cell::new(false));
    let capped = Capped {
        inner: flate2::read::GzDecoder::new(bytes),
        left: limits.max_uncompressed_bytes,
        exceeded: Rc::clone(&exceeded),
    };
    let over = || {
        too_large(format!(
            "the bundle unpacks to more than {} bytes (max_uncompressed_bytes)",
            limits.max_uncompressed_bytes
        ))
    };
    let unreadable = |e: std::io::Error| {
        BundleError::new(
            Rejection::Unreadable,
            anyhow!("not a readable gzip-compressed tarball: {e}"),
        )
    };
    let mut archive = tar::Archive::new(capped);
    let entries = archive.entries().map_err(unreadable)?;
    let mut files: Vec<RawFile> = Vec::new();
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(_) if exceeded.get() => return Err(over()),
            Err(e) => return Err(unreadable(e)),
        };
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Directory
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName => continue,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                return Err(BundleError::new(
                    Rejection::UnsafePath,
                    anyhow!("entry {raw_name:?} is a link (to {target:?}); links are not allowed in a bundle"),
                ));
            }
            other => {
                return Err(BundleError::new(
                    Rejection::UnsafePath,
                    anyhow!("entry {raw_name:?} is not a regular file ({other:?}); bundle refused"),
                ))
            }
        }
        let name = clean_name(&raw_name)?;
        let declared = entry.header().size().unwrap_or(0);
        if declared > limits.max_uncompressed_bytes {
            return Err(over());
        }
        let mut bytes = Vec::with_capacity(usize::try_from(declared.min(1 << 20)).unwrap_or(0));
        if let Err(e) = entry.read_to_end(&mut bytes) {
            if exceeded.get() {
                return Err(over());
            }
            return Err(unreadable(e));
        }
        if files.iter().any(|f| f.name == name) {
            return Err(BundleError::new(
                Rejection::Invalid,
                anyhow!("{name} appears twice in the tarball"),
            ));
        }
        files.push(RawFile { name, bytes });
    }
    // A truncated gzip stream can end exactly at a tar block boundary: read
    // to the end so that its checksum is verified.
    let mut rest = archive.into_inner();
    if let Err(e) = std::io::copy(&mut rest, &mut std::io::sink()) {
        if exceeded.get() {
            return Err(over());
        }
        return Err(unreadable(e));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Reads every file below a bundle directory. Hidden directories (`.git`,
/// Kubernetes' `..data`) are skipped; hidden files (`.manifest`,
/// `.signatures.json`) are kept. Symlinks are followed, as ConfigMap
/// mounts need: a directory is the operator's own file system, not
/// something received.
pub fn from_dir(dir: &Path, limits: &BundleLimits) -> Result<Vec<RawFile>, BundleError> {
    fn walk(
        root: &Path,
        dir: &Path,
        limits: &BundleLimits,
        total: &mut u64,
        out: &mut Vec<RawFile>,
    ) -> Result<(), BundleError> {
        let unreadable = |p: &Path, e: std::io::Error| {
            BundleError::new(
                Rejection::Unreadable,
                anyhow!("cannot read {}: {e}", p.display()),
            )
        };
        let entries = std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| unreadable(dir, e))?;
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(|e| unreadable(&path, e))?;
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if meta.is_dir() {
                if !hidden {
                    walk(root, &path, limits, total, out)?;
                }
                continue;
            }
            *total += meta.len();
            if *total > limits.max_uncompressed_bytes {
                return Err(too_large(format!(
                    "the bundle directory holds more than {} bytes (max_uncompressed_bytes)",
                    limits.max_uncompressed_bytes
                )));
            }
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            let bytes = std::fs::read(&path).map_err(|e| unreadable(&path, e))?;
            out.push(RawFile {
                name: clean_name(&rel)?,
                bytes,
            });
        }
        Ok(())
    }
    let mut files = Vec::new();
    let mut total = 0;
    walk(dir, dir, limits, &mut total, &mut files)?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_traversal_refused() {
        assert_eq!(clean_name("/a/b.rego").unwrap(), "a/b.rego");
        assert_eq!(clean_name("./.manifest").unwrap(), ".manifest");
        for bad in ["../x.rego", "a/../../x", "/", "a\\b"] {
            let e = clean_name(bad).unwrap_err();
            assert_eq!(e.reason, Rejection::UnsafePath, "{bad}");
        }
    }
}
