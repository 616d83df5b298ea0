//! The live policy set and its hot reload.
//!
//! Requests read the current set with one atomic load and keep their own
//! `Arc` to it, so a reload never drops or changes a request in flight.
//! A new set is compiled on the watcher thread, off the request path, and
//! swapped in only if it compiles; otherwise the previous set keeps serving.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::load::{load_for, PolicySource};
use super::PolicySet;
use crate::metrics::Metrics;

pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    source: PolicySource,
    /// The decision rule every set must define (`[policy] decision`).
    entry: String,
    metrics: Arc<Metrics>,
    /// The watched files' state just before the first load (see
    /// [`crate::reload::spawn_watcher`]).
    loaded: Option<crate::reload::Fingerprint>,
}

/// Says, once per set, when its decisions cannot be cached: every request
/// then runs the policy VM, which an operator sizing the gateway wants
/// to know (`rempart_policy_decision_cache_total{result="bypassed"}`
/// counts them).
fn note_cacheability(set: &PolicySet) {
    if let Some(why) = set.cache_bypass() {
        tracing::info!(revision = %set.revision, "decisions are not cached: {why}");
    }
}

/// Names the bundle a set came from after the source serving it.
fn named(set: PolicySet, source: &PolicySource) -> PolicySet {
    match source {
        PolicySource::Bundle(spec) => set.name_bundle(&spec.name),
        _ => set,
    }
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
        Self::open_for(source, super::ENTRY_POINT, metrics)
    }

    /// As [`PolicyStore::open`], with another decision rule (a `data.` path).
    pub fn open_for(
        source: PolicySource,
        entry: &str,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let loaded = crate::reload::fingerprint(&watched_paths(&source));
        let set = named(load_for(&source, entry)?, &source);
        note_cacheability(&set);
        metrics.set_policy_revision(&set.revision);
        if matches!(source, PolicySource::Bundle(_)) {
            metrics.bundle.activated();
        }
        Ok(Arc::new(PolicyStore {
            current: ArcSwap::from_pointee(set),
            source,
            entry: entry.to_string(),
            metrics,
            loaded: Some(loaded),
        }))
    }

    /// A store serving `set`, already loaded from `source` (a bundle
    /// fetched at start-up). Every later set must define the decision rule
    /// `set` was compiled for.
    pub fn from_set(set: PolicySet, source: PolicySource, metrics: Arc<Metrics>) -> Arc<Self> {
        let set = named(set, &source);
        note_cacheability(&set);
        metrics.set_policy_revision(&set.revision);
        if matches!(source, PolicySource::Bundle(_)) {
            metrics.bundle.activated();
        }
        Arc::new(PolicyStore {
            entry: set.entry().to_string(),
            current: ArcSwap::from_pointee(set),
            source,
            metrics,
            loaded: None,
        })
    }

    /// The decision rule every set of this store defines (a `data.` path).
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// Swaps in a set compiled elsewhere (a downloaded bundle), which
    /// must have been compiled for [`PolicyStore::entry`].
    pub fn install(&self, set: PolicySet) {
        debug_assert_eq!(set.entry(), self.entry, "{}", set.origin);
        let set = named(set, &self.source);
        let revision = set.revision.clone();
        note_cacheability(&set);
        self.current.store(Arc::new(set));
        self.metrics.policy_reloads_success.inc();
        self.metrics.bundle.activated();
        self.metrics.set_policy_revision(&revision);
        tracing::info!(%revision, "policy bundle activated");
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Compiles the source again and swaps the result in if it compiles.
    pub fn reload(&self) -> anyhow::Result<ReloadOutcome> {
        match load_for(&self.source, &self.entry) {
            Ok(set) => {
                let set = named(set, &self.source);
                if set.revision == self.current.load().revision {
                    return Ok(ReloadOutcome::Unchanged);
                }
                let revision = set.revision.clone();
                note_cacheability(&set);
                self.current.store(Arc::new(set));
                self.metrics.policy_reloads_success.inc();
                self.metrics.set_policy_revision(&revision);
                if matches!(self.source, PolicySource::Bundle(_)) {
                    self.metrics.bundle.activated();
                }
                tracing::info!(%revision, source = %self.source, "policy set reloaded");
                Ok(ReloadOutcome::Swapped(revision))
            }
            Err(e) => {
                self.metrics.policy_reloads_failure.inc();
                if let Some(reason) = super::bundle::rejection_of(&e) {
                    self.metrics.bundle.activation_failure(reason.as_str());
                }
                tracing::error!(
                    source = %self.source,
                    serving = %self.current.load().revision,
                    "policy reload rejected, previous set keeps serving: {e:#}"
                );
                Err(e)
            }
        }
    }

    /// Starts the watcher: reloads when `trigger` receives (SIGHUP) and,
    /// for a directory source, when its files change (checked every
    /// `interval`; zero disables polling).
    pub fn watch(self: &Arc<Self>, trigger: mpsc::Receiver<()>, interval: Duration) {
        let store = Arc::clone(self);
        let paths = watched_paths(&self.source);
        let loaded = self.loaded.clone();
        crate::reload::spawn_watcher("policy", interval, trigger, paths, loaded, move || {
            // Errors are logged and counted inside reload().
            let _ = store.reload();
        });
    }
}

/// The files whose changes reload a source's policies.
fn watched_paths(source: &PolicySource) -> Vec<PathBuf> {
    match source {
        PolicySource::Dir(d) => vec![d.clone()],
        PolicySource::Builtin => Vec::new(),
        // A downloaded bundle's persisted copy is written by the poller,
        // which activates it itself: watching it would compile it twice.
        PolicySource::Bundle(b) if b.origin.is_some() => Vec::new(),
        PolicySource::Bundle(b) => vec![b.path.clone()],
    }
}
