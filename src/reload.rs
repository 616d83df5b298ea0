//! Hot reload: one watcher thread per reloadable thing (policies, geo data)
//! that reloads on a trigger (SIGHUP) or when its files change.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

pub type Fingerprint = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

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
///
/// `loaded` is the files' fingerprint taken just *before* the caller
/// loaded them: a change made while they were being loaded, or before
/// this watcher started, then differs from it and is reloaded at the first
/// poll. Without it (`None`), the baseline is taken now, and a change
/// made between the load and now is only noticed at the next change.
pub fn spawn_watcher(
    name: &str,
    interval: Duration,
    trigger: mpsc::Receiver<()>,
    paths: Vec<PathBuf>,
    loaded: Option<Fingerprint>,
    reload: impl Fn() + Send + 'static,
) {
    let poll = !interval.is_zero() && !paths.is_empty();
    // Taken now at the latest, not when the thread first runs: a change
    // made before a busy machine schedules the thread would otherwise
    // become the baseline, and never be reloaded.
    let mut seen = match loaded {
        _ if !poll => Vec::new(),
        Some(loaded) => loaded,
        None => fingerprint(&paths),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts a polling watcher on `file` and returns what its reloads send.
    fn watch(file: &Path, loaded: Option<Fingerprint>) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (reloaded_tx, reloaded) = mpsc::channel();
        let (trigger_tx, trigger) = mpsc::channel();
        spawn_watcher(
            "test",
            Duration::from_millis(10),
            trigger,
            vec![file.to_path_buf()],
            loaded,
            move || {
                let _ = reloaded_tx.send(());
            },
        );
        (reloaded, trigger_tx)
    }

    /// A directory holding one policy file, and that file's fingerprint.
    fn one_file() -> (tempfile::TempDir, PathBuf, Fingerprint) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.rego");
        std::fs::write(&file, "package rempart\n").unwrap();
        let loaded = fingerprint(std::slice::from_ref(&file));
        (dir, file, loaded)
    }

    #[test]
    fn a_change_made_while_the_files_were_loading_is_reloaded() {
        let (_dir, file, before_load) = one_file();
        // The change lands after the fingerprint, before the watcher starts.
        std::fs::write(&file, "package rempart\n\n# edited\n").unwrap();
        let (reloaded, _trigger) = watch(&file, Some(before_load));
        assert!(
            reloaded.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the watcher reloads the change it did not see at load"
        );
    }

    #[test]
    fn unchanged_files_are_not_reloaded_and_a_trigger_always_reloads() {
        let (_dir, file, loaded) = one_file();
        let (reloaded, trigger) = watch(&file, Some(loaded));
        // Twenty polls and more with nothing changed.
        assert!(reloaded.recv_timeout(Duration::from_millis(300)).is_err());
        trigger.send(()).unwrap();
        assert!(reloaded.recv_timeout(Duration::from_secs(10)).is_ok());
    }
}
