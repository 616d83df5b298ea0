//! Polling a bundle server: `GET url` with `If-None-Match`, a jittered
//! interval, exponential backoff on errors and an optional bearer token.
//!
//! A downloaded bundle goes through the same gate as a local one (size,
//! names, signature, roots, compilation). Only when it passes is it written
//! to `persist_dir` (so that the next start does not need the server) and
//! activated; a refused bundle leaves the set already serving in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use super::{BundleLimits, BundleSpec, VerificationKey};
use crate::config::BundleConfig;
use crate::metrics::Metrics;
use crate::policy::{PolicySet, PolicySource, PolicyStore};

/// The persisted copy of the last good download in `dir`.
pub fn persisted_bundle(dir: &Path) -> PathBuf {
    dir.join("bundle.tar.gz")
}

fn persisted_etag(dir: &Path) -> PathBuf {
    dir.join("bundle.etag")
}

/// What the server answered.
enum Answer {
    Updated { bytes: Bytes, etag: Option<String> },
    NotModified,
}

/// A failed download: the metric's `reason` label and what happened.
struct DownloadError {
    reason: &'static str,
    error: anyhow::Error,
}

fn failed(reason: &'static str, error: anyhow::Error) -> DownloadError {
    DownloadError { reason, error }
}

type HttpsClient = hyper_util::client::legacy::Client<crate::tls::HttpsConnector, Empty<Bytes>>;

/// The bundle server client and its polling state.
pub struct Poller {
    url: http::Uri,
    shown: String,
    client: HttpsClient,
    token_file: Option<PathBuf>,
    timeout: Duration,
    limits: BundleLimits,
    verification: Option<Arc<VerificationKey>>,
    persist_dir: PathBuf,
    poll: (Duration, Duration),
    backoff: (Duration, Duration),
    etag: Option<String>,
    metrics: Arc<Metrics>,
    /// Poll at once after start (started from the persisted copy, which
    /// may be old).
    catch_up: bool,
}

/// A number in [0, 1) that differs between calls and between processes,
/// so that fifty sidecars started together do not poll together.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait after a success: uniform in [min, max].
fn poll_wait(min: Duration, max: Duration) -> Duration {
    min + (max - min).mul_f64(random_fraction())
}

/// The wait after `failures` consecutive failures: doubling from `min`,
/// capped at `max`, then drawn in its upper half.
fn backoff_wait(failures: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let cap = exp.min(max);
    cap.mul_f64(0.5 + 0.5 * random_fraction())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Poller {
    fn new(cfg: &BundleConfig, spec: &BundleSpec, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| anyhow!("[policy.bundle] url is not set"))?;
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("[policy.bundle] url {url:?}"))?;
        let https = crate::tls::https_connector(cfg.ca.as_deref(), "[policy.bundle] ca")?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Poller {
            url: uri,
            shown: url.to_string(),
            client,
            token_file: cfg.bearer_token_file.clone(),
            timeout: cfg.timeout.0,
            limits: spec.limits,
            verification: spec.verification.clone(),
            persist_dir: cfg.persist_dir.clone(),
            poll: (cfg.poll_min.0, cfg.poll_max.0),
            backoff: (cfg.backoff_min.0, cfg.backoff_max.0),
            etag: None,
            metrics,
            catch_up: false,
        })
    }

    async fn download(&self) -> Result<Answer, DownloadError> {
        let mut req = http::Request::get(self.url.clone());
        if let Some(etag) = &self.etag {
            req = req.header(http::header::IF_NONE_MATCH, etag.as_str());
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                failed(
                    "token",
                    anyhow!("cannot read bearer_token_file {}: {e}", path.display()),
                )
            })?;
            req = req.header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| failed("connect", anyhow!("cannot build the request: {e}")))?;
        let timeout = self.timeout;
        let max = self.limits.max_bytes;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                failed(
                    "connect",
                    anyhow!(
                        "{e}{}",
                        std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"))
                    ),
                )
            })?;
            match resp.status() {
                http::StatusCode::NOT_MODIFIED => return Ok(Answer::NotModified),
                http::StatusCode::OK => {}
                other => return Err(failed("status", anyhow!("HTTP status {other}"))),
            }
            let etag = resp
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let declared = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(n) = declared.filter(|n| *n > max) {
                return Err(failed(
                    "too_large",
                    anyhow!("the bundle is {n} bytes, above the limit of {max} (max_bytes)"),
                ));
            }
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        failed(
                            "too_large",
                            anyhow!("the bundle is larger than {max} bytes (max_bytes)"),
                        )
                    } else {
                        failed("body", anyhow!("reading the body: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Answer::Updated { bytes: body, etag })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| failed("timeout", anyhow!("no complete answer within {timeout:?}")))?
    }

    /// Checks a downloaded bundle, compiled for the decision rule `entry`,
    /// then persists it with its ETag.
    fn accept(
        &self,
        bytes: &[u8],
        etag: Option<&str>,
        entry: &str,
    ) -> Result<PolicySet, super::BundleError> {
        let set = super::load_bytes(
            bytes,
            &self.limits,
            self.verification.as_deref(),
            format!("bundle {}", self.shown),
            entry,
        )?;
        let saved = std::fs::create_dir_all(&self.persist_dir)
            .and_then(|()| write_atomically(&persisted_bundle(&self.persist_dir), bytes))
            .and_then(|()| {
                let etag_path = persisted_etag(&self.persist_dir);
                match etag {
                    Some(e) => write_atomically(&etag_path, e.as_bytes()),
                    None => match std::fs::remove_file(&etag_path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    },
                }
            });
        if let Err(e) = saved {
            // Serving the new policy matters more than the disk copy:
            // activate it, but say the next start would use an older one.
            self.metrics.bundle.activation_failure("persist");
            tracing::error!(
                dir = %self.persist_dir.display(),
                "cannot persist the downloaded bundle (a restart without the server would use an older one): {e}"
            );
        }
        Ok(set)
    }

    /// One download and, when something new came, its activation.
    /// False when it failed (download or refusal).
    async fn poll_once(&mut self, store: &PolicyStore) -> bool {
        match self.download().await {
            Err(e) => {
                self.metrics.bundle.download_failure(e.reason);
                tracing::warn!(
                    url = %self.shown,
                    serving = %store.current().revision,
                    "bundle download failed, the current policy set keeps serving: {:#}",
                    e.error
                );
                false
            }
            Ok(Answer::NotModified) => {
                self.metrics.bundle.downloaded("not_modified");
                true
            }
            Ok(Answer::Updated { bytes, etag }) => {
                self.metrics.bundle.downloaded("updated");
                // Compiled for the rule the store decides with, so that a
                // bundle without the configured decision is refused here.
                match self.accept(&bytes, etag.as_deref(), store.entry()) {
                    Ok(set) => {
                        self.etag = etag;
                        store.install(set);
                        true
                    }
                    Err(e) => {
                        self.metrics.bundle.activation_failure(e.reason.as_str());
                        self.metrics.policy_reloads_failure.inc();
                        tracing::error!(
                            url = %self.shown,
                            reason = e.reason.as_str(),
                            serving = %store.current().revision,
                            "bundle refused, the current policy set keeps serving: {e}"
                        );
                        false
                    }
                }
            }
        }
    }
}

/// The poller with the event loop it started on (the client's pooled
/// connections belong to it).
pub struct Polling {
    poller: Poller,
    runtime: tokio::runtime::Runtime,
}

impl Polling {
    /// Polls forever on its own thread.
    pub fn spawn(self, store: Arc<PolicyStore>) -> anyhow::Result<()> {
        let Polling {
            mut poller,
            runtime,
        } = self;
        std::thread::Builder::new()
            .name("bundle-poll".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut failures = 0u32;
                    let mut first = poller.catch_up;
                    loop {
                        let wait = if first {
                            Duration::ZERO
                        } else if failures == 0 {
                            poll_wait(poller.poll.0, poller.poll.1)
                        } else {
                            backoff_wait(failures, poller.backoff.0, poller.backoff.1)
                        };
                        first = false;
                        tokio::time::sleep(wait).await;
                        if poller.poll_once(&store).await {
                            failures = 0;
                        } else {
                            failures = failures.saturating_add(1);
                        }
                    }
                });
            })
            .context("cannot start the bundle poller thread")?;
        Ok(())
    }
}

/// Opens the policy store for serve. For a bundle server: the persisted
/// last good bundle when it loads, else a first download, which must then
/// succeed (with nothing to serve, rempart does not start: fail closed).
pub fn open_store(
    cfg: &crate::config::Config,
    source: PolicySource,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<PolicyStore>, Option<Polling>)> {
    let server = match (&source, &cfg.policy.bundle) {
        (PolicySource::Bundle(spec), Some(b)) if b.url.is_some() && spec.origin.is_some() => {
            Some((spec.clone(), b))
        }
        _ => None,
    };
    // The persisted copy, every download and every reload are compiled
    // for this rule (`[policy] decision`), like a directory.
    let entry = cfg.policy.entry()?;
    let Some((spec, bcfg)) = server else {
        let store = PolicyStore::open_for(source.clone(), &entry, metrics)
            .with_context(|| format!("cannot load policies from {source}"))?;
        return Ok((store, None));
    };
    let mut poller = Poller::new(bcfg, &spec, Arc::clone(&metrics))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the bundle poller")?;
    let persisted = super::load(&spec, &entry);
    let set = match persisted {
        Ok(set) => {
            poller.etag = std::fs::read_to_string(persisted_etag(&bcfg.persist_dir))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            poller.catch_up = true;
            tracing::info!(
                revision = %set.revision,
                path = %spec.path.display(),
                "starting from the persisted bundle; polling {} now",
                poller.shown
            );
            set
        }
        Err(persist_err) => {
            if spec.path.exists() {
                metrics
                    .bundle
                    .activation_failure(persist_err.reason.as_str());
                tracing::warn!(
                    path = %spec.path.display(),
                    "persisted bundle refused, downloading: {persist_err}"
                );
            }
            let answer = runtime.block_on(poller.download());
            match answer {
                Ok(Answer::Updated { bytes, etag }) => {
                    metrics.bundle.downloaded("updated");
                    let set = poller
                        .accept(&bytes, etag.as_deref(), &entry)
                        .map_err(|e| {
                            metrics.bundle.activation_failure(e.reason.as_str());
                            anyhow!("bundle from {} refused: {e}", poller.shown)
                        })?;
                    poller.etag = etag;
                    set
                }
                Ok(Answer::NotModified) => {
                    return Err(anyhow!(
                    "bundle server {} answered 304 Not Modified to a request without If-None-Match",
                    poller.shown
                ))
                }
                Err(e) => {
                    metrics.bundle.download_failure(e.reason);
                    return Err(anyhow!(
                        "no usable persisted bundle ({persist_err}) and the bundle server {} failed: {:#}; \
                         rempart has no policy to serve",
                        poller.shown,
                        e.error
                    ));
                }
            }
        }
    };
    let store = PolicyStore::from_set(set, source, metrics);
    Ok((store, Some(Polling { poller, runtime })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_in_bounds() {
        let (min, max) = (Duration::from_secs(10), Duration::from_secs(20));
        for _ in 0..100 {
            let w = poll_wait(min, max);
            assert!(w >= min && w <= max, "{w:?}");
        }
        let (bmin, bmax) = (Duration::from_secs(1), Duration::from_secs(60));
        let w = backoff_wait(1, bmin, bmax);
        assert!(w >= bmin / 2 && w <= bmin, "{w:?}");
        let w = backoff_wait(4, bmin, bmax);
        assert!(
            w >= Duration::from_secs(4) && w <= Duration::from_secs(8),
            "{w:?}"
        );
        let w = backoff_wait(30, bmin, bmax);
        assert!(w >= bmax / 2 && w <= bmax, "{w:?}");
    }
}
