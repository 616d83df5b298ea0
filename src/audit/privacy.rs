//! Data minimisation (GDPR art. 5(1)(c)) applied to each record before it
//! is written anywhere: the client address truncated or removed, the
//! subject replaced by a keyed hash or removed. The record says what was
//! done (`masked`, `erased`), so that nobody mistakes a pseudonym for a
//! user name.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IpMasking {
    #[default]
    Keep,
    /// IPv4 to its /24, IPv6 to its /48.
    Truncate,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubjectMasking {
    #[default]
    Keep,
    /// HMAC-SHA-256 with a secret key: the same user gives the same
    /// pseudonym (so queries by pseudonym work), which only the key holder
    /// can link back to a name.
    Hash,
    Remove,
}

pub struct Privacy {
    ip: IpMasking,
    subject: SubjectMasking,
    key: Vec<u8>,
}

impl Privacy {
    /// `None` when nothing is masked.
    pub fn new(
        ip: IpMasking,
        subject: SubjectMasking,
        key_file: Option<&Path>,
    ) -> anyhow::Result<Option<Privacy>> {
        if ip == IpMasking::Keep && subject == SubjectMasking::Keep {
            return Ok(None);
        }
        let key = match (subject, key_file) {
            (SubjectMasking::Hash, Some(path)) => {
                let key = std::fs::read(path)
                    .with_context(|| format!("cannot read subject hash key {}", path.display()))?;
                if key.len() < 16 {
                    bail!(
                        "subject hash key {}: {} bytes; use at least 16 random bytes \
                         (e.g. head -c 32 /dev/urandom > FILE)",
                        path.display(),
                        key.len()
                    );
                }
                key
            }
            (SubjectMasking::Hash, None) => {
                bail!("[audit] mask_subject = \"hash\" needs subject_hash_key (a file of random bytes)")
            }
            _ => Vec::new(),
        };
        Ok(Some(Privacy { ip, subject, key }))
    }

    /// The pseudonym of a subject.
    pub fn pseudonym(&self, subject: &str) -> String {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC accepts keys of any length; unreachable in practice.
            Err(_) => return "hmac-sha256:unavailable".into(),
        };
        mac.update(subject.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("hmac-sha256:{}", hex::encode(&digest[..16]))
    }

    /// Applies the masking to one serialised record.
    pub fn apply(&self, record: Vec<u8>) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&record) else {
            return record;
        };
        let mut masked = Vec::new();
        let mut erased = Vec::new();
        if let Some(ip) = v.pointer_mut("/source/ip") {
            match self.ip {
                IpMasking::Keep => {}
                IpMasking::Remove => {
                    *ip = serde_json::Value::Null;
                    erased.push("source.ip");
                }
                IpMasking::Truncate => {
                    if let Some(t) = ip.as_str().and_then(|s| s.parse().ok()).map(truncate) {
                        *ip = t.to_string().into();
                        masked.push("source.ip");
                    }
                }
            }
        }
        if let Some(subject) = v.pointer_mut("/identity/subject") {
            if let Some(name) = subject.as_str() {
                match self.subject {
                    SubjectMasking::Keep => {}
                    SubjectMasking::Remove => {
                        *subject = serde_json::Value::Null;
                        erased.push("identity.subject");
                    }
                    SubjectMasking::Hash => {
                        *subject = self.pseudonym(name).into();
                        masked.push("identity.subject");
                    }
                }
            }
        }
        if let Some(obj) = v.as_object_mut() {
            if !masked.is_empty() {
                obj.insert("masked".into(), masked.into());
            }
            if !erased.is_empty() {
                obj.insert("erased".into(), erased.into());
            }
        }
        serde_json::to_vec(&v).unwrap_or(record)
    }
}

fn truncate(ip: IpAddr) -> IpAddr {
    match crate::pipeline::locate::canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_truncate_subjects_hash_and_the_record_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, [7u8; 32]).unwrap();
        let p = Privacy::new(IpMasking::Truncate, SubjectMasking::Hash, Some(&key))
            .unwrap()
            .unwrap();
        let rec = br#"{"decision_id":"x","source":{"ip":"10.20.30.40","port":1},"identity":{"method":"header","subject":"bob"}}"#;
        let v: serde_json::Value = serde_json::from_slice(&p.apply(rec.to_vec())).unwrap();
        assert_eq!(v["source"]["ip"], "10.20.30.0");
        let pseudonym = v["identity"]["subject"].as_str().unwrap();
        assert!(pseudonym.starts_with("hmac-sha256:") && pseudonym.len() == 12 + 32);
        assert_eq!(pseudonym, p.pseudonym("bob"));
        assert_ne!(pseudonym, p.pseudonym("alice"));
        assert_eq!(
            v["masked"],
            serde_json::json!(["source.ip", "identity.subject"])
        );
        assert_eq!(
            truncate("2001:db8:1:2::5".parse().unwrap()).to_string(),
            "2001:db8:1::"
        );
        let r = Privacy::new(IpMasking::Remove, SubjectMasking::Remove, None)
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.apply(rec.to_vec())).unwrap();
        assert!(v["source"]["ip"].is_null() && v["identity"]["subject"].is_null());
        assert_eq!(
            v["erased"],
            serde_json::json!(["source.ip", "identity.subject"])
        );
        assert!(Privacy::new(IpMasking::Keep, SubjectMasking::Keep, None)
            .unwrap()
            .is_none());
        assert!(Privacy::new(IpMasking::Keep, SubjectMasking::Hash, None).is_err());
        std::fs::write(&key, "short").unwrap();
        assert!(
            Privacy::new(IpMasking::Keep, SubjectMasking::Hash, Some(&key))
                .err()
                .unwrap()
                .to_string()
                .contains("at least 16")
        );
    }
}
