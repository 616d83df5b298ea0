//! Who is asking, over real sockets: TLS termination (with certificates
//! made here by rcgen), mTLS, an https upstream, JWT bearer tokens signed
//! here and checked against a JWKS read from a file or served over a real
//! loopback HTTP server. Each refused case has a clear outcome and its
//! audit record.

mod common;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use common::pki::Ca;
use common::{request, Rempart, Upstream};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

// ---------------------------------------------------------------- PKI

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A TLS client configuration trusting `ca_pem`, with an optional client
/// certificate, offering `alpn`.
fn client_tls(
    ca_pem: &str,
    client: Option<&(String, String)>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(
    addr: std::net::SocketAddr,
    cfg: rustls::ClientConfig,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One HTTP/1.1 request over a TLS stream: (status, decision id).
async fn h1_get(stream: TlsStream, path: &str) -> Result<(u16, String), String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let id = decision_id(resp.headers());
    Ok((resp.status().as_u16(), id))
}

fn decision_id(h: &http::HeaderMap) -> String {
    h.get("x-rempart-decision-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn fingerprint_of_peer(stream: &TlsStream) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- JWT

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ES256 signing key and its JWK.
struct Signer {
    kid: String,
    key: KeyPair,
}

impl Signer {
    fn new(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let raw = self.key.public_key_raw();
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        })
    }

    fn sign_with_kid(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_with_kid(&self.kid, claims)
    }
}

fn jwks(signers: &[&Signer]) -> String {
    serde_json::json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

const ISSUER: &str = "https://idp.example.eu/realms/crm";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": "crm", "sub": sub, "exp": now() + 600, "iat": now(),
        "name": "Alice Martin", "email": "alice@example.eu",
        "realm_access": {"roles": ["sales", "dpo"]},
    })
}

fn unsigned_token(claims: &serde_json::Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

async fn get_with(rp: &Rempart, path: &str, headers: &[(&str, &str)]) -> common::Reply {
    request("GET", &rp.url(path), headers).await
}

/// Asserts a 403 for `unauthenticated` with `why` in the message, and an
/// audit record with identity.error = `why`.
async fn assert_refused(rp: &Rempart, reply: &common::Reply, why: &str) {
    assert_eq!(
        reply.status,
        403,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    let reason = &body["reasons"][0];
    assert_eq!(reason["code"], "unauthenticated", "{body}");
    assert!(
        reason["message"].as_str().unwrap().contains(why),
        "{why} not in {body}"
    );
    let rec = rp.audit_record(&reply.decision_id()).await;
    assert_eq!(rec["identity"]["method"], "jwt", "{rec}");
    assert_eq!(rec["identity"]["error"], why, "{rec}");
    assert_eq!(rec["decision"]["outcome"], "denied", "{rec}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_tokens_are_checked_and_refusals_recorded() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new("k1");
    let jwks_file = write(dir.path(), "jwks.json", &jwks(&[&signer]));
    let toml = format!(
        r#"
[upstream]
url = "{}"
[identity]
trusted_header = "x-remote-user"
trusted_sources = ["10.0.0.0/8"]
strip_credentials = true
[identity.jwt]
issuer = "{ISSUER}"
audiences = ["crm"]
jwks_file = "{}"
cookie = "crm_token"
roles_claim = "realm_access.roles"
max_token_bytes = 2048
clock_skew = "30s"
"#,
        up.url(),
        jwks_file.display()
    );
    let rp = Rempart::with_config(dir.path(), "rempart.toml", &toml).unwrap();

    // A good token: forwarded, without the token, recorded as alice.
    let good = signer.sign(&claims("alice"));
    let r = get_with(
        &rp,
        "/api/contacts/1",
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["identity"]["method"], "jwt");
    assert_eq!(rec["identity"]["subject"], "alice");
    assert!(rec["identity"].get("error").is_none(), "{rec}");
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        !seen.headers.contains_key("authorization"),
        "token forwarded: {:?}",
        seen.headers
    );

    // The same token in the configured cookie; other cookies reach the CRM.
    let cookie = format!("session=s1; crm_token={good}");
    let r = get_with(&rp, "/api/contacts/2", &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200);
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["cookie"], "session=s1");

    // No token: denied, except on a login path.
    let r = get_with(&rp, "/api/contacts/3", &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reasons"][0]["message"], "authentication required");
    assert_eq!(get_with(&rp, "/login", &[]).await.status, 200);

    // A forged trusted header from an untrusted address (loopback is not in
    // trusted_sources): anonymous, and the CRM never sees the header.
    let r = get_with(&rp, "/login", &[("x-remote-user", "admin")]).await;
    assert_eq!(r.status, 200);
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        !seen.headers.contains_key("x-remote-user"),
        "{:?}",
        seen.headers
    );
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["identity"]["method"], "none");
    assert!(rec["identity"]["subject"].is_null());
    let r = get_with(&rp, "/api/contacts", &[("x-remote-user", "admin")]).await;
    assert_eq!(r.status, 403);

    let bearer = |t: &str| format!("Bearer {t}");
    // Expired (beyond the 30 s skew).
    let mut c = claims("alice");
    c["exp"] = (now() - 120).into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_refused(&rp, &r, "expired").await;
    // Expired but within the skew: accepted.
    let mut c = claims("alice");
    c["exp"] = (now() - 5).into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_eq!(r.status, 200);
    // Not valid yet.
    let mut c = claims("alice");
    c["nbf"] = (now() + 600).into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_refused(&rp, &r, "not_yet_valid").await;
    // Unsigned.
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&unsigned_token(&claims("admin"))))],
    )
    .await;
    assert_refused(&rp, &r, "alg_none").await;
    // HS256 "signed" with the public key: refused before any key is used.
    let hs = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","kid":"k1"}"#),
        b64(claims("admin").to_string().as_bytes()),
        b64(b"forged")
    );
    let r = get_with(&rp, "/api/contacts", &[("authorization", &bearer(&hs))]).await;
    assert_refused(&rp, &r, "alg_not_allowed").await;
    // Signed by another key under the known kid.
    let impostor = Signer::new("k1");
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&impostor.sign(&claims("admin"))))],
    )
    .await;
    assert_refused(&rp, &r, "bad_signature").await;
    // Wrong audience.
    let mut c = claims("alice");
    c["aud"] = "other-app".into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_refused(&rp, &r, "wrong_audience").await;
    // Wrong issuer.
    let mut c = claims("alice");
    c["iss"] = "https://evil.example".into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_refused(&rp, &r, "wrong_issuer").await;
    // Oversized.
    let mut c = claims("alice");
    c["padding"] = "x".repeat(3000).into();
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&signer.sign(&c)))],
    )
    .await;
    assert_refused(&rp, &r, "token_too_large").await;
    // A kid the JWKS does not hold.
    let stranger = Signer::new("k9");
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", &bearer(&stranger.sign(&claims("alice"))))],
    )
    .await;
    assert_refused(&rp, &r, "unknown_kid").await;
    // Garbage.
    let r = get_with(
        &rp,
        "/api/contacts",
        &[("authorization", "Bearer not-a-token")],
    )
    .await;
    assert_refused(&rp, &r, "malformed").await;

    // A rotated JWKS file is picked up on SIGHUP: the new kid is accepted.
    std::fs::write(&jwks_file, jwks(&[&signer, &stranger])).unwrap();
    rp.signal("HUP");
    let token = bearer(&stranger.sign(&claims("bob")));
    wait_for("the rotated JWKS file", async || {
        get_with(&rp, "/api/contacts", &[("authorization", &token)])
            .await
            .status
            == 200
    })
    .await;

    for (reason, n) in [
        ("expired", 1.0),
        ("alg_none", 1.0),
        ("bad_signature", 1.0),
        ("wrong_audience", 1.0),
        ("token_too_large", 1.0),
    ] {
        let sample = format!("rempart_jwt_validation_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(rp.metric(&sample).await, n, "{sample}");
    }
    assert!(
        rp.metric("rempart_jwks_refresh_total{result=\"success\"}")
            .await
            >= 2.0
    );
}

/// A JWKS endpoint on loopback whose document the test changes, or takes
/// down (503).
struct JwksServer {
    addr: std::net::SocketAddr,
    doc: Arc<Mutex<Option<String>>>,
    hits: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(Some(doc)));
        let hits = Arc::new(Mutex::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (d, h) = (d.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: http::Request<Incoming>| {
                        let (d, h) = (d.clone(), h.clone());
                        async move {
                            *h.lock().unwrap() += 1;
                            let current = d.lock().unwrap().clone();
                            let resp = match current {
                                Some(doc) => http::Response::new(Full::new(Bytes::from(doc))),
                                None => {
                                    let mut r = http::Response::new(Full::new(Bytes::from("down")));
                                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                    r
                                }
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            doc,
            hits,
            task,
        }
    }

    fn set(&self, doc: Option<String>) {
        *self.doc.lock().unwrap() = doc;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_url_rotation_outage_staleness_and_recovery() {
    let up = Upstream::start().await;
    let k1 = Signer::new("k1");
    let k2 = Signer::new("k2");
    let idp = JwksServer::start(jwks(&[&k1])).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[upstream]
url = "{}"
[identity.jwt]
issuer = "{ISSUER}"
audiences = ["crm", "crm-api"]
jwks_url = "http://{}/realms/crm/protocol/openid-connect/certs"
jwks_refresh_interval = "300ms"
jwks_min_refetch_interval = "200ms"
jwks_max_staleness = "3s"
jwks_fetch_timeout = "1s"
"#,
        up.url(),
        idp.addr
    );
    let rp = Rempart::with_config(dir.path(), "rempart.toml", &toml).unwrap();
    let bearer = |s: &Signer| format!("Bearer {}", s.sign(&claims("alice")));

    let r = get_with(&rp, "/api/contacts", &[("authorization", &bearer(&k1))]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Key rotation: a token with the new kid makes rempart fetch again at
    // once (not at the next interval) and is accepted.
    idp.set(Some(jwks(&[&k2])));
    let r = get_with(&rp, "/api/contacts", &[("authorization", &bearer(&k2))]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // The identity provider goes down: the last good keys stay in use…
    idp.set(None);
    let down_at = Instant::now();
    let before = *idp.hits.lock().unwrap();
    wait_for("failed fetches", async || {
        *idp.hits.lock().unwrap() >= before + 2
    })
    .await;
    let r = get_with(&rp, "/api/contacts", &[("authorization", &bearer(&k2))]).await;
    assert!(
        down_at.elapsed() < Duration::from_secs(2),
        "test too slow to check the grace period"
    );
    assert_eq!(r.status, 200, "last good keys not kept");
    assert!(
        rp.metric("rempart_jwks_refresh_total{result=\"failure\"}")
            .await
            >= 2.0
    );
    let last_ok = rp
        .metric("rempart_jwks_last_success_timestamp_seconds")
        .await;
    assert!((now() as f64 - last_ok).abs() < 10.0, "{last_ok}");

    // …until they are older than jwks_max_staleness: then fail closed.
    tokio::time::sleep(Duration::from_millis(3300).saturating_sub(down_at.elapsed())).await;
    let r = get_with(&rp, "/api/contacts", &[("authorization", &bearer(&k2))]).await;
    assert_refused(&rp, &r, "jwks_unavailable").await;

    // Back up: accepted again after the next fetch.
    idp.set(Some(jwks(&[&k2])));
    let token = bearer(&k2);
    wait_for("recovery after the JWKS endpoint is back", async || {
        get_with(&rp, "/api/contacts", &[("authorization", &token)])
            .await
            .status
            == 200
    })
    .await;
}

// ---------------------------------------------------------------- TLS

struct TlsSetup {
    dir: tempfile::TempDir,
    ca: Ca,
    cert: PathBuf,
    key: PathBuf,
}

fn tls_setup() -> TlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Test Server CA");
    let (cert, key) = ca.server("rempart-1");
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    TlsSetup {
        dir,
        ca,
        cert: cert_path,
        key: key_path,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_required_refuses_clients_without_a_certificate() {
    let up = Upstream::start().await;
    let t = tls_setup();
    let client_ca = Ca::new("Test Client CA");
    let ca_file = write(t.dir.path(), "clients.pem", &client_ca.pem);
    let alice = client_ca.client("alice", "alice@example.eu");
    let toml = format!(
        r#"
[upstream]
url = "{}"
[server.tls]
cert = "{}"
key = "{}"
client_ca = "{}"
client_auth = "required"
"#,
        up.url(),
        t.cert.display(),
        t.key.display(),
        ca_file.display()
    );
    let rp = Rempart::with_config(t.dir.path(), "rempart.toml", &toml).unwrap();

    // Without a certificate: the handshake fails (with TLS 1.3 the client
    // may only learn it on its first read), nothing reaches the upstream
    // or the policy, and the failure is counted.
    let outcome = match tls_connect(rp.addr, client_tls(&t.ca.pem, None, &[b"http/1.1"])).await {
        Ok(stream) => h1_get(stream, "/api/contacts").await.map(|(s, _)| s),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a client without a certificate was served: {outcome:?}"
    );
    wait_for("the handshake failure metric", async || {
        rp.metrics()
            .await
            .contains("rempart_tls_handshake_failures_total{reason=\"client_cert_missing\"} 1")
    })
    .await;
    // A certificate from another CA is refused too.
    let mallory = Ca::new("Rogue CA").client("mallory", "m@example.eu");
    let outcome = match tls_connect(
        rp.addr,
        client_tls(&t.ca.pem, Some(&mallory), &[b"http/1.1"]),
    )
    .await
    {
        Ok(stream) => h1_get(stream, "/api/contacts").await.map(|(s, _)| s),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a rogue certificate was served: {outcome:?}"
    );
    assert!(up.seen_paths().is_empty(), "{:?}", up.seen_paths());
    assert!(rp.audit_records().is_empty());

    // With alice's certificate: served, identified by the certificate.
    let stream = tls_connect(rp.addr, client_tls(&t.ca.pem, Some(&alice), &[b"http/1.1"]))
        .await
        .unwrap();
    let (status, id) = h1_get(stream, "/api/contacts").await.unwrap();
    assert_eq!(status, 200);
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["identity"]["method"], "mtls", "{rec}");
    let subject = rec["identity"]["subject"].as_str().unwrap();
    assert!(
        subject.contains("CN=alice") && subject.contains("O=Example"),
        "{subject}"
    );
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_reload_keeps_open_connections_and_h2_is_negotiated() {
    let up = Upstream::start().await;
    let t = tls_setup();
    let toml = format!(
        r#"
[upstream]
url = "{}"
[server]
workers = 1
[server.tls]
cert = "{}"
key = "{}"
reload_interval = "0s"
"#,
        up.url(),
        t.cert.display(),
        t.key.display()
    );
    let rp = Rempart::with_config(t.dir.path(), "rempart.toml", &toml).unwrap();

    // HTTP/2 chosen by ALPN.
    let stream = tls_connect(rp.addr, client_tls(&t.ca.pem, None, &[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let first_cert = fingerprint_of_peer(&stream);
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(format!("https://localhost{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = h2.send_request(get("/api/contacts/1")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let rec = rp.audit_record(&decision_id(resp.headers())).await;
    assert_eq!(rec["request"]["protocol"], "HTTP/2");

    // HTTP/1.1 when the client offers only that.
    let stream = tls_connect(rp.addr, client_tls(&t.ca.pem, None, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(h1_get(stream, "/api/x").await.unwrap().0, 200);

    // A broken replacement is refused and the old certificate stays.
    std::fs::write(&t.cert, "not a certificate").unwrap();
    rp.signal("HUP");
    wait_for("the failed reload", async || {
        rp.metrics()
            .await
            .contains("rempart_tls_certificate_reloads_total{result=\"failure\"} 1")
    })
    .await;
    let s = tls_connect(rp.addr, client_tls(&t.ca.pem, None, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(fingerprint_of_peer(&s), first_cert);

    // A new certificate: new connections get it…
    let (cert, key) = t.ca.server("rempart-2");
    std::fs::write(&t.key, key).unwrap();
    std::fs::write(&t.cert, cert).unwrap();
    rp.signal("HUP");
    wait_for("the new certificate", async || {
        let s = tls_connect(rp.addr, client_tls(&t.ca.pem, None, &[b"http/1.1"]))
            .await
            .unwrap();
        fingerprint_of_peer(&s) != first_cert
    })
    .await;
    // …and the connection opened before the reload still serves requests.
    let resp = h2.send_request(get("/api/contacts/2")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.seen_paths()
            .iter()
            .filter(|p| p.starts_with("/api/contacts/"))
            .count(),
        2
    );
    assert!(
        rp.metric("rempart_tls_certificate_reloads_total{result=\"success\"}")
            .await
            >= 1.0
    );
}

/// A TLS upstream on the address `localhost` resolves to first (as
/// rempart resolves it), recording the SNI of each connection.
async fn tls_upstream(
    ca: &Ca,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use std::net::ToSocketAddrs;
    let ip = ("localhost", 0)
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
        .ip();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cert, key) = ca.server("upstream");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(|c| c.unwrap())
            .collect(),
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let snis = Arc::new(Mutex::new(Vec::new()));
    let s = snis.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                s.lock()
                    .unwrap()
                    .push(tls.get_ref().1.server_name().unwrap_or("").to_string());
                let svc = service_fn(|req: http::Request<Incoming>| async move {
                    let body = format!("tls upstream saw {}", req.uri().path());
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, snis, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_with_a_configured_ca() {
    let ca = Ca::new("Upstream CA");
    let (addr, snis, task) = tls_upstream(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "upstream-ca.pem", &ca.pem);
    let url = format!("https://localhost:{}", addr.port());
    let toml = format!(
        "[upstream]\nurl = \"{url}\"\n[upstream.tls]\nca = \"{}\"\n",
        ca_file.display()
    );
    let rp = Rempart::with_config(dir.path(), "rempart.toml", &toml).unwrap();
    let r = get_with(&rp, "/api/contacts/7", &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"tls upstream saw /api/contacts/7");
    assert_eq!(snis.lock().unwrap().as_slice(), ["localhost"]);
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["destination"]["host"], "localhost");
    assert_eq!(rec["destination"]["ip"], addr.ip().to_string());
    drop(rp);

    // Without the CA (the built-in public roots only), the upstream's
    // certificate is not trusted: 502, recorded as an upstream error.
    let dir2 = tempfile::tempdir().unwrap();
    let rp = Rempart::with_config(
        dir2.path(),
        "rempart.toml",
        &format!("[upstream]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let r = get_with(&rp, "/api/contacts/7", &[]).await;
    assert_eq!(r.status, 502);
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "error", "{rec}");
    assert!(
        rp.metric("rempart_upstream_errors_total{kind=\"connect\"}")
            .await
            >= 1.0
    );
    task.abort();
}

#[test]
fn check_validates_tls_and_jwks_files_and_warns_without_identity() {
    let t = tls_setup();
    let dir = t.dir.path();
    let audit = dir.join("audit.jsonl");
    let base = format!(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[audit]\npath = \"{}\"\n",
        audit.display()
    );
    let run_check = |name: &str, toml: &str| {
        let cfg = write(dir, name, toml);
        common::run(&[
            "check",
            "--config",
            cfg.to_str().unwrap(),
            "--policies",
            common::repo_policies().to_str().unwrap(),
        ])
    };

    let (code, _, err) = run_check("plain.toml", &base);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: no identity source"), "{err}");
    // It names the rules that are off, and those that still hold.
    for rule in [
        "unauthenticated (identity.rego",
        "bulk_requires_role (anyone may export",
        "delete_requires_role (anyone may delete)",
        "Still on: personal_data_outside_eea, body_not_inspected",
    ] {
        assert!(err.contains(rule), "{rule}: {err}");
    }

    let good_tls = format!(
        "{base}[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        t.cert.display(),
        t.key.display()
    );
    let (code, _, err) = run_check("tls.toml", &good_tls);
    assert_eq!(code, 0, "{err}");

    // A key that does not belong to the certificate.
    let (_, other_key) = t.ca.server("other");
    let other = write(dir, "other.key", &other_key);
    let mismatched = format!(
        "{base}[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        t.cert.display(),
        other.display()
    );
    let (code, _, err) = run_check("mismatch.toml", &mismatched);
    assert_ne!(code, 0);
    assert!(err.contains("do not make a usable certificate"), "{err}");

    let bad_jwks = write(
        dir,
        "bad-jwks.json",
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
    );
    let jwt = format!(
        "{base}[identity.jwt]\nissuer = \"{ISSUER}\"\naudiences = [\"crm\"]\njwks_file = \"{}\"\n",
        bad_jwks.display()
    );
    let (code, _, err) = run_check("jwt.toml", &jwt);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad-jwks.json") && err.contains("no usable signature key"),
        "{err}"
    );
    std::fs::write(&bad_jwks, jwks(&[&Signer::new("k1")])).unwrap();
    let (code, _, err) = run_check("jwt.toml", &jwt);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("no identity source"), "{err}");
}
