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
use event::Labels;
use spool::Spool;
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
/// the sink thread. `head` is the trail's last seq when the writer starts.
pub fn start(
    options: &DecisionLogOptions,
    trail: &Path,
    head: u64,
    capacity: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SinkHandle> {
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
        next_seq: spool.cursor() + 1,
        behind: spool.cursor() < head,
        spool,
        uploader,
        labels: Labels::new(&uuid::Uuid::now_v7().to_string(), &options.labels),
        metrics: Arc::clone(&metrics),
        options: options.clone(),
        pending: Pending::default(),
        failures: 0,
        retry_at: None,
        jitter: Jitter::new(),
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
    failures: u32,
    retry_at: Option<Instant>,
    jitter: Jitter,
}

impl Shipper {
    fn run(mut self, rx: Receiver<Vec<u8>>) {
        self.gauges();
        loop {
            self.upload_one();
            if self.behind && self.spool.half_free() {
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
    /// spool is full or cannot be written.
    fn flush(&mut self) -> bool {
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
        if !self.flush() {
            return;
        }
        const ATTEMPTS: usize = 3;
        'attempt: for attempt in 1..=ATTEMPTS {
            let rotated = match files::rotated_files(&self.trail) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("decision log: cannot list the trail's files: {e}");
                    return;
                }
            };
            let mut sources: Vec<PathBuf> = rotated
                .into_iter()
                .filter(|r| r.last_seq >= self.next_seq)
                .map(|r| r.path)
                .collect();
            sources.push(self.trail.clone());
            for path in sources {
                let mut reader = match files::open_lines(&path) {
                    Ok(r) => r,
                    // Compressed or rotated meanwhile: list again.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < ATTEMPTS => {
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
                    match reader.read_until(b'\n', &mut line) {
                        Ok(0) => break,
                        Ok(_) if line.last() != Some(&b'\n') => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(file = %path.display(), "decision log: cannot read the trail: {e}");
                            return;
                        }
                    }
                    let text = &line[..line.len() - 1];
                    // A gap may only mean the file was rotated between the
                    // listing and the opening: list again before calling
                    // it a loss.
                    if event::seq_of(text).is_some_and(|s| s > self.next_seq) && attempt < ATTEMPTS
                    {
                        continue 'attempt;
                    }
                    if !self.take(text, true) {
                        return;
                    }
                }
            }
            self.behind = false;
            return;
        }
    }
}
