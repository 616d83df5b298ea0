//! Stage 2, **identify**: who is asking.
//!
//! Identity sources, in the order they are consulted:
//! 1. a JWT / OIDC bearer token (`[identity.jwt]`), from the
//!    `Authorization: Bearer` header or the configured cookie. A token that
//!    is presented but fails a check gives an unauthenticated identity with
//!    `error` saying why; no other source is consulted then, so that a bad
//!    token is never papered over;
//! 2. a client certificate verified during the TLS handshake (mTLS);
//! 3. a header set by an authenticating proxy in front of rempart
//!    (`[identity] trusted_header`), believed only when the connection comes
//!    from one of the configured `trusted_sources`; from anywhere else the
//!    header is removed before the request goes on, so that nobody can
//!    forge an identity for the CRM.
//!
//! With `[identity] strip_credentials`, the token is removed from the
//! request before it is forwarded.

pub mod egress;
pub mod jwt;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;

use super::accept::Connection;
use crate::config::{Cidr, Config, IdentityConfig};
use crate::input::Identity;
use crate::metrics::Metrics;
use crate::tls::ClientCert;
use jwt::JwtVerifier;

#[derive(Default)]
pub struct Identifier {
    trusted_header: Option<http::HeaderName>,
    roles_header: Option<http::HeaderName>,
    trusted_sources: Vec<Cidr>,
    jwt: Option<Arc<JwtVerifier>>,
    strip_credentials: bool,
    /// The configured sources, as shown to policies.
    sources: crate::input::Sources,
    metrics: Option<Arc<Metrics>>,
}

impl Identifier {
    /// The identifier for `cfg`, sharing an already started JWT verifier
    /// (one per process: its key cache and refresher are shared by all
    /// workers).
    pub fn new(cfg: &Config, jwt: Option<Arc<JwtVerifier>>, metrics: Arc<Metrics>) -> Self {
        let mut id = Self::from_identity_config(&cfg.identity);
        let mtls = cfg
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        let mut sources = crate::input::Sources::new();
        if jwt.is_some() {
            sources.push("jwt".into());
        }
        if mtls {
            sources.push("mtls".into());
        }
        if id.trusted_header.is_some() {
            sources.push("header".into());
        }
        id.jwt = jwt;
        id.sources = sources;
        id.metrics = Some(metrics);
        id
    }

    fn from_identity_config(cfg: &IdentityConfig) -> Self {
        Identifier {
            trusted_header: cfg.trusted_header.as_ref().map(|h| h.0.clone()),
            roles_header: cfg.roles_header.as_ref().map(|h| h.0.clone()),
            trusted_sources: cfg.trusted_sources.clone(),
            strip_credentials: cfg.strip_credentials,
            ..Identifier::default()
        }
    }

    /// The configured identity sources ("jwt", "mtls", "header").
    pub fn sources(&self) -> &[crate::input::Name] {
        &self.sources
    }

    /// Identifies the caller, strips identity headers that the peer is not
    /// trusted to set, and the token when configured to.
    pub async fn identify(&self, headers: &mut HeaderMap, conn: &Connection) -> Identity {
        let from_header = self.trusted_header_identity(headers, conn.peer.ip());
        let mut identity = match self.bearer_token(headers) {
            Some(token) => self.jwt_identity(&token).await,
            None => match (&conn.client_cert, from_header) {
                (Some(cert), _) => Identity::from_client_cert(cert),
                (None, Some(h)) => h,
                (None, None) => Identity::anonymous(),
            },
        };
        if self.strip_credentials {
            self.strip_token(headers);
        }
        identity.sources = self.sources.clone();
        identity
    }

    async fn jwt_identity(&self, token: &str) -> Identity {
        let Some(verifier) = &self.jwt else {
            return Identity::anonymous();
        };
        match verifier.verify(token).await {
            Ok(v) => {
                let text = |k: &str| v.claims.get(k).and_then(|c| c.as_str()).map(String::from);
                Identity {
                    authenticated: true,
                    method: "jwt".into(),
                    subject: text("sub"),
                    name: text("name").or_else(|| text("preferred_username")),
                    email: text("email"),
                    issuer: text("iss"),
                    roles: v.roles,
                    groups: v.groups,
                    claims: v.claims,
                    ..Identity::default()
                }
            }
            Err(failure) => {
                if let Some(m) = &self.metrics {
                    m.jwt_failure(failure.as_str()).inc();
                }
                Identity {
                    method: "jwt".into(),
                    error: Some(failure.as_str().to_string()),
                    ..Identity::anonymous()
                }
            }
        }
    }

    /// The bearer token of the request: the `Authorization: Bearer` header,
    /// else the configured cookie. None when JWT is not configured.
    fn bearer_token(&self, headers: &HeaderMap) -> Option<String> {
        let verifier = self.jwt.as_ref()?;
        let from_header = headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_string())
            });
        from_header.or_else(|| {
            let name = verifier.cookie.as_deref()?;
            cookies(headers)
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// Removes the bearer token: the Authorization header and the token
    /// cookie (other cookies stay: the CRM's own session needs them).
    fn strip_token(&self, headers: &mut HeaderMap) {
        headers.remove(http::header::AUTHORIZATION);
        let Some(name) = self.jwt.as_ref().and_then(|j| j.cookie.as_deref()) else {
            return;
        };
        if !cookies(headers).any(|(k, _)| k == name) {
            return;
        }
        let kept: Vec<String> = cookies(headers)
            .filter(|(k, _)| *k != name)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        headers.remove(http::header::COOKIE);
        if !kept.is_empty() {
            if let Ok(v) = http::HeaderValue::from_str(&kept.join("; ")) {
                headers.insert(http::header::COOKIE, v);
            }
        }
    }

    /// The trusted header's identity, when the peer may set it; strips the
    /// headers otherwise.
    fn trusted_header_identity(&self, headers: &mut HeaderMap, peer: IpAddr) -> Option<Identity> {
        let user_header = self.trusted_header.as_ref()?;
        let trusted = self.trusted_sources.iter().any(|net| net.contains(&peer));
        if !trusted {
            headers.remove(user_header);
            if let Some(h) = &self.roles_header {
                headers.remove(h);
            }
            return None;
        }
        let subject = headers
            .get(user_header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from)?;
        let roles = self
            .roles_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Some(Identity {
            authenticated: true,
            method: "header".into(),
            subject: Some(subject),
            roles,
            ..Identity::default()
        })
    }
}

/// `(name, value)` of every cookie of the request.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

impl Identity {
    /// The identity a verified client certificate proves (mTLS).
    pub fn from_client_cert(cert: &ClientCert) -> Identity {
        let claims = BTreeMap::from([
            ("subject_dn".to_string(), cert.subject.clone().into()),
            ("issuer_dn".to_string(), cert.issuer.clone().into()),
            ("sans".to_string(), cert.sans.clone().into()),
            (
                "fingerprint_sha256".to_string(),
                cert.fingerprint_sha256.clone().into(),
            ),
        ]);
        Identity {
            authenticated: true,
            method: "mtls".into(),
            subject: Some(cert.subject.clone()),
            name: cert.common_name.clone(),
            email: cert.email.clone(),
            issuer: Some(cert.issuer.clone()),
            claims,
            ..Identity::default()
        }
    }

    pub fn anonymous() -> Self {
        Identity {
            authenticated: false,
            method: "none".into(),
            ..Identity::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderName;

    fn identifier() -> Identifier {
        let cfg = Config {
            identity: IdentityConfig {
                trusted_header: Some(HeaderName(http::HeaderName::from_static("x-remote-user"))),
                roles_header: Some(HeaderName(http::HeaderName::from_static("x-remote-roles"))),
                trusted_sources: vec![Cidr::parse("10.0.0.0/8").unwrap()],
                ..IdentityConfig::default()
            },
            ..Config::default()
        };
        Identifier::new(&cfg, None, Arc::new(Metrics::new()))
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.insert("x-remote-roles", "dpo, sales".parse().unwrap());
        h
    }

    fn conn(peer: &str) -> Connection {
        Connection::new(
            format!("{peer}:5000").parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn trusted_source_is_believed() {
        let mut h = headers();
        let id = identifier().identify(&mut h, &conn("10.1.1.1")).await;
        assert!(id.authenticated);
        assert_eq!(id.subject.as_deref(), Some("alice"));
        assert_eq!(id.roles, vec!["dpo", "sales"]);
        assert_eq!(id.sources.as_slice(), ["header"]);
        assert!(h.contains_key("x-remote-user"));
    }

    #[tokio::test]
    async fn untrusted_source_is_stripped_and_anonymous() {
        let mut h = headers();
        let id = identifier().identify(&mut h, &conn("192.168.1.1")).await;
        assert!(!id.authenticated);
        assert_eq!(id.method, "none");
        assert!(!h.contains_key("x-remote-user"));
        assert!(!h.contains_key("x-remote-roles"));
    }

    #[tokio::test]
    async fn nothing_configured_means_anonymous() {
        let mut h = headers();
        let id = Identifier::default()
            .identify(&mut h, &conn("10.1.1.1"))
            .await;
        assert!(!id.authenticated);
        assert!(id.sources.is_empty());
    }

    #[test]
    fn cookies_are_parsed() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; token=abc.def ; b=2".parse().unwrap());
        let all: Vec<_> = cookies(&h).collect();
        assert_eq!(all, vec![("a", "1"), ("token", "abc.def"), ("b", "2")]);
    }
}
