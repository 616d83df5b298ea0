//! The command line as users drive it: check, policy eval, policy test.

mod common;

use common::{repo_policies, run};

/// `rempart check` on a config whose policies are in `pol`.
fn check_with_policies(dir: &std::path::Path, pol: &std::path::Path) -> (i32, String, String) {
    let cfg = dir.join("c.toml");
    let toml = format!(
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n[policy]\ndir = \"{}\"\n",
        pol.display()
    );
    std::fs::write(&cfg, toml).unwrap();
    run(&["check", "--config", cfg.to_str().unwrap()])
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = check_with_policies(dir.path(), &repo_policies());
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: ") && out.contains("sha256:"), "{out}");
    // It says whether repeated requests skip the policy, and on what.
    let cache = out
        .lines()
        .find_map(|l| l.strip_prefix("decision cache: "))
        .unwrap_or_else(|| panic!("no decision cache line in {out}"));
    assert!(
        cache.starts_with("1024 decisions per worker thread, keyed on "),
        "{cache}"
    );
    let keyed: Vec<&str> = cache
        .rsplit("keyed on ")
        .next()
        .unwrap()
        .split(", ")
        .collect();
    assert!(keyed.contains(&"input.request.path"), "{keyed:?}");
    assert!(keyed.contains(&"input.identity.roles"), "{keyed:?}");
    for unique in [
        "input.request.id",
        "input.time",
        "input.source.port",
        "input",
    ] {
        assert!(!keyed.contains(&unique), "{unique} in {keyed:?}");
    }
}

#[test]
fn check_says_when_decisions_are_not_cached_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    std::fs::copy(
        repo_policies().join("decision.rego"),
        pol.join("decision.rego"),
    )
    .unwrap();
    std::fs::write(
        pol.join("audit_all.rego"),
        "package rempart\nimport rego.v1\nwarn contains {\"code\": \"x\"} if {\n\tdoc := input\n\tdoc.request.path == \"/never\"\n}\n",
    )
    .unwrap();
    let (code, out, err) = check_with_policies(dir.path(), &pol);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("decision cache: off (a rule reads the whole input document)"),
        "{out}"
    );
}

#[test]
fn check_names_file_line_and_key_of_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n\n[server]\nmdoe = \"monitor\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad.toml") && err.contains("line 5") && err.contains("mdoe"),
        "{err}"
    );
}

#[test]
fn check_reports_a_policy_syntax_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("pol");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(
        pol.join("bad.rego"),
        "package rempart\n\nimport rego.v1\n\ndeny contains x if {\n  x := \n}\n",
    )
    .unwrap();
    let (code, _, err) = check_with_policies(dir.path(), &pol);
    assert_ne!(code, 0);
    assert!(
        err.contains("bad.rego:7:") || err.contains("bad.rego:6:"),
        "{err}"
    );
}

#[test]
fn check_requires_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\nmode = \"monitor\"\n").unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("no upstream"), "{err}");
}

#[test]
fn policy_eval_prints_the_decision_document() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        r#"{"direction":"ingress","request":{"method":"TRACE","path":"/x","segments":["x"],"scheme":"https"},
            "source":{"scope":"private"},"resource":{"bulk":false}}"#,
    )
    .unwrap();
    let pol = repo_policies();
    for extra in [&[][..], &["--interpreter"][..]] {
        let mut args = vec![
            "policy",
            "eval",
            "--policies",
            pol.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(doc["allow"], false);
        assert_eq!(doc["deny"][0]["code"], "method_not_allowed");
        assert!(doc["policy_revision"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"));
    }
}

#[test]
fn policy_eval_rejects_invalid_json_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(&input, "{\"direction\": }").unwrap();
    let (code, _, err) = run(&["policy", "eval", "--input", input.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("input.json") && err.contains("line 1 column"),
        "{err}"
    );
}

#[test]
fn shipped_policy_tests_pass_and_a_failing_test_fails() {
    let (code, out, err) = run(&["policy", "test", repo_policies().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" 0 failed"), "{out}");
    assert!(!out.contains("policy: 0 passed"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    for f in ["decision.rego", "library.rego", "data.json"] {
        std::fs::copy(repo_policies().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("wrong_test.rego"),
        "package wrong_test\nimport rego.v1\nimport data.rempart\ntest_trace_allowed if {\n  rempart.decision.allow with input as {\"direction\": \"ingress\", \"request\": {\"method\": \"TRACE\", \"path\": \"/\", \"segments\": []}, \"resource\": {\"bulk\": false}, \"source\": {}}\n}\n",
    )
    .unwrap();
    let (code, out, _) = run(&["policy", "test", dir.path().to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        out.contains("FAIL") && out.contains("wrong_test.rego:4 test_trace_allowed"),
        "{out}"
    );
}

#[test]
fn check_rejects_data_that_collides_with_a_rule() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("pol");
    std::fs::create_dir_all(pol.join("rempart")).unwrap();
    for f in ["decision.rego", "library.rego", "data.json"] {
        std::fs::copy(repo_policies().join(f), pol.join(f)).unwrap();
    }
    // data.rempart.deny would shadow the rule set `deny`.
    std::fs::write(pol.join("rempart/data.json"), r#"{"deny": ["oops"]}"#).unwrap();
    let (code, out, err) = check_with_policies(dir.path(), &pol);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("conflicts"), "{err}");
}

#[test]
fn check_opens_the_geo_databases_as_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let base = format!(
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n[policy]\ndir = \"{}\"\n",
        repo_policies().display()
    );
    std::fs::write(
        &cfg,
        format!(
            "{base}[geo]\ncountry_db = \"{}/missing.mmdb\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("[geo]") && err.contains("missing.mmdb") && err.contains("fetch.sh"),
        "{err}"
    );
    // No country database at all: accepted, with a warning that says what it means.
    std::fs::write(&cfg, &base).unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: no country database"), "{err}");
}
