//! Test harness: a real upstream HTTP server, a real `rempart` process, and
//! a real HTTP client, all on loopback ephemeral ports.
#![allow(dead_code)]

pub mod dns;
pub mod loopback_geo;
pub mod pki;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, Notify};

pub fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
}

/// A real HTTP/1.1 upstream. Routes:
/// - `/slow/<ms>`: waits, then 200;
/// - `/upload` (and Odoo's `/web/dataset/call_kw[/...]`, for the shipped
///   `odoo` profile): reads the body frame by frame, signals `first_chunk`
///   after the first one, answers with the byte count;
/// - `/download`: sends "first-chunk;", waits for `release`, sends "second-chunk";
/// - anything else: 200 with a small JSON body.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub first_chunk: Arc<Notify>,
    pub release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let first_chunk = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, f, r) = (seen.clone(), first_chunk.clone(), release.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, f, r) = (s.clone(), f.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, f, r) = (s.clone(), f.clone(), r.clone());
                        async move { Ok::<_, Infallible>(route(req, s, f, r).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            first_chunk,
            release,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen_paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

async fn route(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    first_chunk: Arc<Notify>,
    release: Arc<Notify>,
) -> Response<UpBody> {
    let path = req.uri().path().to_string();
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: req.headers().clone(),
    });
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Response::new(full("slow done"));
    }
    if path == "/upload" || path.starts_with("/web/dataset/call_kw") {
        let mut body = req.into_body();
        let mut total = 0usize;
        let mut first = true;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(d) = frame.data_ref() {
                total += d.len();
                if first && total > 0 {
                    first = false;
                    first_chunk.notify_one();
                }
            }
        }
        return Response::new(full(total.to_string()));
    }
    if path == "/download" {
        let (tx, body) = ChannelBody::new();
        tokio::spawn(async move {
            let _ = tx.send(Bytes::from_static(b"first-chunk;")).await;
            release.notified().await;
            let _ = tx.send(Bytes::from_static(b"second-chunk")).await;
        });
        return Response::new(body.boxed());
    }
    let body = serde_json::json!({"path": path, "upstream": true}).to_string();
    Response::new(full(body))
}

/// A body fed chunk by chunk from a channel: proves streaming, since the
/// receiver sees a chunk only if nobody buffers the whole body.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(4);
        (tx, ChannelBody(rx))
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A running `rempart serve` process.
pub struct Rempart {
    pub child: Option<Child>,
    /// The ingress address (0.0.0.0:0 when there is no ingress listener).
    pub addr: SocketAddr,
    /// The egress proxy address, when configured.
    pub egress: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub audit: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Lines rempart wrote to standard output.
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

/// A loopback port for a server that another process (Creme, Prometheus)
/// will bind next, so that no socket can hold it meanwhile.
///
/// Picked at random below Linux's ephemeral range (32768-60999), and free
/// at the moment of the pick: the kernel never hands these out to a
/// `bind(0)` or an outgoing connection, so in the window before the
/// server binds no other test's listener or client can take the port. A
/// port from `bind(0)`, released for the server, could be.
pub fn unused_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
    seed.write_u32(std::process::id());
    let start = seed.finish();
    for i in 0..1000u64 {
        let port = 20_000 + ((start + i * 7919) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999");
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_rempart")
}

/// Runs a rempart command to completion: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    Some(line[start..].split_whitespace().next()?.to_string())
}

impl Rempart {
    /// Starts rempart on ephemeral ports with `extra` arguments and waits
    /// until it says it is ready. `--policies` defaults to the repo's set.
    pub fn start(upstream: &str, extra: &[&str]) -> Rempart {
        Self::try_start(upstream, extra).unwrap_or_else(|e| panic!("rempart did not start: {e}"))
    }

    pub fn try_start(upstream: &str, extra: &[&str]) -> Result<Rempart, String> {
        Self::try_start_via(&[], upstream, extra)
    }

    /// Like [`Rempart::try_start`], but runs `launcher... rempart args...`
    /// (e.g. a shell that sets a resource limit, then `exec "$0" "$@"`).
    pub fn try_start_via(
        launcher: &[&str],
        upstream: &str,
        extra: &[&str],
    ) -> Result<Rempart, String> {
        let dir = tempfile::tempdir().unwrap();
        // An --audit in `extra` (reopening an existing trail) wins.
        let given = extra
            .iter()
            .position(|a| *a == "--audit")
            .and_then(|i| extra.get(i + 1));
        let audit = given.map_or_else(|| dir.path().join("audit.jsonl"), PathBuf::from);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ];
        if given.is_none() {
            args.push("--audit".into());
            args.push(audit.display().to_string());
        }
        if !upstream.is_empty() {
            args.push("--upstream".into());
            args.push(upstream.into());
        }
        if !extra.contains(&"--policies") && !extra.contains(&"--config") {
            args.push("--policies".into());
            args.push(repo_policies().display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut command = match launcher.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .args(&args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("rempart ready") {
                    let _ = tx.send(line.clone());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                let addr = field(&line, "ingress")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                let egress = field(&line, "egress").and_then(|a| a.parse().ok());
                let admin = field(&line, "admin").unwrap().parse().unwrap();
                return Ok(Rempart {
                    child: Some(child),
                    addr,
                    egress,
                    admin,
                    audit,
                    log,
                    stdout: stdout_lines,
                    dir,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "exited with {status}: {}",
                    log.lock().unwrap().join("\n")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "not ready in time: {}",
                    log.lock().unwrap().join("\n")
                ));
            }
        }
    }

    /// Writes `toml` to a file in `dir` and starts rempart with it and the
    /// repository's policies.
    pub fn with_config(dir: &Path, name: &str, toml: &str) -> Result<Rempart, String> {
        let cfg = dir.join(name);
        std::fs::write(&cfg, toml).unwrap();
        let policies = repo_policies();
        Self::try_start(
            "",
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--policies",
                policies.to_str().unwrap(),
            ],
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("rempart did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        // A record being written may be read half-way: only whole lines.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits until the audit trail holds a record with this decision id.
    pub async fn audit_record(&self, decision_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self
                .audit_records()
                .into_iter()
                .find(|r| r["decision_id"] == decision_id)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {decision_id}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let r = get(&format!("http://{}/metrics", self.admin)).await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// The value of one sample, e.g. `rempart_requests_total{direction="ingress",outcome="denied"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
    }

    /// The value of one sample, 0 when absent (a labelled counter that
    /// has not counted yet is not exported).
    pub async fn sample(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// The policy revision `/readyz` reports as serving.
    pub async fn policy_revision(&self) -> String {
        let r = get(&format!("http://{}/readyz", self.admin)).await;
        r.json()["policy_revision"].as_str().unwrap().to_string()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// Waits until the condition holds (checked every 20 ms, up to 10 s).
/// Test files use it with `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let done: bool = $cond;
            if done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {}",
                $what
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

impl Drop for Rempart {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn decision_id(&self) -> String {
        self.headers
            .get("x-rempart-decision-id")
            .expect("x-rempart-decision-id header")
            .to_str()
            .unwrap()
            .to_string()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn send(req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

pub async fn get(url: &str) -> Reply {
    request("GET", url, &[]).await
}
