//! OPA bundles end to end: `rempart policy build`, a real bundle server on
//! loopback (hyper, honouring If-None-Match), and the real rempart binary.

#[macro_use]
mod common;

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{get, run, Rempart, Upstream};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A minimal policy set: denies the paths listed in `data.blocked.paths`.
const POLICY: &str = r#"package rempart

import rego.v1

decision := {"allow": count(deny) == 0, "deny": [r | some r in deny], "warn": []}

deny contains {"code": "blocked_path", "message": "blocked by the bundle"} if {
	input.request.path in data.blocked.paths
}
"#;

const POLICY_TEST: &str = r#"package rempart_test

import rego.v1

test_blocked if {
	not data.rempart.decision.allow with input as {"request": {"path": "/blocked"}}
}
"#;

/// Writes a policy directory blocking `blocked` (data in `blocked/data.json`).
fn policy_dir(root: &Path, name: &str, blocked: &[&str]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("blocked")).unwrap();
    std::fs::write(dir.join("decision.rego"), POLICY).unwrap();
    std::fs::write(dir.join("decision_test.rego"), POLICY_TEST).unwrap();
    std::fs::write(
        dir.join("blocked/data.json"),
        serde_json::json!({ "paths": blocked }).to_string(),
    )
    .unwrap();
    dir
}

/// `rempart policy build` with extra arguments; the bundle's bytes.
fn build(dir: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "policy",
        "build",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "policy build failed: {stdout}{stderr}");
    std::fs::read(out).unwrap()
}

/// A gzip-compressed tarball with raw entry names and types (what a
/// hostile bundle server could send).
fn raw_tarball(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// What the bundle server serves, and what it saw.
#[derive(Default)]
struct Served {
    bundle: Vec<u8>,
    etag: String,
    /// Status to answer instead of the bundle (e.g. 500).
    status: Option<u16>,
    not_modified: usize,
    authorization: Vec<String>,
}

/// A real HTTP bundle server on loopback.
struct BundleServer {
    addr: SocketAddr,
    state: Arc<Mutex<Served>>,
    task: tokio::task::JoinHandle<()>,
    /// Open connections, closed by `stop` (a keep-alive connection would
    /// otherwise outlive the listener).
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl BundleServer {
    async fn start(bundle: Vec<u8>, etag: &str) -> BundleServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(Served {
            bundle,
            etag: etag.into(),
            ..Default::default()
        }));
        let s = state.clone();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let conns = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(&req, &s)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conns.lock().unwrap().push(conn.abort_handle());
            }
        });
        BundleServer {
            addr,
            state,
            task,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/bundles/rempart.tar.gz", self.addr)
    }

    fn serve(&self, bundle: Vec<u8>, etag: &str) {
        let mut s = self.state.lock().unwrap();
        s.bundle = bundle;
        s.etag = etag.into();
        s.status = None;
    }

    fn not_modified(&self) -> usize {
        self.state.lock().unwrap().not_modified
    }

    /// Stops listening: new connections are refused.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

fn answer(req: &Request<Incoming>, state: &Mutex<Served>) -> Response<Full<Bytes>> {
    let mut s = state.lock().unwrap();
    if let Some(a) = req.headers().get("authorization") {
        let a = a.to_str().unwrap_or_default().to_string();
        s.authorization.push(a);
    }
    if req.uri().path() != "/bundles/rempart.tar.gz" {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if let Some(status) = s.status {
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let etag = format!("\"{}\"", s.etag);
    if req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        s.not_modified += 1;
        return Response::builder()
            .status(304)
            .header("etag", etag)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    Response::builder()
        .status(200)
        .header("etag", etag)
        .header("content-type", "application/gzip")
        .body(Full::new(Bytes::from(s.bundle.clone())))
        .unwrap()
}

/// A config polling `url` every 100-200 ms.
fn server_config(dir: &Path, url: &str, extra: &str) -> PathBuf {
    let persist = dir.join("persist");
    let cfg = dir.join("rempart.toml");
    let text = format!(
        r#"[policy.bundle]
url = "{url}"
persist_dir = "{}"
poll_min = "100ms"
poll_max = "200ms"
backoff_min = "100ms"
backoff_max = "300ms"
timeout = "2s"
{extra}
"#,
        persist.display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn start_with(upstream: &Upstream, cfg: &Path) -> Result<Rempart, String> {
    Rempart::try_start(&upstream.url(), &["--config", cfg.to_str().unwrap()])
}

/// rempart serving the local bundle file `dir/live.tar.gz` (written with
/// `bundle`), watched every 100 ms; `policy` opens the `[policy]` table
/// (with any keys of its own).
async fn serve_live_bundle(
    dir: &Path,
    bundle: &[u8],
    policy: &str,
) -> (PathBuf, Upstream, Rempart) {
    let live = dir.join("live.tar.gz");
    std::fs::write(&live, bundle).unwrap();
    let cfg = dir.join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "{policy}reload_interval = \"100ms\"\n[policy.bundle]\npath = \"{}\"\n",
            live.display()
        ),
    )
    .unwrap();
    let upstream = Upstream::start().await;
    let rp = start_with(&upstream, &cfg).unwrap();
    (live, upstream, rp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_change_304_and_revision_in_records_and_readyz() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = build(
        &policy_dir(tmp.path(), "v1", &["/a"]),
        &tmp.path().join("v1.tar.gz"),
        &["--revision", "v1"],
    );
    let v2 = build(
        &policy_dir(tmp.path(), "v2", &["/a", "/b"]),
        &tmp.path().join("v2.tar.gz"),
        &["--revision", "v2"],
    );
    let server = BundleServer::start(v1, "e1").await;
    let upstream = Upstream::start().await;
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let cfg = server_config(
        tmp.path(),
        &server.url(),
        &format!("bearer_token_file = \"{}\"", token.display()),
    );
    let rp = start_with(&upstream, &cfg).unwrap();

    assert_eq!(rp.policy_revision().await, "v1");
    let r = get(&rp.url("/b")).await;
    assert_eq!(r.status, 200, "v1 does not block /b");
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["policy_revision"], "v1", "{rec}");

    // Polls with If-None-Match get 304 and keep v1.
    eventually!("304 answers", server.not_modified() >= 2);
    assert_eq!(rp.policy_revision().await, "v1");
    assert!(
        rp.sample("rempart_policy_bundle_downloads_total{result=\"not_modified\"}")
            .await
            >= 1.0
    );
    assert!(
        rp.sample("rempart_policy_bundle_last_activation_timestamp_seconds")
            .await
            > 1.7e9
    );
    assert!(server
        .state
        .lock()
        .unwrap()
        .authorization
        .iter()
        .all(|a| a == "Bearer s3cret-token"));

    // A new revision is picked up, and decides.
    server.serve(v2, "e2");
    eventually!("v2 active", rp.policy_revision().await == "v2");
    let r = get(&rp.url("/b")).await;
    assert_eq!(r.status, 403, "v2 blocks /b");
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["policy_revision"], "v2", "{rec}");
    assert_eq!(
        rp.sample("rempart_policy_revision_info{revision=\"v2\"}")
            .await,
        1.0
    );
    // The persisted copy is the new one, with its ETag.
    let persisted = std::fs::read(tmp.path().join("persist/bundle.etag")).unwrap();
    assert_eq!(persisted, b"\"e2\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_at_start_and_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = build(
        &policy_dir(tmp.path(), "v1", &["/a"]),
        &tmp.path().join("v1.tar.gz"),
        &["--revision", "v1"],
    );
    let upstream = Upstream::start().await;

    // No server and nothing persisted: nothing to serve, rempart refuses to start.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = server_config(
        tmp.path(),
        &format!("http://{dead}/bundles/rempart.tar.gz"),
        "",
    );
    let err = start_with(&upstream, &cfg).err().expect("must not start");
    assert!(
        err.contains("no usable persisted bundle") && err.contains("no policy to serve"),
        "{err}"
    );

    // With the server: starts, persists, and keeps serving when it goes away.
    let server = BundleServer::start(v1, "e1").await;
    let cfg = server_config(tmp.path(), &server.url(), "");
    let mut rp = start_with(&upstream, &cfg).unwrap();
    assert_eq!(rp.policy_revision().await, "v1");
    assert!(tmp.path().join("persist/bundle.tar.gz").is_file());
    server.stop().await;
    eventually!(
        "download failures",
        rp.sample("rempart_policy_bundle_download_failures_total{reason=\"connect\"}",)
            .await
            >= 2.0
    );
    assert_eq!(get(&rp.url("/a")).await.status, 403, "v1 still decides");
    assert_eq!(get(&rp.url("/x")).await.status, 200);
    assert!(rp.log_text().contains("bundle download failed"));
    rp.stop();

    // Restart while the server is down: starts from the persisted bundle.
    let rp = start_with(&upstream, &cfg).unwrap();
    assert_eq!(rp.policy_revision().await, "v1");
    assert_eq!(get(&rp.url("/a")).await.status, 403);
    assert!(
        rp.log_text().contains("starting from the persisted bundle"),
        "{}",
        rp.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bundles_keep_the_last_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = build(
        &policy_dir(tmp.path(), "v1", &["/a"]),
        &tmp.path().join("v1.tar.gz"),
        &["--revision", "v1"],
    );
    let server = BundleServer::start(v1, "e1").await;
    let upstream = Upstream::start().await;
    let cfg = server_config(
        tmp.path(),
        &server.url(),
        "max_bytes = 65536\nmax_uncompressed_bytes = 1048576",
    );
    let rp = start_with(&upstream, &cfg).unwrap();
    assert_eq!(rp.policy_revision().await, "v1");

    let manifest: &[u8] = br#"{"revision":"evil"}"#;
    let zeros = vec![0u8; 4 << 20];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "corrupt",
            b"\x1f\x8b\x08\x00 this is not a gzip stream".to_vec(),
            "rempart_policy_bundle_activation_failures_total{reason=\"unreadable\"}",
        ),
        (
            "traversal",
            raw_tarball(&[
                (".manifest", tar::EntryType::Regular, manifest, ""),
                (
                    "../../etc/evil.rego",
                    tar::EntryType::Regular,
                    POLICY.as_bytes(),
                    "",
                ),
            ]),
            "rempart_policy_bundle_activation_failures_total{reason=\"unsafe_path\"}",
        ),
        (
            "symlink",
            raw_tarball(&[
                (
                    "decision.rego",
                    tar::EntryType::Regular,
                    POLICY.as_bytes(),
                    "",
                ),
                ("data.json", tar::EntryType::Symlink, b"", "/etc/passwd"),
            ]),
            "rempart_policy_bundle_activation_failures_total{reason=\"unsafe_path\"}",
        ),
        (
            "zip bomb",
            raw_tarball(&[("big/data.json", tar::EntryType::Regular, &zeros, "")]),
            "rempart_policy_bundle_activation_failures_total{reason=\"too_large\"}",
        ),
        (
            "oversize download",
            // Random-looking bytes do not compress: above max_bytes as sent.
            (0..100_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
            "rempart_policy_bundle_download_failures_total{reason=\"too_large\"}",
        ),
        (
            "rego that does not compile",
            raw_tarball(&[
                (".manifest", tar::EntryType::Regular, manifest, ""),
                (
                    "decision.rego",
                    tar::EntryType::Regular,
                    b"package rempart\n\ndecision := {\n",
                    "",
                ),
            ]),
            "rempart_policy_bundle_activation_failures_total{reason=\"compile\"}",
        ),
        (
            "data outside the roots",
            raw_tarball(&[
                (
                    ".manifest",
                    tar::EntryType::Regular,
                    br#"{"revision":"evil","roots":["rempart"]}"#,
                    "",
                ),
                (
                    "decision.rego",
                    tar::EntryType::Regular,
                    POLICY.as_bytes(),
                    "",
                ),
                (
                    "blocked/data.json",
                    tar::EntryType::Regular,
                    br#"{"paths":[]}"#,
                    "",
                ),
            ]),
            "rempart_policy_bundle_activation_failures_total{reason=\"invalid\"}",
        ),
    ];
    for (i, (what, bytes, metric)) in cases.into_iter().enumerate() {
        let before = rp.sample(metric).await;
        server.serve(bytes, &format!("bad{i}"));
        eventually!(what, rp.sample(metric).await > before);
        assert_eq!(rp.policy_revision().await, "v1", "{what}: v1 keeps serving");
        assert_eq!(get(&rp.url("/a")).await.status, 403, "{what}: v1 decides");
    }
    let log = rp.log_text();
    for needle in [
        "not a readable gzip-compressed tarball",
        "path traversal",
        "is a link",
        "max_uncompressed_bytes",
        "max_bytes",
        "outside the manifest roots",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    // The persisted copy is still the good one.
    let persisted = std::fs::read(tmp.path().join("persist/bundle.tar.gz")).unwrap();
    assert_eq!(
        persisted,
        std::fs::read(tmp.path().join("v1.tar.gz")).unwrap()
    );
}

/// An ECDSA P-256 key pair as PEM files: (private PKCS#8, public SPKI).
fn es256_keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    std::fs::write(&private, kp.serialize_pem()).unwrap();
    std::fs::write(&public, kp.public_key_pem()).unwrap();
    (private, public)
}

/// Unpacks a tarball, applies `edit` to its files, packs it again.
fn repack(bytes: &[u8], edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut files = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.push((name.clone(), edit(&name, data)));
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let mut out = b.into_inner().unwrap().finish().unwrap();
    out.flush().unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bundles_only_when_a_key_is_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = es256_keys(tmp.path(), "signer");
    let (other_private, _) = es256_keys(tmp.path(), "intruder");
    let sign = |key: &Path| {
        vec![
            "--signing-key".to_string(),
            key.display().to_string(),
            "--signing-alg".into(),
            "ES256".into(),
            "--signing-keyid".into(),
            "ops".into(),
        ]
    };
    let args = |rev: &str, key: &Path| {
        let mut a = vec!["--revision".to_string(), rev.to_string()];
        a.extend(sign(key));
        a
    };
    let build_signed = |name: &str, blocked: &[&str], rev: &str, key: &Path| {
        let a = args(rev, key);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        build(
            &policy_dir(tmp.path(), name, blocked),
            &tmp.path().join(format!("{name}.tar.gz")),
            &a,
        )
    };
    let v1 = build_signed("v1", &["/a"], "v1", &private);
    let v2 = build_signed("v2", &["/a", "/b"], "v2", &private);
    let unsigned = build(
        &policy_dir(tmp.path(), "u", &[]),
        &tmp.path().join("u.tar.gz"),
        &["--revision", "unsigned"],
    );
    let intruder = build_signed("x", &[], "intruder", &other_private);
    let tampered = repack(&v2, |name, data| {
        if name.ends_with("data.json") {
            br#"{"paths":[]}"#.to_vec()
        } else {
            data
        }
    });

    let server = BundleServer::start(v1, "e1").await;
    let upstream = Upstream::start().await;
    let cfg = server_config(
        tmp.path(),
        &server.url(),
        &format!(
            "[policy.bundle.signing]\npublic_key = \"{}\"\nalgorithm = \"ES256\"\nkeyid = \"ops\"",
            public.display()
        ),
    );
    let rp = start_with(&upstream, &cfg).unwrap();
    assert_eq!(rp.policy_revision().await, "v1");

    let metric = "rempart_policy_bundle_activation_failures_total{reason=\"signature\"}";
    for (i, (what, bytes, needle)) in [
        ("unsigned", unsigned, "not signed"),
        ("signed by another key", intruder, "does not verify"),
        ("tampered after signing", tampered, "digest mismatch"),
    ]
    .into_iter()
    .enumerate()
    {
        let before = rp.sample(metric).await;
        server.serve(bytes, &format!("bad{i}"));
        eventually!(what, rp.sample(metric).await > before);
        assert_eq!(rp.policy_revision().await, "v1", "{what}");
        assert!(rp.log_text().contains(needle), "{what}: {}", rp.log_text());
    }
    server.serve(v2, "e2");
    eventually!("signed v2", rp.policy_revision().await == "v2");
    assert_eq!(get(&rp.url("/b")).await.status, 403);
}

#[test]
fn build_eval_test_and_check_a_bundle_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = policy_dir(tmp.path(), "p", &["/blocked"]);
    // YAML data at its directory path, as OPA places it.
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    std::fs::write(dir.join("extra/data.yaml"), "owner: dsi\nlevel: 3\n").unwrap();
    let out = tmp.path().join("bundle.tar.gz");
    let bytes = build(&dir, &out, &[]);

    // Deterministic: the same sources give the same bytes.
    let again = build(&dir, &tmp.path().join("again.tar.gz"), &[]);
    assert_eq!(bytes, again);

    // The layout OPA reads: .manifest, sources and data at their paths.
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
    let mut names: Vec<String> = Vec::new();
    let mut manifest = serde_json::Value::Null;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name == ".manifest" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            manifest = serde_json::from_str(&text).unwrap();
        }
        names.push(name);
    }
    assert_eq!(
        names,
        [
            ".manifest",
            "blocked/data.json",
            "decision.rego",
            "decision_test.rego",
            "extra/data.yaml"
        ]
    );
    assert!(manifest["revision"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(manifest["roots"], serde_json::json!([""]));

    // policy eval and policy test take the bundle file.
    let input = tmp.path().join("input.json");
    std::fs::write(&input, r#"{"request": {"path": "/blocked"}}"#).unwrap();
    let (code, stdout, stderr) = run(&[
        "policy",
        "eval",
        "--policies",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["allow"], false, "{doc}");
    assert_eq!(doc["policy_revision"], manifest["revision"]);
    let (code, stdout, stderr) = run(&["policy", "test", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");

    // A build of a directory that does not compile fails and writes nothing.
    std::fs::write(dir.join("broken.rego"), "package rempart\n\nx := {\n").unwrap();
    let bad = tmp.path().join("bad.tar.gz");
    let (code, _, stderr) = run(&[
        "policy",
        "build",
        dir.to_str().unwrap(),
        "-o",
        bad.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("broken.rego"), "{stderr}");
    assert!(!bad.exists());

    // check refuses a tarball with path traversal, saying so.
    let evil = tmp.path().join("evil.tar.gz");
    std::fs::write(
        &evil,
        raw_tarball(&[("../x.rego", tar::EntryType::Regular, POLICY.as_bytes(), "")]),
    )
    .unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n[policy.bundle]\npath = \"{}\"\n",
            evil.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("path traversal"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_bundle_file_reloads_and_keeps_last_good() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = build(
        &policy_dir(tmp.path(), "v1", &["/a"]),
        &tmp.path().join("v1.tar.gz"),
        &["--revision", "v1"],
    );
    let v2 = build(
        &policy_dir(tmp.path(), "v2", &["/a", "/b"]),
        &tmp.path().join("v2.tar.gz"),
        &["--revision", "v2"],
    );
    let (live, _upstream, rp) = serve_live_bundle(tmp.path(), &v1, "[policy]\n").await;
    assert_eq!(rp.policy_revision().await, "v1");

    let write = |bytes: &[u8]| {
        let tmpfile = tmp.path().join("next.tar.gz");
        std::fs::write(&tmpfile, bytes).unwrap();
        std::fs::rename(&tmpfile, &live).unwrap();
    };
    write(&v2);
    eventually!("v2 from the file", rp.policy_revision().await == "v2");
    let metric = "rempart_policy_bundle_activation_failures_total{reason=\"unreadable\"}";
    write(b"garbage, not a tarball, and longer than before");
    eventually!("refusal counted", rp.sample(metric).await >= 1.0);
    assert_eq!(rp.policy_revision().await, "v2");
    assert_eq!(get(&rp.url("/b")).await.status, 403);
}

/// An OPA-Envoy style policy (as in OPA-Envoy's primer: `package
/// envoy.authz`, `default allow := false`, the request read from
/// `input.attributes.request.http` and `input.parsed_path`) whose partner
/// allow-list is data: `GET /partners/<name>` is allowed when
/// `data.partners.allowed[name]` is true.
const ENVOY_POLICY: &str = r#"package envoy.authz

import rego.v1

import input.attributes.request.http

default allow := false

allow if {
	http.method == "GET"
	input.parsed_path[0] == "partners"
	data.partners.allowed[input.parsed_path[1]]
}
"#;

/// Tests of [`ENVOY_POLICY`], shipped in its bundles (`policy test`).
const ENVOY_POLICY_TEST: &str = r#"package envoy.authz_test

import rego.v1

get_partner(name) := {"attributes": {"request": {"http": {"method": "GET"}}}, "parsed_path": ["partners", name]}

test_acme_is_listed if data.envoy.authz.allow with input as get_partner("acme")

test_unknown_is_not if not data.envoy.authz.allow with input as get_partner("unknown")
"#;

/// The `[policy]` table of an instance that runs OPA-Envoy policies.
const ENVOY_DECISION: &str =
    "[policy]\ninput_compat = \"envoy\"\ndecision = \"envoy/authz/allow\"\n";

/// Writes (or rewrites) the OPA-Envoy policy directory `name`, with the
/// partners allowed in `partners/data.json`.
fn envoy_dir(root: &Path, name: &str, partners: &[&str]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("partners")).unwrap();
    std::fs::write(dir.join("authz.rego"), ENVOY_POLICY).unwrap();
    std::fs::write(dir.join("authz_test.rego"), ENVOY_POLICY_TEST).unwrap();
    let allowed: serde_json::Map<String, serde_json::Value> = partners
        .iter()
        .map(|p| (p.to_string(), true.into()))
        .collect();
    std::fs::write(
        dir.join("partners/data.json"),
        serde_json::json!({ "allowed": allowed }).to_string(),
    )
    .unwrap();
    dir
}

/// Builds the OPA-Envoy bundle of `dir` for its decision, with the
/// default (content digest) revision.
fn build_envoy(dir: &Path, out: &Path) -> Vec<u8> {
    build(dir, out, &["--decision", "envoy/authz/allow"])
}

/// The status of `GET /partners/<name>` through the proxy.
async fn partner_status(rp: &Rempart, name: &str) -> u16 {
    get(&rp.url(&format!("/partners/{name}"))).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_bundle_from_a_server_decides_with_the_configured_decision() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = envoy_dir(tmp.path(), "envoy", &["acme"]);
    // A bundle must be built for the decision it will be read for.
    let (code, _, stderr) = run(&[
        "policy",
        "build",
        dir.to_str().unwrap(),
        "-o",
        tmp.path().join("wrong.tar.gz").to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "built for data.rempart.decision: {stderr}");
    let v1 = build_envoy(&dir, &tmp.path().join("v1.tar.gz"));
    let server = BundleServer::start(v1, "e1").await;
    let upstream = Upstream::start().await;
    let cfg = server_config(tmp.path(), &server.url(), ENVOY_DECISION);
    let rp = start_with(&upstream, &cfg).unwrap();
    let rev1 = rp.policy_revision().await;
    assert!(rev1.starts_with("sha256:"), "{rev1}");

    // Allow and deny through the proxy, by the OPA-Envoy rule.
    assert_eq!(partner_status(&rp, "acme").await, 200);
    assert_eq!(upstream.seen_paths(), ["/partners/acme"]);
    let denied = get(&rp.url("/partners/globex")).await;
    assert_eq!(denied.status, 403);
    let rec = rp.audit_record(&denied.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "denied", "{rec}");
    assert_eq!(rec["policy_revision"], rev1.as_str(), "{rec}");
    let post = common::request("POST", &rp.url("/partners/acme"), &[]).await;
    assert_eq!(post.status, 403, "the rule allows GET only");
    assert_eq!(
        upstream.seen_paths().len(),
        1,
        "denials never reach the CRM"
    );

    // The same bundle with only its data.json changed, under a new ETag.
    envoy_dir(tmp.path(), "envoy", &["acme", "globex"]);
    let v2 = build_envoy(&dir, &tmp.path().join("v2.tar.gz"));
    server.serve(v2.clone(), "e2");
    eventually!("the data-only bundle", rp.policy_revision().await != rev1);
    let rev2 = rp.policy_revision().await;
    let allowed = get(&rp.url("/partners/globex")).await;
    assert_eq!(allowed.status, 200, "the new data decides");
    let rec = rp.audit_record(&allowed.decision_id()).await;
    assert_eq!(rec["policy_revision"], rev2.as_str(), "{rec}");

    // Refused: a data.json that is not JSON, then a bundle that does not
    // define the configured decision. The data-only bundle keeps serving.
    let broken = repack(&v2, |name, data| {
        if name.ends_with("data.json") {
            br#"{"allowed": {"#.to_vec()
        } else {
            data
        }
    });
    let rempart_style = build(
        &policy_dir(tmp.path(), "rempart-style", &[]),
        &tmp.path().join("rempart-style.tar.gz"),
        &[],
    );
    for (what, bytes, etag, reason, needle) in [
        (
            "broken data",
            broken,
            "e3",
            "invalid",
            "partners/data.json: invalid JSON",
        ),
        (
            "no envoy decision",
            rempart_style,
            "e4",
            "compile",
            "no rule defines data.envoy.authz.allow",
        ),
    ] {
        let metric =
            format!("rempart_policy_bundle_activation_failures_total{{reason=\"{reason}\"}}");
        let before = rp.sample(&metric).await;
        server.serve(bytes, etag);
        eventually!(what, rp.sample(&metric).await > before);
        assert_eq!(rp.policy_revision().await, rev2, "{what}");
        assert_eq!(partner_status(&rp, "globex").await, 200, "{what}");
        assert_eq!(partner_status(&rp, "initech").await, 403, "{what}");
        assert!(rp.log_text().contains(needle), "{what}: {}", rp.log_text());
    }
    // The persisted copy is the last good bundle.
    assert_eq!(
        std::fs::read(tmp.path().join("persist/bundle.tar.gz")).unwrap(),
        v2
    );

    // Restarted with the server gone: the persisted copy is compiled for
    // the configured decision too.
    drop(rp);
    server.stop().await;
    let rp = start_with(&upstream, &cfg).unwrap();
    assert_eq!(rp.policy_revision().await, rev2);
    assert_eq!(partner_status(&rp, "globex").await, 200);
    assert_eq!(partner_status(&rp, "initech").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_envoy_bundle_reloads_its_data_for_the_configured_decision() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = envoy_dir(tmp.path(), "envoy", &["acme"]);
    let v1 = build_envoy(&dir, &tmp.path().join("v1.tar.gz"));
    envoy_dir(tmp.path(), "envoy", &["acme", "globex"]);
    let v2 = build_envoy(&dir, &tmp.path().join("v2.tar.gz"));
    let rempart_style = build(
        &policy_dir(tmp.path(), "rempart-style", &[]),
        &tmp.path().join("rempart-style.tar.gz"),
        &[],
    );
    // policy test runs its tests for the decision it is read for.
    let v1_path = tmp.path().join("v1.tar.gz");
    let v1_path = v1_path.to_str().unwrap();
    let (code, stdout, stderr) =
        run(&["policy", "test", v1_path, "--decision", "envoy/authz/allow"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
    let (code, _, stderr) = run(&["policy", "test", v1_path]);
    assert_ne!(code, 0);
    assert!(stderr.contains("data.rempart.decision"), "{stderr}");

    let (live, upstream, rp) = serve_live_bundle(tmp.path(), &v1, ENVOY_DECISION).await;
    let cfg = tmp.path().join("rempart.toml");
    let rev1 = rp.policy_revision().await;
    assert_eq!(partner_status(&rp, "acme").await, 200);
    assert_eq!(partner_status(&rp, "globex").await, 403);

    let write = |bytes: &[u8]| {
        let next = tmp.path().join("next.tar.gz");
        std::fs::write(&next, bytes).unwrap();
        std::fs::rename(&next, &live).unwrap();
    };
    // Only the data changed: the watcher activates it for envoy/authz/allow.
    write(&v2);
    eventually!("v2 from the file", rp.policy_revision().await != rev1);
    let rev2 = rp.policy_revision().await;
    let allowed = get(&rp.url("/partners/globex")).await;
    assert_eq!(allowed.status, 200);
    let rec = rp.audit_record(&allowed.decision_id()).await;
    assert_eq!(rec["policy_revision"], rev2.as_str(), "{rec}");

    // A bundle without the configured decision is refused on reload.
    let metric = "rempart_policy_bundle_activation_failures_total{reason=\"compile\"}";
    write(&rempart_style);
    eventually!("refusal counted", rp.sample(metric).await >= 1.0);
    assert_eq!(rp.policy_revision().await, rev2);
    assert_eq!(partner_status(&rp, "globex").await, 200);
    let log = rp.log_text();
    assert!(
        log.contains("policy reload rejected")
            && log.contains("no rule defines data.envoy.authz.allow"),
        "{log}"
    );

    // The same bundle given with --policies reads the same decision.
    let rp = Rempart::try_start(
        &upstream.url(),
        &["--config", cfg.to_str().unwrap(), "--policies", v1_path],
    )
    .unwrap();
    assert_eq!(rp.policy_revision().await, rev1);
    assert_eq!(partner_status(&rp, "acme").await, 200);
    assert_eq!(partner_status(&rp, "globex").await, 403);
}
