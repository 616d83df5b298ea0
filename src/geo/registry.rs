//! The operator registry (who runs an AS, and under which law) and the
//! country lists (EU, EEA, GDPR adequacy), both data files in `geoip/`.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// One operator: a company that originates traffic from some ASNs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub id: String,
    pub name: String,
    pub parent: String,
    /// ISO 3166-1 alpha-2 country of the controlling company.
    pub jurisdiction: String,
    pub cloud_act: bool,
    #[serde(default)]
    pub other_laws: Vec<String>,
    pub kind: String,
    #[serde(default)]
    pub asns: Vec<u32>,
    pub sources: Vec<String>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: String,
    #[serde(default)]
    #[allow(dead_code)]
    licence: String,
    operators: Vec<OperatorEntry>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CountryEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountryList {
    as_of: String,
    sources: Vec<String>,
    countries: BTreeMap<String, CountryEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountriesFile {
    version: String,
    eu: CountryList,
    eea: CountryList,
    adequacy: CountryList,
}

/// The registry and the lists, indexed for lookups.
#[derive(Debug, Clone)]
pub struct Registry {
    pub version: String,
    operators: Vec<OperatorEntry>,
    by_asn: HashMap<u32, usize>,
    pub countries_version: String,
    eu: BTreeMap<String, CountryEntry>,
    eea: BTreeMap<String, CountryEntry>,
    adequacy: BTreeMap<String, CountryEntry>,
}

/// The files shipped in `geoip/`, built into the binary.
pub const BUILTIN_OPERATORS: &str = include_str!("../../geoip/operators.json");
pub const BUILTIN_COUNTRIES: &str = include_str!("../../geoip/countries.json");

fn check_country(code: &str, what: &str) -> anyhow::Result<()> {
    if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        bail!("{what}: {code:?} is not an ISO 3166-1 alpha-2 code (two capital letters)");
    }
    Ok(())
}

impl Registry {
    /// Parses and checks the two files; `names` are shown in errors.
    pub fn parse(
        operators: &str,
        operators_name: &str,
        countries: &str,
        countries_name: &str,
    ) -> anyhow::Result<Registry> {
        let ops: RegistryFile = serde_json::from_str(operators)
            .map_err(|e| anyhow::anyhow!("{operators_name}: {e}"))?;
        let mut by_asn = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for (i, op) in ops.operators.iter().enumerate() {
            if !ids.insert(op.id.as_str()) {
                bail!("{operators_name}: operator id {} is listed twice", op.id);
            }
            check_country(
                &op.jurisdiction,
                &format!("{operators_name}: operator {}", op.id),
            )?;
            if op.sources.is_empty() {
                bail!("{operators_name}: operator {} has no source", op.id);
            }
            for asn in &op.asns {
                if let Some(prev) = by_asn.insert(*asn, i) {
                    bail!(
                        "{operators_name}: AS{asn} is listed for both {} and {}",
                        ops.operators[prev].id,
                        op.id
                    );
                }
            }
        }
        let c: CountriesFile = serde_json::from_str(countries)
            .map_err(|e| anyhow::anyhow!("{countries_name}: {e}"))?;
        for (list, name) in [(&c.eu, "eu"), (&c.eea, "eea"), (&c.adequacy, "adequacy")] {
            if list.sources.is_empty() || list.as_of.is_empty() {
                bail!("{countries_name}: list {name} needs as_of and sources");
            }
            for (code, entry) in &list.countries {
                check_country(code, &format!("{countries_name}: list {name}"))?;
                if let Some(scope) = &entry.scope {
                    if scope != "full" && scope != "partial" {
                        bail!("{countries_name}: list {name}: {code} has scope {scope:?}, expected \"full\" or \"partial\"");
                    }
                }
            }
        }
        Ok(Registry {
            version: ops.version,
            operators: ops.operators,
            by_asn,
            countries_version: c.version,
            eu: c.eu.countries,
            eea: c.eea.countries,
            adequacy: c.adequacy.countries,
        })
    }

    pub fn builtin() -> anyhow::Result<Registry> {
        Self::parse(
            BUILTIN_OPERATORS,
            "<built-in>/geoip/operators.json",
            BUILTIN_COUNTRIES,
            "<built-in>/geoip/countries.json",
        )
    }

    pub fn load(
        operators: Option<&std::path::Path>,
        countries: Option<&std::path::Path>,
    ) -> anyhow::Result<Registry> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let (ops, ops_name) = match operators {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (
                BUILTIN_OPERATORS.to_string(),
                "<built-in>/geoip/operators.json".into(),
            ),
        };
        let (cs, cs_name) = match countries {
            Some(p) => (read(p)?, p.display().to_string()),
            None => (
                BUILTIN_COUNTRIES.to_string(),
                "<built-in>/geoip/countries.json".into(),
            ),
        };
        Self::parse(&ops, &ops_name, &cs, &cs_name)
    }

    pub fn operator_for_asn(&self, asn: u32) -> Option<&OperatorEntry> {
        self.by_asn.get(&asn).map(|&i| &self.operators[i])
    }

    pub fn operator_count(&self) -> usize {
        self.operators.len()
    }

    pub fn in_eu(&self, country: &str) -> bool {
        self.eu.contains_key(country)
    }

    /// EU members and the other EEA members.
    pub fn in_eea(&self, country: &str) -> bool {
        self.eu.contains_key(country) || self.eea.contains_key(country)
    }

    pub fn adequacy(&self, country: &str) -> Option<&CountryEntry> {
        self.adequacy.get(country)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_registry_parses_and_covers_the_traps() {
        let r = Registry::builtin().unwrap();
        assert_eq!(r.eu.len(), 27);
        assert!(r.in_eea("NO") && !r.in_eu("NO"));
        assert!(!r.in_eea("CH") && r.adequacy("CH").is_some());
        let amazon = r.operator_for_asn(16509).expect("AS16509 is Amazon");
        assert_eq!(
            (amazon.jurisdiction.as_str(), amazon.cloud_act),
            ("US", true)
        );
        let ovh = r.operator_for_asn(16276).expect("AS16276 is OVHcloud");
        assert_eq!((ovh.jurisdiction.as_str(), ovh.cloud_act), ("FR", false));
        let scw = r.operator_for_asn(12876).expect("AS12876 is Scaleway");
        assert_eq!(scw.jurisdiction, "FR");
    }

    #[test]
    fn duplicate_asn_and_bad_country_are_rejected() {
        let op = |id: &str, asn: u32, j: &str| {
            format!(
                r#"{{"id":"{id}","name":"n","parent":"p","jurisdiction":"{j}","cloud_act":false,"kind":"cloud","asns":[{asn}],"sources":["s"]}}"#
            )
        };
        let file = |ops: &[String]| format!(r#"{{"version":"1","operators":[{}]}}"#, ops.join(","));
        let err = Registry::parse(
            &file(&[op("a", 1, "FR"), op("b", 1, "DE")]),
            "ops",
            BUILTIN_COUNTRIES,
            "c",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("AS1 is listed for both a and b"),
            "{err}"
        );
        let err = Registry::parse(
            &file(&[op("a", 1, "France")]),
            "ops",
            BUILTIN_COUNTRIES,
            "c",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ISO 3166-1"), "{err}");
        let twice = file(&[op("a", 1, "FR"), op("a", 2, "FR")]);
        let err = Registry::parse(&twice, "ops", BUILTIN_COUNTRIES, "c").unwrap_err();
        assert!(err.to_string().contains("id a is listed twice"), "{err}");
        let err = Registry::parse(
            r#"{"version":"1","operators":[],"extra":1}"#,
            "ops.json",
            BUILTIN_COUNTRIES,
            "c",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ops.json") && err.to_string().contains("line 1"),
            "{err}"
        );
    }
}
