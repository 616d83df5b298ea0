//! The `[audit] mask_source_ip` / `mask_subject` shorthand of the
//! minimisation rules ([`super::minimise`]), and the key of the hashes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use super::minimise::{Action, Rule, Rules};

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

/// The rules the shorthand stands for (applied before the policy's).
pub fn configured_rules(ip: IpMasking, subject: SubjectMasking) -> Rules {
    let mut rules = Vec::new();
    match ip {
        IpMasking::Keep => {}
        IpMasking::Truncate => rules.push(Rule::fixed("source.ip", Action::Truncate)),
        IpMasking::Remove => rules.push(Rule::fixed("source.ip", Action::Erase)),
    }
    match subject {
        SubjectMasking::Keep => {}
        SubjectMasking::Hash => rules.push(Rule::fixed("identity.subject", Action::Hash)),
        SubjectMasking::Remove => rules.push(Rule::fixed("identity.subject", Action::Erase)),
    }
    Rules::new(rules)
}

/// The key file made next to the trail when `[audit] subject_hash_key`
/// is not set: `<trail>.hash-key`.
pub fn default_key_path(trail: &Path) -> PathBuf {
    let mut name = trail.file_name().unwrap_or_default().to_os_string();
    name.push(".hash-key");
    trail.with_file_name(name)
}

/// The key of the hashes: the configured file, or `<trail>.hash-key`,
/// created (32 random bytes, mode 0600) when missing, so that policy
/// rules can hash without a configured key and hashes stay stable across
/// restarts.
pub fn load_key(configured: Option<&Path>, trail: &Path) -> anyhow::Result<Vec<u8>> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let path = default_key_path(trail);
            if !path.exists() {
                create_key(&path)?;
            }
            path
        }
    };
    let key =
        std::fs::read(&path).with_context(|| format!("cannot read hash key {}", path.display()))?;
    if key.len() < 16 {
        bail!(
            "hash key {}: {} bytes; use at least 16 random bytes \
             (e.g. head -c 32 /dev/urandom > FILE)",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}

fn create_key(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("cannot read /dev/urandom for the audit hash key")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the audit hash key {}", path.display()))?;
    f.write_all(&key)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write the audit hash key {}", path.display()))?;
    tracing::info!(key = %path.display(), "audit hash key created");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shorthand_is_rules_and_the_key_is_made_once() {
        assert!(configured_rules(IpMasking::Keep, SubjectMasking::Keep).is_empty());
        let r = configured_rules(IpMasking::Truncate, SubjectMasking::Hash);
        let fields: Vec<_> = r.iter().map(|r| (r.field.as_str(), r.action)).collect();
        assert_eq!(
            fields,
            [
                ("source.ip", Action::Truncate),
                ("identity.subject", Action::Hash)
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let trail = dir.path().join("t.jsonl");
        let made = load_key(None, &trail).unwrap();
        assert_eq!(made.len(), 32);
        assert_eq!(load_key(None, &trail).unwrap(), made, "kept across starts");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(default_key_path(&trail))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let short = dir.path().join("short");
        std::fs::write(&short, "short").unwrap();
        assert!(load_key(Some(&short), &trail)
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
    }
}
