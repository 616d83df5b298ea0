//! The tamper-evident trail: a real rempart writes it under concurrent
//! traffic, `rempart audit verify` checks it, and every kind of edit is
//! caught at the right line.

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

    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"status\":200", "\"status\":404");
    let (code, _, err) = verify(&[&write(&dir, "edited.jsonl", &edited)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("edited.jsonl:3") && err.contains("hash mismatch"),
        "{err}"
    );

    let mut deleted = lines.clone();
    deleted.remove(1);
    let (code, _, err) = verify(&[&write(&dir, "deleted.jsonl", &deleted)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("deleted.jsonl:2") && err.contains("from 1 to 3"),
        "{err}"
    );

    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    let (code, _, err) = verify(&[&write(&dir, "swapped.jsonl", &swapped)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("swapped.jsonl:4") && err.contains("from 3 to 5"),
        "{err}"
    );

    // Split across two files (as rotation will): valid in order, broken out of order.
    let a = write(&dir, "a.jsonl", &lines[..2]);
    let b = write(&dir, "b.jsonl", &lines[2..]);
    assert_eq!(verify(&[&a, &b]).0, 0);
    let (code, _, err) = verify(&[&b, &a]);
    assert_ne!(code, 0);
    assert!(err.contains("a.jsonl:1"), "{err}");

    // A forged chain: re-numbered after a deletion, but the hashes no longer link.
    let mut forged = lines.clone();
    forged.remove(1);
    forged[1] = forged[1].replace("\"seq\":3", "\"seq\":2");
    let (code, _, err) = verify(&[&write(&dir, "forged.jsonl", &forged)]);
    assert_ne!(code, 0);
    assert!(err.contains("forged.jsonl:2"), "{err}");
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
