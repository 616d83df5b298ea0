//! Building the ASN database from ip-location-db's CSV (no ready MMDB of
//! it is published on the registries reachable here).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use mmdb_writer::{Value, Writer};

/// Converts CSV rows `ip_range_start,ip_range_end,asn,as_organisation` into
/// a GeoLite2-ASN-shaped MMDB written atomically (temp file, then rename,
/// so that a running rempart never maps a half-written file). Returns the
/// number of ranges.
pub fn asn_from_csv(csvs: &[PathBuf], out: &Path) -> anyhow::Result<usize> {
    let mut writer = Writer::new("rempart-ASN");
    let mut ranges = 0usize;
    let mut skipped = 0usize;
    for csv in csvs {
        let text = std::fs::read_to_string(csv)
            .with_context(|| format!("cannot read {}", csv.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("{}:{}", csv.display(), n + 1);
            let mut cols = line.splitn(4, ',');
            let (Some(start), Some(end), Some(asn)) = (cols.next(), cols.next(), cols.next())
            else {
                return Err(anyhow!(
                    "{}: expected ip_range_start,ip_range_end,asn,as_organisation",
                    at()
                ));
            };
            if n == 0 && start.parse::<IpAddr>().is_err() {
                continue; // a header line
            }
            let org = cols
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_string();
            let start: IpAddr = start
                .parse()
                .map_err(|_| anyhow!("{}: bad start address {start:?}", at()))?;
            let end: IpAddr = end
                .parse()
                .map_err(|_| anyhow!("{}: bad end address {end:?}", at()))?;
            let asn: u32 = asn
                .trim()
                .parse()
                .map_err(|_| anyhow!("{}: bad AS number {asn:?}", at()))?;
            if in_ipv4_alias(start) || in_ipv4_alias(end) {
                // These IPv6 ranges (IPv4-mapped, Teredo, 6to4) are answered
                // from the IPv4 tree, as MaxMind databases do.
                skipped += 1;
                continue;
            }
            let mut fields = vec![("autonomous_system_number", Value::U32(asn))];
            if !org.is_empty() {
                fields.push(("autonomous_system_organization", Value::String(org)));
            }
            writer
                .insert_range(start, end, &Value::map(fields))
                .map_err(|e| anyhow!("{}: {e}", at()))?;
            ranges += 1;
        }
    }
    let tmp = out.with_extension("mmdb.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    writer
        .write_to(std::io::BufWriter::new(file))
        .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} IPv6 ranges inside IPv4-aliased networks \
             (::ffff:0:0/96, 2001::/32, 2002::/16)"
        );
    }
    Ok(ranges)
}

/// IPv6 networks that an MMDB answers from its IPv4 tree.
fn in_ipv4_alias(ip: IpAddr) -> bool {
    let IpAddr::V6(v6) = ip else { return false };
    let s = v6.segments();
    v6.to_ipv4_mapped().is_some() || (s[0] == 0x2001 && s[1] == 0) || s[0] == 0x2002
}
