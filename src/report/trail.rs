//! What the audit trail shows over a period, aggregated in one pass with
//! bounded memory: where forwarded data went (country, operator, law),
//! what was refused and why, and who touched what.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use crate::audit::query::Filter;
use crate::geo::registry::Registry;

/// Distinct keys kept per table (destinations, reasons, subjects, hosts);
/// later keys are folded into one "other" row.
pub const MAX_ROWS: usize = 200;
/// Example decision ids kept per row.
const EXAMPLES: usize = 3;
pub const OTHER: &str = "other";

/// Requests, and for egress tunnels the bytes they carried.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Flow {
    pub requests: u64,
    pub bytes: u64,
}

impl Flow {
    fn add(&mut self, requests: u64, bytes: u64) {
        self.requests += requests;
        self.bytes += bytes;
    }
}

/// Forwarded traffic (outcome allowed or monitored: the data went) by
/// where it went.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Forwarded {
    /// Destination located in an EU member state.
    pub eu: Flow,
    /// Located outside the EU.
    pub non_eu: Flow,
    /// Public destination that could not be located.
    pub unknown: Flow,
    /// Private or loopback destination with no location (not judged).
    pub local: Flow,
    /// To an operator exposed to the US CLOUD Act (the US hyperscalers).
    pub cloud_act: Flow,
    /// To an operator under a non-EEA law (CLOUD Act or other).
    pub non_eu_jurisdiction: Flow,
    /// Monitored: forwarded although the policy denied it (monitor mode).
    pub monitored: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct DestinationRow {
    pub direction: String,
    pub country: Option<String>,
    pub operator: Option<String>,
    pub jurisdiction: Option<String>,
    pub cloud_act: Option<bool>,
    pub sovereign: String,
    pub hosts: BTreeSet<String>,
    pub requests: u64,
    pub forwarded: u64,
    pub denied: u64,
    pub bytes: u64,
    /// Decisions that were not simply allowed: denied, monitored, error.
    pub examples: Vec<String>,
    /// Forwarded decisions whose data left the EU or its law (outside the
    /// EU, unknown location, an operator under non-EU law or the CLOUD
    /// Act): the requests that cost the observed criteria their points.
    pub forwarded_examples: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ReasonRow {
    pub code: String,
    pub direction: String,
    /// Reasons of requests that were blocked.
    pub denied: u64,
    /// Deny reasons monitor mode let through.
    pub monitored: u64,
    /// Warn reasons.
    pub warned: u64,
    pub examples: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SubjectRow {
    pub subject: String,
    pub requests: u64,
    pub denied: u64,
    /// Requests that change data (POST, PUT, PATCH, DELETE).
    pub writes: u64,
    /// Requests whose path says export.
    pub exports: u64,
    /// The first two path segments touched, with counts (up to 5 kept).
    pub resources: BTreeMap<String, u64>,
}

/// Every destination address a host was seen resolving to, by country.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HostAddresses {
    pub host: String,
    pub countries: BTreeSet<String>,
    pub addresses: BTreeSet<String>,
    /// Forwarded decisions to this host that listed an address outside
    /// the EU or of unknown location.
    pub examples: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Observations {
    pub files: Vec<String>,
    /// Decision records in the period (tunnel closing records excluded).
    pub decisions: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    /// direction -> outcome -> count.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    pub forwarded: Forwarded,
    /// Ingress requests with an authenticated subject.
    pub ingress_authenticated: u64,
    pub ingress_total: u64,
    pub destinations: Vec<DestinationRow>,
    pub reasons: Vec<ReasonRow>,
    pub subjects: Vec<SubjectRow>,
    /// Hosts with forwarded traffic, with every address seen (redundancy).
    pub hosts: Vec<HostAddresses>,
    /// Lines that were not JSON (a torn last line).
    pub unreadable_lines: u64,
    /// True when reading stopped at the record cap.
    pub truncated: bool,
}

/// Accumulates records; [`Aggregator::finish`] turns the maps into rows.
pub struct Aggregator<'r> {
    registry: &'r Registry,
    filter: Filter,
    max_records: Option<u64>,
    obs: Observations,
    destinations: BTreeMap<String, DestinationRow>,
    reasons: BTreeMap<(String, String), ReasonRow>,
    subjects: BTreeMap<String, SubjectRow>,
    hosts: BTreeMap<String, HostAddresses>,
    /// Sync mode's pending records, counted only if no complete record
    /// follows (see [`crate::audit::exchange`]).
    pending: crate::audit::exchange::Pending<Value>,
}

fn bounded<V: Default>(map: &mut BTreeMap<String, V>, key: String) -> &mut V {
    if map.len() >= MAX_ROWS && !map.contains_key(&key) {
        return map.entry(OTHER.to_string()).or_default();
    }
    map.entry(key).or_default()
}

fn example(list: &mut Vec<String>, id: &str) {
    if list.len() < EXAMPLES {
        list.push(id.to_string());
    }
}

impl<'r> Aggregator<'r> {
    pub fn new(registry: &'r Registry, filter: Filter, max_records: Option<u64>) -> Self {
        Aggregator {
            registry,
            filter,
            max_records,
            obs: Observations::default(),
            destinations: BTreeMap::new(),
            reasons: BTreeMap::new(),
            subjects: BTreeMap::new(),
            hosts: BTreeMap::new(),
            pending: crate::audit::exchange::Pending::default(),
        }
    }

    /// Reads every file in order (`.gz` accepted).
    pub fn read_files(&mut self, files: &[PathBuf]) -> anyhow::Result<()> {
        for path in files {
            self.obs.files.push(path.display().to_string());
            let reader = crate::audit::files::open_lines(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            for (i, line) in reader.lines().enumerate() {
                if self.obs.truncated {
                    return Ok(());
                }
                let line =
                    line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => self.add(&v),
                    Err(_) => self.obs.unreadable_lines += 1,
                }
            }
        }
        Ok(())
    }

    /// Takes one trail line, in trail order.
    pub fn add(&mut self, v: &Value) {
        if self.pending.take(v, || v.clone()) {
            self.count(v);
        }
    }

    fn count(&mut self, v: &Value) {
        if !self.filter.matches(v) {
            return;
        }
        let s = |p: &str| v.pointer(p).and_then(Value::as_str);
        let id = s("/decision_id").unwrap_or_default();
        let direction = s("/direction").unwrap_or("ingress").to_string();
        let outcome = s("/decision/outcome").unwrap_or("error").to_string();
        let forwarded = matches!(outcome.as_str(), "allowed" | "monitored");
        let geo = v.pointer("/destination/geo").filter(|g| !g.is_null());
        let g = |k: &str| geo.and_then(|g| g.get(k)).and_then(Value::as_str);
        let country = g("country").map(str::to_string);
        let operator = g("operator").map(str::to_string);
        let jurisdiction = g("jurisdiction").map(str::to_string);
        let cloud_act = geo
            .and_then(|g| g.get("cloud_act"))
            .and_then(Value::as_bool);
        let sovereign = g("sovereign").unwrap_or(crate::geo::UNKNOWN).to_string();
        let host = s("/destination/host").unwrap_or_default().to_string();

        // The closing record of an egress tunnel: its bytes, not a new
        // decision.
        if let Some(t) = v.get("transfer").filter(|t| !t.is_null()) {
            let bytes = ["bytes_to_destination", "bytes_from_destination"]
                .iter()
                .filter_map(|k| t.get(*k).and_then(Value::as_u64))
                .sum::<u64>();
            if forwarded {
                self.classify(
                    0,
                    bytes,
                    country.as_deref(),
                    &sovereign,
                    cloud_act,
                    &jurisdiction,
                );
            }
            let key = format!("{direction}|{country:?}|{operator:?}|{sovereign}");
            bounded(&mut self.destinations, key).bytes += bytes;
            return;
        }

        if let Some(max) = self.max_records {
            if self.obs.decisions >= max {
                self.obs.truncated = true;
                return;
            }
        }
        self.obs.decisions += 1;
        if let Some(t) = s("/timestamp") {
            if self.obs.first.as_deref().is_none_or(|f| t < f) {
                self.obs.first = Some(t.to_string());
            }
            if self.obs.last.as_deref().is_none_or(|l| t > l) {
                self.obs.last = Some(t.to_string());
            }
        }
        *self
            .obs
            .outcomes
            .entry(direction.clone())
            .or_default()
            .entry(outcome.clone())
            .or_default() += 1;

        let mut left_eu = false;
        if forwarded {
            left_eu = self.classify(
                1,
                0,
                country.as_deref(),
                &sovereign,
                cloud_act,
                &jurisdiction,
            );
            if outcome == "monitored" {
                self.obs.forwarded.monitored += 1;
            }
            let registry = self.registry;
            let entry = bounded(&mut self.hosts, host.clone());
            entry.host.clone_from(&host);
            let mut outside = false;
            let mut add_address = |ip: Option<&str>, c: Option<&str>| {
                if let Some(ip) = ip {
                    if entry.addresses.len() < 16 {
                        entry.addresses.insert(ip.to_string());
                    }
                }
                outside |= c.is_none_or(|c| !registry.in_eu(c));
                entry
                    .countries
                    .insert(c.unwrap_or(crate::geo::UNKNOWN).to_string());
            };
            match v
                .pointer("/destination/addresses")
                .and_then(Value::as_array)
            {
                Some(list) if !list.is_empty() => {
                    for a in list {
                        add_address(
                            a.get("ip").and_then(Value::as_str),
                            a.pointer("/geo/country").and_then(Value::as_str),
                        );
                    }
                }
                _ => add_address(s("/destination/ip"), country.as_deref()),
            }
            // A local destination (no location) is not judged.
            if outside && sovereign != crate::geo::LOCAL {
                example(&mut entry.examples, id);
            }
        }

        let key = format!("{direction}|{country:?}|{operator:?}|{sovereign}");
        let row = bounded(&mut self.destinations, key);
        row.direction.clone_from(&direction);
        row.country.clone_from(&country);
        row.operator.clone_from(&operator);
        row.jurisdiction.clone_from(&jurisdiction);
        row.cloud_act = cloud_act;
        row.sovereign.clone_from(&sovereign);
        if row.hosts.len() < 5 && !host.is_empty() {
            row.hosts.insert(host.clone());
        }
        row.requests += 1;
        if forwarded {
            row.forwarded += 1;
        } else if outcome == "denied" {
            row.denied += 1;
        }
        if outcome != "allowed" {
            example(&mut row.examples, id);
        }
        if left_eu {
            example(&mut row.forwarded_examples, id);
        }

        for (kind, list) in [("deny", "/decision/deny"), ("warn", "/decision/warn")] {
            for r in v
                .pointer(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let code = r.get("code").and_then(Value::as_str).unwrap_or("?");
                let key = (code.to_string(), direction.clone());
                if self.reasons.len() >= MAX_ROWS && !self.reasons.contains_key(&key) {
                    continue;
                }
                let row = self.reasons.entry(key).or_default();
                row.code = code.to_string();
                row.direction.clone_from(&direction);
                match (kind, outcome.as_str()) {
                    ("warn", _) => row.warned += 1,
                    (_, "monitored") => row.monitored += 1,
                    _ => row.denied += 1,
                }
                example(&mut row.examples, id);
            }
        }

        if direction == "ingress" {
            self.obs.ingress_total += 1;
            let subject = s("/identity/subject");
            if subject.is_some() {
                self.obs.ingress_authenticated += 1;
            }
            let subject = subject.unwrap_or("(anonymous)").to_string();
            let row = bounded(&mut self.subjects, subject.clone());
            row.subject = subject;
            row.requests += 1;
            if outcome == "denied" {
                row.denied += 1;
            }
            let method = s("/request/method").unwrap_or_default();
            if matches!(method, "POST" | "PUT" | "PATCH" | "DELETE") {
                row.writes += 1;
            }
            let path = s("/request/path").unwrap_or_default();
            if path.contains("export") {
                row.exports += 1;
            }
            let resource: String = path
                .split('/')
                .filter(|x| !x.is_empty())
                .take(2)
                .collect::<Vec<_>>()
                .join("/");
            let resource = format!("/{resource}");
            if row.resources.len() < 5 || row.resources.contains_key(&resource) {
                *row.resources.entry(resource).or_default() += 1;
            }
        }
    }

    /// Counts forwarded traffic by where it went; true when it left the
    /// EU or its law (outside the EU, unknown location, an operator under
    /// non-EEA law or the CLOUD Act).
    fn classify(
        &mut self,
        requests: u64,
        bytes: u64,
        country: Option<&str>,
        sovereign: &str,
        cloud_act: Option<bool>,
        jurisdiction: &Option<String>,
    ) -> bool {
        let f = &mut self.obs.forwarded;
        let mut left = true;
        match country {
            _ if sovereign == crate::geo::LOCAL => {
                f.local.add(requests, bytes);
                left = false;
            }
            Some(c) if self.registry.in_eu(c) => {
                f.eu.add(requests, bytes);
                left = false;
            }
            Some(_) => f.non_eu.add(requests, bytes),
            None => f.unknown.add(requests, bytes),
        }
        if cloud_act == Some(true) {
            f.cloud_act.add(requests, bytes);
        }
        if jurisdiction
            .as_deref()
            .is_some_and(|j| !self.registry.in_eea(j))
            || cloud_act == Some(true)
        {
            f.non_eu_jurisdiction.add(requests, bytes);
            left = true;
        }
        left
    }

    pub fn finish(mut self) -> Observations {
        for v in std::mem::take(&mut self.pending).unsettled() {
            self.count(&v);
        }
        let mut destinations: Vec<DestinationRow> = self.destinations.into_values().collect();
        destinations.sort_by_key(|d| std::cmp::Reverse(d.requests));
        let mut reasons: Vec<ReasonRow> = self.reasons.into_values().collect();
        reasons.sort_by(|a, b| {
            (b.denied + b.monitored + b.warned).cmp(&(a.denied + a.monitored + a.warned))
        });
        let mut subjects: Vec<SubjectRow> = self.subjects.into_values().collect();
        subjects.sort_by_key(|s| std::cmp::Reverse(s.requests));
        self.obs.destinations = destinations;
        self.obs.reasons = reasons;
        self.obs.subjects = subjects;
        self.obs.hosts = self.hosts.into_values().collect();
        self.obs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A decision record as the trail holds it (the fields the report
    /// reads).
    fn record(id: &str, t: &str, outcome: &str, host: &str, geo: Value) -> Value {
        json!({
            "decision_id": id,
            "timestamp": t,
            "direction": "egress",
            "request": {"method": "CONNECT", "path": "/"},
            "decision": {"outcome": outcome, "deny": [], "warn": []},
            "destination": {"host": host, "ip": "192.0.2.1", "geo": geo},
        })
    }

    fn geo(
        country: Option<&str>,
        operator: Option<&str>,
        law: Option<&str>,
        sovereign: &str,
    ) -> Value {
        json!({
            "country": country,
            "operator": operator,
            "jurisdiction": law,
            "cloud_act": operator.map(|o| o == "amazon"),
            "sovereign": sovereign,
        })
    }

    fn fr() -> Value {
        geo(
            Some("FR"),
            Some("ovhcloud"),
            Some("FR"),
            "eu_operated_in_eu",
        )
    }
    fn us() -> Value {
        geo(Some("US"), None, None, "outside_eu")
    }
    fn amazon_de() -> Value {
        geo(
            Some("DE"),
            Some("amazon"),
            Some("US"),
            "non_eu_operator_in_eu",
        )
    }

    fn observe(records: &[Value], filter: Filter) -> Observations {
        let registry = Registry::builtin().unwrap();
        let mut agg = Aggregator::new(&registry, filter, None);
        for r in records {
            agg.add(r);
        }
        agg.finish()
    }

    fn row<'a>(obs: &'a Observations, country: &str) -> &'a DestinationRow {
        obs.destinations
            .iter()
            .find(|d| d.country.as_deref() == Some(country))
            .unwrap()
    }

    const T: &str = "2026-11-28T09:00:00Z";

    #[test]
    fn allowed_flows_that_left_the_eu_keep_their_decision_ids() {
        let obs = observe(
            &[
                record("eu-1", T, "allowed", "eu.test", fr()),
                record("us-1", T, "allowed", "us.test", us()),
                record("aws-1", T, "allowed", "s3.test", amazon_de()),
                record("us-2", T, "denied", "us.test", us()),
            ],
            Filter::default(),
        );
        let f = &obs.forwarded;
        // Amazon in Germany is in the EU by location, not by law.
        assert_eq!((f.eu.requests, f.non_eu.requests), (2, 1));
        assert_eq!(f.cloud_act.requests, 1);
        assert_eq!(f.non_eu_jurisdiction.requests, 1);
        // The denial is no forwarded traffic.
        assert_eq!(obs.decisions, 4);
        let us_row = row(&obs, "US");
        assert_eq!((us_row.forwarded, us_row.denied), (1, 1));
        assert_eq!(us_row.forwarded_examples, vec!["us-1"]);
        assert_eq!(us_row.examples, vec!["us-2"]);
        assert_eq!(row(&obs, "DE").forwarded_examples, vec!["aws-1"]);
        // Data that stayed in the EU with an EU operator is no evidence of
        // a loss.
        let fr_row = row(&obs, "FR");
        assert!(fr_row.forwarded_examples.is_empty() && fr_row.examples.is_empty());
    }

    #[test]
    fn monitored_and_unknown_flows_count_as_forwarded_local_ones_are_not_judged() {
        let unknown = geo(None, None, None, "unknown");
        let local = json!({"country": null, "sovereign": "local"});
        let obs = observe(
            &[
                record("m-1", T, "monitored", "us.test", us()),
                record("u-1", T, "allowed", "where.test", unknown),
                record("l-1", T, "allowed", "db.internal", local),
                record("e-1", T, "error", "us.test", us()),
            ],
            Filter::default(),
        );
        let f = &obs.forwarded;
        assert_eq!(f.monitored, 1);
        assert_eq!(
            (f.non_eu.requests, f.unknown.requests, f.local.requests),
            (1, 1, 1)
        );
        let us_row = row(&obs, "US");
        // Monitored: forwarded (it left) and not simply allowed (an example
        // of both kinds); an error is neither forwarded nor denied.
        assert_eq!(us_row.forwarded_examples, vec!["m-1"]);
        assert_eq!(us_row.examples, vec!["m-1", "e-1"]);
        assert_eq!(
            (us_row.forwarded, us_row.denied, us_row.requests),
            (1, 0, 2)
        );
        let unknown_row = obs
            .destinations
            .iter()
            .find(|d| d.sovereign == "unknown")
            .unwrap();
        assert_eq!(unknown_row.forwarded_examples, vec!["u-1"]);
        let local_row = obs
            .destinations
            .iter()
            .find(|d| d.sovereign == "local")
            .unwrap();
        assert!(local_row.forwarded_examples.is_empty());
    }

    #[test]
    fn tunnel_bytes_are_counted_where_they_went_without_a_new_decision() {
        let mut closing = record("us-1", T, "allowed", "us.test", us());
        closing["transfer"] = json!({"bytes_to_destination": 100, "bytes_from_destination": 23});
        let mut eu_closing = record("eu-1", T, "allowed", "eu.test", fr());
        eu_closing["transfer"] = json!({"bytes_to_destination": 300, "bytes_from_destination": 77});
        let mut denied_closing = record("us-2", T, "denied", "us.test", us());
        denied_closing["transfer"] =
            json!({"bytes_to_destination": 5, "bytes_from_destination": 0});
        let obs = observe(
            &[
                record("us-1", T, "allowed", "us.test", us()),
                closing,
                record("eu-1", T, "allowed", "eu.test", fr()),
                eu_closing,
                denied_closing,
            ],
            Filter::default(),
        );
        let f = &obs.forwarded;
        assert_eq!(obs.decisions, 2);
        assert_eq!((f.non_eu.requests, f.non_eu.bytes), (1, 123));
        assert_eq!((f.eu.requests, f.eu.bytes), (1, 377));
        // The closing record adds bytes to its row, not an example.
        assert_eq!(row(&obs, "US").forwarded_examples, vec!["us-1"]);
    }

    #[test]
    fn a_host_with_an_address_outside_the_eu_keeps_the_request_as_evidence() {
        let mut mixed = record("mix-1", T, "allowed", "mixed.test", fr());
        mixed["destination"]["addresses"] = json!([
            {"ip": "192.0.2.10", "geo": {"country": "FR"}},
            {"ip": "192.0.2.20", "geo": {"country": "US"}},
        ]);
        let mut replicated = record("rep-1", T, "allowed", "replicated.test", fr());
        replicated["destination"]["addresses"] = json!([
            {"ip": "192.0.2.30", "geo": {"country": "FR"}},
            {"ip": "192.0.2.31", "geo": {"country": "DE"}},
        ]);
        let obs = observe(&[mixed, replicated], Filter::default());
        let host = |h: &str| obs.hosts.iter().find(|x| x.host == h).unwrap();
        let m = host("mixed.test");
        assert_eq!(m.addresses.len(), 2);
        assert_eq!(
            m.countries.iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["FR", "US"]
        );
        assert_eq!(m.examples, vec!["mix-1"]);
        // Redundant inside the EU: no evidence of a loss.
        let r = host("replicated.test");
        assert_eq!(r.addresses.len(), 2);
        assert!(r.examples.is_empty());
        // The data itself went to France: the request is not a flow that
        // left the EU.
        assert!(row(&obs, "FR").forwarded_examples.is_empty());
    }

    #[test]
    fn examples_are_capped_and_since_excludes_earlier_records() {
        let records: Vec<Value> = (0..6)
            .map(|i| {
                record(
                    &format!("us-{i}"),
                    &format!("2026-11-28T09:0{i}:00Z"),
                    "allowed",
                    "us.test",
                    us(),
                )
            })
            .collect();
        let all = observe(&records, Filter::default());
        assert_eq!(all.forwarded.non_eu.requests, 6);
        assert_eq!(
            row(&all, "US").forwarded_examples,
            vec!["us-0", "us-1", "us-2"]
        );
        let since = Filter {
            since: Some(humantime::parse_rfc3339("2026-11-28T09:04:00Z").unwrap()),
            ..Filter::default()
        };
        let late = observe(&records, since);
        assert_eq!(late.forwarded.non_eu.requests, 2);
        assert_eq!(late.first.as_deref(), Some("2026-11-28T09:04:00Z"));
        assert_eq!(row(&late, "US").forwarded_examples, vec!["us-4", "us-5"]);
    }
}
