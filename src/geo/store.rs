//! The live geo data and its hot reload (same rules as policies: a file
//! that fails to load is rejected and the previous data keeps serving).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::{GeoDb, GeoFiles};
use crate::metrics::Metrics;

pub struct GeoStore {
    current: ArcSwap<GeoDb>,
    files: GeoFiles,
    optional: bool,
    metrics: Arc<Metrics>,
    /// The files' state just before the first load (see
    /// [`crate::reload::spawn_watcher`]).
    loaded: crate::reload::Fingerprint,
}

impl GeoStore {
    /// Loads the configured files. With `optional`, a database that cannot
    /// be opened is left out (logged) instead of stopping the start.
    pub fn open(
        files: GeoFiles,
        optional: bool,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let loaded = crate::reload::fingerprint(&files.paths());
        let db = if optional {
            GeoDb::open_lenient(&files)?
        } else {
            GeoDb::open(&files)?
        };
        metrics.set_geo_build_times(&db);
        Ok(Arc::new(GeoStore {
            current: ArcSwap::from_pointee(db),
            files,
            optional,
            metrics,
            loaded,
        }))
    }

    pub fn current(&self) -> Arc<GeoDb> {
        self.current.load_full()
    }

    pub fn reload(&self) -> anyhow::Result<()> {
        let opened = if self.optional {
            GeoDb::open_lenient(&self.files)
        } else {
            GeoDb::open(&self.files)
        };
        match opened {
            Ok(db) => {
                self.metrics.set_geo_build_times(&db);
                self.current.store(Arc::new(db));
                self.metrics.geo_reloads_success.inc();
                tracing::info!("geo data reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.geo_reloads_failure.inc();
                tracing::error!(
                    optional = self.optional,
                    "geo reload rejected, previous data keeps serving: {e:#}"
                );
                Err(e)
            }
        }
    }

    pub fn watch(self: &Arc<Self>, trigger: mpsc::Receiver<()>, interval: Duration) {
        let store = Arc::clone(self);
        let loaded = Some(self.loaded.clone());
        crate::reload::spawn_watcher(
            "geo",
            interval,
            trigger,
            self.files.paths(),
            loaded,
            move || {
                let _ = store.reload();
            },
        );
    }
}
