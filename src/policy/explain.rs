//! `rempart policy eval --explain`: which `deny`, `warn` and `allow`
//! definitions fired for one input, where they are written, and the input
//! values they read.
//!
//! regorus 0.14 gives no per-rule trace (its `explanations` types have no
//! producer yet, and coverage is per line). So each definition is asked
//! directly: every definition of a decision rule is copied, under a fresh
//! name and with its file's package and imports, into an extra module
//! compiled with the set, and the copy is evaluated on the input. A copy
//! with a value fired; its value is what that one definition contributed.
//! That is exact for the definition's own body (same package, imports,
//! data and input), and costs one evaluation per definition, which is fine
//! for a command run by hand and never done on the request path.
//!
//! "The input values it looked at" are the `input.…` references written in
//! the definition's body and in the helper rules and functions of the
//! same package it names, transitively, each read from the input given.

use std::collections::{BTreeSet, HashMap};

use regorus::Value;
use serde::Serialize;

use super::analysis::{lookup, parse_file, ParsedFile, RuleDef, RuleShape};
use super::load::{compile_files_for, SourceFile};

/// Rules whose definitions an explanation reports, besides the entry
/// point's own rule name (e.g. `allow` of `data.envoy.authz.allow`).
const DECISION_RULES: &[&str] = &["deny", "warn", "allow"];

/// A family of reasons that a gated `deny`/`warn` definition reads
/// (`egress_deny`, `access_warn`: see policies/egress.rego), reported as
/// the reasons themselves.
fn feeds_decision(name: &str) -> bool {
    name.ends_with("_deny") || name.ends_with("_warn")
}

/// Name given to the copy of definition `i`.
const COPY_PREFIX: &str = "__rempart_explain_";

#[derive(Debug, Serialize)]
pub struct InputRead {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub absent: bool,
}

#[derive(Debug, Serialize)]
pub struct Fired {
    pub rule: String,
    pub file: String,
    pub line: u32,
    /// What this definition contributed: the reasons it added to a set, or
    /// its value for a complete rule.
    pub result: serde_json::Value,
    pub input: Vec<InputRead>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// How the definitions were evaluated.
    pub engine: &'static str,
    pub fired: Vec<Fired>,
    /// `file:line rule` of every decision definition that did not fire.
    pub not_fired: Vec<String>,
}

fn to_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// `data.envoy.authz.allow` -> (`envoy.authz`, `allow`).
fn split_entry(entry: &str) -> (String, String) {
    let path = entry.strip_prefix("data.").unwrap_or(entry);
    match path.rsplit_once('.') {
        Some((pkg, rule)) => (pkg.to_string(), rule.to_string()),
        None => (String::new(), path.to_string()),
    }
}

/// Input paths read by `def` and the rules it names, transitively.
fn input_paths(def: &RuleDef, file: &ParsedFile, all: &[ParsedFile]) -> Vec<Vec<String>> {
    let mut by_name: HashMap<(&str, &str), Vec<(&RuleDef, &ParsedFile)>> = HashMap::new();
    for f in all {
        for r in &f.rules {
            by_name
                .entry((r.package.as_str(), r.name.as_str()))
                .or_default()
                .push((r, f));
        }
    }
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut paths: Vec<Vec<String>> = Vec::new();
    let mut stack: Vec<(&RuleDef, &ParsedFile)> = vec![(def, file)];
    seen.insert((def.package.clone(), def.name.clone()));
    while let Some((rule, in_file)) = stack.pop() {
        for (i, r) in rule.refs.iter().enumerate() {
            // The head's own name is not a read.
            if i == 0 && r.path.first().is_some_and(|p| *p == rule.name) {
                continue;
            }
            let mut path = r.path.clone();
            if let Some((_, target)) = in_file.aliases.iter().find(|(a, _)| *a == path[0]) {
                let mut full = target.clone();
                full.extend(path.drain(1..));
                path = full;
            }
            if path[0] == "input" {
                if !paths.contains(&path) {
                    paths.push(path);
                }
                continue;
            }
            // A rule of this package by its bare name, or any rule by its
            // data path (data.pkg.rule, possibly followed by fields).
            let mut candidates = vec![(rule.package.clone(), path[0].clone())];
            if path[0] == "data" {
                for cut in 2..path.len() {
                    candidates.push((path[1..cut].join("."), path[cut].clone()));
                }
            }
            for (pkg, name) in candidates {
                if let Some(defs) = by_name.get(&(pkg.as_str(), name.as_str())) {
                    if seen.insert((pkg.clone(), name.clone())) {
                        stack.extend(defs.iter().copied());
                    }
                }
            }
        }
    }
    paths
}

/// Explains the decision of `entry` on `input` for the serving files of a set.
pub fn explain(
    origin: &str,
    files: Vec<SourceFile>,
    entry: &str,
    input: &serde_json::Value,
) -> anyhow::Result<Explanation> {
    let (entry_pkg, entry_rule) = split_entry(entry);
    let mut parsed = Vec::new();
    for f in files.iter().filter(|f| f.rel.ends_with(".rego")) {
        parsed.push(parse_file(f).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    // The definitions to ask about, and one copy module per definition.
    let mut targets: Vec<(usize, usize)> = Vec::new();
    let mut copies = Vec::new();
    for (fi, f) in parsed.iter().enumerate() {
        if f.package != entry_pkg {
            continue;
        }
        for (ri, r) in f.rules.iter().enumerate() {
            // rempart's own `decision` only gathers deny and warn: its
            // value is the decision printed anyway.
            let wanted = DECISION_RULES.contains(&r.name.as_str())
                || (feeds_decision(&r.name) && r.shape == RuleShape::PartialSet)
                || (r.name == entry_rule && entry != super::ENTRY_POINT);
            if !wanted || matches!(r.shape, RuleShape::Default | RuleShape::Function) {
                continue;
            }
            // A gate (`deny contains r if { cond; some r in egress_deny }`)
            // passes on what its family's definitions give: those are
            // reported one by one instead.
            let gate = DECISION_RULES.contains(&r.name.as_str())
                && r.refs
                    .iter()
                    .any(|x| x.path.len() == 1 && feeds_decision(&x.path[0]));
            if gate {
                continue;
            }
            let Some(rest) = r.text.strip_prefix(r.name.as_str()) else {
                continue;
            };
            let n = targets.len();
            targets.push((fi, ri));
            copies.push(SourceFile {
                rel: format!(".explain/{n}.rego"),
                shown: format!("<explain>/{n}.rego"),
                text: format!(
                    "package {}\n{}\n{COPY_PREFIX}{n}{rest}\n",
                    f.package,
                    f.imports.join("\n")
                ),
            });
        }
    }
    let mut all = files;
    all.extend(copies);
    let set = compile_files_for(entry, origin.to_string(), all)?;
    let input_value = Value::from(input.clone());
    let mut fired = Vec::new();
    let mut not_fired = Vec::new();
    for (n, (fi, ri)) in targets.iter().enumerate() {
        let (f, r) = (&parsed[*fi], &parsed[*fi].rules[*ri]);
        let value = set
            .eval_rule(
                &format!("data.{}.{COPY_PREFIX}{n}", f.package),
                Some(input_value.clone()),
            )
            .map_err(|e| anyhow::anyhow!("{}:{} {}: {e}", f.shown, r.line, r.name))?;
        let did_fire = match &value {
            Value::Undefined => false,
            Value::Set(s) => !s.is_empty(),
            Value::Object(o) if r.shape == RuleShape::PartialObject => !o.is_empty(),
            _ => true,
        };
        if !did_fire {
            not_fired.push(format!("{}:{} {}", f.shown, r.line, r.name));
            continue;
        }
        let input = input_paths(r, f, &parsed)
            .into_iter()
            .map(|p| {
                let found = lookup(&input_value, &p[1..]);
                InputRead {
                    path: p.join("."),
                    value: found.map(to_json),
                    absent: found.is_none(),
                }
            })
            .collect();
        fired.push(Fired {
            rule: r.name.clone(),
            file: f.shown.clone(),
            line: r.line,
            result: to_json(&value),
            input,
        });
    }
    Ok(Explanation {
        engine: "interpreter, one evaluation per definition",
        fired,
        not_fired,
    })
}
