//! Minimisation rules (GDPR art. 5(1)(c)): which fields of a decision
//! record are erased, hashed or truncated before the record is written,
//! and so before any copy of it (stdout, syslog, decision log) leaves the
//! machine.
//!
//! The rules come from policy data (`data.settings.audit.minimise`, read
//! when a policy set loads: a bad rule refuses the whole set) and from the
//! `[audit] mask_*` shorthand of the configuration. They apply to the
//! serialised record before it is chained, so the hash chain covers the
//! minimised record and the original values are never written.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Where the rules live in the policy data document.
pub const DATA_PATH: [&str; 3] = ["settings", "audit", "minimise"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The field is removed from the record; listed in `erased`.
    Erase,
    /// The value is replaced by `hmac-sha256:<32 hex>` (keyed, see
    /// [`Minimiser`]); listed in `masked`.
    Hash,
    /// An address cut to its network (IPv4 /24, IPv6 /48); listed in
    /// `masked`. Only for `*.ip` fields.
    Truncate,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s {
            "erase" => Some(Action::Erase),
            "hash" => Some(Action::Hash),
            "truncate" => Some(Action::Truncate),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Dotted path into the record, e.g. `source.ip`.
    pub field: String,
    pub action: Action,
}

impl Rule {
    /// A rule on a field known to be minimisable (the TOML shorthand).
    pub(crate) fn fixed(field: &str, action: Action) -> Rule {
        Rule {
            field: field.into(),
            action,
        }
    }
}

/// An ordered list of rules; the first rule naming a field wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules(rules)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.0.iter()
    }

    /// Reads `data.settings.audit.minimise` from a data document (absent:
    /// no rules). The error names the rule and the key at fault, as
    /// `data.settings.audit.minimise[1].action: …`.
    pub fn from_policy_data(data: &Value) -> Result<Rules, String> {
        let at = format!("data.{}", DATA_PATH.join("."));
        let Some(list) = DATA_PATH.iter().try_fold(data, |v, k| v.get(k)) else {
            return Ok(Rules::default());
        };
        let list = list.as_array().ok_or_else(|| {
            format!("{at}: must be a list of rules like {{\"field\": \"source.ip\", \"action\": \"truncate\"}}")
        })?;
        let mut rules = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let obj = item.as_object().ok_or_else(|| {
                format!("{at}: must be an object {{\"field\": …, \"action\": …}}")
            })?;
            if let Some(k) = obj.keys().find(|k| *k != "field" && *k != "action") {
                return Err(format!(
                    "{at}: unknown key \"{k}\" (a rule has \"field\" and \"action\")"
                ));
            }
            let field = obj
                .get("field")
                .ok_or_else(|| format!("{at}: missing \"field\""))?
                .as_str()
                .ok_or_else(|| format!("{at}.field: must be a string like \"source.ip\""))?;
            check_field(field).map_err(|e| format!("{at}.field: {e}"))?;
            let action = obj
                .get("action")
                .ok_or_else(|| format!("{at}: missing \"action\""))?;
            let action = action.as_str().and_then(Action::parse).ok_or_else(|| {
                format!("{at}.action: unknown action {action} (expected \"erase\", \"hash\" or \"truncate\")")
            })?;
            if action == Action::Truncate && !field.ends_with(".ip") {
                return Err(format!(
                    "{at}.action: \"truncate\" applies to addresses only (source.ip, destination.ip), not to {field}"
                ));
            }
            rules.push(Rule {
                field: field.to_string(),
                action,
            });
        }
        Ok(Rules(rules))
    }
}

/// Fields that are never minimised: the chain, the record's identity and
/// time, and what the decision was (the trail would no longer be evidence).
const PROTECTED: &[&str] = &[
    "seq",
    "prev_hash",
    "hash",
    "type",
    "decision_id",
    "timestamp",
    "direction",
    "decision",
    "decision.outcome",
    "decision.allow",
    "decision.enforced",
    "status",
    "latency_ms",
    "policy_revision",
    "bundles",
    "transfer",
    "masked",
    "erased",
];

fn minimisable(field: &str) -> bool {
    const ENDPOINT: &[&str] = &[
        "",
        ".host",
        ".ip",
        ".port",
        ".scope",
        ".workload",
        ".addresses",
        ".geo",
        ".geo.country",
        ".geo.asn",
        ".geo.operator",
        ".geo.jurisdiction",
        ".geo.cloud_act",
        ".geo.sovereign",
    ];
    const OTHERS: &[&str] = &[
        "request",
        "request.method",
        "request.host",
        "request.path",
        "request.protocol",
        "identity",
        "identity.method",
        "identity.subject",
        "identity.error",
        "resource",
        "resource.crm",
        "resource.type",
        "resource.id",
        "resource.operation",
        "resource.bulk",
        "resource.inspection",
        "decision.deny",
        "decision.warn",
        "decision.error",
    ];
    OTHERS.contains(&field)
        || ["source", "destination"].iter().any(|side| {
            field
                .strip_prefix(side)
                .is_some_and(|rest| ENDPOINT.contains(&rest))
        })
}

/// Checks a rule's field path: dotted, naming a field the record has and
/// that may be minimised.
fn check_field(field: &str) -> Result<(), String> {
    let well_formed = !field.is_empty()
        && field.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if !well_formed {
        return Err(format!(
            "malformed field path \"{field}\" (expected dotted lower-case names, e.g. \"source.ip\", \"identity.subject\")"
        ));
    }
    if PROTECTED.contains(&field) {
        return Err(format!(
            "\"{field}\" cannot be minimised: the trail needs it to be evidence (chain, decision, time)"
        ));
    }
    if !minimisable(field) {
        return Err(format!(
            "\"{field}\" is not a field of the audit record (it never holds query values, headers, \
             bodies or token claims; the fields are listed in docs/audit.md#fields)"
        ));
    }
    Ok(())
}

/// Applies rules to serialised records, with the key of the hashes.
///
/// Hashes are HMAC-SHA-256 with a secret key rather than plain SHA-256:
/// an IPv4 address or a user name has so few possible values that a plain
/// hash is undone by hashing every candidate (a dictionary attack); a
/// keyed hash can only be checked by the key's holder. The same value
/// gives the same hash for as long as the key is kept, so queries by
/// pseudonym work.
pub struct Minimiser {
    /// The `[audit] mask_*` shorthand, applied before the policy's rules.
    configured: Rules,
    key: Vec<u8>,
}

impl Minimiser {
    pub fn new(configured: Rules, key: Vec<u8>) -> Minimiser {
        Minimiser { configured, key }
    }

    /// `hmac-sha256:` + the first 16 bytes of the HMAC, in hex.
    pub fn pseudonym(&self, value: &str) -> String {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC accepts keys of any length; unreachable in practice.
            Err(_) => return "hmac-sha256:unavailable".into(),
        };
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("hmac-sha256:{}", hex::encode(&digest[..16]))
    }

    /// True when neither the configuration nor `rules` minimise anything.
    pub fn idle(&self, rules: &Rules) -> bool {
        self.configured.is_empty() && rules.is_empty()
    }

    /// Applies the configured rules, then `rules` (the policy set's), to one
    /// serialised record, and lists what was done in `masked` / `erased`.
    pub fn apply(&self, record: Vec<u8>, rules: &Rules) -> Vec<u8> {
        if self.idle(rules) {
            return record;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(&record) else {
            return record;
        };
        let mut masked: Vec<Value> = Vec::new();
        let mut erased: Vec<Value> = Vec::new();
        for rule in self.configured.iter().chain(rules.iter()) {
            let name = Value::String(rule.field.clone());
            if masked.contains(&name) || erased.contains(&name) {
                continue;
            }
            let (parent_path, last) = match rule.field.rsplit_once('.') {
                Some((p, l)) => (Some(p), l),
                None => (None, rule.field.as_str()),
            };
            let parent = match parent_path {
                Some(p) => p.split('.').try_fold(&mut v, |v, k| v.get_mut(k)),
                None => Some(&mut v),
            };
            let Some(parent) = parent.and_then(Value::as_object_mut) else {
                continue;
            };
            let Some(value) = parent.get_mut(last).filter(|v| !v.is_null()) else {
                continue;
            };
            let done = match rule.action {
                Action::Erase => None,
                Action::Hash => Some(match value.as_str() {
                    Some(s) => self.pseudonym(s),
                    None => self.pseudonym(&value.to_string()),
                }),
                // Not an address: erased rather than kept (fail safe).
                Action::Truncate => value
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .map(|ip| truncate(ip).to_string()),
            };
            match done {
                Some(new) => {
                    *value = Value::String(new);
                    masked.push(name);
                }
                None => {
                    parent.remove(last);
                    erased.push(name);
                }
            }
        }
        if let Some(obj) = v.as_object_mut() {
            if !masked.is_empty() {
                obj.insert("masked".into(), Value::Array(masked));
            }
            if !erased.is_empty() {
                obj.insert("erased".into(), Value::Array(erased));
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
    use serde_json::json;

    fn rules(list: Value) -> Result<Rules, String> {
        Rules::from_policy_data(&json!({"settings": {"audit": {"minimise": list}}}))
    }

    #[test]
    fn rules_are_read_from_policy_data_and_bad_ones_named() {
        assert_eq!(Rules::from_policy_data(&json!({})), Ok(Rules::default()));
        let r = rules(json!([
            {"field": "source.ip", "action": "truncate"},
            {"field": "identity.subject", "action": "hash"},
            {"field": "request.path", "action": "erase"},
        ]))
        .unwrap();
        assert_eq!(r.iter().count(), 3);
        let err = |list: Value| rules(list).unwrap_err();
        assert!(err(json!({"field": "x"})).contains("must be a list"));
        let e = err(json!([{"field": "source.ip", "action": "redact"}]));
        assert!(
            e.starts_with("data.settings.audit.minimise[0].action: unknown action \"redact\""),
            "{e}"
        );
        let e = err(json!([{"field": "source..ip", "action": "erase"}]));
        assert!(e.contains("[0].field: malformed field path"), "{e}");
        let e = err(json!([{"field": "/source/ip", "action": "erase"}]));
        assert!(e.contains("malformed"), "{e}");
        let e = err(json!([{"field": "request.query", "action": "erase"}]));
        assert!(e.contains("not a field of the audit record"), "{e}");
        let e = err(json!([{"field": "seq", "action": "erase"}]));
        assert!(e.contains("cannot be minimised"), "{e}");
        let e = err(json!([{"field": "identity.subject", "action": "truncate"}]));
        assert!(e.contains("addresses only"), "{e}");
        let e = err(json!([{"field": "source.ip", "action": "erase", "scope": "x"}]));
        assert!(e.contains("unknown key \"scope\""), "{e}");
        let e = err(json!([{"action": "erase"}]));
        assert!(e.contains("missing \"field\""), "{e}");
    }

    #[test]
    fn rules_erase_hash_and_truncate_and_the_record_says_so() {
        let configured = Rules::new(vec![Rule::fixed("source.ip", Action::Truncate)]);
        let m = Minimiser::new(configured, vec![7; 32]);
        let policy = rules(json!([
            {"field": "source.ip", "action": "erase"},
            {"field": "identity.subject", "action": "hash"},
            {"field": "destination.geo", "action": "erase"},
            {"field": "resource.id", "action": "hash"},
            {"field": "identity.error", "action": "erase"},
        ]))
        .unwrap();
        let rec = br#"{"decision_id":"x","source":{"ip":"10.20.30.40","port":1},"destination":{"host":"h","geo":{"country":"FR"}},"identity":{"method":"header","subject":"bob","error":null},"resource":{"id":42}}"#;
        let v: Value = serde_json::from_slice(&m.apply(rec.to_vec(), &policy)).unwrap();
        // The configuration's rule came first: truncated, not erased.
        assert_eq!(v["source"]["ip"], "10.20.30.0");
        assert_eq!(v["identity"]["subject"], m.pseudonym("bob"));
        assert_ne!(m.pseudonym("bob"), m.pseudonym("alice"));
        assert!(v["destination"].get("geo").is_none());
        assert_eq!(v["resource"]["id"], m.pseudonym("42"));
        assert_eq!(
            v["masked"],
            json!(["source.ip", "identity.subject", "resource.id"])
        );
        // A null field is not there to erase.
        assert_eq!(v["erased"], json!(["destination.geo"]));
        // Same input, same hash; another key, another hash.
        let again: Value = serde_json::from_slice(&m.apply(rec.to_vec(), &policy)).unwrap();
        assert_eq!(again["identity"]["subject"], v["identity"]["subject"]);
        let other = Minimiser::new(Rules::default(), vec![8; 32]);
        assert_ne!(other.pseudonym("bob"), m.pseudonym("bob"));
        assert!(m.pseudonym("bob").len() == 12 + 32);
        // Nothing to do: the bytes pass through untouched.
        assert!(other.idle(&Rules::default()));
        assert_eq!(other.apply(rec.to_vec(), &Rules::default()), rec.to_vec());
        assert_eq!(
            truncate("2001:db8:1:2::5".parse().unwrap()).to_string(),
            "2001:db8:1::"
        );
    }
}
