//! `rempart policy lint` and `rempart policy fmt`: what can be found
//! wrong in a policy set before it is deployed.
//!
//! Lint reports, each with `file:line:column`:
//! - syntax errors (regorus' parser) and compile errors of the set;
//! - calls to builtins that are forbidden on a gateway (network, runtime
//!   environment, JWT decoding that rempart already does) or that regorus
//!   does not implement, which would otherwise fail only when evaluated;
//! - rules defined but never referenced by the entry point or by another
//!   served rule (warnings; `test_*` rules and test files are not judged).
//!
//! Fmt is not `opa fmt` (no Rego formatter exists for Rust): it checks and
//! fixes the layout rules that can be applied without reparsing and
//! reprinting the code: tab indentation, no trailing whitespace, LF line
//! ends, no runs of blank lines, one final newline. Lines inside multi-line
//! raw strings are left alone (their whitespace is part of the value).

use std::collections::{BTreeSet, HashSet};

use regorus::unstable::{Lexer, TokenKind, BUILTINS};
use regorus::Source;
use serde::Serialize;

use super::analysis::{parse_file, syntax_error, ParsedFile, RuleShape};
use super::load::{compile_files_for, SourceFile};

/// Builtins a policy may not call on the gateway, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("http.send", "makes a network call from the request path; pass the data in data.json instead"),
    ("net.lookup_ip_addr", "resolves names from the request path; rempart resolves egress destinations itself (input.destination.addresses)"),
    ("opa.runtime", "exposes the process environment to policies"),
    ("io.jwt.", "tokens are verified by rempart ([identity.jwt]); read input.identity instead"),
    ("rand.intn", "makes decisions non-reproducible"),
];

/// Names the engine handles without a builtin entry.
const SPECIAL_CALLS: &[&str] = &["print"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub severity: Severity,
    /// Stable identifier: `syntax`, `compile`, `forbidden_builtin`,
    /// `unknown_builtin`, `unused_rule`, or a fmt check.
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev}[{}]: {}",
            self.file, self.line, self.col, self.code, self.message
        )
    }
}

fn forbidden(name: &str) -> Option<&'static str> {
    FORBIDDEN
        .iter()
        .find(|(n, _)| {
            if n.ends_with('.') {
                name.starts_with(n)
            } else {
                name == *n
            }
        })
        .map(|(_, why)| *why)
}

/// Expands an import alias at the head of a path.
fn resolve(path: &[String], file: &ParsedFile) -> Vec<String> {
    match file.aliases.iter().find(|(a, _)| *a == path[0]) {
        Some((_, target)) => target.iter().chain(&path[1..]).cloned().collect(),
        None => path.to_vec(),
    }
}

/// Every `(package, rule)` a reference may name: the bare name in the
/// referring package, or each prefix of a `data.` path.
/// A rule name may itself be dotted (`result["allowed"] := ...` defines
/// `result.allowed`), so every dotted prefix of the rest is a candidate.
fn targets(path: &[String], package: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if path[0] == "data" {
        for cut in 2..path.len() {
            for end in cut + 1..=path.len() {
                out.push((path[1..cut].join("."), path[cut..end].join(".")));
            }
        }
    } else {
        for end in 1..=path.len() {
            out.push((package.to_string(), path[..end].join(".")));
        }
    }
    out
}

/// Whether a rule named `name` in `package` is reached by a reference to
/// `(package, referenced)`: the same rule, a rule below it (`result`
/// reaches `result.allowed`) or above it.
fn reaches(referenced: &HashSet<(String, String)>, package: &str, name: &str) -> bool {
    referenced.iter().any(|(p, n)| {
        p == package
            && (n == name
                || name
                    .strip_prefix(n.as_str())
                    .is_some_and(|r| r.starts_with('.'))
                || n.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
    })
}

/// Lints the files of a set (tests included, so that their syntax and
/// builtins are checked too). `entry` is the decision rule as a `data.`
/// path.
pub fn lint(origin: &str, files: Vec<SourceFile>, entry: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut parsed = Vec::new();
    for f in files.iter().filter(|f| f.rel.ends_with(".rego")) {
        match parse_file(f) {
            Ok(p) => parsed.push(p),
            Err(e) => findings.push(Finding {
                file: e.file,
                line: e.line,
                col: e.col,
                severity: Severity::Error,
                code: "syntax",
                message: e.message,
            }),
        }
    }
    if !findings.is_empty() {
        // Nothing further is reliable until the files parse.
        return findings;
    }
    // The set compiles as served (tests left out), for its entry point.
    let served: Vec<SourceFile> = files
        .iter()
        .filter(|f| !f.rel.ends_with("_test.rego"))
        .map(|f| SourceFile {
            rel: f.rel.clone(),
            shown: f.shown.clone(),
            text: f.text.clone(),
        })
        .collect();
    if let Err(e) = compile_files_for(entry, origin.to_string(), served) {
        let first = files.first().map(|f| f.shown.clone()).unwrap_or_default();
        let mut located = syntax_error(&first, &e);
        if !format!("{e:#}").contains("-->") {
            located.message = format!("{e:#}");
        }
        findings.push(Finding {
            file: located.file,
            line: located.line,
            col: located.col,
            severity: Severity::Error,
            code: "compile",
            message: located.message,
        });
    }

    // Every rule defined, and every function defined (calls to these are
    // not builtins).
    let defined: HashSet<(String, String)> = parsed
        .iter()
        .flat_map(|f| f.rules.iter().map(|r| (r.package.clone(), r.name.clone())))
        .collect();
    // References made by served files.
    let mut referenced: HashSet<(String, String)> = HashSet::new();
    let entry_path = entry.strip_prefix("data.").unwrap_or(entry);
    if let Some((pkg, rule)) = entry_path.rsplit_once('.') {
        referenced.insert((pkg.to_string(), rule.to_string()));
    }
    for f in &parsed {
        for r in &f.rules {
            for (i, reference) in r.refs.iter().enumerate() {
                // Skip the head's own name.
                if i == 0 && reference.path[0] == r.name {
                    continue;
                }
                let path = resolve(&reference.path, f);
                let names = targets(&path, &f.package);
                let is_user = names.iter().any(|n| defined.contains(n));
                if !f.is_test {
                    referenced.extend(names);
                }
                if !reference.call || is_user {
                    continue;
                }
                let name = path.join(".");
                if let Some(why) = forbidden(&name) {
                    findings.push(Finding {
                        file: f.shown.clone(),
                        line: reference.line,
                        col: reference.col,
                        severity: Severity::Error,
                        code: "forbidden_builtin",
                        message: format!("{name} is not allowed in rempart policies: {why}"),
                    });
                } else if !BUILTINS.contains_key(name.as_str())
                    && !SPECIAL_CALLS.contains(&name.as_str())
                {
                    findings.push(Finding {
                        file: f.shown.clone(),
                        line: reference.line,
                        col: reference.col,
                        severity: Severity::Error,
                        code: "unknown_builtin",
                        message: format!(
                            "{name} is neither a rule of the set nor a builtin regorus implements"
                        ),
                    });
                }
            }
        }
    }
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    for f in parsed.iter().filter(|f| !f.is_test) {
        for r in &f.rules {
            let key = (r.package.clone(), r.name.clone());
            if r.name.starts_with("test_") || reaches(&referenced, &r.package, &r.name) {
                continue;
            }
            if !reported.insert(key) {
                continue;
            }
            let what = if r.shape == RuleShape::Function {
                "function"
            } else {
                "rule"
            };
            findings.push(Finding {
                file: f.shown.clone(),
                line: r.line,
                col: r.col,
                severity: Severity::Warning,
                code: "unused_rule",
                message: format!(
                    "{what} data.{}.{} is defined but never used by {entry} nor by another rule",
                    r.package, r.name
                ),
            });
        }
    }
    findings.sort();
    findings.dedup();
    findings
}

/// Lines (1-based) inside a multi-line raw string, which fmt must not touch.
fn raw_string_lines(f: &SourceFile) -> HashSet<u32> {
    let mut out = HashSet::new();
    let Ok(source) = Source::from_contents(f.shown.clone(), f.text.clone()) else {
        return out;
    };
    let mut lexer = Lexer::new(&source);
    while let Ok(tok) = lexer.next_token() {
        match tok.0 {
            TokenKind::Eof => break,
            TokenKind::RawString => {
                let lines = tok.1.text().matches('\n').count() as u32;
                for l in tok.1.line..=tok.1.line + lines {
                    out.insert(l);
                }
            }
            _ => {}
        }
    }
    out
}

/// Checks one file's layout; returns the findings and the fixed text.
pub fn fmt_file(f: &SourceFile) -> (Vec<Finding>, String) {
    let raw = raw_string_lines(f);
    let mut findings = Vec::new();
    let mut out = String::with_capacity(f.text.len());
    let mut blank_run = 0;
    let mut finding = |line: u32, col: u32, code: &'static str, message: &str| {
        findings.push(Finding {
            file: f.shown.clone(),
            line,
            col,
            severity: Severity::Warning,
            code,
            message: message.to_string(),
        })
    };
    let text = &f.text;
    let lines: Vec<&str> = text.split('\n').collect();
    // split('\n') of "a\n" gives ["a", ""]: the last element is what
    // follows the final newline.
    let last = lines.len() - 1;
    for (i, line) in lines.iter().enumerate() {
        let n = i as u32 + 1;
        if i == last {
            if !line.is_empty() {
                finding(
                    n,
                    line.len() as u32 + 1,
                    "final_newline",
                    "no newline at end of file",
                );
                out.push_str(line.trim_end());
                out.push('\n');
            }
            break;
        }
        if raw.contains(&n) {
            out.push_str(line);
            out.push('\n');
            blank_run = 0;
            continue;
        }
        let mut l = *line;
        if let Some(stripped) = l.strip_suffix('\r') {
            finding(n, l.len() as u32, "crlf", "line ends with CR LF; use LF");
            l = stripped;
        }
        let trimmed = l.trim_end();
        if trimmed.len() != l.len() {
            finding(
                n,
                trimmed.len() as u32 + 1,
                "trailing_whitespace",
                "trailing whitespace",
            );
        }
        let indent: &str = &trimmed[..trimmed.len() - trimmed.trim_start().len()];
        if indent.contains(' ') {
            finding(
                n,
                1,
                "indent",
                "indentation with spaces; Rego is indented with tabs (not fixed by fmt)",
            );
        }
        if trimmed.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                finding(n, 1, "blank_lines", "more than one blank line in a row");
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(trimmed);
        out.push('\n');
    }
    // Blank lines at the end of the file.
    while out.ends_with("\n\n") {
        out.pop();
        finding(
            lines.len() as u32,
            1,
            "blank_lines",
            "blank lines at end of file",
        );
    }
    (findings, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(rel: &str, text: &str) -> SourceFile {
        SourceFile {
            rel: rel.into(),
            shown: format!("dir/{rel}"),
            text: text.into(),
        }
    }

    #[test]
    fn fmt_fixes_layout_but_not_raw_strings() {
        let f = file(
            "a.rego",
            "package a  \r\n\n\n\nx := `keep  \nthis  `\n  y := 1\n\n",
        );
        let (findings, fixed) = fmt_file(&f);
        assert_eq!(fixed, "package a\n\nx := `keep  \nthis  `\n  y := 1\n");
        let codes: Vec<_> = findings.iter().map(|f| f.code).collect();
        assert!(codes.contains(&"crlf"));
        assert!(codes.contains(&"trailing_whitespace"));
        assert!(codes.contains(&"blank_lines"));
        assert!(codes.contains(&"indent"));
        let (again, same) = fmt_file(&file("a.rego", &fixed));
        assert_eq!(same, fixed);
        assert_eq!(again.iter().filter(|f| f.code != "indent").count(), 0);
    }

    #[test]
    fn unused_rules_and_builtins() {
        let files = vec![file(
            "a.rego",
            "package rempart\nimport rego.v1\n\ndecision := {\"allow\": allow}\n\n\
             allow if helper(input.x)\n\nhelper(x) if x == 1\n\nlonely if true\n\n\
             test_it if true\n\nbad if http.send({})\n\nnope if no.such_fn(1)\n",
        )];
        let found = lint("t", files, "data.rempart.decision");
        let summary: Vec<_> = found.iter().map(|f| (f.code, f.line)).collect();
        assert!(summary.contains(&("unused_rule", 10)), "{found:?}");
        assert!(summary.contains(&("forbidden_builtin", 14)), "{found:?}");
        assert!(summary.contains(&("unknown_builtin", 16)), "{found:?}");
        assert!(!summary.contains(&("unused_rule", 6)), "{found:?}");
        assert!(!summary.contains(&("unused_rule", 8)), "{found:?}");
        assert!(!summary.contains(&("unused_rule", 12)), "{found:?}");
    }
}
