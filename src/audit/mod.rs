//! The audit trail: one JSON line per decision, appended to a file.
//!
//! Request tasks serialise their record and hand the line to a queue; one
//! writer thread drains the queue in batches and appends them with a single
//! write. The writer sleeps between batches instead of waiting on the queue,
//! so under load a request never has to wake it.
//!
//! Durability of this first form ("buffered"): a record is handed to the
//! operating system within about `flush_interval` (one write per batch of at
//! most `MAX_BATCH` records), but not fsynced. A crash of rempart loses what
//! is still queued in memory; a crash of the machine can also lose what the
//! OS had not yet written back. A clean stop (SIGTERM) writes and fsyncs
//! everything queued.

pub mod chain;
mod record;
pub mod verify;

pub use record::{
    AuditDecision, AuditEndpoint, AuditGeo, AuditIdentity, AuditRecord, AuditRequest, Transfer,
};

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::metrics::Metrics;

/// Records written with one `write` at most, so that a batch under heavy
/// load does not grow without bound or wait long.
const MAX_BATCH: usize = 4096;

enum Msg {
    /// One record, a JSON object; the writer chains it (see [`chain`]).
    Line(Vec<u8>),
    /// Write and fsync everything before this, then answer.
    Sync(mpsc::Sender<std::io::Result<()>>),
}

/// The sending side, cloned into every worker.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<Msg>,
    metrics: Arc<Metrics>,
}

/// The writer thread; join it after every sink is dropped.
pub struct AuditWriter {
    handle: std::thread::JoinHandle<()>,
}

impl AuditSink {
    /// Opens (creating or appending to) the trail and starts the writer.
    pub fn open(
        path: &Path,
        flush_interval: Duration,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(AuditSink, AuditWriter)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                anyhow::bail!(
                    "audit trail {}: directory {} does not exist",
                    path.display(),
                    parent.display()
                );
            }
        }
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        // The trail holds personal data (who did what): owner-only on creation.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.read(true);
        let file = options
            .open(path)
            .with_context(|| format!("cannot open audit trail {} for appending", path.display()))?;
        let (file, head) = open_chain(file, path)?;
        let (tx, rx) = mpsc::sync_channel(capacity);
        let writer_metrics = Arc::clone(&metrics);
        let path = path.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run_writer(file, head, path, rx, flush_interval, writer_metrics))
            .context("cannot start the audit writer thread")?;
        Ok((AuditSink { tx, metrics }, AuditWriter { handle }))
    }

    /// Queues one record. Never drops: when the queue is full the caller
    /// waits for the writer (and the wait is counted).
    pub fn record(&self, record: &AuditRecord<'_>) {
        let line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                // Only possible with a non-string map key, which the record
                // type does not have; counted so that it cannot pass unseen.
                self.metrics.audit_write_errors.inc();
                tracing::error!("cannot serialise audit record: {e}");
                return;
            }
        };
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                self.metrics.audit_queue_full.inc();
                if self.tx.send(msg).is_err() {
                    self.metrics.audit_write_errors.inc();
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.audit_write_errors.inc();
                tracing::error!("audit writer is gone; record lost");
            }
        }
    }

    /// Waits until every record queued so far is written and fsynced.
    pub fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Msg::Sync(tx))
            .map_err(|_| std::io::Error::other("audit writer is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("audit writer is gone"))?
    }
}

impl AuditWriter {
    /// Waits for the writer to drain the queue, write, fsync and stop.
    /// Call after every [`AuditSink`] clone is dropped.
    pub fn finish(self) {
        if self.handle.join().is_err() {
            tracing::error!("audit writer thread panicked");
        }
    }
}

/// Finds where the chain stands in an existing trail. A torn last line (a
/// crash mid-write) is cut off and the repair is itself recorded, chained.
fn open_chain(mut file: File, path: &Path) -> anyhow::Result<(File, chain::Head)> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((file, chain::Head::genesis()));
    }
    // Read back far enough to hold the last complete line.
    let mut window = 64 * 1024u64;
    let (start, tail) = loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut tail)?;
        let newlines = tail.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || newlines >= 2 {
            break (start, tail);
        }
        window *= 4;
    };
    let complete = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = tail.len() - complete;
    if torn > 0 {
        file.set_len(start + complete as u64)
            .with_context(|| format!("cannot truncate the torn last line of {}", path.display()))?;
        tracing::warn!(path = %path.display(), bytes = torn, "audit trail had a torn last line; truncated");
    }
    let body = &tail[..complete];
    let last = body[..body.len().saturating_sub(1)]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut head = match std::str::from_utf8(last).ok().map(chain::check_line) {
        Some(Ok(c)) => chain::Head {
            seq: c.seq,
            hash: c.hash,
        },
        _ if last.is_empty() => chain::Head::genesis(),
        _ => {
            anyhow::bail!(
                "audit trail {}: its last line is not a valid chained record; \
                 run `rempart audit verify {}` and move the file aside",
                path.display(),
                path.display()
            )
        }
    };
    if torn > 0 {
        let note = serde_json::json!({
            "type": "repair",
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "truncated_bytes": torn,
            "message": "torn last line (crash mid-write) removed at start",
        });
        let line = chain::link(&mut head, note.to_string().as_bytes());
        file.seek(SeekFrom::End(0))?;
        file.write_all(&line)?;
        file.sync_data()?;
    }
    Ok((file, head))
}

fn run_writer(
    mut file: File,
    mut head: chain::Head,
    path: PathBuf,
    rx: Receiver<Msg>,
    flush_interval: Duration,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut pending: u64 = 0;
    let write = |batch: &mut Vec<u8>, pending: &mut u64, file: &mut File| {
        if batch.is_empty() {
            return Ok(());
        }
        let r = file.write_all(batch);
        match &r {
            Ok(()) => metrics.audit_records.inc_by(*pending),
            Err(e) => {
                // Counted per record, so that the loss is known exactly.
                metrics.audit_write_errors.inc_by(*pending);
                tracing::error!(path = %path.display(), records = *pending, "audit write failed: {e}");
            }
        }
        batch.clear();
        *pending = 0;
        r
    };
    loop {
        // Block only while idle; once work arrives, let a batch gather.
        let first = match rx.recv() {
            Ok(m) => m,
            Err(_) => break,
        };
        if !flush_interval.is_zero() {
            std::thread::sleep(flush_interval);
        }
        let mut next = Some(first);
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Line(l) => {
                    batch.extend_from_slice(&chain::link(&mut head, &l));
                    pending += 1;
                    if pending as usize >= MAX_BATCH {
                        let _ = write(&mut batch, &mut pending, &mut file);
                    }
                }
                Msg::Sync(ack) => {
                    let r =
                        write(&mut batch, &mut pending, &mut file).and_then(|_| file.sync_data());
                    let _ = ack.send(r);
                }
            }
        }
        let _ = write(&mut batch, &mut pending, &mut file);
    }
    // Every sender is gone: the queue is drained; make it durable.
    let _ = write(&mut batch, &mut pending, &mut file);
    if let Err(e) = file.sync_all() {
        metrics.audit_write_errors.inc();
        tracing::error!(path = %path.display(), "audit fsync at shutdown failed: {e}");
    }
}
