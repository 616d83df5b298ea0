//! The tamper-evident trail: a real rempart writes it under concurrent
//! traffic, `rempart audit verify` checks it, and every kind of edit is
//! caught at the right line.

#[macro_use]
mod common;

use common::{get, run, Rempart, Upstream};

fn verify(files: &[&std::path::Path]) -> (i32, String, String) {
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    run(&args)
}

async fn traffic(rp: &Rempart, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = rp.url(&format!("/api/contacts/{i}"));
        tasks.push(tokio::spawn(async move { get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_give_exactly_that_many_chained_records_across_restarts() {
    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &[]);
    traffic(&rp, 200).await;
    assert!(rp.stop().success());
    let trail = rp.audit.clone();
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: 200 records") && out.contains("seq 1..200"),
        "{out}"
    );

    // A restart continues the same chain in the same file.
    let mut again = Rempart::start(&up.url(), &["--audit", trail.to_str().unwrap()]);
    traffic(&again, 50).await;
    assert!(again.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: 250 records") && out.contains("seq 1..250"),
        "{out}"
    );
}

/// A small valid trail written by rempart, returned as its lines.
async fn trail_lines() -> (tempfile::TempDir, Vec<String>) {
    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &[]);
    traffic(&rp, 5).await;
    assert!(rp.stop().success());
    let text = std::fs::read_to_string(&rp.audit).unwrap();
    let dir = tempfile::tempdir().unwrap();
    (dir, text.lines().map(String::from).collect())
}

fn write(dir: &tempfile::TempDir, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(
        &p,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_tampering_is_named_at_its_line() {
    let (dir, lines) = trail_lines().await;
    assert_eq!(lines.len(), 5);
    // Each break is named by file, line and the seq the line states.
    let named = |err: &str, at: &str, seq: u64, what: &str| {
        assert!(
            err.contains(&format!("{at} (seq {seq}): ")) && err.contains(what),
            "expected {at} (seq {seq}) and {what:?} in: {err}"
        );
    };

    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"status\":200", "\"status\":404");
    let (code, _, err) = verify(&[&write(&dir, "edited.jsonl", &edited)]);
    assert_ne!(code, 0);
    named(&err, "edited.jsonl:3", 3, "hash mismatch");

    let mut deleted = lines.clone();
    deleted.remove(1);
    let (code, _, err) = verify(&[&write(&dir, "deleted.jsonl", &deleted)]);
    assert_ne!(code, 0);
    named(&err, "deleted.jsonl:2", 3, "from 1 to 3");

    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    let (code, _, err) = verify(&[&write(&dir, "swapped.jsonl", &swapped)]);
    assert_ne!(code, 0);
    named(&err, "swapped.jsonl:4", 5, "from 3 to 5");

    // A record inserted: a copy of another (its own hash is right), and a
    // new one chained after line 2 (its hash is right, the next link not).
    let mut copied = lines.clone();
    copied.insert(2, lines[0].clone());
    let (code, _, err) = verify(&[&write(&dir, "copied.jsonl", &copied)]);
    assert_ne!(code, 0);
    named(&err, "copied.jsonl:3", 1, "from 2 to 1");
    let new_record = rechain(&lines[..3], 2, |b| b.replace("200", "404")).pop();
    let mut inserted = lines[..2].to_vec();
    inserted.extend(new_record.clone());
    inserted.extend(lines[2..].iter().cloned());
    let (code, _, err) = verify(&[&write(&dir, "inserted.jsonl", &inserted)]);
    assert_ne!(code, 0);
    named(&err, "inserted.jsonl:4", 3, "from 3 to 3");
    let mut spliced = lines[..2].to_vec();
    spliced.extend(new_record);
    spliced.extend(lines[3..].iter().cloned());
    let (code, _, err) = verify(&[&write(&dir, "spliced.jsonl", &spliced)]);
    assert_ne!(code, 0);
    // A replacement chained in: its successor's prev link breaks.
    named(&err, "spliced.jsonl:4", 4, "prev_hash");

    // Split across two files (as rotation will): valid in order, broken out of order.
    let a = write(&dir, "a.jsonl", &lines[..2]);
    let b = write(&dir, "b.jsonl", &lines[2..]);
    assert_eq!(verify(&[&a, &b]).0, 0);
    let (code, _, err) = verify(&[&b, &a]);
    assert_ne!(code, 0);
    named(&err, "a.jsonl:1", 1, "from 5 to 1");

    // A forged chain: re-numbered after a deletion, but the hashes no longer link.
    let mut forged = lines.clone();
    forged.remove(1);
    forged[1] = forged[1].replace("\"seq\":3", "\"seq\":2");
    let (code, _, err) = verify(&[&write(&dir, "forged.jsonl", &forged)]);
    assert_ne!(code, 0);
    named(&err, "forged.jsonl:2", 2, "hash mismatch");

    // A torn line in the middle (half a record, then the rest): its seq
    // is still named.
    let mut torn = lines.clone();
    torn[3] = torn[3][..torn[3].len() / 2].to_string();
    let (code, _, err) = verify(&[&write(&dir, "torn.jsonl", &torn)]);
    assert_ne!(code, 0);
    named(&err, "torn.jsonl:4", 4, "not a chained record");

    // Whole lines cut off the end of an unsigned trail leave a valid,
    // shorter chain: nothing can tell (only signed checkpoints and a
    // witnessed signed seq can, see signed_checkpoints_…). verify says so.
    let cut = write(&dir, "cut.jsonl", &lines[..3]);
    let (code, out, err) = verify(&[&cut]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 3 records"), "{out}");
    assert!(
        err.contains("not signed") && err.contains("cut off the end"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torn_last_line_is_repaired_at_start_and_the_repair_recorded() {
    let (dir, lines) = trail_lines().await;
    let trail = write(&dir, "trail.jsonl", &lines);
    // A crash mid-write: half a record, no newline.
    let torn = &lines[4][..lines[4].len() / 2];
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&trail)
        .unwrap();
    std::io::Write::write_all(&mut f, torn.as_bytes()).unwrap();
    drop(f);
    let (code, _, err) = verify(&[&trail]);
    assert_ne!(code, 0);
    assert!(
        err.contains("trail.jsonl:6") && err.contains("torn"),
        "{err}"
    );

    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &["--audit", trail.to_str().unwrap()]);
    assert_eq!(get(&rp.url("/x")).await.status, 200);
    assert!(rp.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 7 records"), "{out}");
    let text = std::fs::read_to_string(&trail).unwrap();
    let repair: serde_json::Value = serde_json::from_str(text.lines().nth(5).unwrap()).unwrap();
    assert_eq!(repair["type"], "repair");
    assert_eq!(repair["truncated_bytes"], torn.len());
}

/// Starts rempart with an `[audit]` table (and the upstream), the trail at
/// `trail`, optionally through a launcher.
fn start_with_audit(
    launcher: &[&str],
    dir: &std::path::Path,
    upstream: &str,
    audit_toml: &str,
    trail: &std::path::Path,
) -> Rempart {
    let cfg = dir.join(format!("rempart-{}.toml", rand_suffix()));
    std::fs::write(
        &cfg,
        format!("[upstream]\nurl = \"{upstream}\"\n\n[audit]\n{audit_toml}\n"),
    )
    .unwrap();
    let policies = common::repo_policies();
    Rempart::try_start_via(
        launcher,
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

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn decision_ids(path: &std::path::Path) -> std::collections::HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["decision_id"].as_str().map(String::from)
        })
        .collect()
}

/// In buffered mode (`flush_interval = "50ms"`) the same test loses the
/// records of the last few milliseconds (50 of 4 590 when it was written);
/// in sync mode a response is only sent once its record is on disk.
#[tokio::test(flavor = "multi_thread")]
async fn sync_mode_kill_9_under_load_loses_no_acknowledged_record() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let rp = start_with_audit(&[], dir.path(), &up.url(), "durability = \"sync\"", &trail);

    // 16 clients loop until rempart dies under them; keep every decision
    // id that came back with a response.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16 {
        let url = rp.url(&format!("/api/contacts/{c}"));
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match common::send(
                    http::Request::get(&url)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap(),
                )
                .await
                {
                    Ok(r) => {
                        assert_eq!(r.status, 200);
                        acknowledged.push(r.decision_id());
                    }
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    rp.signal("KILL");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for c in clients {
        acknowledged.extend(c.await.unwrap());
    }
    assert!(
        acknowledged.len() > 100,
        "too little load: {}",
        acknowledged.len()
    );
    drop(rp);

    // The restart repairs a torn line if the kill cut a write; then the
    // chain is whole and every answered request has its record.
    let mut again = start_with_audit(&[], dir.path(), &up.url(), "durability = \"sync\"", &trail);
    assert!(again.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    let recorded = decision_ids(&trail);
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no record: {:?} ({out})",
        missing.len(),
        acknowledged.len(),
        &missing[..missing.len().min(5)]
    );
    // Each answered request has its complete record (the answer waited for
    // it); requests cut by the kill may have only their pending record.
    // Query lists every request once either way.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&trail)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let complete: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r.get("exchange").is_none())
        .filter_map(|r| r["decision_id"].as_str())
        .collect();
    assert!(acknowledged.iter().all(|id| complete.contains(id.as_str())));
    let (code, out, err) = run(&["audit", "query", trail.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["decision_id"].as_str().unwrap().to_string()
        })
        .collect();
    let unique: std::collections::HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "a request listed twice");
    assert_eq!(unique.len(), recorded.len());
}

/// A shell that limits the size of files rempart may write (`ulimit -f`,
/// in blocks) and ignores SIGXFSZ, so that writes past the limit fail with
/// EFBIG like a full disk, instead of killing the process. Works without
/// root (a small tmpfs would need `mount`).
fn file_size_limit(blocks: u32) -> Vec<String> {
    vec![
        "bash".into(),
        "-c".into(),
        format!("trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\""),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_mode_fails_closed_when_the_trail_cannot_be_written() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let launcher = file_size_limit(8);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let mut rp = start_with_audit(
        &launcher,
        dir.path(),
        &up.url(),
        "durability = \"sync\"\nfailure_status = 507",
        &trail,
    );
    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let r = get(&rp.url(&format!("/api/contacts/{i}"))).await;
        if r.status == 200 {
            answered.push(r.decision_id());
        } else {
            assert_eq!(r.status, 507);
            assert_eq!(r.json()["error"], "audit_unavailable");
            refused = Some(r.decision_id());
            break;
        }
    }
    let refused = refused.expect("the file size limit was never reached");
    assert!(!answered.is_empty());
    // While the trail cannot be written, requests do not reach the CRM.
    let seen_before = up.seen_paths().len();
    for i in 0..3 {
        let r = get(&rp.url(&format!("/api/contacts/after-{i}"))).await;
        assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(up.seen_paths().len(), seen_before);
    assert!(rp.metric("rempart_audit_sync_failures_total").await >= 4.0);
    assert!(rp.metric("rempart_audit_write_errors_total").await >= 4.0);
    rp.stop();

    // The failed writes were cut back: the trail verifies, holds every
    // answered request and none of the refused ones.
    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    let recorded = decision_ids(&trail);
    assert!(answered.iter().all(|id| recorded.contains(id)));
    assert!(!recorded.contains(&refused));
}

/// Like [`file_size_limit`], but only the soft limit: the test lifts it on
/// the running process with `prlimit(1)` (no privilege needed to raise a
/// soft limit up to the hard one), so that the trail cannot be written,
/// then can again — a disk that fills up and is freed.
fn soft_file_size_limit(blocks: u32) -> Vec<String> {
    vec![
        "bash".into(),
        "-c".into(),
        format!("trap '' XFSZ; ulimit -S -f {blocks} && exec \"$0\" \"$@\""),
    ]
}

fn lift_file_size_limit(rp: &Rempart) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &rp.pid().to_string(), "--fsize=unlimited:"])
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_for_metric(rp: &Rempart, sample: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v = rp.metric(sample).await;
        if done(v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sample} stayed at {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn buffered_mode_keeps_serving_when_the_trail_cannot_be_written_and_loses_nothing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let launcher = soft_file_size_limit(8);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let mut rp = start_with_audit(&launcher, dir.path(), &up.url(), "", &trail);
    let mut answered = Vec::new();
    for i in 0..40 {
        let r = get(&rp.url(&format!("/api/contacts/{i}"))).await;
        assert_eq!(r.status, 200);
        answered.push(r.decision_id());
    }
    wait_for_metric(&rp, "rempart_audit_write_errors_total", |v| v > 0.0).await;
    // The outage goes on: requests are still served, their records kept.
    for i in 0..30 {
        let r = get(&rp.url(&format!("/api/contacts/outage-{i}"))).await;
        assert_eq!(r.status, 200);
        answered.push(r.decision_id());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let written = rp.metric("rempart_audit_records_total").await;
    assert!(written < answered.len() as f64, "nothing failed: {written}");
    assert_eq!(rp.metric("rempart_audit_dropped_total").await, 0.0);
    assert_eq!(rp.metric("rempart_audit_sync_failures_total").await, 0.0);
    // The records kept through the outage are the ones waiting, as the
    // queue gauges show (every other record is in the trail).
    let kept = answered.len() as f64 - written;
    wait_for_metric(&rp, "rempart_audit_queue_records", |v| v == kept).await;
    assert!(rp.metric("rempart_audit_queue_records_peak").await >= kept);
    assert_eq!(rp.metric("rempart_audit_queue_capacity").await, 16384.0);

    // The disk frees: every record kept through the outage reaches the
    // trail, in one valid chain, with no `loss` record (nothing was lost).
    lift_file_size_limit(&rp);
    let total = answered.len() as f64;
    wait_for_metric(&rp, "rempart_audit_records_total", |v| v >= total).await;
    wait_for_metric(&rp, "rempart_audit_queue_records", |v| v == 0.0).await;
    assert!(rp.metric("rempart_audit_queue_records_peak").await >= kept);
    assert!(rp.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("ok: {} records", answered.len())),
        "{out}"
    );
    let recorded = decision_ids(&trail);
    let missing: Vec<_> = answered
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(missing.is_empty(), "{missing:?}");
    assert!(!std::fs::read_to_string(&trail)
        .unwrap()
        .contains("\"type\":\"loss\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn buffered_mode_with_on_full_drop_counts_what_it_drops_and_notes_it_in_the_trail() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let launcher = soft_file_size_limit(8);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let mut rp = start_with_audit(
        &launcher,
        dir.path(),
        &up.url(),
        "on_full = \"drop\"\nqueue_capacity = 8",
        &trail,
    );
    let mut answered = 0;
    for i in 0..40 {
        assert_eq!(
            get(&rp.url(&format!("/api/contacts/{i}"))).await.status,
            200
        );
        answered += 1;
    }
    wait_for_metric(&rp, "rempart_audit_write_errors_total", |v| v > 0.0).await;
    // Beyond the records kept (at most the queue capacity) and the queue
    // itself, records are dropped: the operator chose so.
    for i in 0..60 {
        let r = get(&rp.url(&format!("/api/contacts/outage-{i}"))).await;
        assert_eq!(r.status, 200);
        answered += 1;
    }
    let dropped = wait_for_metric(&rp, "rempart_audit_dropped_total", |v| v > 0.0).await;
    lift_file_size_limit(&rp);
    // The next write notes the drops; then the trail holds every record
    // but the dropped ones.
    let _ = get(&rp.url("/api/contacts/after")).await;
    answered += 1;
    let dropped_final = rp.metric("rempart_audit_dropped_total").await;
    assert!(dropped_final >= dropped);
    wait_for_metric(&rp, "rempart_audit_records_total", |v| {
        v + dropped_final >= answered as f64
    })
    .await;
    assert!(rp.stop().success());
    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&trail).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let noted: u64 = lines
        .iter()
        .filter(|l| l["type"] == "loss")
        .map(|l| {
            assert_eq!(l["write_failed"], 0, "{l}");
            l["dropped"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(noted as f64, dropped_final);
    let decisions = lines
        .iter()
        .filter(|l| l.get("decision_id").is_some())
        .count();
    assert_eq!(decisions as u64 + noted, answered);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_the_trail_cannot_be_written_says_how_many_records_are_lost_and_fails() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let launcher = file_size_limit(8);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let mut rp = start_with_audit(&launcher, dir.path(), &up.url(), "", &trail);
    for i in 0..40 {
        assert_eq!(
            get(&rp.url(&format!("/api/contacts/{i}"))).await.status,
            200
        );
    }
    wait_for_metric(&rp, "rempart_audit_write_errors_total", |v| v > 0.0).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let unwritten = 40.0 - rp.metric("rempart_audit_records_total").await;
    assert!(unwritten > 0.0);
    let status = rp.stop();
    assert!(
        !status.success(),
        "a stop that lost records must not exit 0"
    );
    let log = rp.log_text();
    assert!(
        log.contains(&format!("{unwritten} audit records could not be written")),
        "{log}"
    );
    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
}

fn gunzip(path: &std::path::Path) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut text,
    )
    .unwrap();
    text
}

fn gzip(path: &std::path::Path, text: &str) {
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
    enc.finish().unwrap();
}

fn gz_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gz"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_under_load_keeps_one_chain_across_compressed_files() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trails = dir.path().join("trail");
    std::fs::create_dir(&trails).unwrap();
    let trail = trails.join("audit.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        "rotate_size = \"8KiB\"\ndurability = \"sync\"",
        &trail,
    );
    // Rotation happens between batches; sync mode writes each round before
    // answering it, so that rotations happen however slow the machine is.
    for _ in 0..10 {
        traffic(&rp, 20).await;
    }
    assert!(rp.metric("rempart_audit_rotations_total").await >= 1.0);
    assert!(rp.stop().success());
    let rotated = gz_files(&trails);
    assert!(rotated.len() >= 3, "{rotated:?}");
    // Each rotated file is a complete gzip of whole lines; the first line
    // of each file links to the last line of the one before.
    for pair in rotated.windows(2) {
        let last: serde_json::Value =
            serde_json::from_str(gunzip(&pair[0]).lines().last().unwrap()).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(gunzip(&pair[1]).lines().next().unwrap()).unwrap();
        assert_eq!(first["prev_hash"], last["hash"]);
    }
    let (code, out, err) = verify(&[&trails]);
    assert_eq!(code, 0, "{err}");
    // Sync mode: each forwarded request has its pending record (written
    // before forwarding) and its complete one.
    assert!(
        out.contains("ok: 400 records") && out.contains("seq 1..400"),
        "{out}"
    );
    assert!(
        out.contains(&format!("in {} file(s)", rotated.len() + 1)),
        "{out}"
    );

    // A restart continues the same chain.
    let mut again = start_with_audit(&[], dir.path(), &up.url(), "rotate_size = \"8KiB\"", &trail);
    traffic(&again, 20).await;
    assert!(again.stop().success());
    let (code, out, err) = verify(&[&trails]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("seq 1..420"), "{out}");

    // An edit inside a compressed file is named by file and line.
    let victim = &gz_files(&trails)[1];
    let text = gunzip(victim);
    // (Every decision record, pending or complete, has an outcome.)
    let line = 1 + text
        .lines()
        .position(|l| l.contains("\"outcome\":\"allowed\""))
        .unwrap();
    gzip(
        victim,
        &text.replacen("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"", 1),
    );
    let (code, _, err) = verify(&[&trails]);
    assert_ne!(code, 0);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(&format!("{name}:{line} (seq ")) && err.contains("hash mismatch"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_newest_rotated_files_and_they_still_verify() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trails = dir.path().join("trail");
    std::fs::create_dir(&trails).unwrap();
    let trail = trails.join("audit.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        "rotate_size = \"4KiB\"\nrotate_keep = 2\ndurability = \"sync\"",
        &trail,
    );
    for _ in 0..10 {
        traffic(&rp, 10).await;
    }
    assert!(rp.metric("rempart_audit_rotations_total").await >= 1.0);
    assert!(rp.stop().success());
    assert_eq!(gz_files(&trails).len(), 2);
    let (code, out, err) = verify(&[&trails]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("in 3 file(s)") && out.contains("..200,"),
        "{out}"
    );
    assert!(!out.contains("seq 1.."), "{out}");
}

/// What an attacker with write access (but not the key) can do: rebuild
/// the chain from `from` on, with `edit` applied to every record body.
fn rechain(lines: &[String], from: usize, edit: impl Fn(&str) -> String) -> Vec<String> {
    use rempart::audit::chain::{check_line, link, Head};
    let mut out = lines[..from].to_vec();
    let mut head = match from {
        0 => Head::genesis(),
        _ => {
            let c = check_line(&lines[from - 1]).unwrap();
            Head {
                seq: c.seq,
                hash: c.hash,
            }
        }
    };
    for line in &lines[from..] {
        // `{"seq":N,"prev_hash":"<64>",<fields>,"hash":"<64>"}`
        let start = line.find("\"prev_hash\":\"").unwrap() + 13 + 64 + 2;
        let end = line.len() - (",\"hash\":\"".len() + 64 + 2);
        let body = format!("{{{}}}", edit(&line[start..end]));
        let linked = link(&mut head, body.as_bytes());
        out.push(String::from_utf8(linked).unwrap().trim_end().to_string());
    }
    out
}

fn verify_args(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    run(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_checkpoints_catch_a_rebuilt_chain_and_a_cut_back_trail() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("audit-key.pem");
    let key_s = key.to_str().unwrap();
    let (code, out, err) = run(&["audit", "keygen", "--out", key_s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("key id"), "{out}");
    let public = format!("{key_s}.pub");
    assert_ne!(
        run(&["audit", "keygen", "--out", key_s]).0,
        0,
        "overwrote a key"
    );

    let up = Upstream::start().await;
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        &format!("checkpoint_key = \"{key_s}\"\ncheckpoint_records = 10\ndurability = \"sync\""),
        &trail,
    );
    for _ in 0..5 {
        traffic(&rp, 10).await;
    }
    assert!(rp.metric("rempart_audit_signed_seq").await >= 10.0);
    assert!(rp.stop().success());
    let t = trail.to_str().unwrap();

    let (code, out, err) = verify_args(&[t, "--public-key", &public, "--strict"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("checkpoint(s) verified") && !out.contains("WARNING"),
        "{out}"
    );
    let (code, out, _) = verify_args(&[t]);
    assert_eq!(code, 0);
    assert!(out.contains("not checked"), "{out}");

    // Another key does not vouch for this trail.
    let other = dir.path().join("other.pem");
    assert_eq!(
        run(&["audit", "keygen", "--out", other.to_str().unwrap()]).0,
        0
    );
    let other_pub = format!("{}.pub", other.display());
    let (code, _, err) = verify_args(&[t, "--public-key", &other_pub]);
    assert_ne!(code, 0);
    assert!(err.contains("not by the given public key"), "{err}");

    let lines: Vec<String> = std::fs::read_to_string(&trail)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let checkpoints: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"type\":\"checkpoint\""))
        .map(|(i, _)| i)
        .collect();
    assert!(checkpoints.len() >= 3, "{checkpoints:?}");

    // An edit with the chain rebuilt after it passes the plain chain check
    // but not the signatures.
    // (Every decision record has an outcome; pending ones have no status.)
    let forged = rechain(&lines, 2, |body| {
        body.replacen("\"outcome\":\"allowed\"", "\"outcome\":\"denied\"", 1)
    });
    let forged_path = write(&dir, "forged.jsonl", &forged);
    let f = forged_path.to_str().unwrap();
    assert_eq!(verify_args(&[f]).0, 0);
    let (code, _, err) = verify_args(&[f, "--public-key", &public]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("forged.jsonl:{}", checkpoints[0] + 1)),
        "{err}"
    );

    // Cut back to the first checkpoint: still a valid signed trail, caught
    // only against the seq the monitoring saw signed.
    let cut = write(&dir, "cut.jsonl", &lines[..=checkpoints[0]]);
    let c = cut.to_str().unwrap();
    assert_eq!(verify_args(&[c, "--public-key", &public]).0, 0);
    let last_signed: serde_json::Value =
        serde_json::from_str(&lines[*checkpoints.last().unwrap()]).unwrap();
    let min = last_signed["signed_seq"].to_string();
    let (code, _, err) = verify_args(&[c, "--public-key", &public, "--min-signed-seq", &min]);
    assert_ne!(code, 0);
    assert!(err.contains("cut back"), "{err}");

    // Cut back and rewritten with forged records after the last
    // checkpoint: unsigned, which --strict refuses.
    let mut rewritten = lines[..=checkpoints[0]].to_vec();
    rewritten.extend(
        lines[checkpoints[0] + 1..checkpoints[0] + 4]
            .iter()
            .cloned(),
    );
    let rewritten = rechain(&rewritten, checkpoints[0] + 1, |b| b.replace("200", "201"));
    let rw = write(&dir, "rewritten.jsonl", &rewritten);
    let r = rw.to_str().unwrap();
    let (code, out, _) = verify_args(&[r, "--public-key", &public]);
    assert_eq!(code, 0);
    assert!(out.contains("WARNING: the 3 record(s) after it"), "{out}");
    let (code, _, err) = verify_args(&[r, "--public-key", &public, "--strict"]);
    assert_ne!(code, 0);
    assert!(err.contains("not fully signed"), "{err}");

    // Rotation right after a checkpoint: the new file starts with it. Alone
    // or after the previous file, it verifies with the key; a forged one
    // at the head of a file does not.
    let split = checkpoints[1];
    let older = write(&dir, "older.jsonl", &lines[..split]);
    let newer = write(&dir, "newer.jsonl", &lines[split..]);
    let n = newer.to_str().unwrap();
    let (code, out, err) = verify_args(&[n, "--public-key", &public]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("checkpoint(s) verified"), "{out}");
    let (code, _, err) = verify_args(&[older.to_str().unwrap(), n, "--public-key", &public]);
    assert_eq!(code, 0, "{err}");
    let mut headless = lines[split..].to_vec();
    headless[0] = rechain(&lines[..=split], split, |b| {
        b.replacen("\"signed_seq\":", "\"signed_seq\":1", 1)
    })
    .pop()
    .unwrap();
    let h = write(&dir, "headless.jsonl", &headless[..1]);
    let (code, _, err) = verify_args(&[h.to_str().unwrap(), "--public-key", &public]);
    assert_ne!(code, 0);
    assert!(
        err.contains("headless.jsonl:1") && err.contains("checkpoint signs seq 1"),
        "{err}"
    );
}

/// Pulls the JSON record out of an RFC 5424 message
/// `<PRI>1 TIMESTAMP HOST rempart PID audit - {json}`.
fn syslog_record(msg: &str) -> serde_json::Value {
    assert!(msg.starts_with("<134>1 "), "{msg}");
    let fields: Vec<&str> = msg.splitn(8, ' ').collect();
    assert_eq!(fields.len(), 8, "{msg}");
    assert_eq!(
        (fields[3], fields[5], fields[6]),
        ("rempart", "audit", "-"),
        "{msg}"
    );
    serde_json::from_str(fields[7]).unwrap_or_else(|e| panic!("{e}: {msg}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_copied_to_stdout_and_syslog_over_udp_tcp_and_unix_sockets() {
    use std::io::BufRead;
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unix_path = dir.path().join("log.sock");
    let unix = std::os::unix::net::UnixDatagram::bind(&unix_path).unwrap();
    unix.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let targets = [
        format!("udp://{}", udp.local_addr().unwrap()),
        format!("tcp://{}", tcp.local_addr().unwrap()),
        format!("unix://{}", unix_path.display()),
    ];
    for (i, target) in targets.iter().enumerate() {
        let trail = dir.path().join(format!("trail-{i}.jsonl"));
        let mut rp = start_with_audit(
            &[],
            dir.path(),
            &up.url(),
            &format!("stdout = true\nsyslog = \"{target}\"\nsyslog_facility = \"local0\""),
            &trail,
        );
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(
                get(&rp.url(&format!("/api/contacts/{n}")))
                    .await
                    .decision_id(),
            );
        }
        assert!(rp.stop().success());
        let file_lines: Vec<String> = std::fs::read_to_string(&trail)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(file_lines.len(), 3);

        // Syslog: one message per record, the record byte for byte.
        let messages: Vec<String> = match i {
            0 => (0..3)
                .map(|_| {
                    let mut buf = [0u8; 65536];
                    let n = udp.recv(&mut buf).unwrap();
                    String::from_utf8(buf[..n].to_vec()).unwrap()
                })
                .collect(),
            1 => {
                // RFC 6587 octet counting: "LEN SP MSG".
                let (conn, _) = tcp.accept().unwrap();
                let mut r = std::io::BufReader::new(conn);
                (0..3)
                    .map(|_| {
                        let mut len = Vec::new();
                        r.read_until(b' ', &mut len).unwrap();
                        let len: usize = std::str::from_utf8(&len).unwrap().trim().parse().unwrap();
                        let mut msg = vec![0u8; len];
                        std::io::Read::read_exact(&mut r, &mut msg).unwrap();
                        String::from_utf8(msg).unwrap()
                    })
                    .collect()
            }
            _ => (0..3)
                .map(|_| {
                    let mut buf = [0u8; 65536];
                    let n = unix.recv(&mut buf).unwrap();
                    String::from_utf8(buf[..n].to_vec()).unwrap()
                })
                .collect(),
        };
        let got: Vec<String> = messages
            .iter()
            .map(|m| {
                syslog_record(m)["decision_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(got, ids, "{target}");
        assert!(messages
            .iter()
            .zip(&file_lines)
            .all(|(m, l)| m.ends_with(l.as_str())));

        // Stdout: the same lines as the file.
        let out = rp.stdout.lock().unwrap().clone();
        assert_eq!(out, file_lines, "{target}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_syslog_collector_costs_nothing_but_its_copy() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("tcp://{}", closed.local_addr().unwrap());
    drop(closed);
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        &format!("syslog = \"{target}\"\ndurability = \"sync\""),
        &trail,
    );
    for n in 0..5 {
        assert_eq!(get(&rp.url(&format!("/x/{n}"))).await.status, 200);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rp
        .metrics()
        .await
        .lines()
        .all(|l| !l.starts_with("rempart_audit_sink_errors_total{sink=\"syslog\"}"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no sink error counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        rp.metric("rempart_audit_sink_errors_total{sink=\"syslog\"}")
            .await
            >= 1.0
    );
    assert!(rp.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 10 records"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_query_answers_by_decision_path_time_and_subject() {
    let up = Upstream::start().await;
    let mut rp = Rempart::start(&up.url(), &[]);
    let mut allowed = Vec::new();
    for n in 0..3 {
        allowed.push(
            get(&rp.url(&format!("/api/contacts/{n}")))
                .await
                .decision_id(),
        );
    }
    let denied = common::request("TRACE", &rp.url("/api/contacts"), &[]).await;
    assert_eq!(denied.status, 403);
    let export = get(&rp.url("/api/contact/export")).await;
    assert_eq!(export.status, 200);
    assert!(rp.stop().success());
    let trail = rp.audit.to_str().unwrap();
    // "Who exported contacts last month", as in docs/audit.md (the month
    // being the one around now).
    let at = |offset: i64| {
        let now = std::time::SystemTime::now();
        let t = if offset < 0 {
            now - std::time::Duration::from_secs(offset.unsigned_abs())
        } else {
            now + std::time::Duration::from_secs(offset as u64)
        };
        humantime::format_rfc3339_seconds(t).to_string()
    };
    let (month_start, month_end) = (at(-15 * 24 * 3600), at(15 * 24 * 3600));
    let (code, out, err) = run(&[
        "audit",
        "query",
        trail,
        "--type",
        "contact",
        "--operation",
        "export",
        "--since",
        &month_start,
        "--until",
        &month_end,
        "--format",
        "table",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(
        rows[0].contains("GET /api/contact/export") && rows[0].contains("export contact"),
        "{out}"
    );
    let (_, out, _) = run(&[
        "audit",
        "query",
        trail,
        "--type",
        "contact",
        "--operation",
        "export",
        "--until",
        &month_start,
    ]);
    assert!(out.is_empty(), "{out}");
    let ids = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["decision_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (code, out, err) = run(&["audit", "query", trail, "--decision", "denied"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), vec![denied.decision_id()]);
    assert!(err.contains("1 matching record(s)"), "{err}");
    let (_, out, _) = run(&[
        "audit",
        "query",
        trail,
        "--path",
        "/api/contacts",
        "--method",
        "get",
    ]);
    assert_eq!(ids(&out), allowed);
    // What was touched: resource type, id and operation.
    let (_, out, _) = run(&["audit", "query", trail, "--type", "contacts", "--id", "1"]);
    assert_eq!(ids(&out), vec![allowed[1].clone()]);
    let (_, out, _) = run(&["audit", "query", trail, "--operation", "read"]);
    assert_eq!(ids(&out), allowed);
    let (_, out, _) = run(&["audit", "query", trail, "--operation", "export"]);
    assert_eq!(ids(&out), vec![export.decision_id()]);
    // The table: a header, then one aligned line a record.
    let (code, out, err) = run(&[
        "audit",
        "query",
        trail,
        "--decision",
        "denied",
        "--format",
        "table",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("TIME"), "{out}");
    assert!(lines[1].contains("denied"), "{out}");
    assert!(lines[1].contains("TRACE /api/contacts"), "{out}");
    assert!(lines[1].ends_with("method_not_allowed"), "{out}");
    let (_, out, _) = run(&["audit", "query", trail, "--since", "2999-01-01T00:00:00Z"]);
    assert!(out.is_empty(), "{out}");
    let (_, out, _) = run(&["audit", "query", trail, "--subject", "nobody"]);
    assert!(out.is_empty(), "{out}");
    let (code, _, err) = run(&["audit", "query", trail, "--since", "last tuesday"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid time"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_data_is_minimised_before_the_record_is_written() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("subject.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        &format!(
            "mask_source_ip = \"truncate\"\nmask_subject = \"hash\"\nsubject_hash_key = \"{}\"\nstdout = true\n\
             [identity]\ntrusted_header = \"x-remote-user\"\ntrusted_sources = [\"127.0.0.1\"]",
            key.display()
        ),
        &trail,
    );
    for _ in 0..2 {
        let r = common::request(
            "GET",
            &rp.url("/api/contacts/1"),
            &[("x-remote-user", "bob")],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert!(rp.stop().success());
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(!text.contains("\"bob\""), "{text}");
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs[0]["source"]["ip"], "127.0.0.0");
    let pseudonym = recs[0]["identity"]["subject"].as_str().unwrap();
    assert!(pseudonym.starts_with("hmac-sha256:"), "{pseudonym}");
    // Stable: the same user is the same pseudonym, so queries still work.
    assert_eq!(recs[1]["identity"]["subject"], pseudonym);
    assert_eq!(
        recs[0]["masked"],
        serde_json::json!(["source.ip", "identity.subject"])
    );
    // The copies get the minimised record, never the original.
    assert!(rp
        .stdout
        .lock()
        .unwrap()
        .iter()
        .all(|l| !l.contains("\"bob\"")));
    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&[
        "audit",
        "query",
        trail.to_str().unwrap(),
        "--subject",
        pseudonym,
    ]);
    assert_eq!(out.lines().count(), 2);
}

/// A copy of the shipped policies whose `data.json` carries
/// `settings.audit.minimise = rules` (the rest of the settings as shipped).
fn policies_minimising(dir: &std::path::Path, rules: serde_json::Value) -> std::path::PathBuf {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(common::repo_policies()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    set_minimise(&out, rules);
    out
}

/// Rewrites `data.settings.audit.minimise` (beside, then renamed over, so
/// that a reload never reads half a file).
fn set_minimise(policies: &std::path::Path, rules: serde_json::Value) {
    let data = policies.join("data.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    doc["settings"]["audit"] = serde_json::json!({ "minimise": rules });
    let tmp = policies.join(".next");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, &data).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn minimisation_rules_in_policy_data_apply_reload_and_refuse_bad_rules() {
    use rempart::audit::minimise::{Minimiser, Rules};
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = policies_minimising(
        dir.path(),
        serde_json::json!([
            {"field": "source.ip", "action": "erase"},
            {"field": "identity.subject", "action": "hash"},
        ]),
    );
    let trail = dir.path().join("trail.jsonl");
    let cfg = dir.path().join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{}\"\n[audit]\nstdout = true\n\
             [identity]\ntrusted_header = \"x-remote-user\"\ntrusted_sources = [\"127.0.0.1\"]\n",
            up.url()
        ),
    )
    .unwrap();
    let mut rp = Rempart::start(
        "",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--policies",
            policies.to_str().unwrap(),
            "--audit",
            trail.to_str().unwrap(),
        ],
    );
    let as_bob = |rp: &Rempart| {
        let url = rp.url("/api/contacts/1");
        async move { common::request("GET", &url, &[("x-remote-user", "bob")]).await }
    };
    let first = as_bob(&rp).await;
    let second = as_bob(&rp).await;
    assert_eq!((first.status, second.status), (200, 200));
    let a = rp.audit_record(&first.decision_id()).await;
    let b = rp.audit_record(&second.decision_id()).await;
    assert!(a["source"].get("ip").is_none(), "{a}");
    assert!(a["source"]["port"].as_u64().is_some(), "{a}");
    assert_eq!(a["erased"], serde_json::json!(["source.ip"]));
    assert_eq!(a["masked"], serde_json::json!(["identity.subject"]));
    // Keyed with the key made beside the trail: the same name, the same
    // pseudonym, which only that key gives.
    let key = std::fs::read(dir.path().join("trail.jsonl.hash-key")).unwrap();
    let pseudonym = Minimiser::new(Rules::default(), key).pseudonym("bob");
    assert_eq!(a["identity"]["subject"], pseudonym.as_str());
    assert_eq!(b["identity"]["subject"], pseudonym.as_str());

    // A reload changes the rules: the address is kept, the path hashed.
    let rev0 = rp.policy_revision().await;
    set_minimise(
        &policies,
        serde_json::json!([{"field": "request.path", "action": "hash"}]),
    );
    rp.signal("HUP");
    eventually!("the reload", rp.policy_revision().await != rev0);
    let rev1 = rp.policy_revision().await;
    let third = as_bob(&rp).await;
    let c = rp.audit_record(&third.decision_id()).await;
    assert_eq!(c["source"]["ip"], "127.0.0.1", "{c}");
    assert_eq!(c["identity"]["subject"], "bob", "{c}");
    assert!(
        c["request"]["path"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:"),
        "{c}"
    );
    assert_eq!(c["masked"], serde_json::json!(["request.path"]));
    assert!(c.get("erased").is_none(), "{c}");

    // A bad rule is refused with the file and the rule named; the last
    // good set (and its rules) keeps serving.
    set_minimise(
        &policies,
        serde_json::json!([{"field": "source.ip", "action": "redact"}]),
    );
    rp.signal("HUP");
    eventually!(
        "the refusal",
        rp.sample(r#"rempart_policy_reloads_total{result="failure"}"#)
            .await
            >= 1.0
    );
    assert_eq!(rp.policy_revision().await, rev1);
    // The metric moves just before the line is logged.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !rp.log_text().contains("policy reload rejected") && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = rp.log_text();
    let named = format!(
        "{}: data.settings.audit.minimise[0].action: unknown action \"redact\"",
        policies.join("data.json").display()
    );
    assert!(
        log.contains("policy reload rejected") && log.contains(&named),
        "{log}"
    );
    let fourth = as_bob(&rp).await;
    let d = rp.audit_record(&fourth.decision_id()).await;
    assert_eq!(d["masked"], serde_json::json!(["request.path"]), "{d}");
    // The copies carry the minimised records, exactly as written.
    assert!(rp.stop().success());
    let stdout = rp.stdout.lock().unwrap().clone();
    let written = std::fs::read_to_string(&trail).unwrap();
    assert_eq!(
        stdout.iter().filter(|l| l.contains("decision_id")).count(),
        4,
        "{stdout:?}"
    );
    for line in written.lines().filter(|l| l.contains("decision_id")) {
        assert!(stdout.iter().any(|l| l == line), "{line} not in {stdout:?}");
    }
    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "the chain covers the minimised records: {err}");

    // Checked before deploying (and at start), with the same message.
    set_minimise(
        &policies,
        serde_json::json!([{"field": "request.query", "action": "erase"}]),
    );
    let (code, out, err) = run(&[
        "check",
        "--config",
        cfg.to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
    ]);
    let err = format!("{out}{err}");
    assert_ne!(code, 0);
    assert!(
        err.contains("data.settings.audit.minimise[0].field")
            && err.contains("not a field of the audit record"),
        "{err}"
    );
}

// ------------------------------------------------- syslog over TLS (RFC 5425)

/// What a TLS syslog collector saw on its first connection: the client's
/// certificate (if any) and the octet-counted messages, or the handshake
/// error.
type TlsSeen = Result<(bool, Vec<String>), String>;

/// A TLS syslog collector on loopback (rustls, blocking) presenting
/// `server` (cert PEM, key PEM) that requires a client certificate from
/// `client_ca_pem` and reads `n` frames.
fn tls_syslog_collector(
    server: &(String, String),
    client_ca_pem: &str,
    n: usize,
) -> (std::net::SocketAddr, std::sync::mpsc::Receiver<TlsSeen>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::io::BufRead;
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(server.0.as_bytes())
                .map(|c| c.unwrap())
                .collect(),
            PrivateKeyDer::from_pem_slice(server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut conn = rustls::ServerConnection::new(Arc::new(cfg)).unwrap();
        let seen = (|| {
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
            }
            let has_client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
            let mut r = std::io::BufReader::new(rustls::StreamOwned::new(conn, tcp));
            let mut messages = Vec::new();
            for _ in 0..n {
                let mut len = Vec::new();
                r.read_until(b' ', &mut len).map_err(|e| e.to_string())?;
                let len: usize = std::str::from_utf8(&len)
                    .unwrap()
                    .trim()
                    .parse()
                    .map_err(|e| format!("bad frame length {len:?}: {e}"))?;
                let mut msg = vec![0u8; len];
                std::io::Read::read_exact(&mut r, &mut msg).map_err(|e| e.to_string())?;
                messages.push(String::from_utf8(msg).unwrap());
            }
            Ok((has_client_cert, messages))
        })();
        let _ = tx.send(seen);
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn records_are_copied_to_syslog_over_tls_with_a_verified_server_and_a_client_certificate() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ours = common::pki::Ca::new("Syslog CA");
    let client = ours.client("rempart", "gateway@example.org");
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca = file("ca.pem", &ours.pem);
    let cert = file("client.pem", &client.0);
    let key = file("client.key", &client.1);
    let (addr, seen) = tls_syslog_collector(&ours.server("syslog"), &ours.pem, 3);
    let trail = dir.path().join("trail.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        &format!(
            "syslog = \"tls://{addr}\"\nsyslog_ca = \"{ca}\"\nsyslog_client_cert = \"{cert}\"\nsyslog_client_key = \"{key}\""
        ),
        &trail,
    );
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            get(&rp.url(&format!("/api/contacts/{n}")))
                .await
                .decision_id(),
        );
    }
    let (client_cert, messages) =
        tokio::task::spawn_blocking(move || seen.recv_timeout(std::time::Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the collector got a connection")
            .expect("TLS handshake and three frames");
    assert!(rp.stop().success());
    assert!(client_cert, "rempart presented its client certificate");
    let file_lines: Vec<String> = std::fs::read_to_string(&trail)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let got: Vec<String> = messages
        .iter()
        .map(|m| {
            syslog_record(m)["decision_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(got, ids);
    assert!(messages
        .iter()
        .zip(&file_lines)
        .all(|(m, l)| m.ends_with(l.as_str())));

    // A collector whose certificate another CA signed is refused: the
    // handshake fails, the failure is counted, the trail is complete.
    let other = common::pki::Ca::new("Impostor CA");
    let (addr, seen) = tls_syslog_collector(&other.server("syslog"), &ours.pem, 1);
    let trail = dir.path().join("trail-2.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        &format!("syslog = \"tls://{addr}\"\nsyslog_ca = \"{ca}\"\ndurability = \"sync\""),
        &trail,
    );
    assert_eq!(get(&rp.url("/api/contacts/1")).await.status, 200);
    let outcome =
        tokio::task::spawn_blocking(move || seen.recv_timeout(std::time::Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the impostor got a connection");
    assert!(
        outcome.is_err(),
        "no message reached the impostor: {outcome:?}"
    );
    // (Sync mode writes two records, which may take one or two failed
    // handshakes: the sink retries at most once a second.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !rp.metrics().await.lines().any(|l| {
        l.strip_prefix("rempart_audit_sink_errors_total{sink=\"syslog\"} ")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no sink error counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(rp.stop().success());
    let (code, out, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    // Sync mode: the pending record and the complete one.
    assert!(out.contains("ok: 2 records"), "{out}");
}

// ------------------------------------------------------ rotation by age

#[tokio::test(flavor = "multi_thread")]
async fn age_rotation_keeps_one_chain_that_verify_walks_across_the_files() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trails = dir.path().join("trail");
    std::fs::create_dir(&trails).unwrap();
    let trail = trails.join("audit.jsonl");
    let mut rp = start_with_audit(
        &[],
        dir.path(),
        &up.url(),
        "rotate_age = \"1s\"\ndurability = \"sync\"",
        &trail,
    );
    // Three rounds more than a second apart: the first write of each later
    // round finds the file's first record too old and rotates.
    for round in 0..3 {
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
        }
        for n in 0..5 {
            assert_eq!(
                get(&rp.url(&format!("/api/contacts/{n}"))).await.status,
                200
            );
        }
    }
    assert!(rp.metric("rempart_audit_rotations_total").await >= 2.0);
    assert!(rp.stop().success());
    let rotated = gz_files(&trails);
    assert!(rotated.len() >= 2, "{rotated:?}");
    // No file holds records more than the age apart from its first (plus
    // the slack of a slow machine): rotation was by age, not size.
    for f in &rotated {
        let text = gunzip(f);
        assert!(!text.is_empty());
        let stamps: Vec<std::time::SystemTime> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).unwrap()
            })
            .collect();
        let span = stamps
            .last()
            .unwrap()
            .duration_since(stamps[0])
            .unwrap_or_default();
        assert!(
            span < std::time::Duration::from_millis(1300),
            "{f:?}: {span:?}"
        );
    }
    let (code, out, err) = verify(&[&trails]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: 30 records") && out.contains("seq 1..30"),
        "{out}"
    );
    assert!(
        out.contains(&format!("in {} file(s)", rotated.len() + 1)),
        "{out}"
    );
}

/// An upstream that, on each request, reads the trail and answers whether
/// a record of that very request (found by its path, which each request
/// makes unique) is already in it: `{"recorded", "decision_id",
/// "exchange", "status"}`.
async fn trail_reading_upstream(
    trail: std::path::PathBuf,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let trail = trail.clone();
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream);
                loop {
                    let mut path = None;
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if path.is_none() {
                            path = line.split_whitespace().nth(1).map(String::from);
                        }
                    }
                    let path = path.unwrap_or_default();
                    let text = std::fs::read_to_string(&trail).unwrap_or_default();
                    let found = text
                        .lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .find(|r| r["request"]["path"] == path.as_str());
                    let body = match found {
                        Some(r) => serde_json::json!({
                            "recorded": true,
                            "decision_id": r["decision_id"],
                            "exchange": r["exchange"],
                            "status": r["status"],
                        }),
                        None => serde_json::json!({"recorded": false}),
                    }
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
                        body.len()
                    );
                    if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, task)
}

fn records_of(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_mode_records_the_decision_before_the_crm_sees_the_request_and_counts_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let (up, up_task) = trail_reading_upstream(trail.clone()).await;
    let mut rp = start_with_audit(&[], dir.path(), &up, "durability = \"sync\"", &trail);

    // Sequential and concurrent requests, each with its own path.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = rp.url(&format!("/api/contacts/sync-{i}"));
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        let seen = r.json();
        assert_eq!(
            seen["recorded"], true,
            "the CRM got a request not yet recorded"
        );
        assert_eq!(seen["decision_id"], r.decision_id().as_str());
        assert_eq!(seen["exchange"], "pending");
        assert!(seen["status"].is_null());
        ids.push(r.decision_id());
    }
    // A denied request is not forwarded: one record, no pending one.
    let denied = common::request("TRACE", &rp.url("/api/contacts"), &[]).await;
    assert_eq!(denied.status, 403);
    assert!(rp.stop().success());

    let (code, _, err) = verify(&[&trail]);
    assert_eq!(code, 0, "{err}");
    let records = records_of(&trail);
    for id in &ids {
        let mine: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["decision_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 2, "{id}: {mine:?}");
        assert_eq!(mine[0]["exchange"], "pending");
        assert!(mine[0]["seq"].as_u64() < mine[1]["seq"].as_u64());
        assert!(mine[1].get("exchange").is_none());
        assert_eq!(mine[1]["status"], 200);
        assert_eq!(mine[1]["decision"]["outcome"], "allowed");
    }
    let denied_records: Vec<_> = records
        .iter()
        .filter(|r| r["decision_id"] == denied.decision_id().as_str())
        .collect();
    assert_eq!(denied_records.len(), 1);
    assert_eq!(denied_records[0]["status"], 403);

    // `audit query` and `report` count each request once.
    let (code, out, err) = run(&["audit", "query", trail.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), ids.len() + 1, "{out}");
    assert!(listed.iter().all(|r| r.get("exchange").is_none()));
    let (code, out, err) = run(&[
        "audit",
        "query",
        trail.to_str().unwrap(),
        "--decision",
        "allowed",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), ids.len());
    let (code, out, err) = run(&[
        "report",
        "--format",
        "json",
        "--audit",
        trail.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["observations"]["decisions"], ids.len() as u64 + 1);
    assert_eq!(
        report["observations"]["outcomes"]["ingress"]["allowed"],
        ids.len() as u64
    );

    // A pending record that nothing completes (the exchange was cut short)
    // still stands for its request, once.
    let mut cut = std::fs::read_to_string(&trail).unwrap();
    let last_complete = records
        .iter()
        .rposition(|r| r["decision_id"] == ids[0].as_str())
        .unwrap();
    let kept: Vec<&str> = cut
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != last_complete)
        .map(|(_, l)| l)
        .collect();
    cut = kept.join("\n") + "\n";
    let cut_path = dir.path().join("cut.jsonl");
    std::fs::write(&cut_path, cut).unwrap();
    let (code, out, err) = run(&["audit", "query", cut_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), ids.len() + 1);
    let orphan: Vec<_> = listed
        .iter()
        .filter(|r| r["decision_id"] == ids[0].as_str())
        .collect();
    assert_eq!(orphan.len(), 1);
    assert_eq!(orphan[0]["exchange"], "pending");

    // Control: in buffered mode the record follows the exchange, so the
    // same upstream does not find it (the check above can fail).
    let trail_b = dir.path().join("trail-buffered.jsonl");
    let (up_b, up_b_task) = trail_reading_upstream(trail_b.clone()).await;
    let mut rp = start_with_audit(&[], dir.path(), &up_b, "", &trail_b);
    let r = get(&rp.url("/api/contacts/buffered-0")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["recorded"], false);
    assert!(rp.stop().success());
    assert_eq!(decision_ids(&trail_b).len(), 1);
    up_task.abort();
    up_b_task.abort();
}
