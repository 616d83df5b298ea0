//! The audit trail: one JSON line per decision, appended to a file.
//!
//! Request tasks serialise their record and append it to a bounded queue
//! ([`queue`]); one writer thread ([`writer`]) takes the queue's records in
//! batches, chains them ([`chain`]) and appends each batch with a single
//! write.
//!
//! Two durability modes (`[audit] durability`, see docs/audit.md):
//! - **buffered**: the writer lets records gather for `flush_interval`, then
//!   writes them without fsync. A crash of rempart loses what is still
//!   queued; a crash of the machine can also lose what the OS had not
//!   written back. A failed write is kept and retried (bounded by the queue
//!   capacity, then `on_full` decides). A clean stop writes and fsyncs
//!   everything queued.
//! - **sync**: each record carries a one-shot acknowledgement; the writer
//!   writes everything waiting with one write and one `fdatasync` (group
//!   commit) and then acknowledges each record. A request to be forwarded
//!   first gets a pending record and is forwarded only once it is
//!   acknowledged ([`exchange`]); answers wait for their record, and a
//!   refusal is replaced by an error if its record did not reach the disk.

pub mod chain;
pub mod checkpoint;
pub mod decision_log;
pub mod exchange;
pub mod files;
pub mod minimise;
pub mod privacy;
pub mod query;
mod queue;
mod record;
pub mod sinks;
pub mod verify;
mod writer;

pub use record::{
    AuditDecision, AuditEndpoint, AuditGeo, AuditIdentity, AuditRecord, AuditRequest, BundleRef,
    Transfer,
};
pub use writer::Rotation;

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;

use crate::config::{AuditConfig, Durability, OnFull};
use crate::metrics::Metrics;
use queue::{Pushed, Queue, QueueSender};
use writer::{Compressor, Shared, Trail, Writer, WriterSettings};

/// How the trail is written, from `[audit]`.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub flush_interval: Duration,
    pub capacity: usize,
    pub durability: Durability,
    pub on_full: OnFull,
    pub rotation: Rotation,
    /// Signed checkpoints: the private key file and the cadence.
    pub checkpoint: Option<CheckpointOptions>,
    pub stdout: bool,
    /// Syslog target and facility code.
    pub syslog: Option<(sinks::SyslogTarget, u8)>,
    pub syslog_tls: sinks::SyslogTls,
    pub sink_capacity: usize,
    pub mask_source_ip: privacy::IpMasking,
    pub mask_subject: privacy::SubjectMasking,
    pub subject_hash_key: Option<std::path::PathBuf>,
    /// OPA-compatible decision-log upload.
    pub decision_log: Option<decision_log::DecisionLogOptions>,
}

#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub key: std::path::PathBuf,
    pub every_records: u64,
    pub every: Option<Duration>,
}

impl AuditOptions {
    pub fn from_config(cfg: &AuditConfig) -> AuditOptions {
        AuditOptions {
            flush_interval: cfg.flush_interval.0,
            capacity: cfg.queue_capacity,
            durability: cfg.durability,
            on_full: cfg.on_full,
            rotation: Rotation {
                size: cfg.rotate_size.0,
                age: Some(cfg.rotate_age.0).filter(|a| !a.is_zero()),
                keep: cfg.rotate_keep,
            },
            checkpoint: cfg.checkpoint_key.as_ref().map(|key| CheckpointOptions {
                key: key.clone(),
                every_records: cfg.checkpoint_records,
                every: Some(cfg.checkpoint_interval.0).filter(|d| !d.is_zero()),
            }),
            stdout: cfg.stdout,
            // Both checked by Config::validate; an invalid value here means
            // no syslog rather than a panic.
            syslog: cfg.syslog.as_deref().and_then(|t| {
                Some((
                    sinks::SyslogTarget::parse(t).ok()?,
                    sinks::facility_code(&cfg.syslog_facility)?,
                ))
            }),
            syslog_tls: sinks::SyslogTls {
                ca: cfg.syslog_ca.clone(),
                client_cert: cfg
                    .syslog_client_cert
                    .clone()
                    .zip(cfg.syslog_client_key.clone()),
            },
            sink_capacity: cfg.sink_queue_capacity.max(1),
            mask_source_ip: cfg.mask_source_ip,
            mask_subject: cfg.mask_subject,
            subject_hash_key: cfg.subject_hash_key.clone(),
            decision_log: cfg
                .decision_log
                .as_ref()
                .map(|d| decision_log::DecisionLogOptions::from_config(d, &cfg.path)),
        }
    }
}

/// The sending side, cloned into every worker.
#[derive(Clone)]
pub struct AuditSink {
    queue: QueueSender,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    durability: Durability,
    on_full: OnFull,
    minimiser: Arc<minimise::Minimiser>,
}

/// The largest record buffer a thread keeps between records.
const SCRATCH_KEPT: usize = 16 * 1024;

thread_local! {
    /// Where a worker serialises its record before copying it into the
    /// queue: one buffer per thread, reused, so a record allocates nothing.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The writer thread; join it after every sink is dropped.
pub struct AuditWriter {
    handle: std::thread::JoinHandle<()>,
    shared: Arc<Shared>,
}

/// In sync mode, the promise that a record reaches the disk.
pub struct AuditAck(Option<oneshot::Receiver<bool>>);

impl AuditAck {
    /// True once the record is written and fsynced; false if that failed.
    pub async fn durable(self) -> bool {
        match self.0 {
            Some(rx) => rx.await.unwrap_or(false),
            None => false,
        }
    }
}

impl AuditSink {
    /// Opens (creating or appending to) the trail and starts the writer.
    pub fn open(
        path: &Path,
        options: AuditOptions,
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
        let minimiser = Arc::new(minimise::Minimiser::new(
            privacy::configured_rules(options.mask_source_ip, options.mask_subject),
            privacy::load_key(options.subject_hash_key.as_deref(), path)?,
        ));
        let checkpointer = match &options.checkpoint {
            Some(c) => Some(checkpoint::Checkpointer::new(
                checkpoint::load_signing_key(&c.key)?,
                c.every_records,
                c.every,
            )),
            None => None,
        };
        let trail = Trail::open(path)?;
        let mut sinks = Vec::new();
        if options.stdout {
            sinks.push(sinks::stdout(options.sink_capacity, Arc::clone(&metrics))?);
        }
        if let Some((target, facility)) = &options.syslog {
            sinks.push(sinks::syslog(
                target.clone(),
                *facility,
                &options.syslog_tls,
                options.sink_capacity,
                Arc::clone(&metrics),
            )?);
        }
        let shared = Arc::new(Shared::default());
        shared
            .committed_seq
            .store(trail.head.seq, Ordering::Release);
        if let Some(dl) = &options.decision_log {
            sinks.push(decision_log::start(
                dl,
                path,
                Arc::clone(&shared),
                options.sink_capacity,
                Arc::clone(&metrics),
            )?);
        }
        let compressor = Compressor::start(path, options.rotation.keep, Arc::clone(&metrics))?;
        let queue = Arc::new(Queue::new(options.capacity));
        metrics
            .audit_queue_capacity
            .set(i64::try_from(queue.capacity()).unwrap_or(i64::MAX));
        let scraped = Arc::clone(&shared);
        let scraped_queue = Arc::clone(&queue);
        metrics.refresh_before_render(move |m| scraped.publish_waiting(&scraped_queue, m));
        let sender = queue.sender();
        let writer = Writer {
            trail,
            settings: WriterSettings {
                flush_interval: options.flush_interval,
                fsync_each_batch: options.durability == Durability::Sync,
                rotation: options.rotation.clone(),
                retain_max: options.capacity,
            },
            shared: Arc::clone(&shared),
            metrics: Arc::clone(&metrics),
            compressor,
            checkpointer,
            sinks,
            queue,
            batch: Vec::new(),
            failed_counted: 0,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run())
            .context("cannot start the audit writer thread")?;
        let writer_shared = Arc::clone(&shared);
        Ok((
            AuditSink {
                queue: sender,
                metrics,
                shared,
                durability: options.durability,
                on_full: options.on_full,
                minimiser,
            },
            AuditWriter {
                handle,
                shared: writer_shared,
            },
        ))
    }

    /// True in sync mode: responses wait for their record's [`AuditAck`].
    pub fn is_sync(&self) -> bool {
        self.durability == Durability::Sync
    }

    /// Queues one record, minimised by the configured rules and `rules`
    /// (those of the policy set that decided). Buffered mode returns
    /// `None`; sync mode returns the acknowledgement to wait for. When the
    /// queue is full the caller waits for the writer (counted), unless
    /// `on_full = "drop"`.
    pub fn record(&self, record: &AuditRecord<'_>, rules: &minimise::Rules) -> Option<AuditAck> {
        let (ack_tx, ack) = if self.is_sync() {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(AuditAck(Some(rx))))
        } else {
            (None, None)
        };
        let pushed = SCRATCH.with_borrow_mut(|line| {
            line.clear();
            record.write_json(line);
            // Before the writer chains it: the hash covers the minimised
            // record.
            if !self.minimiser.idle(rules) {
                *line = self.minimiser.apply(std::mem::take(line), rules);
            }
            let wait = self.on_full == OnFull::Block;
            let pushed = self.queue.queue().push(line, ack_tx, wait);
            if line.capacity() > SCRATCH_KEPT {
                *line = Vec::new();
            }
            pushed
        });
        match pushed {
            Pushed::Queued => ack,
            Pushed::QueuedAfterWait => {
                self.metrics.audit_queue_full.inc();
                ack
            }
            Pushed::Full => {
                self.metrics.audit_queue_full.inc();
                self.metrics.audit_dropped.inc();
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                None
            }
            Pushed::Closed => {
                self.metrics.audit_write_errors.inc();
                tracing::error!("audit writer is gone; record lost");
                ack.map(|_| AuditAck(None))
            }
        }
    }

    /// Waits until every record queued so far is written and fsynced.
    pub fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        if !self.queue.queue().sync(tx) {
            return Err(std::io::Error::other("audit writer is gone"));
        }
        rx.recv()
            .map_err(|_| std::io::Error::other("audit writer is gone"))?
    }
}

impl AuditWriter {
    /// Waits for the writer to drain the queue, write, fsync and stop.
    /// Call after every [`AuditSink`] clone is dropped. Returns how many
    /// records could not be written (the disk still failing at the end);
    /// 0 when the trail is complete.
    pub fn finish(self) -> u64 {
        self.shared.stopping.store(true, Ordering::Release);
        if self.handle.join().is_err() {
            tracing::error!("audit writer thread panicked");
        }
        self.shared.unwritten.load(Ordering::Acquire)
    }
}
