//! The two records of a forwarded request in `sync` durability mode.
//!
//! Sync mode writes, and fsyncs, a *pending* record of the decision
//! before the request is forwarded (`"exchange": "pending"`, `"status":
//! null`), and the request's complete record (the same fields as in
//! buffered mode, no `exchange` field) once the exchange is over, with the
//! same `decision_id`. A request is therefore described by its complete
//! record when there is one, and by its pending record only when no
//! complete record follows it: the exchange was cut short (a crash, or a
//! shutdown's drain timeout) or is still in progress. Readers that count
//! or list requests (`audit query`, the report) go through [`Pending`] so
//! that each request is counted once.

use std::collections::HashMap;

use serde_json::Value;

/// The value of `exchange` on a record written before forwarding.
pub const PENDING: &str = "pending";

/// True for a pending record (see the module comment).
pub fn is_pending(record: &Value) -> bool {
    record.get("exchange").and_then(Value::as_str) == Some(PENDING)
}

/// Pending records not (yet) followed by their complete record, in the
/// order they were read. Holds one entry per request in flight when the
/// trail was read, plus one per exchange a crash interrupted.
pub struct Pending<T> {
    open: HashMap<String, (u64, T)>,
    read: u64,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            open: HashMap::new(),
            read: 0,
        }
    }
}

impl<T> Pending<T> {
    /// Takes one record in trail order. Returns false for a pending record,
    /// which is held (`keep` makes what is held) until its complete record
    /// settles it; true for every other line, which the caller handles now.
    pub fn take(&mut self, record: &Value, keep: impl FnOnce() -> T) -> bool {
        let Some(id) = record.get("decision_id").and_then(Value::as_str) else {
            return true;
        };
        if is_pending(record) {
            self.read += 1;
            self.open.insert(id.to_owned(), (self.read, keep()));
            return false;
        }
        if record.get("type").is_none() {
            self.open.remove(id);
        }
        true
    }

    /// The pending records that no complete record followed, oldest first:
    /// each one is the only record of its request.
    pub fn unsettled(self) -> Vec<T> {
        let mut left: Vec<(u64, T)> = self.open.into_values().collect();
        left.sort_by_key(|(n, _)| *n);
        left.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pending_record_stands_only_when_nothing_completes_it() {
        let mut p = Pending::default();
        let lines = [
            json!({"decision_id": "a", "exchange": "pending", "status": null}),
            json!({"decision_id": "b", "exchange": "pending", "status": null}),
            json!({"decision_id": "c", "status": 403}),
            json!({"type": "checkpoint"}),
            json!({"decision_id": "a", "status": 200}),
            json!({"decision_id": "d", "exchange": "pending", "status": null}),
        ];
        let now: Vec<bool> = lines
            .iter()
            .map(|l| p.take(l, || l["decision_id"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(now, [false, false, true, true, true, false]);
        assert_eq!(p.unsettled(), ["b", "d"]);
    }

    #[test]
    fn the_decision_log_sends_the_complete_record_only() {
        let labels = crate::audit::decision_log::event::Labels::new("p", &Default::default());
        let pending = json!({"seq": 1, "decision_id": "a", "exchange": "pending", "status": null});
        let complete = json!({"seq": 2, "decision_id": "a", "status": 200});
        assert!(crate::audit::decision_log::event::event(&pending, &labels).is_none());
        let sent = crate::audit::decision_log::event::event(&complete, &labels).unwrap();
        assert_eq!(sent["result"]["status"], 200);
    }
}
