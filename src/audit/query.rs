//! `rempart audit query`: the questions a DPO asks of the local trail
//! ("who exported contacts last month", "every request that went to a
//! non-EU operator this week"), answered as JSON lines.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;

use super::files::open_lines;

/// Every filter is optional; a record must match all that are given.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// `decision.outcome`: allowed, denied, monitored, error.
    pub outcome: Option<String>,
    pub subject: Option<String>,
    /// `destination.geo.country` (ISO code, case-insensitive).
    pub country: Option<String>,
    /// `destination.geo.operator` (registry id).
    pub operator: Option<String>,
    /// `destination.geo.sovereign` verdict, e.g. `outside_eu`.
    pub sovereign: Option<String>,
    pub method: Option<String>,
    /// Prefix of `request.path`.
    pub path_prefix: Option<String>,
    pub direction: Option<String>,
}

impl Filter {
    pub fn matches(&self, v: &serde_json::Value) -> bool {
        // Records about the trail itself (checkpoint, loss, repair) are
        // not decisions.
        if v.get("type").is_some() || v.get("decision_id").is_none() {
            return false;
        }
        let str_at = |path: &str| v.pointer(path).and_then(|x| x.as_str());
        let eq = |want: &Option<String>, path: &str, fold: bool| {
            want.as_ref().is_none_or(|w| {
                str_at(path).is_some_and(|got| {
                    if fold {
                        got.eq_ignore_ascii_case(w)
                    } else {
                        got == w
                    }
                })
            })
        };
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = str_at("/timestamp").and_then(|t| humantime::parse_rfc3339(t).ok())
            else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        eq(&self.outcome, "/decision/outcome", false)
            && eq(&self.subject, "/identity/subject", false)
            && eq(&self.country, "/destination/geo/country", true)
            && eq(&self.operator, "/destination/geo/operator", false)
            && eq(&self.sovereign, "/destination/geo/sovereign", false)
            && eq(&self.method, "/request/method", true)
            && eq(&self.direction, "/direction", false)
            && self.path_prefix.as_ref().is_none_or(|p| {
                str_at("/request/path").is_some_and(|got| got.starts_with(p.as_str()))
            })
    }
}

/// Writes the matching records of `files` (in order) to `out`, as they are
/// in the trail; returns how many matched.
pub fn query(files: &[PathBuf], filter: &Filter, out: &mut dyn Write) -> anyhow::Result<u64> {
    let mut matched = 0;
    for path in files {
        let reader = open_lines(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (i, line) in reader.lines().enumerate() {
            let line =
                line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
            // A torn last line (crash mid-write) is skipped, like any
            // line that does not parse; `audit verify` reports it.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if filter.matches(&v) {
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")?;
                matched += 1;
            }
        }
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_combine() {
        let rec = serde_json::json!({
            "decision_id": "x", "timestamp": "2026-11-20T10:00:00Z", "direction": "ingress",
            "request": {"method": "GET", "path": "/api/contacts/export"},
            "identity": {"subject": "bob"},
            "decision": {"outcome": "allowed"},
            "destination": {"geo": {"country": "US", "operator": "amazon", "sovereign": "outside_eu"}}
        });
        let f = |f: Filter| f.matches(&rec);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            subject: Some("bob".into()),
            country: Some("us".into()),
            path_prefix: Some("/api/contacts".into()),
            since: humantime::parse_rfc3339("2026-11-01T00:00:00Z").ok(),
            until: humantime::parse_rfc3339("2026-12-01T00:00:00Z").ok(),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            subject: Some("alice".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            until: humantime::parse_rfc3339("2026-11-20T10:00:00Z").ok(),
            ..Filter::default()
        }));
        assert!(!Filter::default().matches(&serde_json::json!({"type": "checkpoint"})));
    }
}
