//! Generated GeoIP databases that place loopback addresses in chosen
//! countries and operators (with `[geo] locate_non_public = true`), so that
//! real traffic on loopback carries real sovereignty verdicts:
//! - 127.0.0.1 — France, OVHcloud (EU operator in the EU);
//! - 127.0.0.2 — France, OVHcloud;
//! - 127.0.0.3 — United States, an operator not in the registry;
//! - 127.0.0.4 — Germany, Amazon (US operator in the EU).

use std::path::{Path, PathBuf};

use mmdb_writer::{Value, Writer};

pub const EU: &str = "127.0.0.2";
pub const US: &str = "127.0.0.3";
pub const US_OPERATOR_IN_EU: &str = "127.0.0.4";

/// The test destinations: (ip, country, asn, organisation). The US
/// address's operator is not in the registry: refused for its location
/// alone.
const DESTINATIONS: [(&str, &str, u32, &str); 3] = [
    (EU, "FR", 16276, "OVH SAS"),
    (US, "US", 64496, "EXAMPLE-US"),
    (US_OPERATOR_IN_EU, "DE", 16509, "AMAZON-02"),
];

/// Writes `country.mmdb` and `asn.mmdb` into `dir`, placing 127.0.0.1 and
/// the test destinations; `places` overrides or adds (ip, country, asn,
/// organisation) entries.
pub fn write(dir: &Path, places: &[(&str, &str, u32, &str)]) -> (PathBuf, PathBuf) {
    let mut table = vec![("127.0.0.1", "FR", 16276, "OVH SAS")];
    table.extend(DESTINATIONS);
    for p in places {
        table.retain(|t| t.0 != p.0);
        table.push(*p);
    }
    write_exactly(dir, &table)
}

/// As [`write`], with the test destinations only: 127.0.0.1 (where the
/// egress tests' clients and resolver stand) stays unlocated.
pub fn write_destinations(dir: &Path) -> (PathBuf, PathBuf) {
    write_exactly(dir, &DESTINATIONS)
}

fn write_exactly(dir: &Path, table: &[(&str, &str, u32, &str)]) -> (PathBuf, PathBuf) {
    let mut country = Writer::new("ip-location-db-country");
    let mut asn = Writer::new("GeoLite2-ASN");
    for &(ip, cc, n, org) in table {
        let net: mmdb_writer::ipnet::IpNet = format!("{ip}/32").parse().unwrap();
        country
            .insert_value(
                net,
                Value::map([("country_code", Value::String(cc.into()))]),
            )
            .unwrap();
        asn.insert_value(
            net,
            Value::map([
                ("autonomous_system_number", Value::U32(n)),
                ("autonomous_system_organization", Value::String(org.into())),
            ]),
        )
        .unwrap();
    }
    let (c, a) = (dir.join("country.mmdb"), dir.join("asn.mmdb"));
    country
        .write_to(std::fs::File::create(&c).unwrap())
        .unwrap();
    asn.write_to(std::fs::File::create(&a).unwrap()).unwrap();
    (c, a)
}

/// The `[geo]` table for databases written by [`write`].
pub fn geo_toml(country: &Path, asn: &Path) -> String {
    format!(
        "[geo]\ncountry_db = \"{}\"\nasn_db = \"{}\"\nlocate_non_public = true\n",
        country.display(),
        asn.display()
    )
}

/// A copy of the repository's policies in `dir/policies` with
/// `internal_networks` opened to loopback (the test destinations are
/// judged on their location, not refused as loopback).
pub fn policies(dir: &Path) -> PathBuf {
    policies_with(dir, |_| {})
}

/// [`policies`], with further changes to the policy data.
pub fn policies_with(dir: &Path, patch: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(super::repo_policies()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, out.join(p.file_name().unwrap())).unwrap();
    }
    let data_path = out.join("data.json");
    let mut data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data_path).unwrap()).unwrap();
    data["settings"]["egress"]["internal_networks"] = serde_json::json!(["127.0.0.0/8"]);
    patch(&mut data);
    std::fs::write(&data_path, serde_json::to_string_pretty(&data).unwrap()).unwrap();
    out
}
