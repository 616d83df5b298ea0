//! Where an address is and under whose law its operator is.
//!
//! Sources, all optional and hot-reloadable: a country database (MaxMind
//! GeoIP2/GeoLite2 or ip-location-db/DB-IP shape), an ASN database
//! (GeoLite2-ASN shape), an AS-registration-country database, and the
//! operator registry and country lists of `geoip/`. Unknown stays `null`:
//! nothing here guesses.

pub mod build;
pub mod mmdb;
pub mod registry;
mod store;

pub use store::GeoStore;

use std::net::IpAddr;
use std::path::PathBuf;

use regorus::Value;
use serde::{Deserialize, Serialize};

use crate::pipeline::locate::{canonical_ip, scope, Scope};
use mmdb::Database;
use registry::{CountryEntry, Registry};

/// The summary verdict of [`Geo::sovereign`].
pub const EU_OPERATED_IN_EU: &str = "eu_operated_in_eu";
pub const NON_EU_OPERATOR_IN_EU: &str = "non_eu_operator_in_eu";
pub const OUTSIDE_EU: &str = "outside_eu";
pub const UNKNOWN: &str = "unknown";
pub const LOCAL: &str = "local";

/// The `geo` object of `source` and `destination` in the policy input.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Geo {
    /// Address class: public, private, loopback, link_local, cgnat, ...
    pub scope: crate::input::Name,
    /// ISO 3166-1 alpha-2 of the located country, or null.
    pub country: Option<String>,
    pub in_eu: bool,
    /// In the EEA (the EU plus Iceland, Liechtenstein, Norway).
    pub in_eea: bool,
    /// The GDPR adequacy decision covering `country`, or null.
    pub adequacy: Option<Adequacy>,
    pub asn: Option<u32>,
    pub as_org: Option<String>,
    /// Country where the AS is registered, or null.
    pub as_country: Option<String>,
    pub operator: Option<Operator>,
    /// eu_operated_in_eu | non_eu_operator_in_eu | outside_eu | unknown | local
    pub sovereign: crate::input::Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Adequacy {
    /// "full" or "partial" (see `note` for who is covered).
    pub scope: String,
    pub decided: Option<String>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Operator {
    pub id: String,
    pub name: String,
    pub parent: String,
    /// Country of the controlling company.
    pub jurisdiction: String,
    /// True when `jurisdiction` is an EEA country.
    pub jurisdiction_in_eea: bool,
    pub cloud_act: bool,
    pub other_laws: Vec<String>,
    pub sources: Vec<String>,
}

/// Configured database files (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeoFiles {
    pub country_db: Option<PathBuf>,
    pub asn_db: Option<PathBuf>,
    pub as_country_db: Option<PathBuf>,
    pub operators: Option<PathBuf>,
    pub countries: Option<PathBuf>,
    /// Look up non-public addresses too (`[geo] locate_non_public`).
    pub locate_non_public: bool,
}

impl GeoFiles {
    pub fn paths(&self) -> Vec<PathBuf> {
        [
            &self.country_db,
            &self.asn_db,
            &self.as_country_db,
            &self.operators,
            &self.countries,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }
}

/// One loaded, immutable set of geo data.
pub struct GeoDb {
    pub country: Option<Database>,
    pub asn: Option<Database>,
    pub as_country: Option<Database>,
    pub registry: Registry,
    locate_non_public: bool,
}

impl GeoDb {
    /// Opens every configured file. A configured file that is missing or
    /// unreadable is an error naming it and saying how to get it.
    pub fn open(files: &GeoFiles) -> anyhow::Result<GeoDb> {
        Self::open_with(files, false)
    }

    /// As [`Self::open`], but a database that cannot be opened is left out
    /// (logged) and only its fields become null (`[geo] optional = true`).
    /// The registry and lists must still load.
    pub fn open_lenient(files: &GeoFiles) -> anyhow::Result<GeoDb> {
        Self::open_with(files, true)
    }

    fn open_with(files: &GeoFiles, lenient: bool) -> anyhow::Result<GeoDb> {
        let open = |p: &Option<PathBuf>, role: &str| -> anyhow::Result<Option<Database>> {
            let Some(p) = p else { return Ok(None) };
            let opened = if !p.exists() {
                Err(anyhow::anyhow!(
                    "GeoIP {role} database {} does not exist: fetch the free databases with \
                     geoip/fetch.sh (see docs/geo.md), point [geo] at your MaxMind files, \
                     or set [geo] optional = true to start without it",
                    p.display()
                ))
            } else {
                Database::open(p).and_then(|db| db.expect_role(role).map(|()| db))
            };
            match opened {
                Ok(db) => Ok(Some(db)),
                Err(e) if lenient => {
                    tracing::warn!("geo: {e:#}; its fields stay null ([geo] optional = true)");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        Ok(GeoDb {
            country: open(&files.country_db, "country")?,
            asn: open(&files.asn_db, "asn")?,
            as_country: open(&files.as_country_db, "as_country")?,
            registry: Registry::load(files.operators.as_deref(), files.countries.as_deref())?,
            locate_non_public: files.locate_non_public,
        })
    }

    /// The `geo` object for one address. Lookup errors (a corrupt record)
    /// leave the affected fields null and are logged: unknown, not a guess.
    pub fn lookup(&self, ip: IpAddr) -> Geo {
        let ip = crate::pipeline::locate::location_ip(canonical_ip(ip));
        let sc = scope(ip);
        if sc != Scope::Public && !self.locate_non_public {
            return Geo::local(sc);
        }
        let ok = |r: anyhow::Result<Option<String>>| {
            r.unwrap_or_else(|e| {
                tracing::warn!(%ip, "geo lookup: {e:#}");
                None
            })
        };
        let country = self.country.as_ref().and_then(|db| ok(db.country(ip)));
        let as_country = self.as_country.as_ref().and_then(|db| ok(db.country(ip)));
        let (asn, as_org) = match self.asn.as_ref().map(|db| db.asn(ip)) {
            Some(Ok(Some((n, org)))) => (Some(n), org),
            Some(Err(e)) => {
                tracing::warn!(%ip, "geo lookup: {e:#}");
                (None, None)
            }
            _ => (None, None),
        };
        let r = &self.registry;
        let operator = asn.and_then(|n| r.operator_for_asn(n)).map(|o| Operator {
            id: o.id.clone(),
            name: o.name.clone(),
            parent: o.parent.clone(),
            jurisdiction: o.jurisdiction.clone(),
            jurisdiction_in_eea: r.in_eea(&o.jurisdiction),
            cloud_act: o.cloud_act,
            other_laws: o.other_laws.clone(),
            sources: o.sources.clone(),
        });
        let in_eu = country.as_deref().is_some_and(|c| r.in_eu(c));
        let in_eea = country.as_deref().is_some_and(|c| r.in_eea(c));
        let adequacy = country
            .as_deref()
            .and_then(|c| r.adequacy(c))
            .map(adequacy_of);
        if sc != Scope::Public && country.is_none() && operator.is_none() {
            // Not mapped to a site by the company's own database.
            return Geo::local(sc);
        }
        let sovereign = verdict(country.as_deref(), in_eea, operator.as_ref());
        Geo {
            scope: sc.as_str().into(),
            country,
            in_eu,
            in_eea,
            adequacy,
            asn,
            as_org,
            as_country,
            operator,
            sovereign: sovereign.into(),
        }
    }
}

fn adequacy_of(c: &CountryEntry) -> Adequacy {
    Adequacy {
        scope: c.scope.clone().unwrap_or_else(|| "full".into()),
        decided: c.decided.clone(),
        note: c.note.clone(),
    }
}

/// The summary verdict. In the EEA, the operator decides: known and under
/// EEA law without foreign-access exposure, or not; unknown stays unknown.
fn verdict(country: Option<&str>, in_eea: bool, operator: Option<&Operator>) -> &'static str {
    match (country, in_eea, operator) {
        (None, _, _) => UNKNOWN,
        (Some(_), false, _) => OUTSIDE_EU,
        (Some(_), true, None) => UNKNOWN,
        (Some(_), true, Some(op)) => {
            if op.jurisdiction_in_eea && !op.cloud_act && op.other_laws.is_empty() {
                EU_OPERATED_IN_EU
            } else {
                NON_EU_OPERATOR_IN_EU
            }
        }
    }
}

impl Geo {
    /// A non-public address: no location or operator to look up.
    pub fn local(sc: Scope) -> Geo {
        Geo {
            scope: sc.as_str().into(),
            country: None,
            in_eu: false,
            in_eea: false,
            adequacy: None,
            asn: None,
            as_org: None,
            as_country: None,
            operator: None,
            sovereign: LOCAL.into(),
        }
    }

    /// The regorus value, built field by field (see `crate::input`).
    pub fn to_value(&self) -> Value {
        use crate::input::value::{obj, opt, s, strings};
        let adequacy = match &self.adequacy {
            Some(a) => obj([
                ("scope", s(&a.scope)),
                ("decided", opt(&a.decided)),
                ("note", s(&a.note)),
            ]),
            None => Value::Null,
        };
        let operator = match &self.operator {
            Some(o) => obj([
                ("id", s(&o.id)),
                ("name", s(&o.name)),
                ("parent", s(&o.parent)),
                ("jurisdiction", s(&o.jurisdiction)),
                ("jurisdiction_in_eea", Value::from(o.jurisdiction_in_eea)),
                ("cloud_act", Value::from(o.cloud_act)),
                ("other_laws", strings(&o.other_laws)),
                ("sources", strings(&o.sources)),
            ]),
            None => Value::Null,
        };
        obj([
            ("scope", s(&self.scope)),
            ("country", opt(&self.country)),
            ("in_eu", Value::from(self.in_eu)),
            ("in_eea", Value::from(self.in_eea)),
            ("adequacy", adequacy),
            (
                "asn",
                self.asn.map_or(Value::Null, |n| Value::from(n as u64)),
            ),
            ("as_org", opt(&self.as_org)),
            ("as_country", opt(&self.as_country)),
            ("operator", operator),
            ("sovereign", s(&self.sovereign)),
        ])
    }
}
