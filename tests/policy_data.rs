//! Policy data split across several `data.json` files, changed and
//! reloaded while `rempart serve` runs, without touching any `.rego` file.

#[macro_use]
mod common;

use std::path::Path;

use common::{get, Rempart, Upstream};

/// Denies partners missing from `data.partners.allowed` (maintained in
/// `partners/data.json`) and any path in `data.gate.closed` (in the
/// top-level `data.json`).
const POLICY: &str = r#"package rempart

import rego.v1

decision := {"allow": count(deny) == 0, "deny": [r | some r in deny], "warn": []}

deny contains {"code": "unknown_partner", "message": "not in data.partners.allowed"} if {
	input.request.segments[0] == "partners"
	not data.partners.allowed[input.request.segments[1]]
}

deny contains {"code": "closed", "message": "listed in data.gate.closed"} if {
	input.request.path in data.gate.closed
}
"#;

/// Writes `text` to `path` as a deployment would: beside it, then renamed
/// over it, so that a reload never reads half a file. The temporary name
/// starts with a dot, which the policy loader skips.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_file_name(".next");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn partners(names: &[&str]) -> String {
    let allowed: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|n| (n.to_string(), true.into())).collect();
    serde_json::json!({ "allowed": allowed }).to_string()
}

fn gate(closed: &[&str]) -> String {
    serde_json::json!({ "gate": { "closed": closed } }).to_string()
}

/// The first deny code of a decision record, or "" when allowed.
fn deny_code(rec: &serde_json::Value) -> &str {
    rec["decision"]["deny"][0]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_data_files_reload_without_touching_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    std::fs::create_dir_all(dir.join("partners")).unwrap();
    let rego = dir.join("decision.rego");
    std::fs::write(&rego, POLICY).unwrap();
    std::fs::write(dir.join("data.json"), gate(&["/closed"])).unwrap();
    let partners_file = dir.join("partners/data.json");
    std::fs::write(&partners_file, partners(&["acme"])).unwrap();
    let policy_mtime = || std::fs::metadata(&rego).unwrap().modified().unwrap();
    let rego_written = policy_mtime();

    let upstream = Upstream::start().await;
    let cfg = tmp.path().join("rempart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"{}\"\n[policy]\ndir = \"{}\"\nreload_interval = \"100ms\"\n",
            upstream.url(),
            dir.display()
        ),
    )
    .unwrap();
    let rp = Rempart::start("", &["--config", cfg.to_str().unwrap()]);
    let rev0 = rp.policy_revision().await;

    // Both files decide: partners/data.json lands at data.partners, the
    // top-level data.json at data.gate.
    assert_eq!(get(&rp.url("/partners/acme")).await.status, 200);
    assert_eq!(get(&rp.url("/closed")).await.status, 403);
    let before = get(&rp.url("/partners/globex")).await;
    assert_eq!(before.status, 403);
    let rec = rp.audit_record(&before.decision_id()).await;
    assert_eq!(deny_code(&rec), "unknown_partner", "{rec}");
    assert_eq!(rec["policy_revision"], rev0.as_str(), "{rec}");

    // One data file changes, picked up by the file watcher.
    replace(&partners_file, &partners(&["acme", "globex"]));
    eventually!("the partners reload", rp.policy_revision().await != rev0);
    let rev1 = rp.policy_revision().await;
    let after = get(&rp.url("/partners/globex")).await;
    assert_eq!(
        after.status, 200,
        "the same request, decided by the new data"
    );
    let rec = rp.audit_record(&after.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "allowed", "{rec}");
    assert_eq!(rec["policy_revision"], rev1.as_str(), "{rec}");

    // The other data file changes, and SIGHUP asks for the reload at once.
    replace(
        &dir.join("data.json"),
        &gate(&["/closed", "/partners/globex"]),
    );
    rp.signal("HUP");
    eventually!("the gate reload", rp.policy_revision().await != rev1);
    let rev2 = rp.policy_revision().await;
    let closed = get(&rp.url("/partners/globex")).await;
    assert_eq!(closed.status, 403);
    let rec = rp.audit_record(&closed.decision_id()).await;
    assert_eq!(deny_code(&rec), "closed", "{rec}");
    assert_eq!(rec["policy_revision"], rev2.as_str(), "{rec}");
    assert_eq!(
        rp.metric(r#"rempart_policy_reloads_total{result="success"}"#)
            .await,
        2.0
    );

    // A data file that is not JSON: refused, naming the file; the last
    // good set keeps serving.
    replace(&partners_file, r#"{"allowed": {"acme": true,"#);
    rp.signal("HUP");
    eventually!(
        "the refusal",
        rp.sample(r#"rempart_policy_reloads_total{result="failure"}"#)
            .await
            >= 1.0
    );
    assert_eq!(rp.policy_revision().await, rev2);
    assert_eq!(get(&rp.url("/partners/acme")).await.status, 200);
    assert_eq!(get(&rp.url("/partners/initech")).await.status, 403);
    let log = rp.log_text();
    let shown = format!("{}: invalid JSON", partners_file.display());
    assert!(
        log.contains("policy reload rejected") && log.contains(&shown),
        "{log}"
    );

    // Fixed again: served, still without any policy file written.
    replace(&partners_file, &partners(&["acme", "initech"]));
    eventually!("the fixed reload", rp.policy_revision().await != rev2);
    assert_eq!(get(&rp.url("/partners/initech")).await.status, 200);
    assert_eq!(policy_mtime(), rego_written, "no .rego file was touched");
}
