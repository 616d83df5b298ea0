//! The OPA-compatible decision log: a real rempart uploads to a real HTTP
//! collector on loopback (which decompresses the gzip body and parses the
//! JSON array), through collector outages, error answers, restarts, a
//! crash and a full spool, and every decision arrives exactly once.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, request, Rempart, Upstream};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// What the collector saw of one POST.
#[derive(Debug, Clone)]
struct Post {
    path: String,
    content_encoding: Option<String>,
    content_type: Option<String>,
    authorization: Option<String>,
    status: u16,
}

#[derive(Default)]
struct Seen {
    /// Events of the POSTs answered 2xx.
    events: Mutex<Vec<Value>>,
    posts: Mutex<Vec<Post>>,
    /// Status the collector answers (200 when 0).
    status: AtomicU16,
}

impl Seen {
    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["decision_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }
}

/// An HTTP collector on loopback; dropping it closes the port (and every
/// connection), so that rempart's next attempt is refused.
struct Collector {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Starts listening on the reserved port: the port was never free in
    /// between, so no other test's server can have taken it.
    async fn start(port: Reserved, seen: Arc<Seen>) -> Collector {
        port.socket.listen(128).unwrap();
        let listener: std::net::TcpListener = port.socket.into();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set: aborting the accept loop
            // drops the set, which aborts them too.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen);
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move { Ok::<_, hyper::Error>(collect(req, &seen).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { task }
    }
}

async fn collect(req: Request<Incoming>, seen: &Seen) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let mut post = Post {
        path: req.uri().path().to_string(),
        content_encoding: header("content-encoding"),
        content_type: header("content-type"),
        authorization: header("authorization"),
        status: 200,
    };
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let status = match seen.status.load(Ordering::SeqCst) {
        0 => 200,
        s => s,
    };
    post.status = status;
    if status == 200 {
        let mut json = String::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut json)
            .expect("the body is gzip");
        let events: Vec<Value> = serde_json::from_str(&json).expect("a JSON array");
        seen.events.lock().unwrap().extend(events);
    }
    seen.posts.lock().unwrap().push(post);
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A loopback port held for a collector that is not up yet: bound but not
/// listening, so rempart's connections are refused, and no other server
/// (another test's collector, upstream or rempart) can bind it meanwhile.
/// Releasing a port and binding it again later let a parallel test take
/// it, and receive this test's events.
struct Reserved {
    socket: socket2::Socket,
    addr: SocketAddr,
}

fn free_addr() -> Reserved {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    Reserved { socket, addr }
}

/// Starts rempart with the trail at `trail` and `[audit]` + `[audit.decision_log]`.
fn start(dir: &Path, upstream: &str, trail: &Path, audit: &str, decision_log: &str) -> Rempart {
    let cfg = dir.join(format!("rempart-{}.toml", nanos()));
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{upstream}\"\n\n[audit]\n{audit}\n\n[audit.decision_log]\n{decision_log}\n"
        ),
    )
    .unwrap();
    let policies = common::repo_policies();
    Rempart::try_start(
        "",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--policies",
            policies.to_str().unwrap(),
            "--audit",
            trail.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("rempart did not start: {e}"))
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Fast settings for tests: small batches, short waits.
fn fast(url: &str) -> String {
    format!(
        "url = \"{url}\"\nbatch_interval = \"100ms\"\nbackoff_min = \"50ms\"\nbackoff_max = \"300ms\"\ntimeout = \"2s\""
    )
}

async fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_metric(rp: &Rempart, sample: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = rp.metric(sample).await;
        if v >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} stayed at {v} (< {at_least})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `n` allowed requests, one after the other; their decision ids.
async fn traffic(rp: &Rempart, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = get(&rp.url(&format!("/api/contacts/{i}"))).await;
        assert_eq!(r.status, 200);
        ids.push(r.decision_id());
    }
    ids
}

/// Every id in `want` arrived exactly once (and nothing else arrived).
fn exactly_once(seen: &Seen, want: &[String]) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in seen.ids() {
        *counts.entry(id).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "duplicates: {dup:?}");
    let missing: Vec<_> = want.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} missing: {missing:?}", missing.len());
    assert_eq!(counts.len(), want.len(), "unexpected extra events");
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.to_str().unwrap().ends_with(".json.gz"))
                .collect()
        })
        .unwrap_or_default()
}

const DELIVERED: &str = "rempart_audit_decision_log_events_delivered_total";

#[tokio::test(flavor = "multi_thread")]
async fn decisions_arrive_as_opa_decision_log_events() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let port = free_addr();
    let addr = port.addr;
    let _collector = Collector::start(port, Arc::clone(&seen)).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start(
        dir.path(),
        &up.url(),
        &trail,
        "mask_source_ip = \"truncate\"",
        &format!(
            "{}\nbearer_token_file = \"{}\"\nlabels = {{ app = \"crm\", region = \"eu-west\" }}",
            fast(&format!("http://{addr}/logs")),
            token.display()
        ),
    );
    let allowed = get(&rp.url("/api/contacts/1?secret=x")).await;
    assert_eq!(allowed.status, 200);
    let denied = request("TRACE", &rp.url("/api/contacts"), &[]).await;
    assert_eq!(denied.status, 403);
    wait_until("2 events", 30, || seen.events().len() >= 2).await;

    let events = seen.events();
    let by_id = |id: &str| {
        events
            .iter()
            .find(|e| e["decision_id"] == id)
            .unwrap_or_else(|| panic!("no event {id} in {events:?}"))
            .clone()
    };
    let e = by_id(&allowed.decision_id());
    assert_eq!(e["path"], "rempart/decision");
    assert!(humantime::parse_rfc3339(e["timestamp"].as_str().unwrap()).is_ok());
    assert_eq!(e["input"]["request"]["method"], "GET");
    assert_eq!(
        e["input"]["request"]["path"], "/api/contacts/1",
        "query values never leave the machine"
    );
    assert_eq!(e["input"]["direction"], "ingress");
    assert_eq!(e["result"]["allow"], true);
    assert_eq!(e["result"]["status"], 200);
    assert_eq!(e["labels"]["app"], "crm");
    assert_eq!(e["labels"]["region"], "eu-west");
    assert!(!e["labels"]["id"].as_str().unwrap().is_empty());
    assert_eq!(e["labels"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(e["masked"], serde_json::json!(["/input/source/ip"]));
    assert_eq!(e["input"]["source"]["ip"], "127.0.0.0");
    assert!(e["requested_by"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.0:"));
    assert!(e["metrics"]["timer_server_handler_ns"].as_u64().unwrap() > 0);
    assert!(e["revision"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(
        e.get("bundles").is_none(),
        "policies from a directory: no bundle to name"
    );
    // The event points at its line in the hash chain.
    let line = rp.audit_record(&allowed.decision_id()).await;
    assert_eq!(e["trail"]["seq"], line["seq"]);
    assert_eq!(e["trail"]["hash"], line["hash"]);

    let d = by_id(&denied.decision_id());
    assert_eq!(d["result"]["allow"], false);
    assert_eq!(d["result"]["deny"][0]["code"], "method_not_allowed");
    assert_eq!(d["result"]["status"], 403);

    let post = &seen.posts()[0];
    assert_eq!(post.path, "/logs");
    assert_eq!(post.content_encoding.as_deref(), Some("gzip"));
    assert_eq!(post.content_type.as_deref(), Some("application/json"));
    assert_eq!(post.authorization.as_deref(), Some("Bearer s3cret-token"));

    wait_metric(&rp, DELIVERED, 2.0).await;
    assert_eq!(
        rp.metric("rempart_audit_decision_log_uploads_total{outcome=\"success\"}")
            .await,
        seen.posts().len() as f64
    );
    assert!(rp.stop().success());
    // Delivered batches are deleted from the spool.
    assert!(spool_files(&dir.path().join("trail.jsonl.spool")).is_empty());
}

/// A copy of the shipped policies with `data.settings.audit.minimise`.
fn policies_minimising(dir: &Path, rules: Value) -> PathBuf {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(common::repo_policies()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let data = out.join("data.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    doc["settings"]["audit"] = serde_json::json!({ "minimise": rules });
    std::fs::write(&data, doc.to_string()).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_is_named_in_the_events_and_its_minimisation_applies_to_them() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let port = free_addr();
    let addr = port.addr;
    let _collector = Collector::start(port, Arc::clone(&seen)).await;
    let policies = policies_minimising(
        dir.path(),
        serde_json::json!([
            {"field": "identity.subject", "action": "erase"},
            {"field": "source.ip", "action": "hash"},
        ]),
    );
    let bundle = dir.path().join("crm.tar.gz");
    let (code, out, err) = common::run(&[
        "policy",
        "build",
        policies.to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--revision",
        "v42",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let trail = dir.path().join("trail.jsonl");
    let cfg = dir.path().join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{}\"\n[policy.bundle]\npath = \"{}\"\n\
             [identity]\ntrusted_header = \"x-remote-user\"\ntrusted_sources = [\"127.0.0.1\"]\n\
             [audit]\n[audit.decision_log]\n{}\n",
            up.url(),
            bundle.display(),
            fast(&format!("http://{addr}/logs"))
        ),
    )
    .unwrap();
    let mut rp = Rempart::start(
        "",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--audit",
            trail.to_str().unwrap(),
        ],
    );
    let r = request(
        "GET",
        &rp.url("/api/contacts/7"),
        &[("x-remote-user", "bob")],
    )
    .await;
    assert_eq!(r.status, 200);
    wait_until("1 event", 30, || !seen.events().is_empty()).await;
    let e = seen.events()[0].clone();
    assert_eq!(e["decision_id"], r.decision_id().as_str());
    // OPA's shape: the bundle by name (the file's, without .tar.gz) and
    // manifest revision.
    assert_eq!(
        e["bundles"],
        serde_json::json!({"crm": {"revision": "v42"}})
    );
    assert_eq!(e["revision"], "v42");
    // The policy data's rules, applied before the record was written:
    // neither the trail nor the event holds the name or the address.
    assert!(e["input"]["identity"].get("subject").is_none(), "{e}");
    let hashed = e["input"]["source"]["ip"].as_str().unwrap();
    assert!(hashed.starts_with("hmac-sha256:"), "{e}");
    assert_eq!(e["erased"], serde_json::json!(["/input/identity/subject"]));
    assert_eq!(e["masked"], serde_json::json!(["/input/source/ip"]));
    let line = rp.audit_record(&r.decision_id()).await;
    assert_eq!(line["bundles"], e["bundles"]);
    assert_eq!(line["source"]["ip"], hashed);
    assert!(rp.stop().success());
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(!text.contains("\"bob\""), "{text}");
    assert!(
        e.get("requested_by").is_none(),
        "a hashed address is no address: {e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_outage_then_errors_loses_nothing_and_duplicates_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let port = free_addr();
    let addr = port.addr;
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start(
        dir.path(),
        &up.url(),
        &trail,
        "",
        &fast(&format!("http://{addr}/logs")),
    );
    // Nobody listens: connections are refused, batches wait in the spool.
    let mut want = traffic(&rp, 30).await;
    wait_metric(
        &rp,
        "rempart_audit_decision_log_uploads_total{outcome=\"network_error\"}",
        2.0,
    )
    .await;
    assert!(rp.metric("rempart_audit_decision_log_spool_files").await >= 1.0);
    assert!(rp.metric("rempart_audit_decision_log_spool_bytes").await > 0.0);

    // The collector comes back but answers 500 for a while.
    seen.status.store(500, Ordering::SeqCst);
    let collector = Collector::start(port, Arc::clone(&seen)).await;
    want.extend(traffic(&rp, 10).await);
    wait_metric(
        &rp,
        "rempart_audit_decision_log_uploads_total{outcome=\"http_error\"}",
        2.0,
    )
    .await;
    assert!(seen.events().is_empty());

    // Healthy again: everything arrives, once.
    seen.status.store(0, Ordering::SeqCst);
    want.extend(traffic(&rp, 10).await);
    wait_until("all 50 events", 60, || seen.events().len() >= want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    exactly_once(&seen, &want);
    wait_metric(&rp, DELIVERED, 50.0).await;
    assert_eq!(
        rp.metric("rempart_audit_decision_log_spool_files").await,
        0.0
    );
    assert_eq!(
        rp.metric("rempart_audit_decision_log_dropped_total{reason=\"not_in_trail\"}")
            .await,
        0.0
    );
    // Retries backed off: far fewer attempts than a tight loop would make.
    let attempts = seen.posts().len();
    assert!(attempts < 100, "{attempts} POSTs");
    assert!(rp.stop().success());
    drop(collector);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_delivers_the_spool_and_a_crash_loses_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let port = free_addr();
    let addr = port.addr;
    let trail = dir.path().join("trail.jsonl");
    let spool = dir.path().join("spool");
    let settings = format!(
        "{}\nspool_dir = \"{}\"",
        fast(&format!("http://{addr}/logs")),
        spool.display()
    );

    // 1. Collector down; a clean stop keeps the spool.
    let mut rp = start(dir.path(), &up.url(), &trail, "", &settings);
    let mut want = traffic(&rp, 20).await;
    assert!(rp.stop().success());
    assert!(!spool_files(&spool).is_empty(), "the stop kept the spool");

    // 2. Still down; kill -9 before the batch is spooled (a long batch
    // interval keeps the events in memory; sync mode puts each answered
    // request's record on disk first).
    let slow = settings.replace("batch_interval = \"100ms\"", "batch_interval = \"1h\"");
    let rp = start(
        dir.path(),
        &up.url(),
        &trail,
        "durability = \"sync\"",
        &slow,
    );
    let crashed = traffic(&rp, 15).await;
    rp.signal("KILL");
    drop(rp);
    want.extend(crashed);

    // 3. Collector up, restart: the spool is sent and the crashed events
    // are read back from the trail.
    let _collector = Collector::start(port, Arc::clone(&seen)).await;
    let mut rp = start(dir.path(), &up.url(), &trail, "", &settings);
    want.extend(traffic(&rp, 5).await);
    wait_until("all 40 events", 60, || seen.events().len() >= want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    exactly_once(&seen, &want);
    assert!(
        rp.metric("rempart_audit_decision_log_recovered_total")
            .await
            >= 15.0
    );
    assert!(rp.stop().success());
    assert!(spool_files(&spool).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spool_stays_within_its_bound_and_the_trail_fills_the_gap() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let port = free_addr();
    let addr = port.addr;
    let trail = dir.path().join("trail.jsonl");
    let spool = dir.path().join("spool");
    let max = 6 * 1024;
    let mut rp = start(
        dir.path(),
        &up.url(),
        &trail,
        "sink_queue_capacity = 1",
        &format!(
            "{}\nspool_dir = \"{}\"\nbatch_max_bytes = \"2KiB\"\nspool_max_bytes = {max}",
            fast(&format!("http://{addr}/logs")),
            spool.display()
        ),
    );
    let mut want = Vec::new();
    for _ in 0..6 {
        want.extend(traffic(&rp, 40).await);
        let on_disk: u64 = spool_files(&spool)
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(on_disk <= max, "spool holds {on_disk} bytes > {max}");
    }
    wait_metric(
        &rp,
        "rempart_audit_decision_log_spool_refusals_total{reason=\"full\"}",
        1.0,
    )
    .await;
    assert!(rp.metric("rempart_audit_decision_log_spool_bytes").await <= max as f64);

    // The collector comes back: what did not fit is read from the trail.
    let _collector = Collector::start(port, Arc::clone(&seen)).await;
    wait_until("all 240 events", 90, || seen.events().len() >= want.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    exactly_once(&seen, &want);
    assert!(
        rp.metric("rempart_audit_decision_log_recovered_total")
            .await
            > 0.0
    );
    assert_eq!(
        rp.metric("rempart_audit_decision_log_dropped_total{reason=\"not_in_trail\"}")
            .await,
        0.0
    );
    assert!(rp.stop().success());
}

#[test]
fn bad_decision_log_settings_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, want) in [
        ("url = \"ftp://x/logs\"", "url"),
        ("url = \"\"", "url"),
        (
            "url = \"http://127.0.0.1:1/logs\"\nbatch_max_bytes = \"1MiB\"\nspool_max_bytes = \"1MiB\"",
            "spool_max_bytes",
        ),
        (
            "url = \"http://127.0.0.1:1/logs\"\nlabels = { id = \"x\" }",
            "labels",
        ),
        (
            "url = \"http://127.0.0.1:1/logs\"\nspool = \"x\"",
            "unknown field `spool`",
        ),
    ] {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!("[upstream]\nurl = \"http://127.0.0.1:1\"\n\n[audit.decision_log]\n{toml}\n"),
        )
        .unwrap();
        let (code, out, err) = common::run(&["check", "--config", cfg.to_str().unwrap()]);
        assert_ne!(code, 0, "{toml}: {out}");
        // Either the key's table or the file's line says where.
        assert!(
            (err.contains("[audit.decision_log]") || err.contains("c.toml: TOML parse error at line"))
                && err.contains(want),
            "{toml}: {err}"
        );
    }
}
