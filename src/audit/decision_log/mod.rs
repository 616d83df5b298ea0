//! The decision log: every decision in the trail, as an OPA decision-log
//! event, uploaded to a collector as gzip JSON arrays (`POST`), through a
//! disk spool so that neither a collector outage nor a restart loses one.
//!
//! It is a sink like stdout and syslog (fed by the writer, after the lines
//! are in the file, through a bounded queue it never blocks on), with one
//! difference: the trail file is its source of truth. Lines it could not
//! take — its queue was full, the spool was full or could not be written,
//! rempart stopped before they were spooled — are read back from the trail
//! (rotated files included) from the spool's cursor on. So events are
//! delivered at least once, in trail order; a duplicate (same
//! `decision_id`) is only possible when rempart stops between the
//! collector's 2xx and the deletion of the batch, or when an answer is
//! lost after the collector kept the batch (timeout). The only losses are
//! trail lines removed by `rotate_keep` before they were spooled, counted
//! in `rempart_audit_decision_log_dropped_total{reason="not_in_trail"}`.

pub mod event;
mod spool;
mod upload;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::DecisionLogConfig;
use crate::metrics::Metrics;

use super::files;
use super::sinks::SinkHandle;
use super::writer::Shared;
use event::Labels;
use spool::Spool;
use std::sync::atomic::Ordering;
use upload::{Jitter, Outcome, Uploader};

/// `[audit.decision_log]`, resolved.
#[derive(Debug, Clone)]
pub struct DecisionLogOptions {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub bearer_token_file: Option<PathBuf>,
    pub timeout: Duration,
    pub batch_max_bytes: u64,
    pub batch_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl DecisionLogOptions {
    pub fn from_config(cfg: &DecisionLogConfig, trail: &Path) -> DecisionLogOptions {
        DecisionLogOptions {
            url: cfg.url.clone(),
            ca: cfg.ca.clone(),
            bearer_token_file: cfg.bearer_token_file.clone(),
            timeout: cfg.timeout.0,
            batch_max_bytes: cfg.batch_max_bytes.0,
            batch_interval: cfg.batch_interval.0,
            spool_dir: cfg
                .spool_dir
                .clone()
                .unwrap_or_else(|| default_spool(trail)),
            spool_max_bytes: cfg.spool_max_bytes.0,
            backoff_min: cfg.backoff_min.0,
            backoff_max: cfg.backoff_max.0,
            labels: cfg.labels.clone(),
        }
    }
}

/// The trail path + `.spool`.
pub fn default_spool(trail: &Path) -> PathBuf {
    let mut name = trail.file_name().unwrap_or_default().to_os_string();
    name.push(".spool");
    trail.with_file_name(name)
}

/// Opens the spool and the client (errors stop the start), then starts
/// the sink thread. `shared` tells how far the trail is written for good.
pub(in crate::audit) fn start(
    options: &DecisionLogOptions,
    trail: &Path,
    shared: Arc<Shared>,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SinkHandle> {
    let head = shared.committed_seq.load(Ordering::Acquire);
    let mut spool = Spool::open(&options.spool_dir, options.spool_max_bytes, head)?;
    if spool.cursor() > head {
        // The trail was replaced by a shorter one: start again from its end.
        tracing::warn!(
            cursor = spool.cursor(),
            head,
            "decision-log spool is ahead of the trail; resuming from the trail's end"
        );
        spool.set_cursor(head)?;
    }
    let uploader = Uploader::new(
        &options.url,
        options.ca.as_deref(),
        options.bearer_token_file.clone(),
        options.timeout,
    )?;
    let shipper = Shipper {
        trail: trail.to_path_buf(),
        committed: shared,
        next_seq: spool.cursor() + 1,
        behind: spool.cursor() < head,
        spool_refused: false,
        spool,
        uploader,
        labels: Labels::new(&uuid::Uuid::now_v7().to_string(), &options.labels),
        metrics: Arc::clone(&metrics),
        options: options.clone(),
        pending: Pending::default(),
        failures: 0,
        retry_at: None,
        jitter: Jitter::new(),
        resume: None,
    };
    super::sinks::spawn("decision_log", capacity, metrics, true, move |rx| {
        shipper.run(rx)
    })
}

/// The batch being gathered: a JSON array under construction.
#[derive(Default)]
struct Pending {
    json: Vec<u8>,
    events: u64,
    first_seq: Option<u64>,
    last_seq: u64,
    opened: Option<Instant>,
}

impl Pending {
    fn cover(&mut self, seq: u64) {
        if self.first_seq.is_none() {
            self.first_seq = Some(seq);
            self.opened = Some(Instant::now());
        }
        self.last_seq = seq;
    }

    fn push(&mut self, seq: u64, event: &[u8]) {
        self.json.push(if self.events == 0 { b'[' } else { b',' });
        self.json.extend_from_slice(event);
        self.events += 1;
        self.cover(seq);
    }
}

struct Shipper {
    trail: PathBuf,
    /// Lines after `committed.committed_seq` may still be cut back by a
    /// failed write: reading the trail stops before them.
    committed: Arc<Shared>,
    spool: Spool,
    uploader: Uploader,
    labels: Labels,
    metrics: Arc<Metrics>,
    options: DecisionLogOptions,
    pending: Pending,
    /// The next trail seq to take.
    next_seq: u64,
    /// Lines from `next_seq` on must be read from the trail file (the
    /// queue's copies are ignored meanwhile).
    behind: bool,
    /// The spool refused the last batch (full or unwritable): reading the
    /// trail back waits until half of it is free, rather than retrying a
    /// full spool for every line. Lines lost by the queue alone do not
    /// wait: the spool has room for them now.
    spool_refused: bool,
    failures: u32,
    retry_at: Option<Instant>,
    jitter: Jitter,
    /// Where the last read of the active file stopped, so that the next
    /// one does not read the whole file again.
    resume: Option<Resume>,
}

/// A position in the active trail file: the line at `offset` has a seq of
/// at least `seq` (lines before it are all below `seq`). The file is known
/// by its inode and the seq of its first line (an inode can be reused).
#[derive(Debug, Clone, Copy)]
struct Resume {
    ino: u64,
    first_seq: Option<u64>,
    offset: u64,
    seq: u64,
}

impl Shipper {
    fn run(mut self, rx: Receiver<Vec<u8>>) {
        self.gauges();
        loop {
            self.upload_one();
            if self.wants_trail() {
                self.catch_up();
            }
            match rx.recv_timeout(self.next_wake()) {
                Ok(lines) => self.take_lines(&lines),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let due = self.pending.json.len() as u64 >= self.options.batch_max_bytes
                || self
                    .pending
                    .opened
                    .is_some_and(|t| t.elapsed() >= self.options.batch_interval);
            if due && !self.behind && !self.flush() {
                self.behind = true;
            }
        }
        // Stopping: spool what the trail holds, then give the collector
        // one chance (bounded by `timeout`) to take the spool.
        if self.flush() {
            self.catch_up();
        }
        let deadline = Instant::now() + self.options.timeout;
        self.retry_at = None;
        while self.spool.files() > 0 && Instant::now() < deadline {
            if !self.upload_one() {
                break;
            }
        }
        if self.spool.files() > 0 {
            tracing::info!(
                files = self.spool.files(),
                bytes = self.spool.bytes(),
                "decision-log spool kept for the next start"
            );
        }
    }

    /// Lines are waiting in the trail and the spool can take some: after
    /// a refusal, only once half of it is free again.
    fn wants_trail(&self) -> bool {
        self.behind && (!self.spool_refused || self.spool.half_free())
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        if self.spool.files() > 0 && self.retry_at.is_none_or(|t| t <= now) {
            return Duration::ZERO;
        }
        let mut wake = now + Duration::from_secs(1);
        if let Some(t) = self.retry_at {
            wake = wake.min(t);
        }
        if let Some(t) = self.pending.opened {
            wake = wake.min(t + self.options.batch_interval);
        }
        wake.saturating_duration_since(now)
    }

    fn gauges(&self) {
        let m = &self.metrics.decision_log;
        m.spool_bytes
            .set(i64::try_from(self.spool.bytes()).unwrap_or(i64::MAX));
        m.spool_files
            .set(i64::try_from(self.spool.files()).unwrap_or(i64::MAX));
    }

    /// Uploads the oldest batch if one is waiting and no backoff is running.
    /// False when an upload was tried and failed.
    fn upload_one(&mut self) -> bool {
        let Some(batch) = self.spool.oldest().cloned() else {
            return true;
        };
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return true;
        }
        let m = &self.metrics.decision_log;
        let body = match std::fs::read(&batch.path) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(file = %batch.path.display(), "decision-log batch unreadable: {e}");
                m.dropped_unreadable.inc_by(batch.events);
                if let Err(e) = self.spool.remove_oldest() {
                    tracing::error!("cannot remove a decision-log batch: {e}");
                }
                self.gauges();
                return true;
            }
        };
        let outcome = self.uploader.post(body);
        match outcome {
            Outcome::Delivered => {
                m.upload_success.inc();
                m.events_delivered.inc_by(batch.events);
                self.failures = 0;
                self.retry_at = None;
                if let Err(e) = self.spool.remove_oldest() {
                    // The collector has it; it would be sent again after a
                    // restart (a duplicate, never a loss).
                    tracing::error!(file = %batch.path.display(), "cannot remove a delivered decision-log batch: {e}");
                }
                self.gauges();
                true
            }
            failed => {
                match &failed {
                    Outcome::Status(_) => m.upload_http_error.inc(),
                    _ => m.upload_network_error.inc(),
                }
                self.failures = self.failures.saturating_add(1);
                let wait = upload::backoff(
                    self.options.backoff_min,
                    self.options.backoff_max,
                    self.failures,
                    self.jitter.next(),
                );
                self.retry_at = Some(Instant::now() + wait);
                tracing::warn!(
                    url = %self.options.url,
                    first_seq = batch.first_seq,
                    retry_in = ?wait,
                    "decision-log upload failed: {failed:?}"
                );
                false
            }
        }
    }

    fn take_lines(&mut self, lines: &[u8]) {
        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if !self.take(line, false) {
                return;
            }
        }
    }

    /// Takes one trail line into the pending batch. False when it could not
    /// (out of order or the spool refused a batch): the caller stops and
    /// the trail is read back later.
    fn take(&mut self, line: &[u8], from_trail: bool) -> bool {
        let m = &self.metrics.decision_log;
        let Some(seq) = event::seq_of(line) else {
            m.dropped_unreadable.inc();
            return true;
        };
        if seq < self.next_seq {
            return true;
        }
        if !from_trail && self.behind {
            return false;
        }
        if seq > self.next_seq {
            if !from_trail {
                // The queue lost lines (it was full): read them back.
                self.behind = true;
                return false;
            }
            m.dropped_not_in_trail.inc_by(seq - self.next_seq);
            tracing::error!(
                from = self.next_seq,
                to = seq - 1,
                "trail lines removed before the decision log could send them"
            );
            self.next_seq = seq;
        }
        let event = match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(record) => {
                event::event(&record, &self.labels).and_then(|e| serde_json::to_vec(&e).ok())
            }
            Err(_) => {
                m.dropped_unreadable.inc();
                None
            }
        };
        match event {
            Some(event) => {
                let full = self.pending.events > 0
                    && (self.pending.json.len() + event.len() + 1) as u64
                        > self.options.batch_max_bytes;
                if full && !self.flush() {
                    self.behind = true;
                    return false;
                }
                self.pending.push(seq, &event);
            }
            None => self.pending.cover(seq),
        }
        if from_trail {
            self.metrics.decision_log.recovered.inc();
        }
        self.next_seq = seq + 1;
        true
    }

    /// Spools the pending batch. False (the batch stays pending) when the
    /// spool is full or cannot be written, which the shipper remembers in
    /// `spool_refused`.
    fn flush(&mut self) -> bool {
        let spooled = self.spool_pending();
        self.spool_refused = !spooled;
        spooled
    }

    fn spool_pending(&mut self) -> bool {
        let Some(first) = self.pending.first_seq else {
            return true;
        };
        let last = self.pending.last_seq;
        let m = &self.metrics.decision_log;
        if self.pending.events == 0 {
            // Nothing to send; a lost cursor only means re-reading lines
            // that give no event.
            if let Err(e) = self.spool.set_cursor(last) {
                tracing::warn!("cannot write the decision-log cursor: {e}");
            }
            self.pending = Pending::default();
            return true;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let body = gz
            .write_all(&self.pending.json)
            .and_then(|()| gz.write_all(b"]"))
            .and_then(|()| gz.finish());
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot compress a decision-log batch: {e}");
                m.spool_write_error.inc();
                return false;
            }
        };
        if !self.spool.has_room(body.len() as u64) {
            m.spool_full.inc();
            tracing::warn!(
                spool_bytes = self.spool.bytes(),
                "decision-log spool full; events wait in the trail"
            );
            return false;
        }
        if let Err(e) = self.spool.write(first, last, self.pending.events, &body) {
            m.spool_write_error.inc();
            tracing::error!("cannot write a decision-log batch to the spool: {e}");
            return false;
        }
        m.events_spooled.inc_by(self.pending.events);
        self.pending = Pending::default();
        self.gauges();
        true
    }

    /// Reads the trail (rotated files, then the active one) from
    /// `next_seq`, until its end or until the spool is full.
    fn catch_up(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if !self.flush() {
            return;
        }
        const ATTEMPTS: usize = 3;
        'attempt: for attempt in 1..=ATTEMPTS {
            // While the active file is the one read last time, everything
            // from `next_seq` on is in it, after the position kept then.
            let active_ino = std::fs::metadata(&self.trail).map(|m| m.ino()).ok();
            let resume = self
                .resume
                .filter(|r| Some(r.ino) == active_ino && r.seq <= self.next_seq);
            let mut sources = Vec::new();
            if resume.is_none() {
                let rotated = match files::rotated_files(&self.trail) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("decision log: cannot list the trail's files: {e}");
                        return;
                    }
                };
                sources.extend(
                    rotated
                        .into_iter()
                        .filter(|r| r.last_seq >= self.next_seq)
                        .map(|r| r.path),
                );
            }
            sources.push(self.trail.clone());
            for path in sources {
                let active = path == self.trail;
                let opened = if active {
                    open_active(&path, resume)
                } else {
                    files::open_lines(&path).map(|r| (r, 0, 0, None))
                };
                let (mut reader, mut offset, ino, first_seq) = match opened {
                    Ok(r) => r,
                    // Compressed or rotated meanwhile: list again.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < ATTEMPTS => {
                        self.resume = None;
                        continue 'attempt;
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), "decision log: cannot read the trail: {e}");
                        return;
                    }
                };
                let mut line = Vec::new();
                loop {
                    line.clear();
                    let n = match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) if line.last() != Some(&b'\n') => break,
                        Ok(n) => n as u64,
                        Err(e) => {
                            tracing::error!(file = %path.display(), "decision log: cannot read the trail: {e}");
                            return;
                        }
                    };
                    let text = &line[..line.len() - 1];
                    // Not yet written for good: the queue brings it once it is.
                    let committed = self.committed.committed_seq.load(Ordering::Acquire);
                    if event::seq_of(text).is_some_and(|s| s > committed) {
                        break;
                    }
                    // A gap may only mean the file was rotated between the
                    // listing and the opening: list again before calling
                    // it a loss.
                    if event::seq_of(text).is_some_and(|s| s > self.next_seq) && attempt < ATTEMPTS
                    {
                        self.resume = None;
                        continue 'attempt;
                    }
                    let seq_before = self.next_seq;
                    if !self.take(text, true) {
                        if active {
                            self.resume = Some(Resume {
                                ino,
                                first_seq,
                                offset,
                                seq: seq_before,
                            });
                        }
                        return;
                    }
                    offset += n;
                }
                if active {
                    self.resume = Some(Resume {
                        ino,
                        first_seq,
                        offset,
                        seq: self.next_seq,
                    });
                }
            }
            self.behind = false;
            return;
        }
    }
}

/// Opens the active trail file for reading, at `resume`'s position when it
/// is the same file: (reader, offset, inode, seq of the first line).
type ActiveFile = (Box<dyn BufRead>, u64, u64, Option<u64>);

fn open_active(path: &Path, resume: Option<Resume>) -> std::io::Result<ActiveFile> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut reader = std::io::BufReader::new(file);
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first)?;
    let first_seq = event::seq_of(&first);
    let offset = match resume {
        Some(r)
            if r.ino == meta.ino()
                && r.first_seq == first_seq
                && first_seq.is_some()
                && r.offset <= meta.len() =>
        {
            r.offset
        }
        _ => 0,
    };
    reader.seek(SeekFrom::Start(offset))?;
    Ok((Box::new(reader), offset, meta.ino(), first_seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain;

    fn append(path: &Path, head: &mut chain::Head, n: usize) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for _ in 0..n {
            let rec = format!("{{\"decision_id\":\"d{}\"}}", head.seq + 1);
            f.write_all(&chain::link(head, rec.as_bytes())).unwrap();
        }
    }

    fn spooled_ids(dir: &Path) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(".json.gz"))
            .collect();
        files.sort();
        let mut ids = Vec::new();
        for f in files {
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap()),
                &mut text,
            )
            .unwrap();
            let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            ids.extend(
                events
                    .iter()
                    .map(|e| e["decision_id"].as_str().unwrap().to_string()),
            );
        }
        ids
    }

    /// A shipper for the trail at `trail` whose last line is `head`, with
    /// batches of at most 1 KiB, a collector that is never there and no
    /// thread: the tests drive it.
    fn shipper(
        trail: &Path,
        spool_dir: &Path,
        spool_max_bytes: u64,
        head: u64,
        metrics: &Arc<Metrics>,
        shared: &Arc<Shared>,
    ) -> Shipper {
        let options = DecisionLogOptions {
            url: "http://127.0.0.1:1/logs".into(),
            ca: None,
            bearer_token_file: None,
            timeout: Duration::from_secs(1),
            batch_max_bytes: 1024,
            batch_interval: Duration::from_secs(1),
            spool_dir: spool_dir.to_path_buf(),
            spool_max_bytes,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(2),
            labels: Default::default(),
        };
        let spool = Spool::open(spool_dir, spool_max_bytes, head).unwrap();
        Shipper {
            trail: trail.to_path_buf(),
            committed: Arc::clone(shared),
            next_seq: spool.cursor() + 1,
            behind: spool.cursor() < head,
            spool_refused: false,
            spool,
            uploader: Uploader::new(&options.url, None, None, options.timeout).unwrap(),
            labels: Labels::new("t", &Default::default()),
            metrics: Arc::clone(metrics),
            options,
            pending: Pending::default(),
            failures: 0,
            retry_at: None,
            jitter: Jitter::new(),
            resume: None,
        }
    }

    #[test]
    fn catching_up_reads_each_line_once_across_rotations_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let trail = dir.path().join("t.jsonl");
        let spool_dir = dir.path().join("spool");
        let mut head = chain::Head::genesis();
        append(&trail, &mut head, 5);
        let metrics = Arc::new(Metrics::new());
        // A spool made when the trail held 2 lines: 3 are behind.
        drop(Spool::open(&spool_dir, 1 << 20, 2).unwrap());
        let shared = Arc::new(Shared::default());
        shared.committed_seq.store(u64::MAX, Ordering::Release);
        let mut s = shipper(&trail, &spool_dir, 1 << 20, 5, &metrics, &shared);
        assert!(s.behind);
        s.catch_up();
        assert!(!s.behind);
        assert!(s.flush());
        assert_eq!(spooled_ids(&spool_dir), ["d3", "d4", "d5"]);
        let resume = s.resume.unwrap();
        assert_eq!((resume.seq, resume.first_seq), (6, Some(1)));

        // More lines: the next read starts where the last one stopped.
        append(&trail, &mut head, 2);
        s.behind = true;
        s.catch_up();
        assert!(s.flush());
        assert!(s.resume.unwrap().offset > resume.offset);
        // The queue's copy of a line already read is ignored; a line
        // after a gap makes it read the trail again.
        s.take_lines(&std::fs::read(&trail).unwrap());
        assert!(!s.behind);

        // Rotation: the active file is renamed and a new one started.
        append(&trail, &mut head, 1);
        std::fs::rename(&trail, files::rotated_name(&trail, head.seq)).unwrap();
        append(&trail, &mut head, 2);
        s.take_lines(&chain::link(&mut head.clone(), b"{\"decision_id\":\"x\"}"));
        assert!(s.behind, "a gap in the queue's lines");
        // Line 10 is in the file but not yet written for good: not read.
        shared.committed_seq.store(9, Ordering::Release);
        s.catch_up();
        assert!(!s.behind);
        assert_eq!(s.next_seq, 10);
        // Its write succeeded: the queue brings it.
        shared.committed_seq.store(10, Ordering::Release);
        let text = std::fs::read_to_string(&trail).unwrap();
        s.take_lines(text.lines().last().unwrap().as_bytes());
        assert!(s.flush());
        assert_eq!(
            spooled_ids(&spool_dir),
            ["d3", "d4", "d5", "d6", "d7", "d8", "d9", "d10"]
        );
        assert_eq!(metrics.decision_log.recovered.get(), 7);
        assert_eq!(metrics.decision_log.dropped_not_in_trail.get(), 0);
        assert_eq!(s.spool.cursor(), 10);
    }

    #[test]
    fn lines_lost_by_the_queue_are_read_back_while_the_spool_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let trail = dir.path().join("t.jsonl");
        let spool_dir = dir.path().join("spool");
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::default());
        shared.committed_seq.store(u64::MAX, Ordering::Release);
        let mut head = chain::Head::genesis();
        // Room for a few batches of ~1 KiB of events each.
        let max = 4096;
        let mut s = shipper(&trail, &spool_dir, max, 0, &metrics, &shared);

        // The queue brings lines until the spool is more than half full.
        let mut lines = Vec::new();
        while s.spool.half_free() {
            let before = head.seq;
            append(&trail, &mut head, 10);
            let text = std::fs::read(&trail).unwrap();
            lines = text
                .split(|&b| b == b'\n')
                .filter(|l| event::seq_of(l).is_some_and(|q| q > before))
                .map(|l| l.to_vec())
                .collect();
            s.take_lines(&lines.join(&b'\n'));
            assert!(s.flush());
            assert!(!s.behind);
        }
        assert_eq!(lines.len(), 10);

        // The queue loses a line: the trail is read back at once, though
        // the spool is not half free, until the spool refuses a batch.
        append(&trail, &mut head, 60);
        let text = std::fs::read_to_string(&trail).unwrap();
        s.take_lines(text.lines().last().unwrap().as_bytes());
        assert!(s.behind);
        assert!(s.wants_trail(), "the spool has room: read the trail");
        s.catch_up();
        assert!(s.behind, "the trail holds more than the spool takes");
        assert_eq!(metrics.decision_log.spool_full.get(), 1);
        assert!(s.spool.bytes() <= max);
        // Refused: wait until half of it is free rather than retry.
        assert!(!s.wants_trail());
        while !s.spool.half_free() {
            s.spool.remove_oldest().unwrap();
        }
        assert!(s.wants_trail());
        s.catch_up();
        assert!(metrics.decision_log.recovered.get() > 0);
    }
}
