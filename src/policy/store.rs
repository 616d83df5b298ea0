//! The live policy set and its hot reload.
//!
//! Requests read the current set with one atomic load and keep their own
//! `Arc` to it, so a reload never drops or changes a request in flight.
//! A new set is compiled on the watcher thread, off the request path, and
//! swapped in only if it compiles; otherwise the previous set keeps serving.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::load::{fingerprint, load, PolicySource};
use super::PolicySet;
use crate::metrics::Metrics;

pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    source: PolicySource,
    metrics: Arc<Metrics>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new revision is serving.
    Swapped(String),
    /// The files compile to the revision already serving.
    Unchanged,
}

impl PolicyStore {
    /// Loads the initial set; an error here must stop the process.
    pub fn open(source: PolicySource, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Self>> {
        let set = load(&source)?;
        metrics.set_policy_revision(&set.revision);
        Ok(Arc::new(PolicyStore {
            current: ArcSwap::from_pointee(set),
            source,
            metrics,
        }))
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Compiles the source again and swaps the result in if it compiles.
    pub fn reload(&self) -> anyhow::Result<ReloadOutcome> {
        match load(&self.source) {
            Ok(set) => {
                if set.revision == self.current.load().revision {
                    return Ok(ReloadOutcome::Unchanged);
                }
                let revision = set.revision.clone();
                self.current.store(Arc::new(set));
                self.metrics.policy_reloads_success.inc();
                self.metrics.set_policy_revision(&revision);
                tracing::info!(%revision, source = %self.source, "policy set reloaded");
                Ok(ReloadOutcome::Swapped(revision))
            }
            Err(e) => {
                self.metrics.policy_reloads_failure.inc();
                tracing::error!(
                    source = %self.source,
                    serving = %self.current.load().revision,
                    "policy reload rejected, previous set keeps serving: {e:#}"
                );
                Err(e)
            }
        }
    }

    /// Starts the watcher thread: it reloads when `trigger` receives (SIGHUP)
    /// and, for a directory source, when the directory's files change
    /// (checked every `interval`; zero disables polling).
    pub fn watch(self: &Arc<Self>, trigger: mpsc::Receiver<()>, interval: Duration) {
        let store = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || {
                let dir = match &store.source {
                    PolicySource::Dir(d) => Some(d.clone()),
                    PolicySource::Builtin => None,
                };
                let poll = !interval.is_zero() && dir.is_some();
                let mut seen = dir.as_deref().and_then(fingerprint);
                let wait = if poll {
                    interval
                } else {
                    Duration::from_secs(3600)
                };
                loop {
                    let forced = match trigger.recv_timeout(wait) {
                        Ok(()) => true,
                        Err(mpsc::RecvTimeoutError::Timeout) => false,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    let now = dir.as_deref().and_then(fingerprint);
                    if forced || (poll && now != seen) {
                        seen = now;
                        // Errors are logged and counted inside reload().
                        let _ = store.reload();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the policy watcher, hot reload is off: {e}");
        }
    }
}
