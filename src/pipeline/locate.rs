//! Stage 4, **locate**: where the source and the destination are.
//!
//! The address scope (loopback, private, public, ...) of the peer and of
//! the upstream, and for public addresses their location and the
//! jurisdiction of their operator ([`crate::geo`]).

pub mod resolve;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::geo::{Geo, GeoDb};
use crate::input::{Address, Destination, Endpoint};

/// The special-purpose class of an address (IANA special-purpose registries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Public,
    Private,
    Loopback,
    LinkLocal,
    Cgnat,
    Multicast,
    Unspecified,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Public => "public",
            Scope::Private => "private",
            Scope::Loopback => "loopback",
            Scope::LinkLocal => "link_local",
            Scope::Cgnat => "cgnat",
            Scope::Multicast => "multicast",
            Scope::Unspecified => "unspecified",
            Scope::Broadcast => "broadcast",
            Scope::Documentation => "documentation",
            Scope::Benchmarking => "benchmarking",
            Scope::Reserved => "reserved",
        }
    }
}

/// The address to locate: an IPv6 address that embeds an IPv4 one (see
/// [`embedded_ipv4`]) is located by the IPv4 address, so that every way of
/// writing one destination gets the same country and operator.
pub fn location_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes the IPv4 address it carries,
/// so that a policy comparing strings or a CIDR check sees one form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 address embeds, for the forms that route to it:
/// mapped, deprecated compatible, NAT64 well-known prefix, 6to4, and Teredo
/// (the client's address, stored inverted in the last 32 bits).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // ::a.b.c.d (RFC 4291 "IPv4-compatible", deprecated); not :: or ::1.
    if s[..6].iter().all(|&x| x == 0) && u32::from(tail) > 1 {
        return Some(tail);
    }
    // 64:ff9b::/96 NAT64 well-known prefix (RFC 6052).
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0) {
        return Some(tail);
    }
    // 2001::/32 Teredo (RFC 4380): the client's IPv4 address, inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(Ipv4Addr::from(!u32::from(tail)));
    }
    // 2002::/16 6to4 (RFC 3056): the IPv4 address is bits 16..48.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

pub fn scope(ip: IpAddr) -> Scope {
    match ip {
        IpAddr::V4(v4) => scope_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(v4) => scope_v4(v4),
            None => scope_v6(v6),
        },
    }
}

fn scope_v4(ip: Ipv4Addr) -> Scope {
    let o = ip.octets();
    let n = u32::from(ip);
    let in_net = |net: u32, bits: u32| (n >> (32 - bits)) == (net >> (32 - bits));
    if ip.is_unspecified() {
        Scope::Unspecified
    } else if ip.is_broadcast() {
        Scope::Broadcast
    } else if ip.is_loopback() {
        Scope::Loopback
    } else if ip.is_private() {
        Scope::Private
    } else if ip.is_link_local() {
        Scope::LinkLocal
    } else if in_net(0x6440_0000, 10) {
        // 100.64.0.0/10 shared address space (RFC 6598)
        Scope::Cgnat
    } else if ip.is_multicast() {
        Scope::Multicast
    } else if ip.is_documentation() {
        Scope::Documentation
    } else if in_net(0xC612_0000, 15) {
        // 198.18.0.0/15 (RFC 2544)
        Scope::Benchmarking
    } else if o[0] == 0 || o[0] >= 240 || in_net(0xC000_0000, 24) || in_net(0xC058_6300, 24) {
        // 0/8 "this network", 240/4 reserved, 192.0.0.0/24 IETF protocol
        // assignments, 192.88.99.0/24 deprecated 6to4 relay anycast.
        Scope::Reserved
    } else {
        Scope::Public
    }
}

fn scope_v6(ip: Ipv6Addr) -> Scope {
    let s = ip.segments();
    if ip.is_unspecified() {
        Scope::Unspecified
    } else if ip.is_loopback() {
        Scope::Loopback
    } else if ip.is_multicast() {
        Scope::Multicast
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Scope::LinkLocal
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // fc00::/7 unique local addresses: the IPv6 private ranges.
        Scope::Private
    } else if s[0] == 0x2001 && s[1] == 0x0db8 || s[0] == 0x3fff && s[1] < 0x1000 {
        // 2001:db8::/32 and 3fff::/20 documentation.
        Scope::Documentation
    } else if s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0 {
        Scope::Benchmarking
    } else if (s[0] & 0xe000) != 0x2000 || (s[0] == 0x2001 && s[1] < 0x0200) || s[0] == 0x0100 {
        // Outside 2000::/3 global unicast, 2001::/23 IETF protocol
        // assignments (Teredo, ORCHID...), 100::/64 discard-only.
        Scope::Reserved
    } else {
        Scope::Public
    }
}

/// The source of a request: the peer of the accepted connection.
pub fn locate_source(conn: &crate::pipeline::accept::Connection, geo: &Arc<GeoDb>) -> Endpoint {
    let located = conn.peer_location.locate(conn.peer.ip(), geo);
    Endpoint {
        ip: conn.peer_ip_str().into(),
        port: conn.peer.port(),
        scope: located.scope.clone(),
        geo: located,
        workload: None,
    }
}

/// Where a connection's peer is, kept for the connection: every request on
/// it comes from the same address, so the databases are searched once per
/// connection (and again after a geo reload), not once per request. For a
/// public client that is three database lookups and the strings of its
/// location saved per request.
#[derive(Debug, Default)]
pub struct PeerLocation(Mutex<Option<(Weak<GeoDb>, Arc<Geo>)>>);

impl PeerLocation {
    /// `ip`'s location in `geo`: the one kept when it was found in this
    /// same generation of the data, else a fresh lookup, kept.
    pub fn locate(&self, ip: IpAddr, geo: &Arc<GeoDb>) -> Arc<Geo> {
        // Only the connection's own requests take this lock. The slot is
        // only ever replaced whole, so a panic while it was held cannot
        // have left half an answer: a poisoned lock is used as it is.
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // The generation is told by its address; the `Weak` kept with it
        // holds that address (not the data) so it cannot be reused by a
        // later generation.
        if let Some((generation, located)) = kept.as_ref() {
            if std::ptr::eq(generation.as_ptr(), Arc::as_ptr(geo)) {
                return Arc::clone(located);
            }
        }
        let located = Arc::new(geo.lookup(canonical_ip(ip)));
        *kept = Some((Arc::downgrade(geo), Arc::clone(&located)));
        located
    }
}

/// Resolves the upstream's host once, at start: rempart connects to this
/// address and no other, so the address the policy judged is the address
/// the data goes to (a later DNS change cannot redirect it).
pub fn resolve_upstream(upstream: &crate::config::UpstreamUrl) -> anyhow::Result<IpAddr> {
    use std::net::ToSocketAddrs;
    let host = upstream.authority.host();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(canonical_ip(ip));
    }
    let mut addrs = (literal, upstream.port())
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve upstream host {literal:?}: {e}"))?;
    addrs
        .next()
        .map(|a| canonical_ip(a.ip()))
        .ok_or_else(|| anyhow::anyhow!("upstream host {literal:?} resolves to no address"))
}

/// The destination of an ingress request: the configured upstream, at the
/// address it was resolved to.
pub fn locate_upstream(
    upstream: &crate::config::UpstreamUrl,
    ip: IpAddr,
    geo: &GeoDb,
) -> Destination {
    let host = upstream.authority.host();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let located = locate_address(ip, geo);
    Destination {
        host: literal.to_ascii_lowercase(),
        ip: Some(located.ip.clone()),
        port: upstream.port(),
        scope: Some(located.scope.clone()),
        geo: Some(located.geo.clone()),
        addresses: vec![located],
    }
}

/// One address with its scope, location and operator.
pub fn locate_address(ip: IpAddr, geo: &GeoDb) -> Address {
    let ip = canonical_ip(ip);
    let geo = geo.lookup(ip);
    Address {
        ip: ip.to_string(),
        scope: geo.scope.clone(),
        geo,
    }
}

/// An egress destination with every resolved address located; `chosen`
/// indexes the address this decision is about (`None`: no address).
pub fn egress_destination(
    host: String,
    port: u16,
    addresses: Vec<Address>,
    chosen: Option<usize>,
) -> Destination {
    let pick = chosen.and_then(|i| addresses.get(i));
    Destination {
        host,
        ip: pick.map(|a| a.ip.clone()),
        port,
        scope: pick.map(|a| a.scope.clone()),
        geo: pick.map(|a| a.geo.clone()),
        addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_locates_its_peer_once_per_generation_of_geo_data() {
        use crate::pipeline::accept::Connection;
        let maxmind = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/maxmind");
        let open = || {
            let files = crate::geo::GeoFiles {
                country_db: Some(maxmind.join("GeoLite2-Country-Test.mmdb")),
                asn_db: Some(maxmind.join("GeoLite2-ASN-Test.mmdb")),
                ..Default::default()
            };
            Arc::new(GeoDb::open(&files).unwrap())
        };
        let (first, second) = (open(), open());
        let here = "127.0.0.1:8080".parse().unwrap();
        let conn = Connection::new("[::ffff:2.125.160.216]:4000".parse().unwrap(), here);

        let a = locate_source(&conn, &first);
        let b = locate_source(&conn, &first);
        assert_eq!(a.geo.country.as_deref(), Some("GB"));
        assert_eq!(
            (a.ip.as_str(), a.scope.as_ref()),
            ("2.125.160.216", "public")
        );
        assert!(
            Arc::ptr_eq(&a.geo, &b.geo),
            "looked up again in the same data"
        );

        // A reload: looked up in the new data, then kept again.
        let c = locate_source(&conn, &second);
        assert!(
            !Arc::ptr_eq(&a.geo, &c.geo),
            "the old generation's answer was kept"
        );
        assert_eq!(c.geo, a.geo);
        assert!(Arc::ptr_eq(&c.geo, &locate_source(&conn, &second).geo));
        // What is kept does not keep the data itself alive.
        assert_eq!(Arc::strong_count(&second), 1);

        // Another connection is located for itself.
        let other = Connection::new("127.0.0.1:5000".parse().unwrap(), here);
        let d = locate_source(&other, &second);
        assert_eq!(
            (d.geo.scope.as_ref(), d.geo.country.as_deref()),
            ("loopback", None)
        );
    }

    fn sc(s: &str) -> &'static str {
        scope(s.parse().unwrap()).as_str()
    }

    #[test]
    fn ipv4_special_ranges() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.31.255.255", "private"),
            ("172.32.0.1", "public"),
            ("192.168.0.1", "private"),
            ("169.254.169.254", "link_local"),
            ("100.64.0.1", "cgnat"),
            ("100.128.0.1", "public"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("0.1.2.3", "reserved"),
            ("192.0.0.8", "reserved"),
            ("8.8.8.8", "public"),
            ("52.28.0.1", "public"),
        ] {
            assert_eq!(sc(ip), want, "{ip}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        for (ip, want) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link_local"),
            ("fd00:ec2::254", "private"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("2a01:4f8::1", "public"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:8.8.8.8", "public"),
            ("::169.254.169.254", "link_local"),
            ("64:ff9b::a00:1", "private"),
            ("2002:7f00:1::", "loopback"),
            // Teredo: client 192.168.1.1 stored inverted (3f57:fefe).
            ("2001:0:4136:e378:8000:63bf:3f57:fefe", "private"),
            ("100::1", "reserved"),
        ] {
            assert_eq!(sc(ip), want, "{ip}");
        }
    }

    #[test]
    fn upstream_names_are_resolved_once_to_an_address() {
        let url = crate::config::UpstreamUrl::parse("http://localhost:8000").unwrap();
        let ip = resolve_upstream(&url).unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let url = crate::config::UpstreamUrl::parse("http://[::ffff:10.0.0.1]:8000").unwrap();
        assert_eq!(resolve_upstream(&url).unwrap().to_string(), "10.0.0.1");
        let url = crate::config::UpstreamUrl::parse("http://no-such-host.invalid:8000").unwrap();
        assert!(resolve_upstream(&url)
            .unwrap_err()
            .to_string()
            .contains("no-such-host.invalid"));
    }

    #[test]
    fn canonical_form_unwraps_mapped() {
        assert_eq!(
            canonical_ip("::ffff:1.2.3.4".parse().unwrap()).to_string(),
            "1.2.3.4"
        );
        assert_eq!(canonical_ip("::1".parse().unwrap()).to_string(), "::1");
    }
}
