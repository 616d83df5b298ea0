//! The spool: a directory of gzip JSON batches waiting for the collector,
//! each written (and fsynced) before its first upload and deleted once the
//! collector answered 2xx, so a collector outage or a restart loses
//! nothing.
//!
//! A batch file is named `<first seq>-<last seq>-<events>.json.gz` after
//! the trail lines it covers. The file `cursor` holds the last trail `seq`
//! taken into the spool; with the names it tells, after a restart, where to
//! resume reading the trail. Files appear under their final name only once
//! complete (written as `.tmp`, fsynced, renamed).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

const CURSOR: &str = "cursor";
const SUFFIX: &str = ".json.gz";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    pub bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first.
    batches: VecDeque<Batch>,
    bytes: u64,
    /// The last trail seq taken into the spool (events or not).
    cursor: u64,
}

fn parse_name(name: &str) -> Option<(u64, u64, u64)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let mut parts = stem.split('-');
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    let events = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((first, last, events))
}

impl Spool {
    /// Opens (creating) the spool. `head` is the trail's last seq: a new
    /// spool starts there (the trail's history is not uploaded).
    pub fn open(dir: &Path, max_bytes: u64, head: u64) -> anyhow::Result<Spool> {
        if !dir.is_dir() {
            std::fs::create_dir(dir).with_context(|| {
                format!("cannot create the decision-log spool {}", dir.display())
            })?;
            use std::os::unix::fs::PermissionsExt;
            // Events hold personal data, like the trail.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", dir.display()))?;
        }
        let mut batches = Vec::new();
        let mut cursor_file = None;
        for entry in std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the decision-log spool {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.ends_with(".tmp") {
                // An interrupted write: its lines are re-read from the trail.
                let _ = std::fs::remove_file(&path);
            } else if name == CURSOR {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                cursor_file = Some(text.trim().parse::<u64>().with_context(|| {
                    format!("{}: not a sequence number: {text:?}", path.display())
                })?);
            } else if let Some((first_seq, last_seq, events)) = parse_name(name) {
                let bytes = entry.metadata()?.len();
                batches.push(Batch {
                    path,
                    first_seq,
                    last_seq,
                    events,
                    bytes,
                });
            }
        }
        batches.sort_by_key(|b| b.first_seq);
        let newest = batches.last().map(|b| b.last_seq);
        let fresh = cursor_file.is_none() && newest.is_none();
        let cursor = match (cursor_file, newest) {
            (None, None) => head,
            (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
        };
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            bytes: batches.iter().map(|b| b.bytes).sum(),
            batches: batches.into(),
            cursor,
        };
        if fresh {
            spool.set_cursor(cursor)?;
        }
        Ok(spool)
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn files(&self) -> usize {
        self.batches.len()
    }

    pub fn oldest(&self) -> Option<&Batch> {
        self.batches.front()
    }

    /// True when a batch of `bytes` keeps the spool within its bound.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.bytes + bytes <= self.max_bytes
    }

    /// True when at least half the spool is free (worth reading the trail back).
    pub fn half_free(&self) -> bool {
        self.bytes * 2 <= self.max_bytes
    }

    /// Writes a batch durably and moves the cursor to `last_seq`.
    pub fn write(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        events: u64,
        gz: &[u8],
    ) -> std::io::Result<()> {
        let name = format!("{first_seq:020}-{last_seq:020}-{events}{SUFFIX}");
        let path = self.dir.join(&name);
        write_durably(&self.dir, &path, gz)?;
        self.bytes += gz.len() as u64;
        self.batches.push_back(Batch {
            path,
            first_seq,
            last_seq,
            events,
            bytes: gz.len() as u64,
        });
        self.set_cursor(last_seq)
    }

    /// Moves the cursor past trail lines that gave no event.
    pub fn set_cursor(&mut self, seq: u64) -> std::io::Result<()> {
        write_durably(
            &self.dir,
            &self.dir.join(CURSOR),
            format!("{seq}\n").as_bytes(),
        )?;
        self.cursor = seq;
        Ok(())
    }

    /// Deletes the oldest batch (the collector has it).
    pub fn remove_oldest(&mut self) -> std::io::Result<()> {
        if let Some(b) = self.batches.front() {
            match std::fs::remove_file(&b.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.bytes -= b.bytes;
            self.batches.pop_front();
        }
        Ok(())
    }
}

/// Writes `data` to `path` through a `.tmp` file, fsyncing the file and the
/// directory, so that `path` is either absent, the old content or complete.
fn write_durably(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_and_cursor_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut s = Spool::open(&spool_dir, 1000, 41).unwrap();
        assert_eq!(s.cursor(), 41);
        s.write(42, 50, 8, b"0123456789").unwrap();
        s.write(51, 60, 9, b"01234").unwrap();
        assert_eq!((s.bytes(), s.files()), (15, 2));
        assert!(s.has_room(985) && !s.has_room(986));
        std::fs::write(spool_dir.join("junk.json.gz.tmp"), b"x").unwrap();
        let mut s = Spool::open(&spool_dir, 1000, 0).unwrap();
        assert_eq!((s.cursor(), s.files(), s.bytes()), (60, 2, 15));
        assert_eq!(s.oldest().unwrap().events, 8);
        s.remove_oldest().unwrap();
        s.remove_oldest().unwrap();
        assert_eq!(s.files(), 0);
        // The cursor file keeps the position once the spool is empty.
        let s = Spool::open(&spool_dir, 1000, 0).unwrap();
        assert_eq!(s.cursor(), 60);
        assert!(!spool_dir.join("junk.json.gz.tmp").exists());
    }
}
