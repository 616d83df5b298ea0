//! The declared facts: what the sovereignty grid asks about the vendor and
//! its contracts that no packet shows (legal form, shareholding,
//! certifications, contract law). A small TOML file the DSI fills in from
//! the vendor's answers; every fact is optional, and a criterion whose
//! fact is missing is reported as not judged (no free points).

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Certifications the grid counts (lower-case in the file).
pub const CERTIFICATIONS: [&str; 3] = ["iso27001", "secnumcloud", "hds"];

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    #[serde(default)]
    pub vendor: VendorFacts,
    #[serde(default)]
    pub hosting: HostingFacts,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VendorFacts {
    /// The vendor's name, for the report's heading.
    pub name: Option<String>,
    /// ISO 3166-1 alpha-2 of the country whose law the vendor's company is
    /// under (its registered seat).
    pub country: Option<String>,
    /// Share of the capital held by Europeans (EU/EEA persons), 0–100.
    pub eu_shareholding_percent: Option<f64>,
    /// A parent company under US law.
    pub us_parent: Option<bool>,
    /// A subsidiary under US law.
    pub us_subsidiary: Option<bool>,
    /// The source code can be audited by the customer (open source or a
    /// contractual audit right).
    pub source_code_auditable: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostingFacts {
    /// The hosting provider's name.
    pub provider: Option<String>,
    /// ISO 3166-1 alpha-2 of the law governing the hosting contract.
    pub contract_law: Option<String>,
    /// Certifications of the datacenters and the service: any of
    /// `iso27001`, `secnumcloud`, `hds`.
    pub certifications: Option<Vec<String>>,
}

impl Facts {
    pub fn from_file(path: &Path) -> anyhow::Result<Facts> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read declared facts {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("declared facts {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Facts> {
        let facts: Facts = toml::from_str(text)?;
        facts.check()?;
        Ok(facts)
    }

    fn check(&self) -> anyhow::Result<()> {
        for (what, code) in [
            ("[vendor] country", &self.vendor.country),
            ("[hosting] contract_law", &self.hosting.contract_law),
        ] {
            if let Some(c) = code {
                if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                    bail!("{what}: {c:?} is not an ISO 3166-1 alpha-2 code (two capital letters, e.g. \"FR\")");
                }
            }
        }
        if let Some(p) = self.vendor.eu_shareholding_percent {
            if !(0.0..=100.0).contains(&p) {
                bail!("[vendor] eu_shareholding_percent: {p} is not between 0 and 100");
            }
        }
        for c in self.hosting.certifications.iter().flatten() {
            if !CERTIFICATIONS.contains(&c.as_str()) {
                bail!(
                    "[hosting] certifications: {c:?} is not one the grid counts ({})",
                    CERTIFICATIONS.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn certified(&self, name: &str) -> Option<bool> {
        self.hosting
            .certifications
            .as_ref()
            .map(|c| c.iter().any(|x| x == name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_the_key_named() {
        let f = Facts::parse(
            "[vendor]\ncountry = \"FR\"\neu_shareholding_percent = 72\n[hosting]\ncertifications = [\"hds\"]\n",
        )
        .unwrap();
        assert_eq!(f.vendor.country.as_deref(), Some("FR"));
        assert_eq!(f.certified("hds"), Some(true));
        assert_eq!(f.certified("iso27001"), Some(false));
        assert_eq!(Facts::default().certified("hds"), None);
        let e = Facts::parse("[vendor]\ncountry = \"France\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("[vendor] country"), "{e:#}");
        let e = Facts::parse("[hosting]\ncertifications = [\"soc2\"]\n").unwrap_err();
        assert!(format!("{e:#}").contains("soc2"), "{e:#}");
        let e = Facts::parse("[vendor]\nshareholders = 3\n").unwrap_err();
        assert!(format!("{e:#}").contains("shareholders"), "{e:#}");
    }
}
