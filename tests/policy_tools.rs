//! The policy author's tools as users drive them: `policy eval --explain`,
//! `policy lint`, `policy fmt`, `policy test` with `with ... as`, and the
//! OPA-Envoy compatible input and decision end to end through `serve`.

mod common;

use common::{repo_policies, request, run, Rempart, Upstream};

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The worked example input of docs/policies.md, changed to a TRACE on a
/// path with a `.git` segment: two deny rules and one warn rule fire.
fn trace_input(dir: &std::path::Path) -> std::path::PathBuf {
    let doc = serde_json::json!({
        "direction": "ingress",
        "request": {"id": "t", "method": "TRACE", "scheme": "http", "host": "crm.example.eu",
                    "port": 8080, "path": "/api/v1/contacts/.git", "segments": ["api", "v1", "contacts", ".git"],
                    "query": {}, "headers": {}, "protocol": "HTTP/1.1"},
        "source": {"ip": "10.20.0.7", "port": 51544, "scope": "private", "workload": null,
                   "geo": {"scope": "private", "country": null, "in_eu": false, "in_eea": false, "adequacy": null,
                           "asn": null, "as_org": null, "as_country": null, "operator": null, "sovereign": "local"}},
        "destination": {"host": "127.0.0.1", "ip": "127.0.0.1", "port": 8000, "scope": "loopback",
                        "geo": {"scope": "loopback", "country": null, "in_eu": false, "in_eea": false, "adequacy": null,
                                "asn": null, "as_org": null, "as_country": null, "operator": null, "sovereign": "local"},
                        "addresses": []},
        "identity": {"authenticated": true, "method": "header", "subject": "bob", "name": null, "email": null,
                     "roles": ["sales"], "groups": [], "claims": {}, "issuer": null, "error": null, "sources": ["header"]},
        "resource": {"crm": "generic", "type": "contacts", "id": null, "operation": "delete", "bulk": true, "inspection": null},
        "time": {"rfc3339": "2026-11-27T09:30:00Z", "unix_ns": 0, "weekday": 5, "hour": 9}
    });
    let path = dir.join("trace.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

#[test]
fn explain_names_each_fired_rule_with_file_line_and_the_input_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let input = trace_input(dir.path());
    let policies = repo_policies();
    let (code, out, err) = run(&[
        "policy",
        "eval",
        "--policies",
        policies.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--explain",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The decision itself is unchanged by --explain.
    assert_eq!(doc["allow"], false);
    let fired = doc["explain"]["fired"].as_array().unwrap();
    let library = std::fs::read_to_string(policies.join("library.rego")).unwrap();
    let line_of = |needle: &str| {
        library
            .lines()
            .position(|l| l.contains(needle))
            .map(|n| n as u64 + 1)
            .unwrap()
    };
    let method_rule = fired
        .iter()
        .find(|f| f["result"][0]["code"] == "method_not_allowed")
        .unwrap_or_else(|| panic!("{out}"));
    // Reported under its family (library.rego's gated `ingress_deny`).
    assert_eq!(method_rule["rule"], "ingress_deny");
    assert!(method_rule["file"]
        .as_str()
        .unwrap()
        .ends_with("policies/library.rego"));
    // The `deny contains {` head that opens the method rule.
    let head = line_of("\"code\": \"method_not_allowed\"") - 1;
    assert_eq!(method_rule["line"], head, "{method_rule}");
    let reads = method_rule["input"].as_array().unwrap();
    assert!(reads
        .iter()
        .any(|r| r["path"] == "input.request.method" && r["value"] == "TRACE"));
    assert!(reads
        .iter()
        .any(|r| r["path"] == "input.direction" && r["value"] == "ingress"));
    // The helper it calls is followed: blocked_path reads segments.
    let blocked = fired
        .iter()
        .find(|f| f["result"][0]["code"] == "blocked_path")
        .unwrap();
    assert!(blocked["input"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "input.request.segments"));
    let warn = fired.iter().find(|f| f["rule"] == "warn").unwrap();
    assert_eq!(warn["result"][0]["code"], "bulk_operation");
    // Rules that did not fire are listed by file and line.
    let not_fired = doc["explain"]["not_fired"].as_array().unwrap();
    assert!(not_fired
        .iter()
        .any(|n| n.as_str().unwrap().contains("sovereignty.rego:")));
    assert!(!not_fired.iter().any(|n| n
        .as_str()
        .unwrap()
        .ends_with(&format!("library.rego:{head} ingress_deny"))));
    // The family's gate is not reported as a rule of its own.
    assert!(!fired
        .iter()
        .any(|f| f["rule"] == "deny" && f["file"].as_str().unwrap().ends_with("library.rego")));
}

#[test]
fn lint_locates_syntax_errors_forbidden_builtins_and_unused_rules() {
    // The shipped set is clean, even with --strict.
    let (code, out, err) = run(&[
        "policy",
        "lint",
        "--strict",
        repo_policies().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("lint: 0 error(s), 0 warning(s)"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.rego",
        "package rempart\n\nimport rego.v1\n\n\
         decision := {\"allow\": count(deny) == 0, \"deny\": [r | some r in deny], \"warn\": []}\n\n\
         deny contains {\"code\": \"x\"} if not admin\n\n\
         admin if \"admin\" in input.identity.roles\n\n\
         lonely if input.x == 1\n\n\
         fetch if http.send({\"url\": \"http://127.0.0.1:1/\", \"method\": \"get\"})\n\n\
         claims := io.jwt.decode(\"a.b.c\")\n\n\
         odd if no_such.builtin(1)\n",
    );
    write(
        dir.path(),
        "a_test.rego",
        "package a_test\n\nimport rego.v1\n\ntest_helper_in_tests_is_fine if helper\n\nhelper if true\n",
    );
    let (code, out, _) = run(&["policy", "lint", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let file = dir.path().join("a.rego").display().to_string();
    for expected in [
        format!("{file}:11:1: warning[unused_rule]: rule data.rempart.lonely"),
        format!("{file}:13:10: error[forbidden_builtin]: http.send"),
        format!("{file}:15:11: error[forbidden_builtin]: io.jwt.decode"),
        format!("{file}:17:8: error[unknown_builtin]: no_such.builtin"),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in\n{out}");
    }
    // admin is used by deny; test files are not judged for unused rules.
    assert!(!out.contains("data.rempart.admin"), "{out}");
    assert!(!out.contains("a_test.rego"), "{out}");

    // Warnings alone pass, unless --strict.
    let clean = tempfile::tempdir().unwrap();
    write(
        clean.path(),
        "a.rego",
        "package rempart\n\nimport rego.v1\n\ndecision := {\"allow\": true, \"deny\": [], \"warn\": []}\n\nlonely := 1\n",
    );
    let (code, out, _) = run(&["policy", "lint", clean.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("lint: 0 error(s), 1 warning(s)"), "{out}");
    let (code, _, _) = run(&["policy", "lint", "--strict", clean.path().to_str().unwrap()]);
    assert_eq!(code, 1);

    // A syntax error: file, line and column, and nothing else judged.
    let bad = tempfile::tempdir().unwrap();
    write(
        bad.path(),
        "b.rego",
        "package rempart\n\nimport rego.v1\n\ndecision := {\n\t\"allow\": true,\n\tdeny contains x if {\n",
    );
    let (code, out, _) = run(&["policy", "lint", bad.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    let b = bad.path().join("b.rego").display().to_string();
    assert!(out.contains(&format!("{b}:7:")), "{out}");
    assert!(out.contains("error[syntax]"), "{out}");
    assert!(out.contains("lint: 1 error(s), 0 warning(s)"), "{out}");
}

#[test]
fn fmt_check_reports_and_fmt_fixes_layout() {
    let (code, out, _) = run(&[
        "policy",
        "fmt",
        "--check",
        repo_policies().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "the shipped policies are formatted: {out}");

    let dir = tempfile::tempdir().unwrap();
    let messy = "package rempart   \r\n\nimport rego.v1\n\n\n\nx := `raw  \nkept  `\n";
    write(dir.path(), "m.rego", messy);
    let (code, out, _) = run(&["policy", "fmt", "--check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("m.rego:1:16: warning[trailing_whitespace]"),
        "{out}"
    );
    assert!(out.contains("warning[blank_lines]"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("m.rego")).unwrap(),
        messy,
        "--check changes nothing"
    );
    let (code, out, _) = run(&["policy", "fmt", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("m.rego")).unwrap(),
        "package rempart\n\nimport rego.v1\n\nx := `raw  \nkept  `\n"
    );
    let (code, out, _) = run(&["policy", "fmt", "--check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn policy_test_mocks_input_and_data_and_reports_each_test() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["decision.rego", "library.rego", "data.json"] {
        std::fs::copy(repo_policies().join(f), dir.path().join(f)).unwrap();
    }
    write(
        dir.path(),
        "mock_test.rego",
        "package mock_test\n\nimport rego.v1\n\nimport data.rempart\n\n\
         req(m) := {\"direction\": \"ingress\", \"request\": {\"method\": m, \"path\": \"/\", \"segments\": []}, \"resource\": {\"bulk\": false}, \"source\": {}}\n\n\
         test_get_allowed if rempart.decision.allow with input as req(\"GET\")\n\n\
         test_get_blocked_by_mocked_data if {\n\
         \tnot rempart.decision.allow with input as req(\"GET\") with data.settings.blocked_methods as [\"GET\"]\n\
         }\n\n\
         test_wrong_on_purpose if rempart.decision.allow with input as req(\"TRACE\")\n",
    );
    let (code, out, _) = run(&["policy", "test", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let file = dir.path().join("mock_test.rego").display().to_string();
    assert!(
        out.contains(&format!("PASS {file}:9 test_get_allowed")),
        "{out}"
    );
    assert!(
        out.contains(&format!("PASS {file}:11 test_get_blocked_by_mocked_data")),
        "{out}"
    );
    assert!(
        out.contains(&format!("FAIL {file}:15 test_wrong_on_purpose")),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with("policy: 2 passed, 1 failed"),
        "{out}"
    );
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/envoy")
        .join(name)
}

fn envoy_gateway(upstream: &Upstream, policies: &str, decision: &str) -> Rempart {
    let cfg = tempfile::tempdir().unwrap();
    let path = cfg.path().join("rempart.toml");
    std::fs::write(
        &path,
        format!("[policy]\ninput_compat = \"envoy\"\ndecision = \"{decision}\"\n"),
    )
    .unwrap();
    let dir = fixture(policies);
    let r = Rempart::start(
        &upstream.url(),
        &[
            "--config",
            path.to_str().unwrap(),
            "--policies",
            dir.to_str().unwrap(),
        ],
    );
    // The config file is read at start; the temp dir may go.
    drop(cfg);
    r
}

#[tokio::test]
async fn an_opa_envoy_object_decision_sets_status_headers_and_body() {
    let upstream = Upstream::start().await;
    let gw = envoy_gateway(&upstream, "object", "envoy/authz/result");

    // Allowed: the request headers of the decision reach the upstream, the
    // ones to remove do not, and the response gets its extra header.
    let ok = request(
        "GET",
        &gw.url("/people/42"),
        &[("x-test-role", "guest"), ("one-auth-header", "secret")],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.headers["x-foo"], "bar");
    let seen = upstream.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.path, "/people/42");
    assert_eq!(seen.headers["x-ext-auth-allow"], "yes");
    assert_eq!(seen.headers["x-validated-by"], "security-checkpoint");
    assert!(seen.headers.get("one-auth-header").is_none());

    // No role: not a valid token -> 401 with the policy's body and headers.
    let no_token = request("GET", &gw.url("/people/42"), &[]).await;
    assert_eq!(no_token.status, 401);
    assert_eq!(&no_token.body[..], b"Authentication Failed");
    assert_eq!(no_token.headers["x-ext-auth-allow"], "yes");
    // A guest may not DELETE -> 403 with the other body.
    let forbidden = request("DELETE", &gw.url("/people/42"), &[("x-test-role", "guest")]).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(&forbidden.body[..], b"Unauthorized Request");
    assert_eq!(
        upstream.seen_paths().len(),
        1,
        "denials never reach the upstream"
    );

    // The trail records the denial with the status the policy chose.
    let rec = gw.audit_record(&no_token.decision_id()).await;
    assert_eq!(rec["decision"]["outcome"], "denied", "{rec}");
    assert_eq!(rec["status"], 401, "{rec}");
    assert_eq!(rec["decision"]["deny"][0]["code"], "not_allowed", "{rec}");
}

#[tokio::test]
async fn an_opa_envoy_boolean_decision_reads_parsed_path_and_query() {
    let upstream = Upstream::start().await;
    let gw = envoy_gateway(&upstream, "parsed", "envoy/authz/allow");
    let ok = request("GET", &gw.url("/people?lang=en&id=1&id=2"), &[]).await;
    assert_eq!(ok.status, 200);
    let denied = request("GET", &gw.url("/people?lang=fr&id=1&id=2"), &[]).await;
    assert_eq!(denied.status, 403);
    // A boolean decision gives rempart's own denial, with its reason.
    assert_eq!(denied.json()["reasons"][0]["code"], "not_allowed");
    let other = request("GET", &gw.url("/people/1?lang=en&id=1&id=2"), &[]).await;
    assert_eq!(other.status, 403);
    // (the upstream records paths without their query)
    assert_eq!(upstream.seen_paths(), vec!["/people"]);
}

#[test]
fn a_bad_decision_path_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n[policy]\ndecision = \"envoy/au thz\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("[policy] decision"), "{err}");
    // A decision the policies do not define is refused at load.
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:8000\"\n[policy]\ndir = \"{}\"\ndecision = \"envoy/authz/missing\"\n",
            fixture("parsed").display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("data.envoy.authz.missing"), "{err}");
}

/// Every field path of a schema node: (path, has children).
fn schema_paths(node: &serde_json::Value, prefix: &str, out: &mut Vec<(String, bool)>) {
    if let Some(props) = node["properties"].as_object() {
        for (name, child) in props {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            out.push((path.clone(), child["properties"].is_object()));
            schema_paths(child, &path, out);
        }
    }
}

#[test]
fn the_input_reference_and_the_schema_name_the_same_fields() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/input.schema.json")).unwrap(),
    )
    .unwrap();
    let guide = std::fs::read_to_string(root.join("docs/policies.md")).unwrap();
    let start = guide
        .find("\n## Input reference")
        .expect("Input reference section");
    // Up to the Scopes table, whose rows are values, not fields.
    let end = start + guide[start..].find("\n### Scopes").unwrap();
    let reference = &guide[start..end];
    let mut paths = Vec::new();
    schema_paths(&schema, "", &mut paths);
    assert!(paths.len() > 60, "{paths:?}");
    // Schema -> guide: every leaf field has its row.
    let rows: Vec<&str> = reference.lines().filter(|l| l.starts_with("| `")).collect();
    let first_cells: Vec<String> = rows
        .iter()
        .filter_map(|l| l.split('|').nth(1))
        .map(|c| c.trim().trim_matches('`').to_string())
        .collect();
    for (path, has_children) in &paths {
        if !has_children {
            assert!(
                first_cells.contains(path),
                "docs/policies.md Input reference has no row for `{path}` (in docs/input.schema.json)"
            );
        }
    }
    // Guide -> schema: every row names a field of the schema.
    let known: Vec<&String> = paths.iter().map(|(p, _)| p).collect();
    for cell in &first_cells {
        assert!(
            known.contains(&cell),
            "docs/policies.md documents `{cell}`, which docs/input.schema.json does not have"
        );
    }
    // The shared geo and address objects: each field named in its row.
    let row_of = |field: &str| {
        rows.iter()
            .find(|l| l.starts_with(&format!("| `{field}`")))
            .unwrap_or_else(|| panic!("no row for {field}"))
            .to_string()
    };
    for (def, row) in [("geo", "source.geo"), ("address", "destination.addresses")] {
        let fields = schema["$defs"][def]["properties"].as_object().unwrap();
        let text = row_of(row);
        for name in fields.keys() {
            assert!(
                text.contains(&format!("`{name}`"))
                    || text.contains(&format!("{name}:"))
                    || text.contains(&format!("\"{name}\"")),
                "the `{row}` row does not mention `{name}` ($defs.{def})"
            );
        }
    }
}

#[test]
fn the_envoy_input_fields_match_the_schema() {
    let req = http::Request::builder()
        .method("GET")
        .uri("/people/a%20b?lang=en&id=1&id=2")
        .header("host", "crm.example.eu:8080")
        .header("accept", "*/*")
        .header("authorization", "Bearer secret")
        .body(())
        .unwrap();
    let (parts, _) = req.into_parts();
    let conn = rempart::pipeline::accept::Connection::new(
        "10.0.0.7:50000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
    );
    let redact = [http::header::AUTHORIZATION];
    let info = rempart::pipeline::accept::describe(
        &parts,
        rempart::input::RequestId::from("id-1").unwrap(),
        &conn,
        &redact,
        rempart::policy::RequestReads::ALL,
    );
    let dir = tempfile::tempdir().unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trace_input(dir.path())).unwrap()).unwrap();
    let mut value = regorus::Value::from(base);
    rempart::policy::envoy::add_envoy_input(&mut value, &parts, &info, conn.peer, conn.local);
    let doc = serde_json::to_value(&value).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/input.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    if let Err(e) = validator.validate(&doc) {
        panic!("schema rejects the envoy input: {e}\n{doc}");
    }
    let http = &doc["attributes"]["request"]["http"];
    assert_eq!(http["path"], "/people/a%20b?lang=en&id=1&id=2");
    assert_eq!(http["host"], "crm.example.eu:8080");
    assert_eq!(http["headers"][":method"], "GET");
    assert_eq!(http["headers"]["authorization"], "[redacted]");
    assert_eq!(doc["parsed_path"], serde_json::json!(["people", "a b"]));
    assert_eq!(doc["parsed_query"]["id"], serde_json::json!(["1", "2"]));
    let src = &doc["attributes"]["source"]["address"]["socketAddress"];
    assert_eq!(
        (src["address"].as_str(), src["portValue"].as_u64()),
        (Some("10.0.0.7"), Some(50000))
    );
    assert_eq!(doc["version"]["ext_authz"], "v3");
}
