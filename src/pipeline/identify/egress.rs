//! Part of **identify** for the egress proxy: which workload is calling
//! out. A sidecar sees one CRM; a shared egress gateway sees many, told
//! apart by the account they give in `Proxy-Authorization: Basic`, by
//! their client certificate (`[egress.tls]` with a `client_ca`), or by
//! their source address (`[[egress.workloads]]`), in that order of
//! precedence: a credential says more than an address.

use base64::Engine;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{Cidr, EgressConfig};
use crate::input::Identity;
use crate::pipeline::accept::Connection;
use crate::tls::ClientCert;

/// The caller of one egress request.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub identity: Identity,
    pub workload: Option<String>,
}

/// Why a caller is refused with `407`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    WrongCredentials,
}

impl AuthFailure {
    pub fn message(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "this proxy requires Proxy-Authorization: Basic",
            AuthFailure::Malformed => "Proxy-Authorization is not valid Basic credentials",
            AuthFailure::WrongCredentials => "unknown proxy user or wrong password",
        }
    }
}

struct User {
    name: String,
    password_sha256: [u8; 32],
    workload: Option<String>,
}

struct Workload {
    name: String,
    sources: Vec<Cidr>,
    /// `kind:value` certificate matchers, checked at config validation.
    certificates: Vec<String>,
}

pub struct EgressIdentifier {
    workloads: Vec<Workload>,
    users: Vec<User>,
    require_auth: bool,
}

impl EgressIdentifier {
    pub fn new(cfg: &EgressConfig) -> Self {
        EgressIdentifier {
            workloads: cfg
                .workloads
                .iter()
                .map(|w| Workload {
                    name: w.name.clone(),
                    sources: w.sources.clone(),
                    certificates: w.certificates.clone(),
                })
                .collect(),
            users: cfg
                .users
                .iter()
                .map(|u| {
                    let mut hash = [0u8; 32];
                    // Checked at config validation: 64 hex digits.
                    let _ = hex::decode_to_slice(&u.password_sha256, &mut hash);
                    User {
                        name: u.name.clone(),
                        password_sha256: hash,
                        workload: u.workload.clone(),
                    }
                })
                .collect(),
            require_auth: cfg.require_proxy_auth,
        }
    }

    /// Identifies the caller from `Proxy-Authorization`, its client
    /// certificate and its address. Credentials that are given must be
    /// right, even when not required.
    pub fn identify(&self, headers: &HeaderMap, conn: &Connection) -> Result<Caller, AuthFailure> {
        let peer = conn.peer.ip();
        let cert = conn.client_cert.as_deref();
        let by_cert = cert.and_then(|c| {
            self.workloads
                .iter()
                .find(|w| w.certificates.iter().any(|m| certificate_matches(m, c)))
        });
        let by_source = || {
            self.workloads
                .iter()
                .find(|w| w.sources.iter().any(|n| n.contains(&peer)))
        };
        let workload = by_cert.or_else(by_source).map(|w| w.name.clone());
        let Some(value) = headers.get(http::header::PROXY_AUTHORIZATION) else {
            if self.require_auth && cert.is_none() {
                return Err(AuthFailure::Missing);
            }
            return Ok(Caller {
                identity: cert.map_or_else(Identity::anonymous, Identity::from_client_cert),
                workload,
            });
        };
        let (name, password) = basic_credentials(value).ok_or(AuthFailure::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let user = self
            .users
            .iter()
            .find(|u| u.name == name && constant_time_eq(&u.password_sha256, &digest))
            .ok_or(AuthFailure::WrongCredentials)?;
        Ok(Caller {
            identity: Identity {
                authenticated: true,
                method: "proxy_basic".into(),
                subject: Some(user.name.clone()),
                ..Identity::default()
            },
            workload: user.workload.clone().or(workload),
        })
    }
}

/// Whether a verified client certificate matches a `kind:value` entry of
/// `[[egress.workloads]] certificates`.
fn certificate_matches(matcher: &str, cert: &ClientCert) -> bool {
    let Some((kind, value)) = matcher.split_once(':') else {
        return false;
    };
    match kind {
        "cn" => cert.common_name.as_deref() == Some(value),
        "sha256" => cert.fingerprint_sha256.eq_ignore_ascii_case(value),
        // `sans` holds `dns:…`, `uri:…`, `email:…`, `ip:…`: the matcher's
        // own spelling. DNS names compare without case.
        "dns" => cert.sans.iter().any(|s| {
            s.strip_prefix("dns:")
                .is_some_and(|d| d.eq_ignore_ascii_case(value))
        }),
        _ => cert.sans.iter().any(|s| s == matcher),
    }
}

fn basic_credentials(value: &http::HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Compares two digests without an early exit, so that timing says
/// nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml: &str) -> EgressConfig {
        crate::config::Config::from_toml(toml).unwrap().egress
    }

    fn from(ip: &str) -> Connection {
        Connection::new(
            std::net::SocketAddr::new(ip.parse().unwrap(), 40000),
            "127.0.0.1:3128".parse().unwrap(),
        )
    }

    fn basic(user: &str, pw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(
            http::header::PROXY_AUTHORIZATION,
            format!("Basic {v}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn workloads_by_source_and_by_account() {
        let real = hex::encode(Sha256::digest(b"s3cret"));
        let c = cfg(&format!(
            "[egress]\nlisten = \"127.0.0.1:0\"\n[[egress.workloads]]\nname = \"creme\"\nsources = [\"127.0.0.0/8\"]\n[[egress.users]]\nname = \"billing\"\npassword_sha256 = \"{real}\"\nworkload = \"billing-crm\"\n"
        ));
        let id = EgressIdentifier::new(&c);
        let local = from("127.0.0.9");
        let other = from("10.0.0.9");
        let anon = id.identify(&HeaderMap::new(), &local).unwrap();
        assert_eq!(anon.workload.as_deref(), Some("creme"));
        assert!(!anon.identity.authenticated);
        assert_eq!(
            id.identify(&HeaderMap::new(), &other).unwrap().workload,
            None
        );
        let user = id.identify(&basic("billing", "s3cret"), &other).unwrap();
        assert_eq!(user.workload.as_deref(), Some("billing-crm"));
        assert_eq!(user.identity.subject.as_deref(), Some("billing"));
        assert_eq!(user.identity.method, "proxy_basic");
        assert_eq!(
            id.identify(&basic("billing", "guess"), &local),
            Err(AuthFailure::WrongCredentials)
        );
        let mut junk = HeaderMap::new();
        junk.insert(
            http::header::PROXY_AUTHORIZATION,
            "Bearer x".parse().unwrap(),
        );
        assert_eq!(id.identify(&junk, &local), Err(AuthFailure::Malformed));
    }

    #[test]
    fn required_auth_refuses_anonymous_callers() {
        let real = hex::encode(Sha256::digest(b"pw"));
        let c = cfg(&format!(
            "[egress]\nlisten = \"127.0.0.1:0\"\nrequire_proxy_auth = true\n[[egress.users]]\nname = \"u\"\npassword_sha256 = \"{real}\"\n"
        ));
        let id = EgressIdentifier::new(&c);
        let local = from("127.0.0.1");
        assert_eq!(
            id.identify(&HeaderMap::new(), &local),
            Err(AuthFailure::Missing)
        );
        assert!(
            id.identify(&basic("u", "pw"), &local)
                .unwrap()
                .identity
                .authenticated
        );
    }

    #[test]
    fn a_client_certificate_names_the_workload_and_satisfies_required_auth() {
        let real = hex::encode(Sha256::digest(b"pw"));
        let c = cfg(&format!(
            "[egress]\nlisten = \"127.0.0.1:0\"\nrequire_proxy_auth = true\n\
             [egress.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\n\
             [[egress.workloads]]\nname = \"creme\"\ncertificates = [\"uri:spiffe://crm/creme\", \"dns:Creme.CRM.svc\"]\n\
             [[egress.workloads]]\nname = \"shared\"\nsources = [\"127.0.0.0/8\"]\n\
             [[egress.users]]\nname = \"u\"\npassword_sha256 = \"{real}\"\n"
        ));
        let id = EgressIdentifier::new(&c);
        let cert = |sans: &[&str], cn: Option<&str>| {
            let mut conn = from("127.0.0.1");
            conn.tls = true;
            conn.client_cert = Some(std::sync::Arc::new(ClientCert {
                subject: "CN=x".into(),
                common_name: cn.map(String::from),
                issuer: "CN=ca".into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
                fingerprint_sha256: "ab".repeat(32),
                email: None,
            }));
            conn
        };
        let by_uri = id
            .identify(&HeaderMap::new(), &cert(&["uri:spiffe://crm/creme"], None))
            .unwrap();
        assert_eq!(by_uri.workload.as_deref(), Some("creme"));
        assert!(by_uri.identity.authenticated);
        assert_eq!(by_uri.identity.method, "mtls");
        // DNS names match without case; the certificate wins over the
        // source network, which would say "shared".
        let by_dns = id
            .identify(&HeaderMap::new(), &cert(&["dns:creme.crm.svc"], None))
            .unwrap();
        assert_eq!(by_dns.workload.as_deref(), Some("creme"));
        // A certificate that names no workload falls back to the source.
        let other = id
            .identify(
                &HeaderMap::new(),
                &cert(&["uri:spiffe://crm/other"], Some("creme")),
            )
            .unwrap();
        assert_eq!(other.workload.as_deref(), Some("shared"));
        assert!(other.identity.authenticated);
        // No certificate and no credentials: required auth refuses.
        assert_eq!(
            id.identify(&HeaderMap::new(), &from("127.0.0.1")),
            Err(AuthFailure::Missing)
        );
    }
}
