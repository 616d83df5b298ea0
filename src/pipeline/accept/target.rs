//! Part of **accept** for the egress proxy: what destination a proxy
//! request names, in one canonical form.
//!
//! The same destination must get the same decision however it is written,
//! so the host is put in the form a resolver would end up using before any
//! policy sees it: IPv4 literals in every form `inet_aton` accepts (decimal
//! `2130706433`, octal `0177.0.0.1`, hex `0x7f.1`, short `127.1`), IPv6 with
//! a zone or an embedded IPv4 address, trailing dots, letter case and
//! internationalised names (to their punycode form, UTS #46 as browsers
//! do). The WHATWG URL host parser (`url` crate) does exactly this for
//! names and IPv4; zones and IPv4-mapped IPv6 are handled here.

use std::fmt;
use std::net::IpAddr;

use crate::pipeline::locate::canonical_ip;

/// The host of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name: lower case, ASCII (punycode), no trailing dot.
    Name(String),
    /// An address literal, canonical (IPv4-mapped IPv6 as IPv4).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A canonical destination: host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    /// The host as a `Host` header writes it (IPv6 in brackets).
    pub fn host_for_header(&self) -> String {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
            h => h.to_string(),
        }
    }
}

/// Why a proxy request's destination was refused before any decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError(pub String);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(msg: impl Into<String>) -> TargetError {
    TargetError(msg.into())
}

/// The destination of a proxy request: the `CONNECT` target, or the
/// authority of an absolute-form `http://` URI. Origin-form requests (not
/// meant for a proxy) and `https://` URIs (which a client must send
/// through `CONNECT`) are refused.
pub fn of_proxy_request(parts: &http::request::Parts) -> Result<Target, TargetError> {
    if parts.method == http::Method::CONNECT {
        let authority = parts
            .uri
            .authority()
            .ok_or_else(|| err("CONNECT needs a host:port target"))?;
        return parse_authority(authority.as_str(), None);
    }
    match (parts.uri.scheme_str(), parts.uri.authority()) {
        (Some("http"), Some(a)) => parse_authority(a.as_str(), Some(80)),
        (Some("https"), _) => Err(err(
            "https:// destinations go through a CONNECT tunnel (set HTTPS_PROXY)",
        )),
        (Some(other), _) => Err(err(format!("unsupported scheme {other:?}"))),
        (None, _) => Err(err(
            "not a proxy request: send an absolute URI (http://host/path) or CONNECT host:port",
        )),
    }
}

/// Parses `host[:port]` (the CONNECT request target, or the authority of
/// an absolute-form URI). `default_port` is used when no port is written;
/// `None` makes the port mandatory (CONNECT).
pub fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
    if authority.is_empty() {
        return Err(err("empty destination"));
    }
    if authority.contains('@') {
        return Err(err("credentials in the destination are not allowed"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| err(format!("unterminated IPv6 literal in {authority:?}")))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| err(format!("junk after IPv6 literal in {authority:?}")))?,
            ),
        };
        (Inner::V6(inside), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(err(format!(
                    "IPv6 destination {authority:?} must be written in brackets"
                )))
            }
            Some((h, p)) => (Inner::Other(h), Some(p)),
            None => (Inner::Other(authority), None),
        }
    };
    let port = match port {
        Some(p) => parse_port(p)?,
        None => {
            default_port.ok_or_else(|| err(format!("destination {authority:?} has no port")))?
        }
    };
    let host = match host {
        Inner::V6(v6) => Host::Ip(parse_ipv6(v6)?),
        Inner::Other(h) => parse_host(h)?,
    };
    Ok(Target { host, port })
}

enum Inner<'a> {
    V6(&'a str),
    Other(&'a str),
}

fn parse_port(p: &str) -> Result<u16, TargetError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) if !p.is_empty() => Err(err(format!("invalid port {p:?}"))),
        Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(err(format!("invalid port {p:?}"))),
    }
}

/// An IPv6 literal without brackets; a zone (`%eth0`, or `%25eth0` as
/// URIs write it) is dropped: the address decides, and a zone only makes
/// sense for link-local addresses, which policies refuse anyway.
fn parse_ipv6(s: &str) -> Result<IpAddr, TargetError> {
    let addr = s.split_once('%').map_or(s, |(a, _)| a);
    addr.parse::<std::net::Ipv6Addr>()
        .map(|v6| canonical_ip(IpAddr::V6(v6)))
        .map_err(|_| err(format!("invalid IPv6 address {s:?}")))
}

/// A name or an IPv4 literal in any form a resolver accepts.
fn parse_host(h: &str) -> Result<Host, TargetError> {
    if h.is_empty() {
        return Err(err("empty host"));
    }
    // One trailing dot is the fully qualified spelling of the same name.
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.is_empty() || h.ends_with('.') {
        return Err(err(format!("invalid host {h:?}")));
    }
    match url::Host::parse(h) {
        Ok(url::Host::Ipv4(v4)) => Ok(Host::Ip(IpAddr::V4(v4))),
        Ok(url::Host::Ipv6(v6)) => Ok(Host::Ip(canonical_ip(IpAddr::V6(v6)))),
        Ok(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_string();
            check_dns_name(&d)?;
            Ok(Host::Name(d))
        }
        Err(e) => Err(err(format!("invalid host {h:?}: {e}"))),
    }
}

/// What DNS can carry: labels of 1–63 letters, digits, `-` and `_`, 253
/// characters in all. Anything else cannot be resolved and is refused
/// before it reaches a resolver or a policy.
fn check_dns_name(d: &str) -> Result<(), TargetError> {
    if d.len() > 253 {
        return Err(err(format!("host name longer than 253 characters: {d:?}")));
    }
    for label in d.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if label.is_empty() || label.len() > 63 || !ok_chars {
            return Err(err(format!("invalid host name {d:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> String {
        let t = parse_authority(s, Some(80)).unwrap_or_else(|e| panic!("{s}: {e}"));
        format!("{}:{}", t.host, t.port)
    }

    #[test]
    fn every_spelling_of_loopback_is_one_address() {
        for s in [
            "127.0.0.1",
            "127.0.0.1.",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0x7F.0x0.0.01",
            "127.1",
            "127.0.1",
            "017700000001",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::FFFF:127.0.0.1]",
        ] {
            assert_eq!(t(s), "127.0.0.1:80", "{s}");
        }
    }

    #[test]
    fn metadata_address_spellings() {
        for s in [
            "169.254.169.254:80",
            "0xa9fea9fe:80",
            "2852039166:80",
            "0251.0376.0251.0376:80",
            "169.254.43518:80",
            "[::ffff:a9fe:a9fe]:80",
        ] {
            assert_eq!(t(s), "169.254.169.254:80", "{s}");
        }
    }

    #[test]
    fn names_are_lower_case_punycode_without_trailing_dot() {
        assert_eq!(t("API.Example.EU."), "api.example.eu:80");
        assert_eq!(t("bücher.example:8443"), "xn--bcher-kva.example:8443");
        assert_eq!(t("BÜCHER.example"), "xn--bcher-kva.example:80");
        assert_eq!(t("xn--bcher-kva.example"), "xn--bcher-kva.example:80");
        assert_eq!(t("_dmarc.example.org"), "_dmarc.example.org:80");
    }

    #[test]
    fn ipv6_with_zone_and_port() {
        assert_eq!(t("[fe80::1%25eth0]:443"), "fe80::1:443");
        assert_eq!(t("[fe80::1%eth0]"), "fe80::1:80");
        assert_eq!(t("[2001:DB8::1]:8080"), "2001:db8::1:8080");
    }

    #[test]
    fn bad_destinations_are_refused_with_what_is_wrong() {
        for (s, want) in [
            ("", "empty"),
            ("example.com:0", "invalid port"),
            ("example.com:99999", "invalid port"),
            ("example.com:+80", "invalid port"),
            ("example.com:", "invalid port"),
            ("::1:443", "brackets"),
            ("[::1", "unterminated"),
            ("[::1]x", "junk"),
            ("[zz::1]:80", "invalid IPv6"),
            ("user:pw@example.com:80", "credentials"),
            ("exa mple.com", "invalid host"),
            ("example..com", "invalid host"),
            ("example.com..", "invalid host"),
            ("256.0.0.1", "invalid host"),
            ("a*b.example", "invalid host"),
        ] {
            let e = parse_authority(s, Some(80)).unwrap_err().0;
            assert!(e.contains(want), "{s:?}: {e}");
        }
        let e = parse_authority("example.com", None).unwrap_err().0;
        assert!(e.contains("no port"), "{e}");
    }
}
