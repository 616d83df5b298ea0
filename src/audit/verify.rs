//! `rempart audit verify`: walks the hash chain across files in order and
//! names the first broken link exactly.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::chain::{check_line, GENESIS};

#[derive(Debug)]
pub struct Report {
    pub records: u64,
    pub files: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
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

pub fn verify(files: &[PathBuf]) -> Result<Report, Broken> {
    let mut prev: Option<(u64, String)> = None;
    let mut report = Report {
        records: 0,
        files: files.len(),
        first_seq: 0,
        last_seq: 0,
        first_time: None,
        last_time: None,
    };
    for file in files {
        verify_file(file, &mut prev, &mut report)?;
    }
    Ok(report)
}

fn verify_file(
    path: &Path,
    prev: &mut Option<(u64, String)>,
    report: &mut Report,
) -> Result<(), Broken> {
    let broken = |line: usize, seq: Option<u64>, what: String| Broken {
        file: path.to_path_buf(),
        line,
        seq,
        what,
    };
    let file =
        std::fs::File::open(path).map_err(|e| broken(0, None, format!("cannot open: {e}")))?;
    let mut reader = std::io::BufReader::new(file);
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
        if !buf.ends_with('\n') {
            return Err(broken(
                n,
                None,
                "torn last line (no newline): a write was cut off".into(),
            ));
        }
        let line = buf.trim_end_matches('\n');
        let c = check_line(line).map_err(|what| broken(n, None, what))?;
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
