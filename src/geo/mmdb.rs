//! MaxMind DB files, memory-mapped: GeoIP2/GeoLite2 (Country, City, ASN)
//! and ip-location-db / DB-IP files whose records are `{"country_code"}`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use maxminddb::{Mmap, Reader};
use serde::{Deserialize, Serialize};

/// The record layout, detected from the file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// MaxMind GeoIP2/GeoLite2 Country or City: `country.iso_code`.
    Geoip2Country,
    /// MaxMind GeoLite2/GeoIP2 ASN: `autonomous_system_number`, `..._organization`.
    Geoip2Asn,
    /// ip-location-db and similar: `country_code`.
    CountryCode,
}

impl Shape {
    fn detect(database_type: &str) -> Shape {
        let t = database_type.to_ascii_lowercase();
        let maxmind_family =
            t.starts_with("geoip2-") || t.starts_with("geolite2-") || t.starts_with("dbip-");
        if t.contains("country") || t.contains("city") {
            // "GeoLite2-Country", but also ip-location-db's "country ipvAll"
            // and "iptoasn-country" (the country where the AS is registered).
            if maxmind_family {
                Shape::Geoip2Country
            } else {
                Shape::CountryCode
            }
        } else if t.contains("asn") || t.contains("isp") {
            Shape::Geoip2Asn
        } else if maxmind_family {
            Shape::Geoip2Country
        } else {
            Shape::CountryCode
        }
    }
}

pub struct Database {
    reader: Reader<Mmap>,
    pub path: PathBuf,
    pub shape: Shape,
}

#[derive(Debug, Serialize)]
pub struct DatabaseInfo {
    pub role: &'static str,
    pub path: String,
    pub database_type: String,
    pub shape: Shape,
    pub build_date: String,
    pub build_epoch: u64,
    pub ip_version: u16,
    pub records: Option<usize>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

/// Both country shapes at once: a GeoIP2 record has `country`, an
/// ip-location-db one has `country_code`.
#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct AsnRecord<'a> {
    autonomous_system_number: Option<u32>,
    #[serde(borrow)]
    autonomous_system_organization: Option<&'a str>,
}

fn valid_country(code: &str) -> Option<String> {
    (code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| code.to_ascii_uppercase())
}

impl Database {
    pub fn open(path: &Path) -> anyhow::Result<Database> {
        // SAFETY: a memory map is sound as long as the file is not modified
        // in place while mapped. Database updates must replace the file
        // (write a new file, then rename over the old one), as
        // geoip/fetch.sh and geoipupdate do: the old inode stays mapped,
        // unchanged, until the reload drops this reader. This contract is
        // stated in docs/geo.md.
        let reader = unsafe { Reader::open_mmap(path) }
            .map_err(|e| anyhow!("{}: not a readable MaxMind DB file: {e}", path.display()))?;
        let shape = Shape::detect(&reader.metadata().database_type);
        let db = Database {
            reader,
            path: path.to_path_buf(),
            shape,
        };
        Ok(db)
    }

    /// The record covering `ip`, decoded as `T`, or None.
    fn record<'a, T: Deserialize<'a>>(&'a self, ip: IpAddr) -> anyhow::Result<Option<T>> {
        self.reader
            .lookup(ip)
            .context("lookup failed")?
            .decode()
            .map_err(|e| anyhow!("{}: bad record: {e}", self.path.display()))
    }

    /// The located country (ISO code), from either shape.
    pub fn country(&self, ip: IpAddr) -> anyhow::Result<Option<String>> {
        let rec: Option<CountryRecord<'_>> = self.record(ip)?;
        Ok(rec.and_then(|r| {
            r.country
                .and_then(|c| c.iso_code)
                .or(r.country_code)
                .and_then(valid_country)
        }))
    }

    pub fn asn(&self, ip: IpAddr) -> anyhow::Result<Option<(u32, Option<String>)>> {
        let rec: Option<AsnRecord<'_>> = self.record(ip)?;
        Ok(rec.and_then(|r| {
            r.autonomous_system_number
                .map(|n| (n, r.autonomous_system_organization.map(String::from)))
        }))
    }

    /// Checks that the file's role matches its shape, so that a country
    /// file configured as the ASN database is refused at load, not
    /// silently answering nothing.
    pub fn expect_role(&self, role: &str) -> anyhow::Result<()> {
        let ok = match role {
            "asn" => self.shape == Shape::Geoip2Asn,
            _ => self.shape != Shape::Geoip2Asn,
        };
        if !ok {
            return Err(anyhow!(
                "{}: database type {:?} cannot serve as the {role} database",
                self.path.display(),
                self.reader.metadata().database_type
            ));
        }
        Ok(())
    }

    pub fn info(&self, role: &'static str, count_records: bool) -> DatabaseInfo {
        let m = self.reader.metadata();
        let records = count_records.then(|| {
            self.reader
                .networks(Default::default())
                .map(|it| {
                    it.filter(|n| n.as_ref().is_ok_and(|n| n.has_data()))
                        .count()
                })
                .unwrap_or(0)
        });
        DatabaseInfo {
            role,
            path: self.path.display().to_string(),
            database_type: m.database_type.clone(),
            shape: self.shape,
            build_date: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.build_epoch),
            )
            .to_string(),
            build_epoch: m.build_epoch,
            ip_version: m.ip_version,
            records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_from_database_type() {
        assert_eq!(Shape::detect("GeoLite2-Country"), Shape::Geoip2Country);
        assert_eq!(Shape::detect("GeoIP2-City"), Shape::Geoip2Country);
        assert_eq!(Shape::detect("GeoLite2-ASN"), Shape::Geoip2Asn);
        assert_eq!(Shape::detect("DBIP-Country-Lite"), Shape::Geoip2Country);
        assert_eq!(Shape::detect("ip-location-db"), Shape::CountryCode);
        assert_eq!(Shape::detect("country ipvAll"), Shape::CountryCode);
        assert_eq!(Shape::detect("iptoasn-country"), Shape::CountryCode);
        assert_eq!(Shape::detect("rempart-ASN"), Shape::Geoip2Asn);
    }
}
