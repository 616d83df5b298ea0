//! `rempart audit verify`: walks the hash chain across files in order and
//! names the first broken link exactly. Files may be gzip-compressed
//! (rotated files are); a directory stands for its trail files in chain
//! order.

use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::chain::{check_line, GENESIS};
use super::checkpoint;
use super::decision_log::event::seq_of;
use super::files::open_lines;

#[derive(Debug)]
pub struct Report {
    pub records: u64,
    pub files: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// Checkpoint records seen (verified when a public key was given).
    pub checkpoints: u64,
    /// The seq signed by the last checkpoint.
    pub last_signed_seq: Option<u64>,
}

#[derive(Debug)]
pub struct Broken {
    pub file: PathBuf,
    pub line: usize,
    pub seq: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// Replaces each directory in `args` by the trail files it holds (names
/// ending in `.jsonl`, `.jsonl.gz`, or rotated `<name>.<20 digits>[.gz]`),
/// ordered by the sequence number of their first record. Files keep the
/// order they were given in.
pub fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>, Broken> {
    let mut out = Vec::new();
    for arg in args {
        if !arg.is_dir() {
            out.push(arg.clone());
            continue;
        }
        let broken = |what: String| Broken {
            file: arg.clone(),
            line: 0,
            seq: None,
            what,
        };
        let entries = std::fs::read_dir(arg).map_err(|e| broken(format!("cannot list: {e}")))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| broken(format!("cannot list: {e}")))?;
            if let Some(name) = entry.file_name().to_str() {
                if is_trail_name(name) && entry.path().is_file() {
                    names.push(name.to_string());
                }
            }
        }
        // A compression cut short by a crash leaves `X` and `X.gz`: `X` is whole.
        let plain: std::collections::HashSet<String> = names.iter().cloned().collect();
        names.retain(|n| n.strip_suffix(".gz").is_none_or(|p| !plain.contains(p)));
        let mut keyed = Vec::new();
        for name in names {
            let path = arg.join(&name);
            let first = first_seq(&path).map_err(|what| Broken {
                file: path.clone(),
                line: 1,
                seq: None,
                what,
            })?;
            keyed.push((first.unwrap_or(u64::MAX), name, path));
        }
        keyed.sort();
        if keyed.is_empty() {
            return Err(broken(
                "no trail files (*.jsonl, *.jsonl.gz, rotated files) in this directory".into(),
            ));
        }
        out.extend(keyed.into_iter().map(|(_, _, p)| p));
    }
    Ok(out)
}

fn is_trail_name(name: &str) -> bool {
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".jsonl") {
        return true;
    }
    name.rsplit_once('.')
        .is_some_and(|(_, digits)| digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The `seq` of a file's first line; `None` for an empty file.
fn first_seq(path: &Path) -> Result<Option<u64>, String> {
    let mut reader = open_lines(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("cannot read: {e}"))?;
    if line.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(line.trim_end()).map_err(|e| format!("not JSON: {e}"))?;
    v["seq"]
        .as_u64()
        .map(Some)
        .ok_or_else(|| "no \"seq\" field".to_string())
}

/// Walks the chain; with `key`, also checks every checkpoint's signature
/// and requires at least one.
pub fn verify(files: &[PathBuf], key: Option<&VerifyingKey>) -> Result<Report, Broken> {
    verify_with(files, key, None)
}

/// [`verify`], also requiring (with a key) that a checkpoint signs at
/// least `min_signed_seq`: the seq an external witness saw signed
/// (`rempart_audit_signed_seq`, the log), so that a trail cut back to an
/// earlier checkpoint is caught.
pub fn verify_with(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
    min_signed_seq: Option<u64>,
) -> Result<Report, Broken> {
    let mut prev: Option<(u64, String)> = None;
    let mut report = Report {
        records: 0,
        files: files.len(),
        first_seq: 0,
        last_seq: 0,
        first_time: None,
        last_time: None,
        checkpoints: 0,
        last_signed_seq: None,
    };
    for file in files {
        verify_file(file, &mut prev, &mut report, key)?;
    }
    if key.is_some() && report.checkpoints == 0 {
        return Err(Broken {
            file: files.last().cloned().unwrap_or_default(),
            line: 0,
            seq: None,
            what: "no signed checkpoint in the trail: it cannot be authenticated with the key \
                   (is [audit] checkpoint_key set?)"
                .into(),
        });
    }
    if let (Some(_), Some(min)) = (key, min_signed_seq) {
        let signed = report.last_signed_seq.unwrap_or(0);
        if signed < min {
            return Err(Broken {
                file: files.last().cloned().unwrap_or_default(),
                line: 0,
                seq: None,
                what: format!(
                    "the last checkpoint signs seq {signed}, but seq {min} was signed: \
                     the trail was cut back"
                ),
            });
        }
    }
    Ok(report)
}

fn verify_file(
    path: &Path,
    prev: &mut Option<(u64, String)>,
    report: &mut Report,
    key: Option<&VerifyingKey>,
) -> Result<(), Broken> {
    let broken = |line: usize, seq: Option<u64>, what: String| Broken {
        file: path.to_path_buf(),
        line,
        seq,
        what,
    };
    let mut reader = open_lines(path).map_err(|e| broken(0, None, format!("cannot open: {e}")))?;
    let mut buf = String::new();
    let mut n = 0usize;
    loop {
        buf.clear();
        let read = reader
            .read_line(&mut buf)
            .map_err(|e| broken(n + 1, None, format!("cannot read: {e}")))?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        // What the line says its seq is, read from its first bytes: named
        // even when the rest of the line cannot be trusted.
        let stated_seq = seq_of(buf.as_bytes());
        if !buf.ends_with('\n') {
            return Err(broken(
                n,
                stated_seq,
                "torn last line (no newline): a write was cut off".into(),
            ));
        }
        let line = buf.trim_end_matches('\n');
        let c = check_line(line).map_err(|what| broken(n, stated_seq, what))?;
        match prev {
            None => {
                if c.seq == 1 && c.prev_hash != GENESIS {
                    return Err(broken(
                        n,
                        Some(c.seq),
                        "the first record of a chain must have a prev_hash of zeros".into(),
                    ));
                }
                report.first_seq = c.seq;
            }
            Some((pseq, phash)) => {
                if c.seq != *pseq + 1 {
                    return Err(broken(
                        n,
                        Some(c.seq),
                        format!("sequence goes from {pseq} to {}: records were deleted, inserted or reordered", c.seq),
                    ));
                }
                if c.prev_hash != *phash {
                    return Err(broken(
                        n,
                        Some(c.seq),
                        format!("prev_hash {} is not the hash of record {pseq} ({phash}): the chain was rebuilt or spliced", c.prev_hash),
                    ));
                }
            }
        }
        if c.value["type"] == "checkpoint" {
            if let Some(key) = key {
                // A file may start with a checkpoint (rotation right after
                // one was due): the record it signs is the one its own
                // prev link names, in the previous file.
                let before = prev
                    .clone()
                    .unwrap_or_else(|| (c.seq.saturating_sub(1), c.prev_hash.clone()));
                checkpoint::check(&c.value, Some(&before), key)
                    .map_err(|what| broken(n, Some(c.seq), what))?;
            }
            report.checkpoints += 1;
            report.last_signed_seq = c.value["signed_seq"].as_u64();
        }
        if report.first_time.is_none() {
            report.first_time = c.timestamp.clone();
        }
        if c.timestamp.is_some() {
            report.last_time = c.timestamp.clone();
        }
        report.records += 1;
        report.last_seq = c.seq;
        *prev = Some((c.seq, c.hash));
    }
}
