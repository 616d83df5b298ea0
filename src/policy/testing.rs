//! `rempart policy test`: runs every `test_*` rule of a policy set, the
//! `opa test` habit. A test passes when its rule evaluates to `true`.

use super::load::{compile_files_for, source_files, PolicySource, SourceFile};

#[derive(Debug)]
pub struct TestResult {
    pub file: String,
    pub line: usize,
    pub rule: String,
    pub passed: bool,
    pub detail: String,
}

/// Finds `package` and top-level `test_*` rule heads in one file.
fn test_rules(file: &SourceFile) -> Vec<(String, usize, String)> {
    let mut package = None;
    let mut out = Vec::new();
    for (n, line) in file.text.lines().enumerate() {
        if let Some(p) = line.strip_prefix("package ") {
            package = p.split('#').next().map(|p| p.trim().to_string());
            continue;
        }
        if line.starts_with("test_") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(pkg) = &package {
                let path = format!("data.{pkg}.{name}");
                if !out
                    .iter()
                    .any(|(p, _, _): &(String, usize, String)| *p == path)
                {
                    out.push((path, n + 1, name));
                }
            }
        }
    }
    out
}

/// Runs the tests of `source`, compiled (tests included) for the decision
/// rule `entry`, which the set must define as it must to be served.
pub fn run(source: &PolicySource, entry: &str) -> anyhow::Result<Vec<TestResult>> {
    let files = source_files(source, true)?;
    let mut wanted = Vec::new();
    for f in &files {
        for (path, line, rule) in test_rules(f) {
            wanted.push((f.shown.clone(), line, rule, path));
        }
    }
    let set = compile_files_for(entry, source.to_string(), files)?;
    Ok(wanted
        .into_iter()
        .map(|(file, line, rule, path)| {
            let (passed, detail) = match set.eval_rule(&path, None) {
                Ok(regorus::Value::Bool(true)) => (true, String::new()),
                Ok(regorus::Value::Undefined) => (false, "undefined (a condition failed)".into()),
                Ok(v) => (false, format!("evaluated to {v}")),
                Err(e) => (false, format!("error: {e}")),
            };
            TestResult {
                file,
                line,
                rule,
                passed,
                detail,
            }
        })
        .collect())
}
