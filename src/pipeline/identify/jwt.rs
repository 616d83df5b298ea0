//! JWT / OIDC bearer tokens checked against a JWKS.
//!
//! The keys come from a file (reloaded when it changes) or from a URL,
//! fetched by a refresher thread: at start, every `jwks_refresh_interval`,
//! and when a token names a `kid` the cache does not hold (at most once per
//! `jwks_min_refetch_interval`, so that random `kid`s cannot make rempart
//! hammer the identity provider). When fetches fail, the last good keys
//! stay in use for `jwks_max_staleness`; past that every token is refused
//! (`jwks_unavailable`): fail closed.
//!
//! Only asymmetric algorithms are accepted, and a key is used only for the
//! algorithms of its own type: a token cannot pick `HS256` and have a
//! public key used as an HMAC secret, nor `alg: none`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};

use crate::config::JwtConfig;
use crate::metrics::Metrics;

/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a token was not accepted; the text goes to `input.identity.error`
/// and to the `reason` label of `rempart_jwt_validation_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    TooLarge,
    Malformed,
    AlgNone,
    AlgNotAllowed,
    MissingKid,
    UnknownKid,
    JwksUnavailable,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    InvalidClaim,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::TooLarge => "token_too_large",
            Failure::Malformed => "malformed",
            Failure::AlgNone => "alg_none",
            Failure::AlgNotAllowed => "alg_not_allowed",
            Failure::MissingKid => "missing_kid",
            Failure::UnknownKid => "unknown_kid",
            Failure::JwksUnavailable => "jwks_unavailable",
            Failure::BadSignature => "bad_signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::WrongIssuer => "wrong_issuer",
            Failure::WrongAudience => "wrong_audience",
            Failure::MissingClaim => "missing_claim",
            Failure::InvalidClaim => "invalid_claim",
        }
    }

    fn of(e: &jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => Failure::BadSignature,
            K::ExpiredSignature => Failure::Expired,
            K::ImmatureSignature => Failure::NotYetValid,
            K::InvalidIssuer => Failure::WrongIssuer,
            K::InvalidAudience => Failure::WrongAudience,
            K::MissingRequiredClaim(_) => Failure::MissingClaim,
            K::InvalidClaimFormat(_) | K::InvalidSubject => Failure::InvalidClaim,
            K::InvalidAlgorithm | K::MissingAlgorithm => Failure::AlgNotAllowed,
            _ => Failure::Malformed,
        }
    }
}

/// The verified claims of a token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: BTreeMap<String, Json>,
    pub roles: Vec<String>,
    pub groups: Vec<String>,
}

/// One usable verification key.
struct Key {
    kid: Option<String>,
    /// The algorithm the JWK is pinned to, if it says.
    alg: Option<Algorithm>,
    kind: KeyKind,
    decoding: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        use Algorithm as A;
        let by_kind = match self.kind {
            KeyKind::Rsa => matches!(
                alg,
                A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
            ),
            KeyKind::P256 => alg == A::ES256,
            KeyKind::P384 => alg == A::ES384,
            KeyKind::Ed25519 => alg == A::EdDSA,
        };
        by_kind && self.alg.is_none_or(|a| a == alg)
    }
}

/// A generation of keys and when it was obtained.
struct Keys {
    keys: Vec<Key>,
    /// When these keys were fetched; `None` for a file (never stale) and
    /// for the empty set before any fetch succeeded.
    fetched: Option<Instant>,
    from_file: bool,
}

/// Parses a JWKS document, keeping the signature keys rempart can use.
fn parse_jwks(text: &[u8]) -> anyhow::Result<Vec<Key>> {
    let set: JwkSet = serde_json::from_slice(text).context("not a JWKS document")?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyKind::Ed25519
            }
            // Symmetric keys have no place in a public key set.
            _ => continue,
        };
        let alg = match &jwk.common.key_algorithm {
            Some(a) => match Algorithm::from_str(&format!("{a:?}")) {
                Ok(a) => Some(a),
                Err(_) => continue,
            },
            None => None,
        };
        let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
            tracing::warn!(kid = ?jwk.common.key_id, "JWKS: skipping a key that cannot be used");
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            kind,
            decoding,
        });
    }
    if keys.is_empty() {
        bail!("the JWKS holds no usable signature key (RSA, P-256, P-384 or Ed25519)");
    }
    Ok(keys)
}

/// Reads and checks a JWKS file (also used by `rempart check`).
pub fn read_jwks_file(path: &Path) -> anyhow::Result<usize> {
    let text =
        std::fs::read(path).with_context(|| format!("cannot read JWKS file {}", path.display()))?;
    let keys = parse_jwks(&text).with_context(|| format!("JWKS file {}", path.display()))?;
    Ok(keys.len())
}

/// The shared key cache and its refresh machinery.
pub struct KeyStore {
    current: ArcSwap<Keys>,
    max_staleness: Duration,
    min_refetch: Duration,
    fetch_timeout: Duration,
    /// Milliseconds since `epoch` of the last refetch asked for an unknown kid.
    last_kid_refetch_ms: AtomicU64,
    epoch: Instant,
    refetch: Option<mpsc::UnboundedSender<()>>,
    /// Counts finished fetch attempts (success or failure), so that a
    /// request waiting for a refetch wakes up either way.
    attempts: watch::Sender<u64>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl KeyStore {
    fn install(&self, keys: Vec<Key>, from_file: bool) {
        let n = keys.len();
        self.current.store(Arc::new(Keys {
            keys,
            fetched: Some(Instant::now()),
            from_file,
        }));
        self.metrics.jwks_refresh_success.inc();
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.metrics.jwks_last_success_timestamp.set(unix);
        self.attempts.send_modify(|g| *g += 1);
        tracing::info!(keys = n, "JWKS loaded");
    }

    /// Reloads the JWKS file; on error the previous keys stay.
    pub fn reload_file(&self) {
        let Some(path) = &self.file else { return };
        match std::fs::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_jwks(&t))
        {
            Ok(keys) => self.install(keys, true),
            Err(e) => {
                self.metrics.jwks_refresh_failure.inc();
                tracing::error!(
                    "JWKS reload from {} failed, keeping the previous keys: {e:#}",
                    path.display()
                );
            }
        }
    }

    /// The keys, unless they are too old to be trusted.
    fn usable(&self) -> Option<Arc<Keys>> {
        let keys = self.current.load_full();
        let fetched = keys.fetched?;
        if !keys.from_file && fetched.elapsed() > self.max_staleness {
            return None;
        }
        Some(keys)
    }

    /// Asks the refresher for a fetch because of an unknown kid, if the
    /// rate limit allows; returns a receiver that changes when the fetch
    /// is over.
    fn ask_refetch(&self) -> Option<watch::Receiver<u64>> {
        let tx = self.refetch.as_ref()?;
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_kid_refetch_ms.load(Ordering::Relaxed);
        let min = self.min_refetch.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < min {
            return None;
        }
        if self
            .last_kid_refetch_ms
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another request asked at the same moment: wait for its fetch.
            return Some(self.attempts.subscribe());
        }
        let rx = self.attempts.subscribe();
        tx.send(()).ok()?;
        Some(rx)
    }
}

/// Checks tokens for one `[identity.jwt]` section.
pub struct JwtVerifier {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    skew: Duration,
    max_bytes: usize,
    pub cookie: Option<String>,
    roles_path: Vec<String>,
    groups_path: Vec<String>,
    pub keys: Arc<KeyStore>,
}

impl JwtVerifier {
    /// Loads the keys (a file must be valid; a URL that cannot be fetched
    /// yet leaves every token refused until a fetch succeeds) and starts
    /// the refresher thread for a URL.
    pub fn start(cfg: &JwtConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| Algorithm::from_str(a).with_context(|| format!("unknown algorithm {a:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (refetch_tx, refetch_rx) = mpsc::unbounded_channel();
        let keys = Arc::new(KeyStore {
            current: ArcSwap::from_pointee(Keys {
                keys: Vec::new(),
                fetched: None,
                from_file: cfg.jwks_file.is_some(),
            }),
            max_staleness: cfg.jwks_max_staleness.0,
            min_refetch: cfg.jwks_min_refetch_interval.0,
            fetch_timeout: cfg.jwks_fetch_timeout.0,
            last_kid_refetch_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            refetch: cfg.jwks_url.as_ref().map(|_| refetch_tx),
            attempts: watch::channel(0).0,
            file: cfg.jwks_file.clone(),
            metrics,
        });
        if let Some(path) = &cfg.jwks_file {
            let text = std::fs::read(path)
                .with_context(|| format!("cannot read JWKS file {}", path.display()))?;
            let parsed =
                parse_jwks(&text).with_context(|| format!("JWKS file {}", path.display()))?;
            keys.install(parsed, true);
        }
        if let Some(url) = &cfg.jwks_url {
            let fetcher = Fetcher::new(url, cfg.jwks_ca.as_deref())?;
            spawn_refresher(
                Arc::clone(&keys),
                fetcher,
                refetch_rx,
                cfg.jwks_refresh_interval.0,
            )?;
        }
        Ok(JwtVerifier {
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            algorithms,
            skew: cfg.clock_skew.0,
            max_bytes: cfg.max_token_bytes,
            cookie: cfg.cookie.clone(),
            roles_path: cfg.roles_claim.split('.').map(String::from).collect(),
            groups_path: cfg.groups_claim.split('.').map(String::from).collect(),
            keys,
        })
    }

    /// Verifies a token: size, header, key, signature, then claims.
    pub async fn verify(&self, token: &str) -> Result<Verified, Failure> {
        if token.len() > self.max_bytes {
            return Err(Failure::TooLarge);
        }
        let (alg, kid) = self.header(token)?;
        let keys = self.keys.usable().ok_or(Failure::JwksUnavailable)?;
        let keys = match find_key(&keys, alg, kid.as_deref()) {
            Err(Failure::UnknownKid) => self.refetched(alg, kid.as_deref()).await?,
            Err(f) => return Err(f),
            Ok(_) => keys,
        };
        let key = find_key(&keys, alg, kid.as_deref())?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.skew.as_secs();
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<BTreeMap<String, Json>>(token, &key.decoding, &validation)
                .map_err(|e| Failure::of(&e))?;
        let claims = data.claims;
        Ok(Verified {
            roles: strings_at(&claims, &self.roles_path),
            groups: strings_at(&claims, &self.groups_path),
            claims,
        })
    }

    /// The algorithm and key id of a token, refusing `none` and every
    /// algorithm not configured (HMAC never is).
    fn header(&self, token: &str) -> Result<(Algorithm, Option<String>), Failure> {
        let mut parts = token.split('.');
        let (Some(head), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::Malformed);
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(head.trim_end_matches('='))
            .map_err(|_| Failure::Malformed)?;
        let header: serde_json::Map<String, Json> =
            serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed)?;
        let alg = header
            .get("alg")
            .and_then(Json::as_str)
            .ok_or(Failure::Malformed)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(Failure::AlgNone);
        }
        let alg = Algorithm::from_str(alg).map_err(|_| Failure::AlgNotAllowed)?;
        if !self.algorithms.contains(&alg) {
            return Err(Failure::AlgNotAllowed);
        }
        let kid = match header.get("kid") {
            None | Some(Json::Null) => None,
            Some(Json::String(k)) => Some(k.clone()),
            Some(_) => return Err(Failure::Malformed),
        };
        Ok((alg, kid))
    }

    /// Waits (bounded) for a refetch asked because of an unknown kid.
    async fn refetched(&self, alg: Algorithm, kid: Option<&str>) -> Result<Arc<Keys>, Failure> {
        let Some(mut rx) = self.keys.ask_refetch() else {
            return Err(Failure::UnknownKid);
        };
        let waited = tokio::time::timeout(self.keys.fetch_timeout, rx.changed()).await;
        if !matches!(waited, Ok(Ok(()))) {
            return Err(Failure::UnknownKid);
        }
        let keys = self.keys.usable().ok_or(Failure::JwksUnavailable)?;
        find_key(&keys, alg, kid)?;
        Ok(keys)
    }
}

fn find_key<'k>(keys: &'k Keys, alg: Algorithm, kid: Option<&str>) -> Result<&'k Key, Failure> {
    match kid {
        Some(kid) => keys
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or(Failure::UnknownKid)
            .and_then(|k| {
                if k.accepts(alg) {
                    Ok(k)
                } else {
                    Err(Failure::AlgNotAllowed)
                }
            }),
        // Without a kid, a key is chosen only when exactly one fits.
        None => {
            let mut fitting = keys.keys.iter().filter(|k| k.accepts(alg));
            match (fitting.next(), fitting.next()) {
                (Some(k), None) => Ok(k),
                _ => Err(Failure::MissingKid),
            }
        }
    }
}

/// The strings at a dotted claim path: a list of strings, or one string
/// (split on spaces, as OAuth `scope` is).
pub fn strings_at(claims: &BTreeMap<String, Json>, path: &[String]) -> Vec<String> {
    let Some((first, rest)) = path.split_first() else {
        return Vec::new();
    };
    let mut v = claims.get(first);
    for p in rest {
        v = v.and_then(|x| x.get(p));
    }
    match v {
        Some(Json::Array(items)) => items
            .iter()
            .filter_map(Json::as_str)
            .map(String::from)
            .collect(),
        Some(Json::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

/// Fetches the JWKS over HTTP(S).
struct Fetcher {
    uri: http::Uri,
    client: hyper_util::client::legacy::Client<crate::tls::HttpsConnector, Empty<Bytes>>,
}

impl Fetcher {
    fn new(url: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("[identity.jwt] jwks_url {url:?}"))?;
        let https = crate::tls::https_connector(ca, "[identity.jwt] jwks_ca")?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Fetcher { uri, client })
    }

    async fn fetch(&self, timeout: Duration) -> anyhow::Result<Vec<Key>> {
        let req = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())?;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))??;
        if !resp.status().is_success() {
            bail!("HTTP status {}", resp.status());
        }
        let body = tokio::time::timeout(
            timeout,
            Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("body not received within {timeout:?}"))?
        .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
        .to_bytes();
        parse_jwks(&body)
    }
}

/// The refresher thread: fetches at start, then every `interval`, sooner
/// after a failure (every `min_refetch`), and when asked (unknown kid).
fn spawn_refresher(
    store: Arc<KeyStore>,
    fetcher: Fetcher,
    mut asked: mpsc::UnboundedReceiver<()>,
    interval: Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the JWKS refresher")?;
    // The first fetch happens before rempart says it is ready, so that
    // the first requests do not all fail while the keys are on their way.
    let first_ok = rt.block_on(fetch_once(&store, &fetcher));
    std::thread::Builder::new()
        .name("jwks-refresh".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut ok = first_ok;
                loop {
                    let wait = if ok {
                        interval
                    } else {
                        store.min_refetch.max(Duration::from_millis(100))
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        got = asked.recv() => if got.is_none() { return },
                    }
                    ok = fetch_once(&store, &fetcher).await;
                }
            })
        })
        .context("cannot start the JWKS refresher thread")?;
    Ok(())
}

async fn fetch_once(store: &KeyStore, fetcher: &Fetcher) -> bool {
    match fetcher.fetch(store.fetch_timeout).await {
        Ok(keys) => {
            store.install(keys, false);
            true
        }
        Err(e) => {
            store.metrics.jwks_refresh_failure.inc();
            store.attempts.send_modify(|g| *g += 1);
            tracing::warn!(
                url = %fetcher.uri,
                "JWKS fetch failed, keeping the previous keys (if any, up to jwks_max_staleness): {e:#}"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_paths() {
        let claims: BTreeMap<String, Json> = serde_json::from_value(serde_json::json!({
            "realm_access": {"roles": ["a", "b", 3]},
            "scope": "read write",
            "groups": "solo"
        }))
        .unwrap();
        let path = |p: &str| p.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(strings_at(&claims, &path("realm_access.roles")), ["a", "b"]);
        assert_eq!(strings_at(&claims, &path("scope")), ["read", "write"]);
        assert_eq!(strings_at(&claims, &path("groups")), ["solo"]);
        assert!(strings_at(&claims, &path("missing.path")).is_empty());
    }

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        let err = parse_jwks(oct).err().unwrap().to_string();
        assert!(err.contains("no usable"), "{err}");
        assert!(parse_jwks(b"{}").is_err());
    }
}
