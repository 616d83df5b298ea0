//! `rempart serve` end to end: a real upstream, a real rempart process, real
//! HTTP over loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;

const INGRESS_ALLOWED: &str = r#"rempart_requests_total{direction="ingress",outcome="allowed"}"#;
const INGRESS_DENIED: &str = r#"rempart_requests_total{direction="ingress",outcome="denied"}"#;
const INGRESS_MONITORED: &str =
    r#"rempart_requests_total{direction="ingress",outcome="monitored"}"#;
const INGRESS_ERROR: &str = r#"rempart_requests_total{direction="ingress",outcome="error"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn allowed_request_reaches_upstream_with_forwarding_headers() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &[]);
    let r = request(
        "GET",
        &rp.url("/api/contacts/42?q=secret"),
        &[
            ("host", "crm.example.eu"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/api/contacts/42");
    let id = r.decision_id();

    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.headers["host"], "crm.example.eu",
        "Host is kept by default"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "crm.example.eu");

    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["decision"]["outcome"], "allowed");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["request"]["method"], "GET");
    assert_eq!(rec["request"]["path"], "/api/contacts/42");
    assert_eq!(rec["source"]["scope"], "loopback");
    assert_eq!(rec["source"]["geo"]["sovereign"], "local");
    assert_eq!(rec["destination"]["ip"], "127.0.0.1");
    assert_eq!(rec["destination"]["geo"]["sovereign"], "local");
    assert!(rec["policy_revision"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let line = std::fs::read_to_string(&rp.audit).unwrap();
    assert!(
        !line.contains("secret"),
        "query values never reach the trail"
    );
    assert_eq!(rp.metric(INGRESS_ALLOWED).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_request_gets_403_reasons_header_audit_and_metric() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &[]);
    let before = rp.metric(INGRESS_DENIED).await;
    let r = request("TRACE", &rp.url("/api/contacts"), &[]).await;
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["decision_id"], r.decision_id());
    assert_eq!(body["reasons"][0]["code"], "method_not_allowed");
    assert!(
        up.seen_paths().is_empty(),
        "a denied request never reaches the upstream"
    );

    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "denied");
    assert_eq!(rec["decision"]["enforced"], true);
    assert_eq!(rec["decision"]["deny"][0]["code"], "method_not_allowed");
    assert_eq!(rec["status"], 403);
    assert_eq!(rp.metric(INGRESS_DENIED).await, before + 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn monitor_mode_lets_through_and_records_what_would_have_been_denied() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &["--mode", "monitor"]);
    let r = request("GET", &rp.url("/.env"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.seen_paths(), vec!["/.env"]);
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "monitored");
    assert_eq!(rec["decision"]["enforced"], false);
    assert_eq!(rec["decision"]["allow"], false);
    assert_eq!(rec["decision"]["deny"][0]["code"], "blocked_path");
    assert_eq!(rp.metric(INGRESS_MONITORED).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_compile_error_refuses_to_start_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.rego"),
        "package rempart\nimport rego.v1\n\ndecision := {\"allow\": true\n",
    )
    .unwrap();
    let err = Rempart::try_start(
        "http://127.0.0.1:9",
        &["--policies", dir.path().to_str().unwrap()],
    )
    .err()
    .expect("must not start");
    assert!(err.contains("broken.rego:"), "{err}");
    assert!(err.contains("exited with exit status: 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_502_with_json_metric_and_audit() {
    // A port with nothing listening: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rp = Rempart::start(&format!("http://127.0.0.1:{port}"), &[]);
    let r = get(&rp.url("/api/contacts")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "bad_gateway");
    assert_eq!(r.json()["decision_id"], r.decision_id());
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "error");
    assert_eq!(rec["status"], 502);
    assert!(
        rec["decision"]["error"]
            .as_str()
            .unwrap()
            .contains("onnect"),
        "{rec}"
    );
    assert_eq!(
        rp.metric(r#"rempart_upstream_errors_total{kind="connect"}"#)
            .await,
        1.0
    );
    assert_eq!(rp.metric(INGRESS_ERROR).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_504_within_the_configured_timeout() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{}\"\nresponse_timeout = \"300ms\"\n[policy]\ndir = \"{}\"\n",
            up.url(),
            repo_policies().display()
        ),
    )
    .unwrap();
    let rp = Rempart::start("", &["--config", cfg.to_str().unwrap()]);
    let started = std::time::Instant::now();
    let r = get(&rp.url("/slow/5000")).await;
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the upstream did"
    );
    assert_eq!(r.json()["error"], "gateway_timeout");
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["status"], 504);
    assert_eq!(
        rp.metric(r#"rempart_upstream_errors_total{kind="timeout"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_in_flight_requests_and_flushes_every_record() {
    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &[]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = rp.url("/slow/700");
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    // Let every request reach the upstream, then stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while up.seen_paths().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let admin = rp.admin;
    let status = tokio::task::spawn_blocking(move || {
        let s = rp.stop();
        (s, rp)
    });
    // While draining, the admin listener still answers and says so.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "draining");
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "in-flight request must finish");
        ids.push(r.decision_id());
    }
    let (status, rp) = status.await.unwrap();
    assert!(status.success(), "exit status {status}");
    let records = rp.audit_records();
    for id in ids {
        assert!(
            records.iter().any(|r| r["decision_id"] == id.as_str()),
            "record {id} lost"
        );
    }
    assert!(rp.log_text().contains("audit trail flushed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_and_response_bodies_are_streamed_not_buffered() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &[]);

    // Upload: the upstream must see the first chunk while the client still
    // holds the rest back. A buffering proxy would wait forever here.
    let (tx, body) = ChannelBody::new();
    let req = http::Request::post(rp.url("/upload")).body(body).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<ChannelBody>();
    let pending = tokio::spawn(async move { client.request(req).await });
    tx.send(Bytes::from(vec![b'a'; 64 * 1024])).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), up.first_chunk.notified())
        .await
        .expect("first chunk reached the upstream before the body was complete");
    for _ in 0..15 {
        tx.send(Bytes::from(vec![b'b'; 64 * 1024])).await.unwrap();
    }
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    let total = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(total, (16 * 64 * 1024).to_string().as_bytes());

    // Download: the client must get the first chunk before the upstream
    // sends the second.
    let resp = common::client()
        .request(
            http::Request::get(rp.url("/download"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk arrived before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"first-chunk;");
    up.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"second-chunk");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_clients_are_served() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &[]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let resp = client
        .request(
            http::Request::get(rp.url("/api/contacts"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let id = resp.headers()["x-rempart-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let rec = rp.audit_record(&id).await;
    assert_eq!(rec["request"]["protocol"], "HTTP/2");
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.headers["host"],
        rp.addr.to_string(),
        "the h2 authority becomes Host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_header_is_stripped_from_untrusted_sources() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |trusted: &str| {
        let p = dir
            .path()
            .join(format!("{}.toml", trusted.replace(['/', '.'], "_")));
        std::fs::write(
            &p,
            format!(
                "[upstream]\nurl = \"{}\"\n[identity]\ntrusted_header = \"X-Remote-User\"\ntrusted_sources = [\"{trusted}\"]\n",
                up.url()
            ),
        )
        .unwrap();
        p
    };
    // Not trusted: the forged header must not reach the CRM.
    let untrusted = cfg("10.0.0.0/8");
    let rp = Rempart::start(
        "",
        &[
            "--config",
            untrusted.to_str().unwrap(),
            "--policies",
            repo_policies().to_str().unwrap(),
        ],
    );
    // Anonymous, so the shipped policy denies it except on a login path:
    // ask for one, to see what reaches the CRM.
    let r = request("GET", &rp.url("/x"), &[("x-remote-user", "admin")]).await;
    assert_eq!(
        r.status, 403,
        "anonymous once an identity source is configured"
    );
    assert_eq!(r.json()["reasons"][0]["code"], "unauthenticated");
    let r = request("GET", &rp.url("/login"), &[("x-remote-user", "admin")]).await;
    assert_eq!(r.status, 200);
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        !seen.headers.contains_key("x-remote-user"),
        "forged identity stripped"
    );
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["identity"]["method"], "none");
    assert!(rec["identity"]["subject"].is_null());
    drop(rp);

    // Trusted (loopback is the authenticating proxy here): believed and kept.
    let trusted = cfg("127.0.0.0/8");
    let rp = Rempart::start(
        "",
        &[
            "--config",
            trusted.to_str().unwrap(),
            "--policies",
            repo_policies().to_str().unwrap(),
        ],
    );
    let r = request("GET", &rp.url("/x"), &[("x-remote-user", "alice")]).await;
    assert_eq!(r.status, 200);
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["x-remote-user"], "alice");
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["identity"]["method"], "header");
    assert_eq!(rec["identity"]["subject"], "alice");
}

/// An upstream and a rempart serving the shipped decision from a
/// directory of its own, which a test rewrites to reload.
async fn start_with_reloadable_policies() -> (Upstream, tempfile::TempDir, Rempart) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "package rempart\n");
    let rp = Rempart::start(&up.url(), &["--policies", dir.path().to_str().unwrap()]);
    (up, dir, rp)
}

fn write_policy(dir: &std::path::Path, extra_rule: &str) {
    for f in ["decision.rego", "library.rego", "data.json"] {
        std::fs::copy(repo_policies().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("extra.rego"), extra_rule).unwrap();
}

const RELOADED_RULE: &str = r#"package rempart
import rego.v1
deny contains {"code": "reloaded", "message": "added by reload"} if input.request.path == "/reloaded"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn evaluation_error_fails_closed_by_default_and_open_when_configured() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A rule that runs past the evaluation time limit on /heavy.
    write_policy(
        dir.path(),
        "package rempart\nimport rego.v1\ndeny contains {\"code\": \"x\"} if {\n  input.request.path == \"/heavy\"\n  count([n | some n in numbers.range(1, 20000000)]) < 0\n}\n",
    );
    let p = dir.path().to_str().unwrap();
    let cfg = dir.path().join("closed.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{}\"\n[policy]\ndir = \"{p}\"\neval_timeout = \"10ms\"\n",
            up.url()
        ),
    )
    .unwrap();
    let rp = Rempart::start("", &["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        get(&rp.url("/light")).await.status,
        200,
        "other requests are unaffected"
    );
    let r = get(&rp.url("/heavy")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "policy_unavailable");
    assert_eq!(
        up.seen_paths(),
        vec!["/light"],
        "the failed request never reached the upstream"
    );
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "error");
    assert!(
        rec["decision"]["error"]
            .as_str()
            .unwrap()
            .contains("time limit"),
        "{rec}"
    );
    assert_eq!(
        rp.metric("rempart_policy_evaluation_errors_total").await,
        1.0
    );
    assert_eq!(rp.metric(INGRESS_ERROR).await, 1.0);
    drop(rp);

    let cfg = dir.path().join("open.toml");
    std::fs::write(&cfg, format!("[upstream]\nurl = \"{}\"\n[policy]\ndir = \"{p}\"\neval_timeout = \"10ms\"\non_error = \"allow\"\n", up.url())).unwrap();
    let rp = Rempart::start("", &["--config", cfg.to_str().unwrap()]);
    let r = get(&rp.url("/heavy")).await;
    assert_eq!(r.status, 200);
    let rec = rp.audit_record(&r.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "error");
    assert_eq!(rec["decision"]["enforced"], false);
}

const HEADER_AND_QUERY_RULE: &str = r#"package rempart
import rego.v1
deny contains {"code": "tenant", "message": "tenant b is closed"} if input.request.headers["x-tenant"] == "b"
deny contains {"code": "export", "message": "no exports"} if "csv" in input.request.query.format
"#;

// The gateway describes a request's headers and query only for a set that
// reads them; a reload to a set that does must see them from then on.
#[tokio::test(flavor = "multi_thread")]
async fn headers_and_query_reach_a_set_that_reads_them_after_a_reload() {
    let (_up, dir, rp) = start_with_reloadable_policies().await;
    let tenant_b = [("x-tenant", "b")];
    let url = rp.url("/api/contacts/1");
    let export = rp.url("/api/contacts?format=json&format=csv");
    assert_eq!(request("GET", &url, &tenant_b).await.status, 200);
    assert_eq!(get(&export).await.status, 200);

    std::fs::write(dir.path().join("extra.rego"), HEADER_AND_QUERY_RULE).unwrap();
    rp.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while request("GET", &url, &tenant_b).await.status != 403 {
        assert!(std::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(&export).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["reasons"][0]["code"], "export");
    let r = request("GET", &url, &[("x-tenant", "a")]).await;
    assert_eq!(r.status, 200, "another tenant still passes");
    assert_eq!(get(&rp.url("/api/contacts?format=json")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_hanging_up_does_not_lose_the_record_of_what_the_crm_received() {
    let up = Upstream::start().await;
    let rp = Rempart::start(&up.url(), &[]);
    let url = rp.url("/slow/600");
    let gave_up = tokio::time::timeout(Duration::from_millis(150), get(&url)).await;
    assert!(gave_up.is_err(), "the client gave up first");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let recs = rp.audit_records();
        if let Some(rec) = recs.iter().find(|r| r["request"]["path"] == "/slow/600") {
            assert_eq!(rec["status"], 200, "{rec}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record for the abandoned request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.seen_paths(), vec!["/slow/600"]);
}

/// Hot reload under concurrent traffic: a good set is swapped in, a broken
/// one is rejected, and not one request fails along the way.
#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_good_and_broken_sets_under_traffic_without_failures() {
    let (_up, dir, rp) = start_with_reloadable_policies().await;
    let rev0 = get(&format!("http://{}/readyz", rp.admin)).await.json()["policy_revision"].clone();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (url, stop) = (rp.url("/api/contacts"), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match send(http::Request::get(&url).body(Default::default()).unwrap()).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("status {}", r.status)),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&rp.url("/reloaded")).await.status, 200);

    // A good set, picked up by SIGHUP.
    std::fs::write(dir.path().join("extra.rego"), RELOADED_RULE).unwrap();
    rp.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(&rp.url("/reloaded")).await.status != 403 {
        assert!(std::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rev1 = get(&format!("http://{}/readyz", rp.admin)).await.json()["policy_revision"].clone();
    assert_ne!(rev0, rev1);
    assert_eq!(
        rp.metric(r#"rempart_policy_reloads_total{result="success"}"#)
            .await,
        1.0
    );

    // A broken set, picked up by polling the directory: rejected, the
    // previous one keeps serving.
    std::fs::write(
        dir.path().join("extra.rego"),
        "package rempart\ndeny contains {{{",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rp
        .metric(r#"rempart_policy_reloads_total{result="failure"}"#)
        .await
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "broken set not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(&rp.url("/reloaded")).await;
    assert_eq!(r.status, 403, "previous set still serving");
    assert_eq!(
        get(&format!("http://{}/readyz", rp.admin)).await.json()["policy_revision"],
        rev1
    );
    assert!(rp.log_text().contains("policy reload rejected"));
    assert!(
        rp.log_text().contains("extra.rego"),
        "the rejection names the file"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during reload: {failed:?}"
        );
        total += ok;
    }
    assert!(
        total > 100,
        "traffic ran during the reloads ({total} requests)"
    );
    // Every decision records the revision that made it.
    let revs: std::collections::BTreeSet<String> = rp
        .audit_records()
        .iter()
        .map(|r| r["policy_revision"].as_str().unwrap().to_string())
        .collect();
    assert!(
        revs.contains(rev0.as_str().unwrap()) && revs.contains(rev1.as_str().unwrap()),
        "{revs:?}"
    );
}

/// Decisions are cached on the input fields the policies read: a repeated
/// request gets the same answer and the same record without running the
/// policy again, and a reload empties the cache at once.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_requests_are_decided_from_the_cache_until_the_policy_changes() {
    let (_up, dir, rp) = start_with_reloadable_policies().await;
    let hit = r#"rempart_policy_decision_cache_total{result="hit"}"#;
    let miss = r#"rempart_policy_decision_cache_total{result="miss"}"#;

    for _ in 0..6 {
        assert_eq!(get(&rp.url("/reloaded")).await.status, 200);
    }
    // Each worker thread has its own cache: at most one miss per thread.
    assert!(rp.metric(miss).await <= 2.0, "{}", rp.metric(miss).await);
    assert!(rp.metric(hit).await >= 4.0, "{}", rp.metric(hit).await);

    // A denial served from the cache carries its reasons to the client and
    // to the trail, as an evaluated one does.
    let hits_before = rp.metric(hit).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let r = get(&rp.url("/.git/config")).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.json()["reasons"][0]["code"], "blocked_path");
        ids.push(r.decision_id());
    }
    assert!(rp.metric(hit).await >= hits_before + 2.0);
    for id in &ids {
        let rec = rp.audit_record(id).await;
        assert_eq!(rec["decision"]["outcome"], "denied");
        assert_eq!(rec["decision"]["deny"][0]["code"], "blocked_path");
    }

    // The allow cached for /reloaded does not outlive the set that gave it.
    std::fs::write(dir.path().join("extra.rego"), RELOADED_RULE).unwrap();
    rp.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(&rp.url("/reloaded")).await.status != 403 {
        assert!(std::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(get(&rp.url("/reloaded")).await.status, 403);
    }
}

/// A set that reads the clock is never cached (and the log says why); the
/// cache can also be turned off.
#[tokio::test(flavor = "multi_thread")]
async fn volatile_policies_and_a_zero_sized_cache_are_never_served_from_the_cache() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(
        dir.path(),
        "package rempart\nimport rego.v1\n\
         warn contains {\"code\": \"night\"} if time.now_ns() < 0\n",
    );
    let rp = Rempart::start(&up.url(), &["--policies", dir.path().to_str().unwrap()]);
    for _ in 0..3 {
        assert_eq!(get(&rp.url("/api/contacts")).await.status, 200);
    }
    let bypassed = r#"rempart_policy_decision_cache_total{result="bypassed"}"#;
    let hit = r#"rempart_policy_decision_cache_total{result="hit"}"#;
    assert_eq!(rp.metric(bypassed).await, 3.0);
    assert_eq!(rp.metric(hit).await, 0.0);
    let log = rp.log_text();
    assert!(
        log.contains("decisions are not cached") && log.contains("extra.rego:3: time.now_ns"),
        "{log}"
    );

    let cfg_dir = tempfile::tempdir().unwrap();
    let off = Rempart::with_config(
        cfg_dir.path(),
        "rempart.toml",
        &format!(
            "[upstream]\nurl = \"{}\"\n[policy]\ndecision_cache = 0\n",
            up.url()
        ),
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(get(&off.url("/api/contacts")).await.status, 200);
    }
    assert_eq!(off.metric(bypassed).await, 3.0);
    assert_eq!(off.metric(hit).await, 0.0);
}

/// Reads from `stream` until the peer closes it (bounded by `within`);
/// returns how long that took, or `None` if it stayed open.
async fn time_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn header_read_timeout_closes_a_stalled_head_and_an_idle_keep_alive_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rp = Rempart::with_config(
        dir.path(),
        "rempart.toml",
        &format!(
            "[server]\nheader_read_timeout = \"1s\"\n[upstream]\nurl = \"{}\"\n",
            up.url()
        ),
    )
    .unwrap();

    // Half a request head, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(rp.addr).await.unwrap();
    stalled
        .write_all(b"GET /api/contacts/1 HTTP/1.1\r\nHost: crm")
        .await
        .unwrap();
    let closed = time_until_closed(&mut stalled, Duration::from_secs(10)).await;
    let closed = closed.expect("a stalled request head was never timed out");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}"
    );

    // A complete exchange, then the connection sits idle.
    let mut idle = tokio::net::TcpStream::connect(rp.addr).await.unwrap();
    idle.write_all(b"GET /api/contacts/1 HTTP/1.1\r\nHost: crm\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"upstream\":true") {
        let n = idle.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let closed = time_until_closed(&mut idle, Duration::from_secs(10)).await;
    let closed = closed.expect("an idle keep-alive connection was never closed");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}"
    );
}

/// Sends `head` as is on a new connection and reads the whole answer (the
/// head asks the server to close).
async fn raw_exchange(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request whose host is ambiguous never reaches the CRM or the policy:
/// rempart answers 400, says why, records it, in monitor mode too. The
/// policy, the record and the CRM would otherwise not agree on the host.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_an_ambiguous_host_is_refused_with_400_in_any_mode() {
    let up = Upstream::start().await;
    for mode in ["enforce", "monitor"] {
        let rp = Rempart::start(&up.url(), &["--mode", mode]);
        let refused = [
            (
                "GET /api/contacts/1 HTTP/1.1\r\nHost: crm.example.eu\r\nHost: other.example\r\n",
                "more than one Host header",
            ),
            ("GET /api/contacts/2 HTTP/1.1\r\n", "no Host header"),
            (
                "GET /api/contacts/3 HTTP/1.1\r\nHost: user@crm.example.eu\r\n",
                "invalid Host header",
            ),
            (
                "GET /api/contacts/4 HTTP/1.1\r\nHost: \r\n",
                "invalid Host header",
            ),
            (
                "GET http://crm.example.eu/api/contacts/5 HTTP/1.1\r\nHost: other.example\r\n",
                "does not match",
            ),
        ];
        for (head, why) in refused {
            let answer = raw_exchange(rp.addr, &format!("{head}Connection: close\r\n\r\n")).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{mode}: {head:?} -> {answer}"
            );
            assert!(answer.contains("x-rempart-decision-id: "), "{answer}");
            let body: serde_json::Value =
                serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            assert_eq!(body["error"], "bad_request");
            assert!(
                body["message"].as_str().unwrap().contains(why),
                "{mode}: {head:?} -> {body}"
            );
        }
        // Written differently, the same host and port: served. So is an
        // HTTP/1.0 request without Host.
        for head in [
            "GET http://crm.example.eu:80/api/contacts/6 HTTP/1.1\r\nHost: CRM.example.eu\r\n",
            "GET /api/contacts/7 HTTP/1.0\r\n",
        ] {
            let answer = raw_exchange(rp.addr, &format!("{head}Connection: close\r\n\r\n")).await;
            assert!(answer.contains(" 200 OK"), "{mode}: {head:?} -> {answer}");
        }

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let records = loop {
            let recs = rp.audit_records();
            if recs.len() >= 7 {
                break recs;
            }
            assert!(std::time::Instant::now() < deadline, "{recs:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let refused: Vec<_> = records.iter().filter(|r| r["status"] == 400).collect();
        assert_eq!(refused.len(), 5, "{records:?}");
        for r in refused {
            assert_eq!(r["decision"]["outcome"], "denied", "{r}");
            assert_eq!(r["decision"]["enforced"], true, "{r}");
            assert_eq!(r["decision"]["deny"][0]["code"], "bad_request", "{r}");
        }
        assert_eq!(
            rp.metric(r#"rempart_requests_total{direction="ingress",outcome="denied"}"#)
                .await,
            5.0
        );
    }
    let seen = up.seen_paths();
    for refused in 1..=5 {
        let path = format!("/api/contacts/{refused}");
        assert!(!seen.contains(&path), "{path} reached the CRM: {seen:?}");
    }
    assert_eq!(
        seen.iter()
            .filter(|p| p.as_str() == "/api/contacts/6")
            .count(),
        2
    );
}
