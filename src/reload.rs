//! Hot reload: one watcher thread per reloadable thing (policies, geo data)
//! that reloads on a trigger (SIGHUP) or when its files change.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

type Fingerprint = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

/// Names, sizes and modification times of the files at or below `paths`
/// (a missing file counts as a state too). Polled to notice changes without
/// reading every file. Symlinks are followed, as Kubernetes ConfigMap
/// mounts need; hidden entries (`..data`) are skipped.
pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    fn walk(path: &Path, out: &mut Fingerprint) {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                let Ok(entries) = std::fs::read_dir(path) else {
                    out.push((path.to_path_buf(), None));
                    return;
                };
                for entry in entries.flatten() {
                    if !entry.file_name().to_string_lossy().starts_with('.') {
                        walk(&entry.path(), out);
                    }
                }
            }
            Ok(meta) => out.push((
                path.to_path_buf(),
                meta.modified().ok().map(|m| (meta.len(), m)),
            )),
            Err(_) => out.push((path.to_path_buf(), None)),
        }
    }
    let mut out = Vec::new();
    for p in paths {
        walk(p, &mut out);
    }
    out.sort();
    out
}

/// Starts a thread that calls `reload` when `trigger` receives, and when
/// the files under `paths` change (checked every `interval`; zero or no
/// paths disables polling). `reload` logs and counts its own failures.
pub fn spawn_watcher(
    name: &str,
    interval: Duration,
    trigger: mpsc::Receiver<()>,
    paths: Vec<PathBuf>,
    reload: impl Fn() + Send + 'static,
) {
    let poll = !interval.is_zero() && !paths.is_empty();
    // Taken now, not when the thread first runs: a change made after the
    // caller loaded the files (and announced itself ready) but before a
    // busy machine schedules the thread would otherwise become the
    // baseline, and never be reloaded.
    let mut seen = if poll {
        fingerprint(&paths)
    } else {
        Vec::new()
    };
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-watch"))
        .spawn(move || {
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
                let now = if poll {
                    fingerprint(&paths)
                } else {
                    Vec::new()
                };
                if forced || (poll && now != seen) {
                    seen = now;
                    reload();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the {name} watcher, hot reload is off: {e}");
    }
}
