//! The writer thread: takes records from the queue in batches, chains them,
//! appends each batch with one write, fsyncs when the durability mode asks,
//! acknowledges sync-mode records, rotates the file, and notes in the trail
//! itself any record that could not be written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::oneshot;

use super::checkpoint::Checkpointer;
use super::queue::{Hand, Queue, Woke};
use super::{chain, files};
use crate::metrics::Metrics;

/// Records written with one `write` at most, so that a batch under heavy
/// load does not grow without bound or wait long.
const MAX_BATCH: usize = 4096;
/// A commit's buffer larger than this is freed after the commit rather
/// than kept: a batch under steady load is a few hundred KiB, a full one
/// of [`MAX_BATCH`] records about 5 MiB.
const MAX_KEPT_BATCH: usize = 1 << 20;
/// Buffered mode, after a failed write: the first wait before retrying
/// the records kept, doubled at each failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Attempts at the last write when the writer stops (about three seconds
/// with the backoff) before the records still held are given up, loudly.
const SHUTDOWN_ATTEMPTS: u32 = 6;

/// State the writer shares with the request side.
#[derive(Default)]
pub(super) struct Shared {
    /// The last commit failed (sync mode refuses new work while it holds).
    pub failing: AtomicBool,
    /// Records dropped on a full queue since the last note in the trail.
    pub dropped: AtomicU64,
    /// The seq of the last line known to be in the file for good: lines
    /// after it may still be cut back by a failed write. Readers of the
    /// live file (the decision log) stop there.
    pub committed_seq: AtomicU64,
    /// Every sender is gone and the writer is asked to finish: even at the
    /// bound of records kept after failed writes, it drains the queue and
    /// stops.
    pub stopping: AtomicBool,
    /// Set by the writer when it stopped with records it could not write.
    pub unwritten: AtomicU64,
    /// Records the writer has in hand: the batch being written, or those
    /// kept after a failed write.
    pub holding: AtomicUsize,
    /// The most records found waiting since start.
    pub peak: AtomicUsize,
}

impl Shared {
    /// Records waiting for the trail now (queued or in the writer's hand),
    /// noted in the peak. Read at each batch and at each scrape, so that a
    /// write stuck on a slow disk still shows the queue growing.
    pub fn waiting(&self, queue: &Queue) -> usize {
        let waiting = queue.len() + self.holding.load(Ordering::Acquire);
        self.peak.fetch_max(waiting, Ordering::AcqRel);
        waiting
    }

    /// Sets the queue gauges from [`Shared::waiting`].
    pub fn publish_waiting(&self, queue: &Queue, metrics: &Metrics) {
        let waiting = self.waiting(queue);
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.audit_queue_records.set(gauge(waiting));
        metrics
            .audit_queue_records_peak
            .set(gauge(self.peak.load(Ordering::Acquire)));
    }
}

#[derive(Debug, Clone)]
pub struct Rotation {
    /// Rotate before a write would take the file past this size (0 = never).
    pub size: u64,
    /// Rotate once the file's first record is this old.
    pub age: Option<Duration>,
    /// Rotated files kept (0 = all).
    pub keep: usize,
}

pub(super) struct WriterSettings {
    pub flush_interval: Duration,
    pub fsync_each_batch: bool,
    pub rotation: Rotation,
    /// Buffered mode: records kept for a retry after failed writes, at
    /// most (the queue capacity). At the bound the writer stops taking
    /// from the queue, which fills, and `on_full` decides: senders wait,
    /// or drop (counted, and noted by a `loss` record).
    pub retain_max: usize,
}

/// The active file and where the chain stands.
pub(super) struct Trail {
    path: PathBuf,
    file: File,
    /// Bytes in the file: a failed write is cut back to this length.
    len: u64,
    /// When the file's first record was written (for `rotate_age`).
    started: SystemTime,
    pub(super) head: chain::Head,
    /// Records whose write failed since the last successful one.
    lost: u64,
    /// The written part's page cache, handed back as the file grows.
    cache: files::PageRelease,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true).read(true);
    // The trail holds personal data (who did what): owner-only on creation.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl Trail {
    /// Opens (creating or appending to) the active file and finds where the
    /// chain stands: its last line, or, when it is empty, the last line of
    /// the newest rotated file. A torn last line (a crash mid-write) is cut
    /// off and the repair is itself recorded, chained.
    pub fn open(path: &Path) -> anyhow::Result<Trail> {
        let mut file = open_append(path)
            .with_context(|| format!("cannot open audit trail {} for appending", path.display()))?;
        let len = file.metadata()?.len();
        let (complete, torn, last, first) = read_ends(&mut file, len)
            .with_context(|| format!("cannot read audit trail {}", path.display()))?;
        if torn > 0 {
            file.set_len(complete).with_context(|| {
                format!("cannot truncate the torn last line of {}", path.display())
            })?;
            tracing::warn!(path = %path.display(), bytes = torn, "audit trail had a torn last line; truncated");
        }
        let refused = |what: &Path| {
            anyhow::anyhow!(
                "audit trail {}: the last line of {} is not a valid chained record; \
                 run `rempart audit verify` on it and move the file aside",
                path.display(),
                what.display()
            )
        };
        let mut head = match last {
            Some(line) => head_of(&line).ok_or_else(|| refused(path))?,
            None => match files::rotated_files(path)?.last() {
                // An empty active file after a rotation continues the chain
                // of the file before it.
                Some(prev) => match files::last_line(&prev.path)? {
                    Some(line) => head_of(&line).ok_or_else(|| refused(&prev.path))?,
                    None => chain::Head::genesis(),
                },
                None => chain::Head::genesis(),
            },
        };
        let started = first
            .as_deref()
            .and_then(first_timestamp)
            .unwrap_or_else(SystemTime::now);
        let mut len = complete;
        if torn > 0 {
            let note = serde_json::json!({
                "type": "repair",
                "timestamp": now_rfc3339(),
                "truncated_bytes": torn,
                "message": "torn last line (crash mid-write) removed at start",
            });
            let line = chain::link(&mut head, note.to_string().as_bytes());
            file.seek(SeekFrom::End(0))?;
            file.write_all(&line)?;
            file.sync_data()?;
            len += line.len() as u64;
        }
        Ok(Trail {
            path: path.to_path_buf(),
            file,
            len,
            started,
            head,
            lost: 0,
            cache: files::PageRelease::default(),
        })
    }

    fn rotation_due(&self, rotation: &Rotation, incoming: usize) -> bool {
        if self.len == 0 {
            return false;
        }
        let too_big = rotation.size > 0 && self.len + incoming as u64 > rotation.size;
        let too_old = rotation
            .age
            .is_some_and(|age| self.started.elapsed().unwrap_or_default() >= age);
        too_big || too_old
    }

    /// Closes the active file under its rotated name (holding records up
    /// to `last_seq`) and starts a new, empty one.
    fn rotate(&mut self, last_seq: u64) -> anyhow::Result<PathBuf> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot fsync {}", self.path.display()))?;
        let rotated = files::rotated_name(&self.path, last_seq);
        std::fs::rename(&self.path, &rotated).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.path.display(),
                rotated.display()
            )
        })?;
        let file = match open_append(&self.path) {
            Ok(f) => f,
            Err(e) => {
                // Put the old file back so that writing can go on.
                let _ = std::fs::rename(&rotated, &self.path);
                return Err(e).with_context(|| format!("cannot create {}", self.path.display()));
            }
        };
        files::sync_dir(&self.path);
        self.file = file;
        self.len = 0;
        self.cache.restart();
        self.started = SystemTime::now();
        Ok(rotated)
    }
}

/// Reads the file's first and last complete lines: returns (length of the
/// complete lines, bytes of a torn tail, last line, first line).
fn read_ends(
    file: &mut File,
    len: u64,
) -> std::io::Result<(u64, u64, Option<String>, Option<String>)> {
    if len == 0 {
        return Ok((0, 0, None, None));
    }
    let mut first = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    Read::by_ref(file).take(64 * 1024).read_to_end(&mut first)?;
    let first = first
        .split(|&b| b == b'\n')
        .next()
        .filter(|_| first.contains(&b'\n'))
        .map(|l| String::from_utf8_lossy(l).into_owned());
    // Read back far enough to hold the last complete line.
    let mut window = 64 * 1024u64;
    let (start, tail) = loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut tail)?;
        let newlines = tail.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || newlines >= 2 {
            break (start, tail);
        }
        window *= 4;
    };
    let complete = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = (tail.len() - complete) as u64;
    let body = &tail[..complete];
    let last = body[..body.len().saturating_sub(1)]
        .rsplit(|&b| b == b'\n')
        .next()
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8_lossy(l).into_owned());
    Ok((start + complete as u64, torn, last, first))
}

fn head_of(line: &str) -> Option<chain::Head> {
    chain::check_line(line).ok().map(|c| chain::Head {
        seq: c.seq,
        hash: c.hash,
    })
}

fn first_timestamp(line: &str) -> Option<SystemTime> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    humantime::parse_rfc3339(v["timestamp"].as_str()?).ok()
}

/// Compresses rotated files and applies retention, off the writer thread so
/// that a large file never stalls requests waiting for their records.
pub(super) struct Compressor {
    tx: Option<mpsc::Sender<PathBuf>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Compressor {
    pub fn start(active: &Path, keep: usize, metrics: Arc<Metrics>) -> anyhow::Result<Compressor> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let active = active.to_path_buf();
        // Finish what a crash interrupted: rotated files left uncompressed.
        for r in files::rotated_files(&active)? {
            if !r.compressed {
                let _ = tx.send(r.path);
            }
        }
        let handle = std::thread::Builder::new()
            .name("audit-compress".into())
            .spawn(move || {
                for path in rx {
                    match files::compress(&path) {
                        Ok(gz) => tracing::info!(file = %gz.display(), "rotated audit file compressed"),
                        Err(e) => {
                            metrics.audit_write_errors.inc();
                            tracing::error!("cannot compress rotated audit file: {e:#}");
                        }
                    }
                    match files::apply_retention(&active, keep) {
                        Ok(removed) => {
                            for r in removed {
                                tracing::info!(file = %r.display(), "old audit file removed (rotate_keep)");
                            }
                        }
                        Err(e) => tracing::error!("audit retention failed: {e:#}"),
                    }
                }
            })
            .context("cannot start the audit compression thread")?;
        Ok(Compressor {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    fn send(&self, path: PathBuf) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(path);
        }
    }

    /// Waits for every queued compression.
    pub fn finish(mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("audit compression thread panicked");
            }
        }
    }
}

/// Everything the writer thread owns.
pub(super) struct Writer {
    pub trail: Trail,
    pub settings: WriterSettings,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub compressor: Compressor,
    pub checkpointer: Option<Checkpointer>,
    /// Copies of the trail (stdout, syslog), fed only with written lines.
    pub sinks: Vec<super::sinks::SinkHandle>,
    pub queue: Arc<Queue>,
    /// The chained lines of one commit, kept between commits.
    pub batch: Vec<u8>,
    /// Of the records held after failed writes (buffered mode), how many
    /// `rempart_audit_write_errors_total` already counted.
    pub failed_counted: usize,
}

impl Writer {
    pub fn run(mut self) {
        // However the loop ends, senders must not wait for a writer that
        // is gone.
        struct Gone(Arc<Queue>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.close_writer();
            }
        }
        let _gone = Gone(Arc::clone(&self.queue));
        let mut records = Hand::default();
        let mut acks = Vec::new();
        let mut backlog = false;
        let mut retry = RETRY_MIN;
        let mut closed = false;
        while !closed {
            let fsync = self.settings.fsync_each_batch;
            let limit;
            if records.is_empty() {
                // Block only while idle; once work arrives, let a batch
                // gather (buffered mode). In sync mode the batch is
                // whatever arrived during the previous write and fsync:
                // group commit.
                let wait = self.checkpointer.as_ref().and_then(Checkpointer::wait);
                // Records wait for a checkpoint: sign them when the
                // interval ends even if no other record comes (retrying
                // every second while the trail cannot be written).
                let wait = wait.map(|w| {
                    if self.shared.failing.load(Ordering::Relaxed) {
                        w.max(Duration::from_secs(1))
                    } else {
                        w
                    }
                });
                match self.queue.wait(wait) {
                    Woke::Work => {}
                    Woke::TimedOut => {
                        let _ = self.commit(&mut records, fsync, false);
                        continue;
                    }
                    Woke::Closed => break,
                }
                if !fsync && !backlog && !self.settings.flush_interval.is_zero() {
                    std::thread::sleep(self.settings.flush_interval);
                }
                limit = MAX_BATCH;
            } else {
                // Buffered mode after a failed write: the records are
                // kept. Wait, then retry them with whatever arrived
                // meanwhile, up to the bound (beyond it the queue fills
                // and `on_full` decides).
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_MAX);
                limit = if self.shared.stopping.load(Ordering::Acquire) {
                    usize::MAX
                } else {
                    self.settings.retain_max.max(1)
                };
            }
            let taken = self.queue.take(&mut records, limit, &self.shared.holding);
            closed = taken.closed;
            self.shared.waiting(&self.queue);
            backlog = records.len() >= MAX_BATCH;
            records.take_acks(&mut acks);
            // A sync request: everything before it written and fsynced.
            let fsync = fsync || !taken.syncs.is_empty();
            let result = self.commit(&mut records, fsync, false);
            let ok = result.is_ok();
            self.note_holding(records.len());
            answer(&mut acks, ok);
            for reply in taken.syncs {
                let _ = reply.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
            if ok {
                retry = RETRY_MIN;
            }
        }
        // Every sender is gone: the queue is drained; sign and make it
        // durable. Records still held after failed writes get a few more
        // attempts, then are given up, loudly.
        let mut attempts = 0;
        while let Err(e) = self.commit(&mut records, true, true) {
            attempts += 1;
            if attempts >= SHUTDOWN_ATTEMPTS {
                let unwritten = records.len() as u64 + self.trail.lost;
                self.shared.unwritten.store(unwritten, Ordering::Release);
                tracing::error!(
                    path = %self.trail.path.display(),
                    records = unwritten,
                    "audit write at shutdown failed ({e}): {unwritten} audit records could not be written and are lost"
                );
                break;
            }
            std::thread::sleep(retry);
            retry = (retry * 2).min(RETRY_MAX);
        }
        records.take_acks(&mut acks);
        answer(&mut acks, false);
        self.compressor.finish();
        for sink in self.sinks {
            sink.finish();
        }
    }

    /// Notes the records the writer still has in hand after a commit
    /// (those kept after a failed write). The gauges are set at each
    /// scrape; sampling here keeps the peak between scrapes.
    fn note_holding(&self, holding: usize) {
        self.shared.holding.store(holding, Ordering::Release);
        self.shared.waiting(&self.queue);
    }

    /// Chains and appends `records` (emptying it) with one write, preceded
    /// by a note of any records lost since the last successful write and
    /// followed by a signed checkpoint when one is due (always, if
    /// `final_checkpoint` and records were written since the last one). On
    /// failure the file is cut back and the chain rewound, so the trail
    /// stays valid and the next success notes the loss.
    fn commit(
        &mut self,
        records: &mut Hand,
        fsync: bool,
        final_checkpoint: bool,
    ) -> std::io::Result<()> {
        let dropped = self.shared.dropped.swap(0, Ordering::Relaxed);
        let trail = &mut self.trail;
        let unsigned = self.checkpointer.as_ref().map_or(0, |c| c.since);
        let checkpoint_pending = self
            .checkpointer
            .as_ref()
            .is_some_and(|c| c.due() || (final_checkpoint && c.since > 0));
        if records.is_empty() && trail.lost == 0 && dropped == 0 && !checkpoint_pending {
            return if fsync {
                trail.file.sync_data()
            } else {
                Ok(())
            };
        }
        let before = trail.head.clone();
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        if trail.lost > 0 || dropped > 0 {
            let note = serde_json::json!({
                "type": "loss",
                "timestamp": now_rfc3339(),
                "write_failed": trail.lost,
                "dropped": dropped,
                "message": "records missing before this line: write_failed could not be \
                            written (I/O error), dropped found the queue full (on_full = drop)",
            });
            chain::link_into(&mut trail.head, note.to_string().as_bytes(), &mut batch);
        }
        // One allocation of the batch's size: grown by doubling, a
        // backlog's batch of megabytes left a trail of freed blocks behind
        // it, resident until the allocator purges them.
        batch.reserve(records.byte_len() + records.len() * chain::LINE_OVERHEAD_MAX);
        for r in records.iter() {
            chain::link_into(&mut trail.head, r, &mut batch);
        }
        let mut signed = None;
        if let Some(cp) = &mut self.checkpointer {
            cp.since = unsigned + (trail.head.seq - before.seq);
            if cp.due() || (final_checkpoint && cp.since > 0) {
                let record = cp.record(&trail.head);
                signed = Some(trail.head.clone());
                chain::link_into(&mut trail.head, &record, &mut batch);
            }
        }
        if trail.rotation_due(&self.settings.rotation, batch.len()) {
            match trail.rotate(before.seq) {
                Ok(rotated) => {
                    self.metrics.audit_rotations.inc();
                    tracing::info!(file = %rotated.display(), "audit trail rotated");
                    self.compressor.send(rotated);
                }
                // Keep writing to the current file: a failed rotation must
                // not lose records.
                Err(e) => tracing::error!("audit rotation failed: {e:#}"),
            }
        }
        let result = trail.file.write_all(&batch).and_then(|()| {
            if fsync {
                trail.file.sync_data()
            } else {
                Ok(())
            }
        });
        let n = records.len() as u64;
        // Buffered mode keeps the records of a failed write for a retry;
        // sync mode has answered their requests (fail closed) and notes
        // them as lost.
        let retain = !self.settings.fsync_each_batch;
        if result.is_ok() || !retain {
            records.clear();
        }
        let outcome = match result {
            Ok(()) => {
                self.failed_counted = 0;
                trail.len += batch.len() as u64;
                trail.cache.after_write(&trail.file, trail.len);
                trail.lost = 0;
                self.shared
                    .committed_seq
                    .store(trail.head.seq, Ordering::Release);
                for sink in &self.sinks {
                    sink.send(&batch);
                }
                self.metrics.audit_records.inc_by(n);
                self.shared.failing.store(false, Ordering::Relaxed);
                if let Some(head) = signed {
                    // Published outside the trail (metrics, log) so that a
                    // trail cut back to an earlier checkpoint can be caught.
                    self.metrics
                        .audit_signed_seq
                        .set(i64::try_from(head.seq).unwrap_or(i64::MAX));
                    tracing::info!(seq = head.seq, hash = %head.hash, "audit checkpoint signed");
                }
                Ok(())
            }
            Err(e) => {
                // Remove whatever part of the batch reached the file, so
                // that no torn line sits in the middle of the trail.
                if let Err(t) = trail.file.set_len(trail.len) {
                    tracing::error!(path = %trail.path.display(), "cannot cut back a failed audit write: {t}");
                }
                trail.head = before;
                if let Some(cp) = &mut self.checkpointer {
                    cp.since = unsigned;
                }
                self.shared.dropped.fetch_add(dropped, Ordering::Relaxed);
                self.shared.failing.store(true, Ordering::Relaxed);
                // Counted once per record (not again at each retry), so
                // that the count is exact; a failed write of no record
                // (a note, a checkpoint) counts one.
                let uncounted = if retain {
                    let new = (n as usize).saturating_sub(self.failed_counted);
                    self.failed_counted = n as usize;
                    new as u64
                } else {
                    trail.lost += n;
                    n
                };
                if uncounted > 0 || n == 0 {
                    self.metrics.audit_write_errors.inc_by(uncounted.max(1));
                }
                if retain {
                    tracing::error!(path = %trail.path.display(), records = n, "audit write failed: {e}; the records are kept and retried");
                } else {
                    tracing::error!(path = %trail.path.display(), records = n, "audit write failed: {e}");
                }
                Err(e)
            }
        };
        // Kept for the next commit, unless a burst made it very large.
        if batch.capacity() > MAX_KEPT_BATCH {
            batch = Vec::new();
        }
        self.batch = batch;
        outcome
    }
}

fn answer(acks: &mut Vec<oneshot::Sender<bool>>, ok: bool) {
    for ack in acks.drain(..) {
        let _ = ack.send(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gauges_are_read_at_each_scrape_and_keep_their_peak() {
        // A write stuck on a slow disk sets no gauge: the scrape must see
        // the queue grow all the same.
        let shared = Arc::new(Shared::default());
        let queue = Arc::new(Queue::new(64));
        let metrics = Arc::new(Metrics::new());
        let scraped = Arc::clone(&shared);
        let scraped_queue = Arc::clone(&queue);
        metrics.refresh_before_render(move |m| scraped.publish_waiting(&scraped_queue, m));
        let sample = |name: &str| -> String {
            let text = String::from_utf8(metrics.render()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_default()
                .to_string()
        };
        let _sender = queue.sender();
        for _ in 0..3 {
            queue.push(b"{}", None, false);
        }
        shared.holding.store(2, Ordering::Release);
        assert_eq!(sample("rempart_audit_queue_records"), "5");
        for _ in 0..37 {
            queue.push(b"{}", None, false);
        }
        assert_eq!(sample("rempart_audit_queue_records"), "42");
        let mut hand = Hand::default();
        let _ = queue.take(&mut hand, usize::MAX, &shared.holding);
        assert_eq!(
            sample("rempart_audit_queue_records"),
            "40",
            "taken: in hand"
        );
        shared.holding.store(0, Ordering::Release);
        assert_eq!(sample("rempart_audit_queue_records"), "0");
        assert_eq!(sample("rempart_audit_queue_records_peak"), "42");
    }

    fn writer(path: &Path, rotation: Rotation) -> Writer {
        let metrics = Arc::new(Metrics::new());
        Writer {
            trail: Trail::open(path).unwrap(),
            settings: WriterSettings {
                flush_interval: Duration::ZERO,
                fsync_each_batch: true,
                rotation: rotation.clone(),
                retain_max: 16,
            },
            shared: Arc::new(Shared::default()),
            compressor: Compressor::start(path, rotation.keep, Arc::clone(&metrics)).unwrap(),
            metrics,
            checkpointer: None,
            sinks: Vec::new(),
            queue: Arc::new(Queue::new(16)),
            batch: Vec::new(),
            failed_counted: 0,
        }
    }

    fn no_rotation() -> Rotation {
        Rotation {
            size: 0,
            age: None,
            keep: 0,
        }
    }

    fn records(n: usize) -> Hand {
        let mut r = super::super::queue::Records::default();
        for i in 0..n {
            r.push(format!("{{\"decision_id\":\"r{i}\"}}").as_bytes());
        }
        Hand::of(r)
    }

    #[test]
    fn a_failed_write_is_cut_back_and_noted_at_the_next_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut w = writer(&path, no_rotation());
        w.commit(&mut records(3), true, false).unwrap();
        // A read-only handle on the same file: the next write fails.
        let good = std::mem::replace(&mut w.trail.file, File::open(&path).unwrap());
        assert!(w.commit(&mut records(2), true, false).is_err());
        assert!(w.shared.failing.load(Ordering::Relaxed));
        w.shared.dropped.store(4, Ordering::Relaxed);
        w.trail.file = good;
        w.commit(&mut records(1), true, false).unwrap();
        assert!(!w.shared.failing.load(Ordering::Relaxed));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3]["type"], "loss");
        assert_eq!(lines[3]["write_failed"], 2);
        assert_eq!(lines[3]["dropped"], 4);
        assert_eq!(lines[4]["seq"], 5);
        let report = super::super::verify::verify(&[path], None).unwrap();
        assert_eq!(report.records, 5);
    }

    #[test]
    fn buffered_mode_keeps_a_failed_batch_and_writes_it_whole_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut w = writer(&path, no_rotation());
        w.settings.fsync_each_batch = false;
        w.commit(&mut records(2), false, false).unwrap();
        let good = std::mem::replace(&mut w.trail.file, File::open(&path).unwrap());
        let mut held = records(3);
        assert!(w.commit(&mut held, false, false).is_err());
        assert_eq!(held.len(), 3, "the failed batch is kept");
        assert_eq!(w.metrics.audit_write_errors.get(), 3);
        // A retry with more records: each record counted once.
        held.append(records(2));
        assert!(w.commit(&mut held, false, false).is_err());
        assert_eq!(held.len(), 5);
        assert_eq!(w.metrics.audit_write_errors.get(), 5);
        w.trail.file = good;
        w.commit(&mut held, false, false).unwrap();
        assert!(held.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 7);
        assert!(!text.contains("\"loss\""), "nothing was lost: {text}");
        let report = super::super::verify::verify(&[path], None).unwrap();
        assert_eq!(report.records, 7);
    }

    #[test]
    fn rotation_continues_the_chain_into_the_new_file_and_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let rotation = Rotation {
            size: 300,
            age: None,
            keep: 0,
        };
        let mut w = writer(&path, rotation.clone());
        for _ in 0..4 {
            w.commit(&mut records(2), false, false).unwrap();
        }
        w.compressor.finish();
        let rotated = files::rotated_files(&path).unwrap();
        assert_eq!(rotated.len(), 3, "{rotated:?}");
        assert!(rotated.iter().all(|r| r.compressed));
        // A crash right after a rotation leaves the active file empty: the
        // chain continues from the newest rotated file.
        std::fs::rename(&path, files::rotated_name(&path, 8)).unwrap();
        std::fs::write(&path, "").unwrap();
        let mut w = writer(&path, no_rotation());
        assert_eq!(w.trail.head.seq, 8);
        w.commit(&mut records(1), true, false).unwrap();
        // Opening may compress the uncompressed rotated file in the
        // background: wait for it before listing the files.
        w.compressor.finish();
        let mut all: Vec<PathBuf> = files::rotated_files(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.path)
            .collect();
        all.push(path.clone());
        let report = super::super::verify::verify(&all, None).unwrap();
        assert_eq!((report.first_seq, report.last_seq), (1, 9));
    }
}
