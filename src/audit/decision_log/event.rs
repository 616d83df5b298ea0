//! One trail line → one decision-log event in OPA's format, so that a
//! collector built for OPA (or a team's existing pipeline) takes rempart's
//! decisions unchanged.
//!
//! Only decision records become events. Records about the trail itself
//! (`checkpoint`, `loss`, `repair`) and the closing record of an egress
//! tunnel (`transfer`, same `decision_id` as its decision) stay in the
//! local trail: OPA's format has no place for them, and a collector that
//! de-duplicates on `decision_id` would merge the tunnel's two records.

use serde_json::{json, Map, Value};

/// OPA's `path`: the rule that was queried (`data.rempart.decision`).
pub const DECISION_PATH: &str = "rempart/decision";

/// What every event carries besides the record: OPA's `labels`.
pub struct Labels(Value);

impl Labels {
    /// `id` identifies this process (a fresh UUID at each start, like
    /// OPA's), `version` rempart's version; `extra` are configured.
    pub fn new(id: &str, extra: &std::collections::BTreeMap<String, String>) -> Labels {
        let mut labels = Map::new();
        for (k, v) in extra {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
        labels.insert("id".into(), Value::String(id.into()));
        labels.insert(
            "version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        );
        Labels(Value::Object(labels))
    }
}

/// The `seq` of a trail line (`{"seq":N,…`), read without parsing the rest.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Where a record field (dotted, as in the record's `masked` / `erased`)
/// sits in the event: under `/input` or, for `decision.*`, `/result`.
fn pointer_in_event(field: &str) -> Option<String> {
    let (top, rest) = field.split_once('.').unwrap_or((field, ""));
    let tail = if rest.is_empty() {
        String::new()
    } else {
        format!("/{}", rest.replace('.', "/"))
    };
    match top {
        "direction" | "request" | "source" | "destination" | "identity" => {
            Some(format!("/input/{top}{tail}"))
        }
        "decision" if !rest.is_empty() => Some(format!("/result{tail}")),
        _ => None,
    }
}

/// The event for a parsed trail line, or `None` when the line is not a
/// decision (see the module comment).
pub fn event(record: &Value, labels: &Labels) -> Option<Value> {
    if record.get("type").is_some() || record.get("transfer").is_some() {
        return None;
    }
    let decision_id = record.get("decision_id")?.as_str()?;
    let field = |k: &str| record.get(k).cloned().unwrap_or(Value::Null);
    let decision = record.get("decision").and_then(Value::as_object);
    let mut result = decision.cloned().unwrap_or_default();
    result.insert("status".into(), field("status"));

    let mut event = Map::new();
    event.insert("decision_id".into(), Value::String(decision_id.into()));
    event.insert("timestamp".into(), field("timestamp"));
    event.insert("path".into(), Value::String(DECISION_PATH.into()));
    // The input as the trail keeps it: already minimised (no headers, no
    // query values, masked addresses and subjects), never the raw request.
    event.insert(
        "input".into(),
        json!({
            "direction": field("direction"),
            "request": field("request"),
            "source": field("source"),
            "destination": field("destination"),
            "identity": field("identity"),
        }),
    );
    event.insert("result".into(), Value::Object(result));
    // Bundles: passed through when the record names them
    // (`{"<name>": {"revision": "…"}}`, a revision may be absent); the
    // policy set's own revision goes in OPA's older top-level `revision`.
    if let Some(bundles) = record.get("bundles").filter(|b| b.is_object()) {
        event.insert("bundles".into(), bundles.clone());
    }
    if let Some(rev) = record
        .get("policy_revision")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        event.insert("revision".into(), Value::String(rev.into()));
    }
    event.insert("labels".into(), labels.0.clone());
    // OPA names masked and erased fields by JSON pointer into the event;
    // a field the event does not carry (`resource.*`) is not named.
    for key in ["masked", "erased"] {
        if let Some(fields) = record.get(key).and_then(Value::as_array) {
            let pointers: Vec<Value> = fields
                .iter()
                .filter_map(Value::as_str)
                .filter_map(pointer_in_event)
                .map(Value::String)
                .collect();
            if !pointers.is_empty() {
                event.insert(key.into(), Value::Array(pointers));
            }
        }
    }
    // Only a (possibly truncated) address; a hashed one is no address.
    if let Some(ip) = record
        .pointer("/source/ip")
        .and_then(Value::as_str)
        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
    {
        let port = record.pointer("/source/port").and_then(Value::as_u64);
        let by = match (ip.contains(':'), port) {
            (false, Some(p)) => format!("{ip}:{p}"),
            (true, Some(p)) => format!("[{ip}]:{p}"),
            (_, None) => ip.to_string(),
        };
        event.insert("requested_by".into(), Value::String(by));
    }
    if let Some(ms) = record.get("latency_ms").and_then(Value::as_f64) {
        event.insert(
            "metrics".into(),
            json!({ "timer_server_handler_ns": (ms * 1e6).round() as u64 }),
        );
    }
    // rempart's own addition: where the record sits in the hash chain, so
    // that a collector-side event can be checked against the local trail.
    event.insert(
        "trail".into(),
        json!({ "seq": field("seq"), "hash": field("hash") }),
    );
    Some(Value::Object(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_record_becomes_an_opa_event() {
        let line = r#"{"seq":7,"prev_hash":"aa","decision_id":"d1","timestamp":"2026-11-27T10:00:00Z","direction":"ingress","request":{"method":"GET","host":"crm","path":"/api/x","protocol":"HTTP/1.1"},"source":{"ip":"10.0.0.0","port":5000,"scope":"private","geo":null},"destination":{"host":"crm","ip":"127.0.0.1","port":80,"scope":"loopback","geo":null},"identity":{"method":"none","subject":null},"decision":{"outcome":"denied","allow":false,"enforced":true,"deny":[{"code":"x","message":"no"}],"warn":[]},"status":403,"latency_ms":1.5,"policy_revision":"sha256:abc","masked":["source.ip"],"erased":["identity.subject"],"hash":"bb"}"#;
        assert_eq!(seq_of(line.as_bytes()), Some(7));
        let labels = Labels::new("inst", &[("app".into(), "crm".into())].into());
        let v: Value = serde_json::from_str(line).unwrap();
        let e = event(&v, &labels).unwrap();
        assert_eq!(e["decision_id"], "d1");
        assert_eq!(e["path"], "rempart/decision");
        assert_eq!(e["input"]["request"]["path"], "/api/x");
        assert_eq!(e["result"]["allow"], false);
        assert_eq!(e["result"]["status"], 403);
        assert_eq!(e["revision"], "sha256:abc");
        assert!(e.get("bundles").is_none());
        assert_eq!(e["labels"]["app"], "crm");
        assert_eq!(e["labels"]["id"], "inst");
        assert_eq!(e["masked"], json!(["/input/source/ip"]));
        assert_eq!(e["erased"], json!(["/input/identity/subject"]));
        assert_eq!(e["requested_by"], "10.0.0.0:5000");
        assert_eq!(e["metrics"]["timer_server_handler_ns"], 1_500_000);
        assert_eq!(e["trail"]["seq"], 7);

        let mut other_fields = v.clone();
        other_fields["masked"] = json!(["decision.deny", "resource.id", "identity.subject"]);
        other_fields["erased"] = json!(["resource.id"]);
        let e = event(&other_fields, &labels).unwrap();
        assert_eq!(
            e["masked"],
            json!(["/result/deny", "/input/identity/subject"])
        );
        assert!(e.get("erased").is_none(), "resource is not in the event");

        let mut with_bundle = v.clone();
        with_bundle["bundles"] = json!({"crm": {}});
        assert_eq!(
            event(&with_bundle, &labels).unwrap()["bundles"],
            json!({"crm": {}})
        );
    }

    #[test]
    fn trail_records_and_tunnel_closings_are_not_events() {
        let labels = Labels::new("i", &Default::default());
        for v in [
            json!({"seq":1,"type":"checkpoint"}),
            json!({"seq":2,"decision_id":"d","transfer":{"bytes_to_destination":1}}),
        ] {
            assert!(event(&v, &labels).is_none());
        }
    }
}
