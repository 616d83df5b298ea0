//! `rempart audit query`: the questions a DPO asks of the local trail
//! ("who exported contacts last month", "every request that went to a
//! non-EU operator this week"), answered as JSON lines or as a table.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use std::sync::Arc;

use anyhow::Context;

use super::files::open_lines;
use crate::geo::registry::Registry;

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
    /// `destination.geo.jurisdiction`: the country whose law governs the
    /// destination's operator (ISO code, case-insensitive).
    pub jurisdiction: Option<String>,
    /// Only destinations run by a known operator that is not an EU one,
    /// wherever the address is (see [`non_eu_operator`]); the registry
    /// gives the EEA countries.
    pub non_eu_operator: Option<Arc<Registry>>,
    pub method: Option<String>,
    /// Prefix of `request.path`.
    pub path_prefix: Option<String>,
    pub direction: Option<String>,
    /// `resource.type` (e.g. `contact`).
    pub resource_type: Option<String>,
    /// `resource.id`.
    pub resource_id: Option<String>,
    /// `resource.operation` (e.g. `export`).
    pub operation: Option<String>,
}

/// How matching records are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Each record as it is in the trail, one JSON object a line.
    #[default]
    Json,
    /// One aligned line a record with the fields a DPO reads first.
    Table,
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
            && eq(&self.jurisdiction, "/destination/geo/jurisdiction", true)
            && self
                .non_eu_operator
                .as_ref()
                .is_none_or(|r| non_eu_operator(v, r))
            && eq(&self.method, "/request/method", true)
            && eq(&self.direction, "/direction", false)
            && eq(&self.resource_type, "/resource/type", false)
            && eq(&self.resource_id, "/resource/id", false)
            && eq(&self.operation, "/resource/operation", false)
            && self.path_prefix.as_ref().is_none_or(|p| {
                str_at("/request/path").is_some_and(|got| got.starts_with(p.as_str()))
            })
    }
}

/// True when the record's destination is run by a known operator that is
/// not an EU one: under the law of a country outside the EEA, or exposed to
/// the US CLOUD Act, wherever the address is (in the EU that is the verdict
/// `non_eu_operator_in_eu`; outside, the verdict is `outside_eu` whoever
/// runs it, so the operator is read). A destination whose operator is
/// unknown does not match.
fn non_eu_operator(v: &serde_json::Value, registry: &Registry) -> bool {
    let Some(geo) = v.pointer("/destination/geo") else {
        return false;
    };
    if geo.get("sovereign").and_then(|s| s.as_str()) == Some(crate::geo::NON_EU_OPERATOR_IN_EU) {
        return true;
    }
    let Some(jurisdiction) = geo.get("jurisdiction").and_then(|j| j.as_str()) else {
        return false;
    };
    !registry.in_eea(&jurisdiction.to_ascii_uppercase())
        || geo.get("cloud_act").and_then(|c| c.as_bool()) == Some(true)
}

/// Writes the matching records of `files` (in order) to `out`, as they are
/// in the trail or as table rows; returns how many matched.
pub fn query(
    files: &[PathBuf],
    filter: &Filter,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut matched = 0;
    if format == Format::Table {
        writeln!(out, "{}", table_row(&TABLE_HEADER.map(String::from)))?;
    }
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
                match format {
                    Format::Json => writeln!(out, "{line}")?,
                    Format::Table => writeln!(out, "{}", table_row(&table_cells(&v)))?,
                }
                matched += 1;
            }
        }
    }
    Ok(matched)
}

const TABLE_HEADER: [&str; 8] = [
    "TIME",
    "DIR",
    "OUTCOME",
    "SUBJECT",
    "REQUEST",
    "RESOURCE",
    "DESTINATION",
    "REASONS",
];

/// Fixed widths keep rows aligned without reading the whole trail first;
/// the last column is not cut.
const TABLE_WIDTHS: [usize; 7] = [20, 7, 9, 16, 40, 24, 28];

fn table_row(cells: &[String; 8]) -> String {
    let mut row = String::new();
    for (cell, width) in cells.iter().zip(TABLE_WIDTHS) {
        let shown: String = if cell.chars().count() > width {
            cell.chars()
                .take(width.saturating_sub(1))
                .chain(['…'])
                .collect()
        } else {
            cell.clone()
        };
        row.push_str(&format!("{shown:<width$} "));
    }
    row.push_str(&cells[7]);
    row
}

fn table_cells(v: &serde_json::Value) -> [String; 8] {
    let s = |path: &str| {
        v.pointer(path)
            .and_then(|x| x.as_str())
            .unwrap_or("-")
            .to_string()
    };
    // Second precision is enough to read; the JSON form keeps the rest.
    let time: String = s("/timestamp").chars().take(19).collect();
    let request = match v.pointer("/request/path").and_then(|p| p.as_str()) {
        Some(p) if !p.is_empty() => format!("{} {p}", s("/request/method")),
        _ => format!("{} {}", s("/request/method"), s("/request/host")),
    };
    let resource = match v.pointer("/resource/id").and_then(|x| x.as_str()) {
        Some(id) => format!("{} {}/{id}", s("/resource/operation"), s("/resource/type")),
        None => format!("{} {}", s("/resource/operation"), s("/resource/type")),
    };
    let destination = format!(
        "{} {} {}",
        s("/destination/host"),
        s("/destination/geo/country"),
        s("/destination/geo/operator")
    );
    let reasons: Vec<&str> = ["/decision/deny", "/decision/warn"]
        .iter()
        .filter_map(|p| v.pointer(p).and_then(|x| x.as_array()))
        .flatten()
        .filter_map(|r| r.get("code").and_then(|c| c.as_str()))
        .collect();
    [
        time,
        s("/direction"),
        s("/decision/outcome"),
        s("/identity/subject"),
        request,
        resource,
        destination,
        if reasons.is_empty() {
            "-".to_string()
        } else {
            reasons.join(",")
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_combine() {
        let rec = serde_json::json!({
            "decision_id": "x", "timestamp": "2026-11-20T10:00:00Z", "direction": "ingress",
            "request": {"method": "GET", "path": "/api/contacts/export"},
            "resource": {"crm": "generic", "type": "contacts", "id": null, "operation": "export", "bulk": true},
            "identity": {"subject": "bob"},
            "decision": {"outcome": "allowed"},
            "destination": {"geo": {"country": "US", "operator": "amazon", "jurisdiction": "US", "sovereign": "outside_eu"}}
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
        // "Who exported contacts": resource filters.
        assert!(f(Filter {
            resource_type: Some("contacts".into()),
            operation: Some("export".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            operation: Some("delete".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            resource_id: Some("42".into()),
            ..Filter::default()
        }));
        // Operators: by jurisdiction, and "non-EU" inside and outside the EU.
        let registry = Arc::new(Registry::builtin().unwrap());
        let non_eu = || Filter {
            non_eu_operator: Some(Arc::clone(&registry)),
            ..Filter::default()
        };
        assert!(f(Filter {
            jurisdiction: Some("us".into()),
            ..Filter::default()
        }));
        assert!(f(non_eu()), "a US operator");
        let with_geo = |geo: serde_json::Value| {
            let mut r = rec.clone();
            r["destination"]["geo"] = geo;
            non_eu().matches(&r)
        };
        assert!(with_geo(
            serde_json::json!({"country": "US", "operator": "amazon",
            "jurisdiction": "US", "cloud_act": true, "sovereign": "outside_eu"})
        ));
        assert!(with_geo(
            serde_json::json!({"country": "DE", "operator": "amazon",
            "jurisdiction": "US", "cloud_act": true, "sovereign": "non_eu_operator_in_eu"})
        ));
        assert!(!with_geo(
            serde_json::json!({"country": "FR", "operator": "ovh",
            "jurisdiction": "FR", "cloud_act": false, "sovereign": "eu_operated_in_eu"})
        ));
        assert!(!with_geo(
            serde_json::json!({"country": "CA", "operator": "ovh",
            "jurisdiction": "FR", "cloud_act": false, "sovereign": "outside_eu"})
        ));
        assert!(!with_geo(
            serde_json::json!({"country": "US", "operator": null,
            "jurisdiction": null, "sovereign": "outside_eu"})
        ));
        let cells = table_cells(&rec);
        assert_eq!(cells[3], "bob");
        assert_eq!(cells[4], "GET /api/contacts/export");
        assert_eq!(cells[5], "export contacts");
    }
}
