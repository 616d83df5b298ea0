//! Stage 2, **identify**: who is asking.
//!
//! In this first form the only identity source is a header set by an
//! authenticating proxy in front of rempart (`[identity] trusted_header`).
//! It is believed only when the connection comes from one of the configured
//! `trusted_sources`; from anywhere else the header is removed before the
//! request goes on, so that nobody can forge an identity for the CRM.

pub mod egress;

use std::net::IpAddr;

use http::HeaderMap;

use crate::config::{Cidr, IdentityConfig};
use crate::input::Identity;

#[derive(Debug, Clone, Default)]
pub struct Identifier {
    trusted_header: Option<http::HeaderName>,
    roles_header: Option<http::HeaderName>,
    trusted_sources: Vec<Cidr>,
}

impl Identifier {
    pub fn new(cfg: &IdentityConfig) -> Self {
        Identifier {
            trusted_header: cfg.trusted_header.as_ref().map(|h| h.0.clone()),
            roles_header: cfg.roles_header.as_ref().map(|h| h.0.clone()),
            trusted_sources: cfg.trusted_sources.clone(),
        }
    }

    /// Whether any identity source is configured.
    pub fn is_configured(&self) -> bool {
        self.trusted_header.is_some()
    }

    /// Identifies the caller and strips identity headers that the peer is
    /// not trusted to set.
    pub fn identify(&self, headers: &mut HeaderMap, peer: IpAddr) -> Identity {
        let Some(user_header) = &self.trusted_header else {
            return Identity::anonymous();
        };
        let trusted = self.trusted_sources.iter().any(|net| net.contains(&peer));
        if !trusted {
            headers.remove(user_header);
            if let Some(h) = &self.roles_header {
                headers.remove(h);
            }
            return Identity::anonymous();
        }
        let subject = headers
            .get(user_header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(String::from);
        let Some(subject) = subject else {
            return Identity::anonymous();
        };
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
        Identity {
            authenticated: true,
            method: "header".into(),
            subject: Some(subject),
            roles,
        }
    }
}

impl Identity {
    pub fn anonymous() -> Self {
        Identity {
            authenticated: false,
            method: "none".into(),
            subject: None,
            roles: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderName;

    fn identifier() -> Identifier {
        Identifier::new(&IdentityConfig {
            trusted_header: Some(HeaderName(http::HeaderName::from_static("x-remote-user"))),
            roles_header: Some(HeaderName(http::HeaderName::from_static("x-remote-roles"))),
            trusted_sources: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        })
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.insert("x-remote-roles", "dpo, sales".parse().unwrap());
        h
    }

    #[test]
    fn trusted_source_is_believed() {
        let mut h = headers();
        let id = identifier().identify(&mut h, "10.1.1.1".parse().unwrap());
        assert!(id.authenticated);
        assert_eq!(id.subject.as_deref(), Some("alice"));
        assert_eq!(id.roles, vec!["dpo", "sales"]);
        assert!(h.contains_key("x-remote-user"));
    }

    #[test]
    fn untrusted_source_is_stripped_and_anonymous() {
        let mut h = headers();
        let id = identifier().identify(&mut h, "192.168.1.1".parse().unwrap());
        assert!(!id.authenticated);
        assert_eq!(id.method, "none");
        assert!(!h.contains_key("x-remote-user"));
        assert!(!h.contains_key("x-remote-roles"));
    }

    #[test]
    fn nothing_configured_means_anonymous() {
        let mut h = headers();
        let id = Identifier::default().identify(&mut h, "10.1.1.1".parse().unwrap());
        assert!(!id.authenticated);
    }
}
