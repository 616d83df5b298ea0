//! `rempart report` and the admin `/report`, on a real trail: a real
//! rempart process in front of a real upstream, real egress tunnels to a
//! real TCP server, and CONNECTs to destinations that generated GeoIP
//! fixtures place in the United States and at Amazon in Germany
//! (tests/common/loopback_geo.rs).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::loopback_geo::{self, EU, US, US_OPERATOR_IN_EU};
use common::{get, request, Rempart, Upstream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP echo server on `ip` (an EU destination in the fixtures).
async fn echo_server(ip: &str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Opens a tunnel through the egress proxy; returns its status and, when
/// open, the stream.
async fn connect(proxy: std::net::SocketAddr, target: &str) -> (u16, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("proxy answered in time")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, s)
}

struct Scene {
    rempart: Rempart,
    _upstream: Upstream,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The same deployment in monitor mode (same trail, same policies).
    monitor_config: PathBuf,
}

fn config_text(dir: &Path, upstream: &str, mode: &str, extra: &str) -> String {
    let (country, asn) = (dir.join("country.mmdb"), dir.join("asn.mmdb"));
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n[upstream]\nurl = \"{upstream}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [egress]\n# Port 0 on the ingress address would be refused as the same listener.\nlisten = \"127.0.0.9:0\"\n\
         [policy]\ndir = \"{}\"\n[audit]\npath = \"{}\"\n{extra}\n{}",
        dir.join("policies").display(),
        dir.join("audit.jsonl").display(),
        loopback_geo::geo_toml(&country, &asn),
    )
}

/// rempart with real traffic: ingress allowed and denied, an egress
/// tunnel to the EU that carries bytes, and egress refused to the US and
/// to Amazon in Germany. Stopped, so the trail is complete.
async fn scene(report_table: &str) -> Scene {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    loopback_geo::write(dir.path(), &[]);
    loopback_geo::policies(dir.path());
    let config = dir.path().join("rempart.toml");
    std::fs::write(
        &config,
        config_text(dir.path(), &up.url(), "enforce", report_table),
    )
    .unwrap();
    let monitor_config = dir.path().join("rempart-monitor.toml");
    std::fs::write(
        &monitor_config,
        config_text(dir.path(), &up.url(), "monitor", report_table),
    )
    .unwrap();
    // The harness would give rempart a trail of its own: use the config's.
    let audit = dir.path().join("audit.jsonl");
    let rempart = Rempart::try_start(
        "",
        &[
            "--config",
            config.to_str().unwrap(),
            "--audit",
            audit.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("rempart did not start: {e}"));

    for _ in 0..3 {
        assert_eq!(get(&rempart.url("/api/contacts/1")).await.status, 200);
    }
    assert_eq!(
        request("POST", &rempart.url("/api/contacts"), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        request("TRACE", &rempart.url("/api/contacts"), &[])
            .await
            .status,
        403
    );

    let proxy = rempart.egress.expect("egress listener");
    let (echo, _task) = echo_server(EU).await;
    let (status, mut tunnel) = connect(proxy, &echo.to_string()).await;
    assert_eq!(status, 200, "EU destination refused");
    tunnel.write_all(b"contact export 123").await.unwrap();
    let mut back = [0u8; 18];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"contact export 123");
    drop(tunnel);
    assert_eq!(connect(proxy, &format!("{US}:443")).await.0, 403);
    assert_eq!(
        connect(proxy, &format!("{US_OPERATOR_IN_EU}:443")).await.0,
        403
    );
    // The tunnel's closing record (its bytes) is written when it closes,
    // which may be before or after the two refusals' records reach the
    // file: wait for all of them (5 ingress and 3 egress decisions, 1
    // transfer), so that every reader of the trail sees the same 8.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = rempart.audit_records();
        let transfers = records
            .iter()
            .filter(|r| r.get("transfer").is_some_and(|t| !t.is_null()))
            .count();
        if transfers == 1 && records.len() - transfers == 8 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "trail incomplete: {} records, {transfers} transfer(s)",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Scene {
        rempart,
        _upstream: up,
        dir,
        config,
        monitor_config,
    }
}

fn report_json(args: &[&str]) -> Value {
    let mut all = vec!["report", "--format", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = common::run(&all);
    assert_eq!(code, 0, "rempart report failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn criterion<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no criterion {id}"))
}

fn score(r: &Value, id: &str) -> u64 {
    criterion(r, id)["score"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn report_scores_a_real_trail_and_the_score_follows_the_configuration() {
    let mut s = scene("").await;
    assert!(s.rempart.stop().success());
    let cfg = s.config.to_str().unwrap();
    let enforce = report_json(&["--config", cfg]);

    assert_eq!(enforce["schema"], "rempart.report/v1");
    let criteria = enforce["criteria"].as_array().unwrap();
    assert_eq!(criteria.len(), 11);
    assert_eq!(
        criteria
            .iter()
            .map(|c| c["max"].as_u64().unwrap())
            .sum::<u64>(),
        100
    );
    let total: u64 = criteria.iter().map(|c| c["score"].as_u64().unwrap()).sum();
    assert_eq!(enforce["score"].as_u64().unwrap(), total);

    // What was seen: 4 ingress requests forwarded to the CRM in France, one
    // tunnel to France that carried 36 bytes; the US and Amazon refused.
    let obs = &enforce["observations"];
    assert_eq!(obs["forwarded"]["eu"]["requests"], 5, "{obs:#}");
    assert_eq!(obs["forwarded"]["eu"]["bytes"], 36);
    assert_eq!(obs["forwarded"]["non_eu"]["requests"], 0);
    assert_eq!(obs["outcomes"]["egress"]["denied"], 2);
    assert_eq!(obs["outcomes"]["ingress"]["denied"], 1);
    let reasons: Vec<&str> = obs["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    for code in [
        "destination_outside_eu",
        "destination_non_eu_jurisdiction",
        "method_not_allowed",
    ] {
        assert!(reasons.contains(&code), "{code} not in {reasons:?}");
    }
    let us_row = obs["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["country"] == "US")
        .expect("a US destination row");
    assert_eq!(
        (us_row["denied"].as_u64(), us_row["forwarded"].as_u64()),
        (Some(1), Some(0))
    );
    // Its example decision is a real record of the trail.
    let example = us_row["examples"][0].as_str().unwrap();
    assert!(s
        .rempart
        .audit_records()
        .iter()
        .any(|r| r["decision_id"] == example));
    let amazon = obs["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["operator"] == "amazon")
        .expect("an Amazon row");
    assert_eq!(
        (amazon["country"].as_str(), amazon["jurisdiction"].as_str()),
        (Some("DE"), Some("US"))
    );

    // Everything forwarded stayed in the EU with EU operators, and rempart
    // enforces it with fresh data: the observed criteria are full.
    for id in [
        "hosting_eu",
        "redundancy_eu_only",
        "no_us_cloud",
        "outside_cloud_act",
    ] {
        let c = criterion(&enforce, id);
        assert_eq!(c["score"], c["max"], "{id}: {c:#}");
        assert_eq!(c["basis"], "observed");
    }
    // The declared criteria are not judged without a facts file.
    for id in [
        "datacenters_iso27001",
        "contract_french_law",
        "vendor_eu_law",
        "eu_shareholding",
        "no_us_subsidiary",
        "auditable_source",
        "secnumcloud_hds",
    ] {
        let c = criterion(&enforce, id);
        assert_eq!(
            (c["score"].as_u64(), c["basis"].as_str()),
            (Some(0), Some("not_judged")),
            "{id}"
        );
    }
    assert_eq!(enforce["score"], 40);
    assert_eq!(enforce["judged_max"], 40);
    assert_eq!(enforce["verdict"], "insufficient");
    assert_eq!(
        enforce["posture"]["probes"]["denies_us_operator_in_eu"],
        true
    );

    // The same trail, judged with the monitor-mode configuration: nothing
    // would be stopped, so the enforcement points go.
    let monitor = report_json(&["--config", s.monitor_config.to_str().unwrap()]);
    for id in [
        "hosting_eu",
        "no_us_cloud",
        "outside_cloud_act",
        "redundancy_eu_only",
    ] {
        assert!(
            score(&monitor, id) < score(&enforce, id),
            "{id} did not drop in monitor mode"
        );
    }
    assert_eq!(score(&monitor, "hosting_eu"), 6);
    assert!(monitor["score"].as_u64() < enforce["score"].as_u64());
    let mode = monitor["controls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "enforce_mode")
        .unwrap();
    assert_eq!(mode["status"], "missing");

    // A policy set that lets Amazon through (an allow-listed operator)
    // loses the CLOUD Act enforcement points, though nothing reached it.
    let data_path = s.dir.path().join("policies/data.json");
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(&data_path).unwrap()).unwrap();
    data["settings"]["sovereignty"]["allowed_operators"] = serde_json::json!(["amazon"]);
    std::fs::write(&data_path, data.to_string()).unwrap();
    let lax = report_json(&["--config", cfg]);
    assert_eq!(lax["posture"]["probes"]["denies_us_operator_in_eu"], false);
    assert_eq!(score(&lax, "outside_cloud_act"), 9);
    assert_eq!(score(&lax, "no_us_cloud"), 6);
    assert_eq!(score(&lax, "hosting_eu"), 10);

    // Declared facts score the criteria no packet shows.
    let facts = s.dir.path().join("facts.toml");
    std::fs::write(
        &facts,
        "[vendor]\nname = \"Exemple CRM SAS\"\ncountry = \"FR\"\neu_shareholding_percent = 64\nus_parent = false\nus_subsidiary = false\n\
         source_code_auditable = true\n[hosting]\nprovider = \"OVHcloud\"\ncontract_law = \"FR\"\ncertifications = [\"iso27001\", \"hds\"]\n",
    )
    .unwrap();
    std::fs::write(
        &data_path,
        serde_json::to_string(&{
            data["settings"]["sovereignty"]["allowed_operators"] = serde_json::json!([]);
            data
        })
        .unwrap(),
    )
    .unwrap();
    let full = report_json(&["--config", cfg, "--facts", facts.to_str().unwrap()]);
    assert_eq!(full["score"], 100, "{:#}", full["criteria"]);
    assert_eq!(full["verdict"], "sovereign");
    assert_eq!(full["vendor"], "Exemple CRM SAS");
    assert_eq!(
        criterion(&full, "outside_cloud_act")["basis"],
        "observed_and_declared"
    );

    // A time range that ends before the traffic: nothing observed.
    let before = report_json(&["--config", cfg, "--until", "2020-01-01T00:00:00Z"]);
    assert_eq!(before["observations"]["decisions"], 0);
    assert_eq!(
        criterion(&before, "hosting_eu")["score"],
        4,
        "enforcement only"
    );

    // Bad facts are refused with the key named.
    std::fs::write(&facts, "[vendor]\ncountry = \"France\"\n").unwrap();
    let (code, _, err) = common::run(&[
        "report",
        "--config",
        cfg,
        "--facts",
        facts.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("[vendor] country") && err.contains("facts.toml"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn report_renders_markdown_and_self_contained_html() {
    let mut s = scene("").await;
    assert!(s.rempart.stop().success());
    let audit = s.dir.path().join("audit.jsonl");
    // Trail only, no configuration: the enforcement parts are not judged.
    let (code, md, err) = common::run(&["report", "--audit", audit.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(md.starts_with("# Sovereignty report"), "{md}");
    assert!(
        md.contains("**Score: 24 / 100** — **insufficient**"),
        "{md}"
    );
    assert!(
        md.contains("| Hosting | Data hosted in France / EU | 6 / 10 | observed |"),
        "{md}"
    );
    assert!(md.contains("enforcement not judged: no configuration given"));
    assert!(md.contains("`destination_non_eu_jurisdiction`"));

    let out = s.dir.path().join("report.html");
    let (code, _, err) = common::run(&[
        "report",
        "--config",
        s.config.to_str().unwrap(),
        "--format",
        "html",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("score 40 / 100 (insufficient)"), "{err}");
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    assert!(html.contains("<svg"), "charts are inline SVG");
    // Self-contained: no script, no external resource.
    for banned in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(banned), "{banned} in the HTML report");
    }
    // Every criterion and the score appear.
    assert!(html.contains("40 <span class=\"muted\">/ 100</span>"));
    for title in [
        "Data hosted in France / EU",
        "Outside the CLOUD Act",
        "SecNumCloud / HDS certification",
    ] {
        assert!(html.contains(title), "{title}");
    }
    // The page of docs/report.png: this trail with a partly filled facts
    // file (see docs/report.md, "Screenshot").
    if let Some(path) = std::env::var_os("REMPART_REPORT_DOCS_HTML") {
        let facts = s.dir.path().join("facts.toml");
        std::fs::write(
            &facts,
            "[vendor]\nname = \"Exemple CRM SAS\"\ncountry = \"FR\"\neu_shareholding_percent = 64\nus_subsidiary = true\n\
             [hosting]\nprovider = \"OVHcloud\"\ncontract_law = \"FR\"\ncertifications = [\"iso27001\"]\n",
        )
        .unwrap();
        let (code, _, err) = common::run(&[
            "report",
            "--config",
            s.config.to_str().unwrap(),
            "--facts",
            facts.to_str().unwrap(),
            "--format",
            "html",
            "-o",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    // Neither --audit nor --config: a clear error.
    let (code, _, err) = common::run(&["report"]);
    assert_ne!(code, 0);
    assert!(err.contains("--audit") && err.contains("--config"), "{err}");
}

/// Runs headless Chromium (Debian package `chromium`, installed by
/// .ci/run) with `args`; fails the test, never skips it, when Chromium is
/// missing.
fn chromium(profile: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .env("HOME", profile)
        .output()
        .expect("chromium is installed (see .ci/run)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_html_report_renders_in_headless_chromium() {
    let mut s = scene("").await;
    assert!(s.rempart.stop().success());
    let page = s.dir.path().join("report.html");
    let (code, _, err) = common::run(&[
        "report",
        "--config",
        s.config.to_str().unwrap(),
        "--format",
        "html",
        "-o",
        page.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let url = format!("file://{}", page.display());
    let profile = s.dir.path().join("chromium");
    std::fs::create_dir_all(&profile).unwrap();

    // The DOM Chromium built: the score, every criterion, the charts.
    let (ok, dom, err) = chromium(&profile, &["--dump-dom", &url]);
    assert!(ok, "{err}");
    assert!(
        dom.contains("40 <span class=\"muted\">/ 100</span>"),
        "{dom}"
    );
    assert!(dom.contains("Outside the CLOUD Act"), "{dom}");
    assert!(dom.contains("<svg"), "{dom}");

    // A screenshot: a PNG of the requested size with real content (a blank
    // page of that size compresses to a few KiB).
    let shot = s.dir.path().join("report.png");
    let (ok, _, err) = chromium(
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
            &url,
        ],
    );
    assert!(ok, "{err}");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 1600));
    assert!(png.len() > 40_000, "a near-blank page: {} bytes", png.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_report_serves_the_live_trail_as_json_or_html() {
    let s = scene("[report]\nmax_records = 3\n").await;
    let admin = s.rempart.admin;
    let json_reply = request(
        "GET",
        &format!("http://{admin}/report"),
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(json_reply.status, 200);
    assert_eq!(json_reply.headers["content-type"], "application/json");
    let r = json_reply.json();
    assert_eq!(r["schema"], "rempart.report/v1");
    // Bounded: at most [report] max_records decisions are read.
    assert_eq!(r["observations"]["decisions"], 3);
    assert_eq!(r["observations"]["truncated"], true);
    assert_eq!(r["posture"]["mode"], "enforce");

    let html = request(
        "GET",
        &format!("http://{admin}/report"),
        &[("accept", "text/html,*/*")],
    )
    .await;
    assert_eq!(html.status, 200);
    assert_eq!(html.headers["content-type"], "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(&html.body).starts_with("<!DOCTYPE html>"));
    let md = get(&format!("http://{admin}/report?format=markdown")).await;
    assert!(String::from_utf8_lossy(&md.body).starts_with("# Sovereignty report"));
    let bad = get(&format!("http://{admin}/report?format=pdf")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_format");
    // The other admin paths are unchanged.
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_report_without_a_cap_matches_the_cli() {
    let mut s = scene("").await;
    let admin = s.rempart.admin;
    let live = get(&format!("http://{admin}/report?format=json"))
        .await
        .json();
    assert!(s.rempart.stop().success());
    let cli = report_json(&["--config", s.config.to_str().unwrap()]);
    assert_eq!(live["observations"]["truncated"], false);
    for key in ["score", "judged_max", "verdict"] {
        assert_eq!(live[key], cli[key], "{key}");
    }
    assert_eq!(
        live["observations"]["decisions"],
        cli["observations"]["decisions"]
    );
}

/// Sends `n` bytes through an echo tunnel and reads them back.
async fn exchange(tunnel: &mut tokio::net::TcpStream, n: usize) {
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    tunnel.write_all(&data).await.unwrap();
    let mut back = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(back, data);
}

/// Opens an allowed tunnel to `target`, carries `n` bytes each way, closes.
async fn tunnel_carrying(proxy: std::net::SocketAddr, target: &str, n: usize) {
    let (status, mut t) = connect(proxy, target).await;
    assert_eq!(status, 200, "{target} refused");
    exchange(&mut t, n).await;
    t.shutdown().await.unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
}

/// The decision record (not a tunnel's closing one) of the request to `host`.
fn decision_of<'a>(records: &'a [Value], host: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            r["destination"]["host"] == host && r.get("transfer").is_none_or(|t| t.is_null())
        })
        .collect()
}

/// Data that actually left: an allow-list (host exceptions in the policy
/// data) lets real tunnels through the egress proxy to the United States
/// and to Amazon in Germany, and to a name with one EU and one US address.
/// The report scores the observed criteria partially, from the shares of
/// requests and bytes, and its examples are those forwarded requests —
/// and `--since` leaves out what came before.
#[tokio::test(flavor = "multi_thread")]
async fn report_scores_forwarded_non_eu_traffic_with_its_decisions_as_evidence() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (country, asn) = loopback_geo::write(dir.path(), &[]);
    let policies = loopback_geo::policies_with(dir.path(), |data| {
        data["settings"]["sovereignty"]["host_exceptions"] =
            serde_json::json!(["us.test", "s3.amazon.test", "mixed.test"]);
    });
    let (eu, _eu_task) = echo_server(EU).await;
    let (us, _us_task) = echo_server(US).await;
    let (aws, _aws_task) = echo_server(US_OPERATOR_IN_EU).await;
    let dns = common::dns::Dns::start(&[
        ("eu.test", &[EU]),
        ("us.test", &[US]),
        ("s3.amazon.test", &[US_OPERATOR_IN_EU]),
        // Two addresses, EU first: the data goes to France, but the name
        // has a replica in the United States.
        ("mixed.test", &[EU, US]),
    ])
    .await;
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("rempart.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmode = \"enforce\"\n[upstream]\nurl = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [egress]\nlisten = \"127.0.0.9:0\"\ndns_servers = [\"{}\"]\n\
             [policy]\ndir = \"{}\"\n[audit]\npath = \"{}\"\n{}",
            up.url(),
            dns.addr,
            policies.display(),
            audit.display(),
            loopback_geo::geo_toml(&country, &asn),
        ),
    )
    .unwrap();
    let mut rempart = Rempart::try_start(
        "",
        &[
            "--config",
            config.to_str().unwrap(),
            "--audit",
            audit.to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("rempart did not start: {e}"));
    let proxy = rempart.egress.expect("egress listener");

    // Before the period: a flow to the United States that --since must
    // leave out.
    tunnel_carrying(proxy, &format!("us.test:{}", us.port()), 10).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while decision_of(&rempart.audit_records(), "us.test").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no record of the early flow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The period: 3 requests to the CRM (France), and 4 tunnels: to
    // France 4000 bytes each way, to the US as many, to Amazon in Germany
    // 50, to mixed.test (France) 20. One attempt to the US without an
    // exception is refused.
    for _ in 0..3 {
        assert_eq!(get(&rempart.url("/api/contacts/1")).await.status, 200);
    }
    tunnel_carrying(proxy, &format!("eu.test:{}", eu.port()), 4000).await;
    tunnel_carrying(proxy, &format!("us.test:{}", us.port()), 4000).await;
    tunnel_carrying(proxy, &format!("s3.amazon.test:{}", aws.port()), 50).await;
    tunnel_carrying(proxy, &format!("mixed.test:{}", eu.port()), 20).await;
    assert_eq!(connect(proxy, &format!("{US}:{}", us.port())).await.0, 403);
    // Stopped: every tunnel's closing record is in the trail.
    assert!(rempart.stop().success());
    let until =
        humantime::format_rfc3339_micros(std::time::SystemTime::now() + Duration::from_secs(1))
            .to_string();
    let records = rempart.audit_records();
    let us_flows = decision_of(&records, "us.test");
    assert_eq!(us_flows.len(), 2);
    let (early_us, us_flow) = (
        us_flows[0]["decision_id"].as_str().unwrap(),
        us_flows[1]["decision_id"].as_str().unwrap(),
    );
    assert_eq!(us_flows[1]["decision"]["outcome"], "allowed");
    let aws_flow = decision_of(&records, "s3.amazon.test")[0]["decision_id"]
        .as_str()
        .unwrap();
    let mixed = decision_of(&records, "mixed.test")[0];
    assert_eq!(mixed["destination"]["ip"], EU);
    let mixed_flow = mixed["decision_id"].as_str().unwrap();
    let refused = decision_of(&records, US)[0]["decision_id"]
        .as_str()
        .unwrap();

    let r = report_json(&[
        "--config",
        config.to_str().unwrap(),
        "--since",
        &since,
        "--until",
        &until,
    ]);
    let obs = &r["observations"];
    // 3 ingress + 4 tunnels + 1 refusal; the early flow is out.
    assert_eq!(obs["decisions"], 8, "{obs:#}");
    let fw = &obs["forwarded"];
    // Amazon in Germany is located in the EU (hosting) but under US law.
    assert_eq!(fw["eu"]["requests"], 6);
    assert_eq!(fw["non_eu"]["requests"], 1);
    assert_eq!(fw["eu"]["bytes"], 8000 + 100 + 40);
    assert_eq!(fw["non_eu"]["bytes"], 8000);
    assert_eq!(fw["cloud_act"]["requests"], 1);
    assert_eq!(fw["non_eu_jurisdiction"]["requests"], 1);

    // Hosting in the EU: 6 of 7 requests (5 of 6 points) but only about
    // half the bytes (3 of 6): the lower share counts; plus the 4
    // enforcement points (the policy still denies what is not excepted).
    let hosting = criterion(&r, "hosting_eu");
    assert_eq!(hosting["score"], 3 + 4, "{hosting:#}");
    assert!(hosting["evidence"]
        .to_string()
        .contains("egress bytes kept in the EU: 50.4 %"));
    // Its evidence is the request that left, then the one refused.
    assert_eq!(
        hosting["examples"],
        serde_json::json!([us_flow, refused]),
        "{hosting:#}"
    );
    // US cloud in the path: capped at 3 of 6, plus enforcement.
    let us_cloud = criterion(&r, "no_us_cloud");
    assert_eq!(us_cloud["score"], 3 + 4, "{us_cloud:#}");
    assert_eq!(us_cloud["examples"][0], aws_flow);
    assert!(us_cloud["evidence"].to_string().contains("amazon"));
    // CLOUD Act: 6 of 7 requests under EU law (7 of 9), plus enforcement.
    let cloud_act = criterion(&r, "outside_cloud_act");
    assert_eq!(cloud_act["score"], 7 + 6, "{cloud_act:#}");
    assert_eq!(cloud_act["examples"][0], aws_flow);
    // Redundancy: 5 located hosts, 2 with an address outside the EU
    // (us.test, and mixed.test's replica): 1 of 3, plus enforcement.
    let redundancy = criterion(&r, "redundancy_eu_only");
    assert_eq!(redundancy["score"], 1 + 2, "{redundancy:#}");
    assert!(redundancy["evidence"][0].as_str().unwrap().starts_with(
        "5 located destination hosts with forwarded traffic, 1 seen on several addresses"
    ));
    assert!(redundancy["evidence"]
        .to_string()
        .contains("mixed.test (FR, US)"));
    let examples: Vec<&str> = redundancy["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        examples.contains(&mixed_flow) && examples.contains(&us_flow),
        "{examples:?}"
    );
    let host = obs["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "mixed.test")
        .unwrap();
    assert_eq!(host["addresses"], serde_json::json!([EU, US]));
    // Partial everywhere it was observed; the total adds up.
    for id in [
        "hosting_eu",
        "no_us_cloud",
        "outside_cloud_act",
        "redundancy_eu_only",
    ] {
        let c = criterion(&r, id);
        assert!(
            c["score"].as_u64() > Some(0) && c["score"].as_u64() < c["max"].as_u64(),
            "{id}"
        );
        assert_eq!(c["basis"], "observed");
    }
    assert_eq!(r["score"], 7 + 7 + 13 + 3);
    assert_eq!(r["verdict"], "insufficient");

    // Every example of every criterion is a decision of the trail, inside
    // the period.
    for c in r["criteria"].as_array().unwrap() {
        for e in c["examples"].as_array().unwrap() {
            assert_ne!(e, early_us, "{}: an example from before --since", c["id"]);
            assert!(
                records.iter().any(|x| &x["decision_id"] == e),
                "{}: {e} is not in the trail",
                c["id"]
            );
        }
    }

    // Without --since the early flow counts.
    let all = report_json(&["--config", config.to_str().unwrap()]);
    assert_eq!(all["observations"]["forwarded"]["non_eu"]["requests"], 2);
    assert_eq!(all["observations"]["decisions"], 9);
}
