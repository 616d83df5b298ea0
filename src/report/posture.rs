//! What rempart knows of its own set-up: the configuration (mode, TLS,
//! identity, audit), what the loaded policy set actually does (probed
//! with synthetic inputs, so a rule renamed or an allow-list entry that
//! lets Amazon through is seen as it behaves), and how fresh the geo data is.

use serde::Serialize;
use serde_json::json;

use crate::config::{AuditRecordScope, Config, Durability, Mode};
use crate::geo::GeoDb;
use crate::input::PolicyInput;
use crate::policy::{EvalLimits, PolicySet};

/// A GeoIP country database older than this is stale (the alert
/// `RempartGeoDatabaseStale` uses the same threshold).
pub const GEO_STALE_DAYS: u64 = 45;

#[derive(Debug, Clone, Serialize)]
pub struct Posture {
    /// "enforce" or "monitor".
    pub mode: String,
    pub ingress_tls: bool,
    pub mtls: bool,
    /// Configured identity sources: jwt, mtls, header.
    pub identity_sources: Vec<String>,
    pub audit_durability: String,
    pub audit_record_scope: String,
    pub audit_signed: bool,
    pub egress_proxy: bool,
    pub policy_revision: String,
    pub probes: Probes,
    pub geo: GeoFreshness,
}

/// What the serving policy set decides on synthetic requests (true: it
/// denies, as a sovereign set must).
#[derive(Debug, Clone, Serialize)]
pub struct Probes {
    /// Egress to a public address located in the United States.
    pub denies_outside_eu: bool,
    /// Egress to Amazon in Frankfurt (EU location, US operator).
    pub denies_us_operator_in_eu: bool,
    /// Egress to a public address that could not be located.
    pub denies_unknown_location: bool,
    /// Egress to an EU operator in the EU that no allow-list names.
    pub denies_unlisted_egress: bool,
    /// An anonymous ingress request to CRM data when an identity source
    /// is configured.
    pub denies_anonymous: bool,
    /// Probes that failed to evaluate (policy error), by name.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GeoFreshness {
    /// Age in days of the country database; null when none is loaded.
    pub country_db_age_days: Option<u64>,
    /// Age in days of the ASN database (operator identification); null
    /// when none is loaded.
    pub asn_db_age_days: Option<u64>,
    pub operators_version: String,
}

impl GeoFreshness {
    pub fn of(geo: &GeoDb, now: std::time::SystemTime) -> Self {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let age = |d: &Option<crate::geo::mmdb::Database>, role| {
            d.as_ref()
                .map(|d| now.saturating_sub(d.info(role, false).build_epoch) / 86_400)
        };
        GeoFreshness {
            country_db_age_days: age(&geo.country, "country"),
            asn_db_age_days: age(&geo.asn, "asn"),
            operators_version: geo.registry.version.clone(),
        }
    }

    pub fn country_fresh(&self) -> bool {
        self.country_db_age_days
            .is_some_and(|a| a <= GEO_STALE_DAYS)
    }
}

impl Posture {
    pub fn of(cfg: &Config, set: &PolicySet, geo: &GeoDb, now: std::time::SystemTime) -> Self {
        let mtls = cfg
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        let mut identity_sources = Vec::new();
        if cfg.identity.jwt.is_some() {
            identity_sources.push("jwt".to_string());
        }
        if mtls {
            identity_sources.push("mtls".to_string());
        }
        if cfg.identity.trusted_header.is_some() {
            identity_sources.push("header".to_string());
        }
        Posture {
            mode: match cfg.server.mode {
                Mode::Enforce => "enforce",
                Mode::Monitor => "monitor",
            }
            .to_string(),
            ingress_tls: cfg.server.tls.is_some(),
            mtls,
            identity_sources,
            audit_durability: match cfg.audit.durability {
                Durability::Buffered => "buffered",
                Durability::Sync => "sync",
            }
            .to_string(),
            audit_record_scope: match cfg.audit.record {
                AuditRecordScope::All => "all",
                AuditRecordScope::DenyAndWarn => "deny_and_warn",
            }
            .to_string(),
            audit_signed: cfg.audit.checkpoint_key.is_some(),
            egress_proxy: cfg.egress.listen.is_some(),
            policy_revision: set.revision.clone(),
            probes: Probes::run(set),
            geo: GeoFreshness::of(geo, now),
        }
    }

    pub fn enforcing(&self) -> bool {
        self.mode == "enforce"
    }
}

fn geo(
    scope: &str,
    country: Option<&str>,
    operator: Option<serde_json::Value>,
    sovereign: &str,
) -> serde_json::Value {
    let in_eu = country.is_some_and(|c| ["FR", "DE"].contains(&c));
    json!({
        "scope": scope, "country": country, "in_eu": in_eu, "in_eea": in_eu, "adequacy": null,
        "asn": null, "as_org": null, "as_country": null, "operator": operator, "sovereign": sovereign
    })
}

fn operator(id: &str, name: &str, jurisdiction: &str, cloud_act: bool) -> serde_json::Value {
    json!({
        "id": id, "name": name, "parent": name, "jurisdiction": jurisdiction,
        "jurisdiction_in_eea": jurisdiction != "US", "cloud_act": cloud_act,
        "other_laws": [], "sources": []
    })
}

/// A synthetic request: egress to `ip` with `geo`, or ingress.
fn probe_input(
    direction: &str,
    host: &str,
    ip: &str,
    geo: serde_json::Value,
    sources: &[&str],
) -> serde_json::Value {
    let local = self::geo("private", None, None, "local");
    json!({
        "direction": direction,
        "request": {
            "id": "report-probe", "method": "GET", "scheme": "https", "host": host, "port": 443,
            "path": "/api/contacts", "segments": ["api", "contacts"], "query": {}, "headers": {},
            "protocol": "HTTP/1.1"
        },
        "source": {"ip": "10.0.0.7", "port": 40000, "scope": "private", "geo": local, "workload": null},
        "destination": {
            "host": host, "ip": ip, "port": 443, "scope": "public", "geo": geo.clone(),
            "addresses": [{"ip": ip, "scope": "public", "geo": geo}]
        },
        "identity": {"authenticated": false, "method": "none", "subject": null, "name": null,
                     "email": null, "roles": [], "groups": [], "claims": {}, "issuer": null,
                     "error": null, "sources": sources},
        "resource": {"crm": "generic", "type": "contacts", "id": null, "operation": "list", "bulk": false},
        "time": {"rfc3339": "2026-11-27T09:30:00.000000Z", "unix_ns": 1795771800000000000i64, "weekday": 5, "hour": 9}
    })
}

impl Probes {
    pub fn run(set: &PolicySet) -> Probes {
        let ovh = operator("ovhcloud", "OVHcloud", "FR", false);
        let amazon = operator("amazon", "Amazon Web Services", "US", true);
        let cases = [
            (
                "outside_eu",
                probe_input(
                    "egress",
                    "api.example.us",
                    "198.51.100.7",
                    geo("public", Some("US"), None, "outside_eu"),
                    &[],
                ),
            ),
            (
                "us_operator_in_eu",
                probe_input(
                    "egress",
                    "api.example.de",
                    "198.51.100.8",
                    geo("public", Some("DE"), Some(amazon), "non_eu_operator_in_eu"),
                    &[],
                ),
            ),
            (
                "unknown_location",
                probe_input(
                    "egress",
                    "api.example.net",
                    "198.51.100.9",
                    geo("public", None, None, "unknown"),
                    &[],
                ),
            ),
            (
                "unlisted_egress",
                probe_input(
                    "egress",
                    "api.example.fr",
                    "198.51.100.10",
                    geo("public", Some("FR"), Some(ovh.clone()), "eu_operated_in_eu"),
                    &[],
                ),
            ),
            (
                "anonymous",
                probe_input(
                    "ingress",
                    "crm.example.eu",
                    "198.51.100.11",
                    geo("public", Some("FR"), Some(ovh), "eu_operated_in_eu"),
                    &["jwt"],
                ),
            ),
        ];
        let mut errors = Vec::new();
        let mut denied = [false; 5];
        for (i, (name, input)) in cases.into_iter().enumerate() {
            let result = serde_json::from_value::<PolicyInput>(input)
                .map_err(anyhow::Error::from)
                .and_then(|input| set.evaluate(input.to_value(), &EvalLimits::default()));
            match result {
                Ok(d) => denied[i] = !d.deny.is_empty(),
                Err(e) => {
                    tracing::debug!("report probe {name}: {e:#}");
                    errors.push(name.to_string());
                }
            }
        }
        Probes {
            denies_outside_eu: denied[0],
            denies_us_operator_in_eu: denied[1],
            denies_unknown_location: denied[2],
            denies_unlisted_egress: denied[3],
            denies_anonymous: denied[4],
            errors,
        }
    }
}
