//! `rempart report`: the 100-point, 11-criteria sovereignty grid of
//! `docs/report.md`, scored from what rempart can know — the audit trail
//! over a period (observed), its own configuration and policies (whether
//! what was observed is also enforced), and a declared-facts file for the
//! criteria no packet shows. A criterion without evidence is marked not
//! judged and scores 0: the total never contains free points.
//!
//! Output: Markdown, JSON (schema `rempart.report/v1`, docs/report.md) and
//! a self-contained HTML page ([`render`]).

pub mod facts;
pub mod posture;
pub mod render;
pub mod trail;

use serde::Serialize;

use facts::Facts;
use posture::Posture;
use trail::{Flow, Observations};

pub const SCHEMA: &str = "rempart.report/v1";

/// How a criterion was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// From the audit trail and rempart's own set-up.
    Observed,
    /// From the declared-facts file.
    Declared,
    /// Both.
    ObservedAndDeclared,
    /// No evidence: scored 0.
    NotJudged,
}

#[derive(Debug, Clone, Serialize)]
pub struct Criterion {
    /// Stable identifier (e.g. `hosting_eu`).
    pub id: &'static str,
    pub group: &'static str,
    pub title: &'static str,
    pub score: u32,
    pub max: u32,
    pub basis: Basis,
    /// What the score rests on.
    pub evidence: Vec<String>,
    /// What to do to score higher (empty at full marks).
    pub improve: Vec<String>,
    /// Decision ids an auditor can look up (`rempart audit query`).
    pub examples: Vec<String>,
}

/// One operational-control check (the grid's third pillar): reported,
/// not part of the 100 points.
#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub id: &'static str,
    pub title: &'static str,
    /// "ok", "warning" or "missing".
    pub status: &'static str,
    pub detail: String,
    pub improve: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Period {
    pub since: Option<String>,
    pub until: Option<String>,
    pub first_record: Option<String>,
    pub last_record: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub generated_at: String,
    pub rempart_version: &'static str,
    pub period: Period,
    pub score: u32,
    pub max: u32,
    /// Points of the criteria that could be judged (the score's ceiling
    /// with the evidence at hand).
    pub judged_max: u32,
    /// "sovereign" (≥ 90), "partial" (70–89), "insufficient" (< 70).
    pub verdict: &'static str,
    pub vendor: Option<String>,
    pub criteria: Vec<Criterion>,
    pub controls: Vec<Control>,
    /// Null when no configuration was given.
    pub posture: Option<Posture>,
    /// Null when no facts file was given.
    pub facts: Option<Facts>,
    pub observations: Observations,
}

/// Where a report's evidence comes from.
pub struct Sources<'a> {
    /// The deployment's configuration; `None`: enforcement not judged.
    pub config: Option<&'a crate::config::Config>,
    /// The serving (or configured) policy set, probed for what it denies.
    pub policies: Option<&'a crate::policy::PolicySet>,
    pub geo: &'a crate::geo::GeoDb,
    pub facts: Option<&'a Facts>,
    /// Trail files, oldest first.
    pub files: Vec<std::path::PathBuf>,
    pub filter: crate::audit::query::Filter,
    pub max_records: Option<u64>,
    pub now: std::time::SystemTime,
}

/// Reads the trail and scores it.
pub fn generate(s: Sources<'_>) -> anyhow::Result<Report> {
    let mut agg = trail::Aggregator::new(&s.geo.registry, s.filter.clone(), s.max_records);
    agg.read_files(&s.files)?;
    let posture = match (s.config, s.policies) {
        (Some(cfg), Some(set)) => Some(Posture::of(cfg, set, s.geo, s.now)),
        _ => None,
    };
    let time = |t: Option<std::time::SystemTime>| {
        t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
    };
    Ok(build(Inputs {
        observations: agg.finish(),
        posture: posture.as_ref(),
        facts: s.facts,
        since: time(s.filter.since),
        until: time(s.filter.until),
        now: s.now,
    }))
}

/// The live trail of a running rempart: the active file and the rotated
/// files that may hold records of the last `window`, oldest first.
pub fn live_files(
    active: &std::path::Path,
    since: std::time::SystemTime,
) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<std::path::PathBuf> = crate::audit::files::rotated_files(active)?
        .into_iter()
        // A rotated file last written before the window holds nothing in it.
        .filter(|r| {
            std::fs::metadata(&r.path)
                .and_then(|m| m.modified())
                .map_or(true, |m| m >= since)
        })
        .map(|r| r.path)
        .collect();
    if active.is_file() {
        files.push(active.to_path_buf());
    }
    Ok(files)
}

pub fn verdict(score: u32) -> &'static str {
    match score {
        90.. => "sovereign",
        70..=89 => "partial",
        _ => "insufficient",
    }
}

/// Everything a report is made of.
pub struct Inputs<'a> {
    pub observations: Observations,
    pub posture: Option<&'a Posture>,
    pub facts: Option<&'a Facts>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub now: std::time::SystemTime,
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "n/a".into()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

/// `points` scaled by `share` (0..=1), rounded down: a partial share never
/// earns the full points.
fn scaled(points: u32, good: u64, whole: u64) -> u32 {
    if whole == 0 || good >= whole {
        return points;
    }
    ((points as u64 * good) / whole) as u32
}

/// The part of an observed criterion that says whether rempart would stop
/// a bad flow, not just whether one happened.
struct Enforcement {
    points: u32,
    evidence: String,
    improve: Option<String>,
}

fn enforcement(
    posture: Option<&Posture>,
    max: u32,
    rule_active: impl Fn(&Posture) -> bool,
    rule_name: &str,
    data_ok: impl Fn(&Posture) -> (bool, String),
) -> Option<Enforcement> {
    let p = posture?;
    let mut missing = Vec::new();
    if !p.enforcing() {
        missing.push("rempart runs in monitor mode: a denial is recorded but not applied; set [server] mode = \"enforce\"".to_string());
    }
    if !rule_active(p) {
        missing.push(format!("the serving policy set does not deny {rule_name}: restore the shipped sovereignty rules, or remove the allow-list entry or exemption that lets it through"));
    }
    let (data, data_note) = data_ok(p);
    if !data {
        missing.push(data_note.clone());
    }
    let points = if missing.is_empty() {
        max
    } else if p.enforcing() && rule_active(p) {
        // Rules applied on missing or stale data: half.
        max / 2
    } else {
        0
    };
    Some(Enforcement {
        points,
        evidence: format!(
            "enforcement: mode {}; policy {} {} {rule_name}; {}",
            p.mode,
            p.policy_revision,
            if rule_active(p) {
                "denies"
            } else {
                "does NOT deny"
            },
            data_note
        ),
        improve: (!missing.is_empty()).then(|| missing.join("; ")),
    })
}

fn country_data(p: &Posture) -> (bool, String) {
    match p.geo.country_db_age_days {
        None => (false, "no country database: configure [geo] country_db (geoip/fetch.sh)".into()),
        Some(a) if a > posture::GEO_STALE_DAYS => (
            false,
            format!("the country database is {a} days old: refresh it (geoip/fetch.sh, the GeoIP CronJob)"),
        ),
        Some(a) => (true, format!("country database {a} days old")),
    }
}

fn operator_data(p: &Posture) -> (bool, String) {
    let (country_ok, country_note) = country_data(p);
    match p.geo.asn_db_age_days {
        None => (false, "no ASN database: operators (and their law) cannot be identified; configure [geo] asn_db".into()),
        Some(_) if !country_ok => (false, country_note),
        Some(a) => (true, format!("ASN database {a} days old, operator registry {}", p.geo.operators_version)),
    }
}

/// An observed criterion: `observed_max` from the trail plus the rest
/// from enforcement.
#[allow(clippy::too_many_arguments)]
fn observed_criterion(
    id: &'static str,
    group: &'static str,
    title: &'static str,
    max: u32,
    observed_max: u32,
    observed: Option<(u32, Vec<String>, Option<String>)>,
    enforcement: Option<Enforcement>,
    examples: Vec<String>,
) -> Criterion {
    let mut c = Criterion {
        id,
        group,
        title,
        score: 0,
        max,
        basis: Basis::NotJudged,
        evidence: Vec::new(),
        improve: Vec::new(),
        examples,
    };
    match observed {
        Some((points, evidence, improve)) => {
            c.score += points.min(observed_max);
            c.evidence.extend(evidence);
            c.improve.extend(improve);
            c.basis = Basis::Observed;
        }
        None => {
            c.evidence
                .push("no forwarded traffic in the period: nothing observed".into());
            c.improve.push("run rempart in front of the CRM (and as its egress proxy) over the period, with [audit] record = \"all\"".into());
        }
    }
    match enforcement {
        Some(e) => {
            c.score += e.points.min(max - observed_max);
            c.evidence.push(e.evidence);
            c.improve.extend(e.improve);
            if c.basis == Basis::NotJudged {
                // Enforcement alone is judged, but the criterion is about
                // traffic: without any, only the enforcement points count.
                c.basis = Basis::Observed;
            }
        }
        None => {
            c.evidence
                .push("enforcement not judged: no configuration given".into());
            c.improve
                .push("pass --config so that the mode, policies and geo data are judged".into());
        }
    }
    c
}

fn declared(
    id: &'static str,
    group: &'static str,
    title: &'static str,
    max: u32,
    fact: Option<(u32, String)>,
    missing: &str,
    improve: &str,
) -> Criterion {
    let (score, basis, evidence, improve) = match fact {
        Some((s, e)) => (
            s.min(max),
            Basis::Declared,
            vec![format!("declared: {e}")],
            if s >= max { Vec::new() } else { vec![improve.to_string()] },
        ),
        None => (
            0,
            Basis::NotJudged,
            vec![format!("not judged: rempart cannot see this on the wire and the facts file does not declare {missing}")],
            vec![format!("declare {missing} in the facts file (--facts), from the vendor's answers")],
        ),
    };
    Criterion {
        id,
        group,
        title,
        score,
        max,
        basis,
        evidence,
        improve,
        examples: Vec::new(),
    }
}

fn flow_text(f: &Flow) -> String {
    if f.bytes > 0 {
        format!("{} requests, {} bytes", f.requests, f.bytes)
    } else {
        format!("{} requests", f.requests)
    }
}

pub fn build(inputs: Inputs<'_>) -> Report {
    let obs = inputs.observations;
    let posture = inputs.posture;
    let facts = inputs.facts;
    let fw = &obs.forwarded;
    let judged_requests = fw.eu.requests + fw.non_eu.requests + fw.unknown.requests;
    let judged_bytes = fw.eu.bytes + fw.non_eu.bytes + fw.unknown.bytes;
    // The evidence of a criterion: first the forwarded requests that cost
    // it points (data that left), then the attempts that were stopped.
    let non_eu_examples = |pred: &dyn Fn(&trail::DestinationRow) -> bool| -> Vec<String> {
        let rows = || obs.destinations.iter().filter(|d| pred(d));
        rows()
            .flat_map(|d| d.forwarded_examples.iter())
            .chain(rows().flat_map(|d| d.examples.iter()))
            .take(5)
            .cloned()
            .collect()
    };
    let mut criteria = Vec::new();

    // 1. Hosting: data hosted in France / EU (10).
    let hosting = (judged_requests > 0).then(|| {
        let by_requests = scaled(6, fw.eu.requests, judged_requests);
        let by_bytes = scaled(6, fw.eu.bytes, judged_bytes);
        let points = by_requests.min(by_bytes);
        let mut ev = vec![
            format!(
                "forwarded to EU locations: {} of {} located requests ({})",
                fw.eu.requests,
                judged_requests,
                pct(fw.eu.requests, judged_requests)
            ),
            format!("outside the EU: {}; location unknown: {}", flow_text(&fw.non_eu), flow_text(&fw.unknown)),
        ];
        if judged_bytes > 0 {
            ev.push(format!("egress bytes kept in the EU: {}", pct(fw.eu.bytes, judged_bytes)));
        }
        if fw.local.requests > 0 {
            ev.push(format!("{} requests to private or loopback destinations without a location (not judged)", fw.local.requests));
        }
        let improve = (points < 6).then(|| "move or block the flows leaving the EU (see the destinations table and the example decisions)".to_string());
        (points, ev, improve)
    });
    criteria.push(observed_criterion(
        "hosting_eu",
        "Hosting",
        "Data hosted in France / EU",
        10,
        6,
        hosting,
        enforcement(
            posture,
            4,
            |p| p.probes.denies_outside_eu && p.probes.denies_unknown_location,
            "destinations outside the EU or of unknown location",
            country_data,
        ),
        non_eu_examples(&|d| {
            d.sovereign == crate::geo::OUTSIDE_EU
                || (d.sovereign == crate::geo::UNKNOWN && d.forwarded > 0)
        }),
    ));

    // 2. Datacenters ISO 27001 certified (5).
    criteria.push(declared(
        "datacenters_iso27001",
        "Hosting",
        "Datacenters ISO 27001 certified",
        5,
        facts.and_then(|f| f.certified("iso27001")).map(|c| {
            (
                if c { 5 } else { 0 },
                format!(
                    "ISO 27001 {}",
                    if c {
                        "certified"
                    } else {
                        "not among the certifications"
                    }
                ),
            )
        }),
        "[hosting] certifications",
        "obtain (or require from the host) ISO 27001 certification of the datacenters",
    ));

    // 3. Geographic redundancy inside the EU only (5).
    let redundancy = (!obs.hosts.is_empty()).then(|| {
        let judged: Vec<_> = obs
            .hosts
            .iter()
            .filter(|h| h.countries.iter().any(|c| c != crate::geo::UNKNOWN) || h.countries.len() > 1)
            .collect();
        let outside: Vec<String> = judged
            .iter()
            .filter(|h| h.countries.iter().any(|c| c == crate::geo::UNKNOWN || !eu(c)))
            .map(|h| format!("{} ({})", h.host, h.countries.iter().cloned().collect::<Vec<_>>().join(", ")))
            .collect();
        let multi = judged.iter().filter(|h| h.addresses.len() > 1).count();
        let examples: Vec<String> = judged
            .iter()
            .filter(|h| h.countries.iter().any(|c| c == crate::geo::UNKNOWN || !eu(c)))
            .flat_map(|h| h.examples.iter().cloned())
            .take(5)
            .collect();
        let points = scaled(3, (judged.len() - outside.len()) as u64, judged.len() as u64);
        let mut ev = vec![format!(
            "{} located destination hosts with forwarded traffic, {} seen on several addresses; every address of {} is in the EU",
            judged.len(),
            multi,
            judged.len() - outside.len()
        )];
        if !outside.is_empty() {
            ev.push(format!("addresses outside the EU or unknown: {}", outside.join("; ")));
        }
        ev.push("backups and replicas that never cross rempart are not seen: ask the vendor where they are".into());
        let improve = (!outside.is_empty()).then(|| "remove the non-EU replicas or addresses of these hosts".to_string());
        (points, ev, improve, examples)
    });
    let (redundancy, redundancy_examples) = match redundancy {
        Some((points, ev, improve, examples)) => (Some((points, ev, improve)), examples),
        None => (None, Vec::new()),
    };
    criteria.push(observed_criterion(
        "redundancy_eu_only",
        "Hosting",
        "Geographic redundancy inside the EU only",
        5,
        3,
        redundancy,
        enforcement(
            posture,
            2,
            |p| p.probes.denies_outside_eu,
            "addresses outside the EU (each resolved address is judged)",
            country_data,
        ),
        redundancy_examples,
    ));

    // 4. Hosting contract under French law (10).
    criteria.push(declared(
        "contract_french_law",
        "Hosting",
        "Hosting contract under French law",
        10,
        facts
            .and_then(|f| f.hosting.contract_law.as_deref())
            .map(|law| match law {
                "FR" => (10, "the hosting contract is under French law".to_string()),
                l if eu(l) => (
                    5,
                    format!("the hosting contract is under {l} law (EU, not French): half"),
                ),
                l => (
                    0,
                    format!("the hosting contract is under {l} law, outside the EU"),
                ),
            }),
        "[hosting] contract_law",
        "negotiate a hosting contract under French law with a non-transfer clause",
    ));

    // 5. Company under European law (10).
    criteria.push(declared(
        "vendor_eu_law",
        "Vendor",
        "Company under European law",
        10,
        facts.and_then(|f| f.vendor.country.as_deref()).map(|c| {
            if eu(c) {
                (10, format!("the vendor is a company under {c} law"))
            } else {
                (
                    0,
                    format!("the vendor is a company under {c} law, outside the EU"),
                )
            }
        }),
        "[vendor] country",
        "prefer a vendor incorporated in the EU",
    ));

    // 6. European shareholding > 50 % (10).
    criteria.push(declared(
        "eu_shareholding",
        "Vendor",
        "European shareholding > 50 %",
        10,
        facts
            .and_then(|f| f.vendor.eu_shareholding_percent)
            .map(|p| {
                (
                    if p > 50.0 { 10 } else { 0 },
                    format!("{p} % of the capital held by Europeans"),
                )
            }),
        "[vendor] eu_shareholding_percent",
        "a vendor majority-owned by Europeans",
    ));

    // 7. No US subsidiary (5).
    criteria.push(declared(
        "no_us_subsidiary",
        "Vendor",
        "No US subsidiary",
        5,
        facts.and_then(|f| f.vendor.us_subsidiary).map(|s| {
            (
                if s { 0 } else { 5 },
                if s {
                    "the vendor has a US subsidiary".into()
                } else {
                    "no US subsidiary".to_string()
                },
            )
        }),
        "[vendor] us_subsidiary",
        "a US subsidiary can be compelled to hand over data: prefer a vendor without one",
    ));

    // 8. Auditable source code (10).
    criteria.push(declared(
        "auditable_source",
        "Technology",
        "Auditable source code",
        10,
        facts.and_then(|f| f.vendor.source_code_auditable).map(|a| {
            (
                if a { 10 } else { 0 },
                if a {
                    "the source code can be audited".into()
                } else {
                    "the source code cannot be audited".to_string()
                },
            )
        }),
        "[vendor] source_code_auditable",
        "obtain an audit right on the source code (or an open-source CRM)",
    ));

    // 9. No dependency on a US cloud (10).
    let upstream_on_us_cloud = obs
        .destinations
        .iter()
        .any(|d| d.direction == "ingress" && d.cloud_act == Some(true) && d.forwarded > 0);
    let attempts_us_cloud: u64 = obs
        .destinations
        .iter()
        .filter(|d| d.cloud_act == Some(true))
        .map(|d| d.denied)
        .sum();
    let us_cloud = (judged_requests > 0).then(|| {
        let operators: std::collections::BTreeSet<String> = obs
            .destinations
            .iter()
            .filter(|d| d.cloud_act == Some(true) && d.forwarded > 0)
            .filter_map(|d| d.operator.clone())
            .collect();
        let points = if upstream_on_us_cloud {
            0
        } else if fw.cloud_act.requests > 0 {
            scaled(6, judged_requests - fw.cloud_act.requests, judged_requests).min(3)
        } else {
            6
        };
        let mut ev = vec![format!(
            "forwarded to US-cloud operators (CLOUD Act): {} of {} located requests ({}){}",
            fw.cloud_act.requests,
            judged_requests,
            pct(fw.cloud_act.requests, judged_requests),
            if operators.is_empty() {
                String::new()
            } else {
                format!(": {}", operators.into_iter().collect::<Vec<_>>().join(", "))
            }
        )];
        if upstream_on_us_cloud {
            ev.push("the CRM itself (the ingress upstream) runs on a US cloud".into());
        }
        ev.push(format!(
            "attempts to reach US clouds denied: {attempts_us_cloud}"
        ));
        let improve = (points < 6)
            .then(|| "replace the US-cloud services in the path with EU-operated ones".to_string());
        (points, ev, improve)
    });
    criteria.push(observed_criterion(
        "no_us_cloud",
        "Technology",
        "No dependency on a US cloud (AWS, Azure, GCP)",
        10,
        6,
        us_cloud,
        enforcement(
            posture,
            4,
            |p| p.probes.denies_us_operator_in_eu,
            "US operators in the EU (Amazon in Frankfurt)",
            operator_data,
        ),
        non_eu_examples(&|d| d.cloud_act == Some(true)),
    ));

    // 10. Outside the CLOUD Act (15).
    let vendor_exposed = facts.and_then(|f| match (f.vendor.us_parent, f.vendor.us_subsidiary) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), Some(false)) => Some(false),
        _ => None,
    });
    let cloud_act_flows = (judged_requests > 0).then(|| {
        let points = scaled(
            9,
            judged_requests - fw.non_eu_jurisdiction.requests,
            judged_requests,
        );
        let ev = vec![format!(
            "forwarded to operators under a non-EU law: {} of {} located requests ({})",
            fw.non_eu_jurisdiction.requests,
            judged_requests,
            pct(fw.non_eu_jurisdiction.requests, judged_requests)
        )];
        let improve = (points < 9)
            .then(|| "stop the flows to operators under US (or other non-EU) law".to_string());
        (points, ev, improve)
    });
    let mut c = observed_criterion(
        "outside_cloud_act",
        "Legal",
        "Outside the CLOUD Act",
        15,
        9,
        cloud_act_flows,
        enforcement(
            posture,
            6,
            |p| p.probes.denies_us_operator_in_eu,
            "operators under non-EU law",
            operator_data,
        ),
        non_eu_examples(&|d| {
            d.jurisdiction.as_deref().is_some_and(|j| !eu(j)) || d.cloud_act == Some(true)
        }),
    );
    match vendor_exposed {
        Some(true) => {
            c.score = 0;
            c.evidence.push("declared: the vendor has a US parent or subsidiary, which the CLOUD Act can compel whatever the wire shows".into());
            c.improve.push("a vendor without US parent or subsidiary".into());
            c.basis = if c.basis == Basis::NotJudged {
                Basis::Declared
            } else {
                Basis::ObservedAndDeclared
            };
        }
        Some(false) => {
            c.evidence.push("declared: no US parent or subsidiary".into());
            if c.basis != Basis::NotJudged {
                c.basis = Basis::ObservedAndDeclared;
            }
        }
        None => c.evidence.push("the vendor's own exposure (US parent or subsidiary) is not declared: judged on the wire only".into()),
    }
    criteria.push(c);

    // 11. SecNumCloud / HDS (10).
    criteria.push(declared(
        "secnumcloud_hds",
        "Legal",
        "SecNumCloud / HDS certification",
        10,
        facts
            .and_then(|f| f.hosting.certifications.as_ref())
            .map(|c| {
                let held: Vec<&str> = c
                    .iter()
                    .map(String::as_str)
                    .filter(|x| *x == "secnumcloud" || *x == "hds")
                    .collect();
                if held.is_empty() {
                    (0, "neither SecNumCloud nor HDS".to_string())
                } else {
                    (10, format!("certified {}", held.join(", ")))
                }
            }),
        "[hosting] certifications",
        "a SecNumCloud-qualified (public sector) or HDS-certified (health) host",
    ));

    let score = criteria.iter().map(|c| c.score).sum();
    let judged_max = criteria
        .iter()
        .filter(|c| c.basis != Basis::NotJudged)
        .map(|c| c.max)
        .sum();
    Report {
        schema: SCHEMA,
        generated_at: humantime::format_rfc3339_seconds(inputs.now).to_string(),
        rempart_version: env!("CARGO_PKG_VERSION"),
        period: Period {
            since: inputs.since,
            until: inputs.until,
            first_record: obs.first.clone(),
            last_record: obs.last.clone(),
        },
        score,
        max: 100,
        judged_max,
        verdict: verdict(score),
        vendor: facts.and_then(|f| f.vendor.name.clone()),
        controls: controls(posture, &obs),
        criteria,
        posture: posture.cloned(),
        facts: facts.cloned(),
        observations: obs,
    }
}

/// EU membership from the built-in country list.
fn eu(country: &str) -> bool {
    static REGISTRY: std::sync::OnceLock<Option<crate::geo::registry::Registry>> =
        std::sync::OnceLock::new();
    REGISTRY
        .get_or_init(|| crate::geo::registry::Registry::builtin().ok())
        .as_ref()
        .is_some_and(|r| r.in_eu(country))
}

fn controls(posture: Option<&Posture>, obs: &Observations) -> Vec<Control> {
    let mut out = Vec::new();
    let Some(p) = posture else {
        out.push(Control {
            id: "configuration",
            title: "Configuration",
            status: "missing",
            detail: "no configuration given: TLS, identity, mode and audit settings are not judged"
                .into(),
            improve: Some("pass --config".into()),
        });
        return out;
    };
    let mut push = |id, title, ok: bool, warn: bool, detail: String, improve: &str| {
        out.push(Control {
            id,
            title,
            status: if ok {
                "ok"
            } else if warn {
                "warning"
            } else {
                "missing"
            },
            detail,
            improve: (!ok).then(|| improve.to_string()),
        });
    };
    push(
        "enforce_mode",
        "Decisions are enforced",
        p.enforcing(),
        false,
        format!("mode {}", p.mode),
        "set [server] mode = \"enforce\" once the monitor-mode trail shows no false denials",
    );
    push(
        "tls",
        "Encryption in transit (ingress TLS)",
        p.ingress_tls,
        false,
        if p.ingress_tls {
            format!(
                "TLS terminated by rempart{}",
                if p.mtls {
                    ", client certificates required"
                } else {
                    ""
                }
            )
        } else {
            "plain HTTP on the ingress listener".into()
        },
        "configure [server.tls] (or make sure a TLS terminator sits in front on a private network)",
    );
    let auth_share = pct(obs.ingress_authenticated, obs.ingress_total);
    push(
        "identity",
        "Strong authentication",
        !p.identity_sources.is_empty() && p.probes.denies_anonymous,
        !p.identity_sources.is_empty(),
        format!(
            "identity sources: {}; anonymous requests to CRM data {}; {} of {} ingress requests had an authenticated subject ({auth_share})",
            if p.identity_sources.is_empty() { "none".to_string() } else { p.identity_sources.join(", ") },
            if p.probes.denies_anonymous { "denied" } else { "NOT denied" },
            obs.ingress_authenticated,
            obs.ingress_total
        ),
        "configure [identity.jwt], mTLS or a trusted header, and keep the shipped identity rules",
    );
    push(
        "audit_complete",
        "Every access is recorded",
        p.audit_record_scope == "all",
        false,
        format!("[audit] record = \"{}\"", p.audit_record_scope),
        "set [audit] record = \"all\" so that the trail answers \"who touched what\"",
    );
    push(
        "audit_durable",
        "Audit trail durable and tamper-evident",
        p.audit_durability == "sync" && p.audit_signed,
        p.audit_durability == "sync" || p.audit_signed,
        format!(
            "durability {}, signed checkpoints {}",
            p.audit_durability,
            if p.audit_signed { "on" } else { "off" }
        ),
        "set [audit] durability = \"sync\" and a checkpoint_key (rempart audit keygen)",
    );
    push(
        "egress_default_deny",
        "Outbound calls go through rempart, allow-list only",
        p.egress_proxy && p.probes.denies_unlisted_egress,
        p.egress_proxy,
        format!(
            "egress proxy {}; unlisted EU destinations {}",
            if p.egress_proxy { "configured" } else { "not configured" },
            if p.probes.denies_unlisted_egress { "denied (default deny)" } else { "allowed" }
        ),
        "configure [egress] listen, force the CRM's traffic through it (NetworkPolicy), and set data.settings.egress.default_deny with an allow-list",
    );
    push(
        "geo_fresh",
        "Location data is fresh",
        p.geo.country_fresh() && p.geo.asn_db_age_days.is_some(),
        p.geo.country_db_age_days.is_some(),
        format!(
            "country database {}, ASN database {}, operator registry {}",
            p.geo.country_db_age_days.map_or("missing".into(), |a| format!("{a} days old")),
            p.geo.asn_db_age_days.map_or("missing".into(), |a| format!("{a} days old")),
            p.geo.operators_version
        ),
        "refresh the GeoIP databases at least monthly (geoip/fetch.sh) and configure both country_db and asn_db",
    );
    if !p.probes.errors.is_empty() {
        push(
            "policy_probes",
            "Policy set evaluates",
            false,
            false,
            format!("probes failed to evaluate: {}", p.probes.errors.join(", ")),
            "fix the policy set (rempart policy test)",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_scaling() {
        assert_eq!(verdict(90), "sovereign");
        assert_eq!(verdict(89), "partial");
        assert_eq!(verdict(70), "partial");
        assert_eq!(verdict(69), "insufficient");
        assert_eq!(scaled(6, 99, 100), 5);
        assert_eq!(scaled(6, 100, 100), 6);
        assert_eq!(scaled(6, 0, 0), 6);
    }

    #[test]
    fn nothing_known_scores_nothing() {
        let r = build(Inputs {
            observations: Observations::default(),
            posture: None,
            facts: None,
            since: None,
            until: None,
            now: std::time::SystemTime::now(),
        });
        assert_eq!(r.criteria.len(), 11);
        assert_eq!(r.criteria.iter().map(|c| c.max).sum::<u32>(), 100);
        assert_eq!(r.score, 0);
        assert_eq!(r.judged_max, 0);
        assert_eq!(r.verdict, "insufficient");
        assert!(r.criteria.iter().all(|c| c.basis == Basis::NotJudged));
    }

    #[test]
    fn declared_facts_score_their_criteria_only() {
        let facts = Facts::parse(
            "[vendor]\ncountry = \"FR\"\neu_shareholding_percent = 80\nus_parent = false\nus_subsidiary = false\nsource_code_auditable = true\n\
             [hosting]\ncontract_law = \"FR\"\ncertifications = [\"iso27001\", \"secnumcloud\"]\n",
        )
        .unwrap();
        let r = build(Inputs {
            observations: Observations::default(),
            posture: None,
            facts: Some(&facts),
            since: None,
            until: None,
            now: std::time::SystemTime::now(),
        });
        // 5 + 10 + 10 + 10 + 5 + 10 + 10: every declared criterion.
        assert_eq!(r.score, 60);
        let us = Facts::parse("[vendor]\nus_subsidiary = true\n").unwrap();
        let r = build(Inputs {
            observations: Observations::default(),
            posture: None,
            facts: Some(&us),
            since: None,
            until: None,
            now: std::time::SystemTime::now(),
        });
        let c = r
            .criteria
            .iter()
            .find(|c| c.id == "outside_cloud_act")
            .unwrap();
        assert_eq!((c.score, c.basis), (0, Basis::Declared));
    }
}
