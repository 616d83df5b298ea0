//! The decision cache: the last decisions of one worker thread, keyed on
//! the part of the input the policy set reads (see [`super::reads`]).
//!
//! A policy set is a pure function of its input and its data as long as it
//! calls no volatile builtin, so a request whose read fields equal an
//! earlier request's gets the earlier decision without running the VM. The
//! cache belongs to one thread and one compiled set: a reload starts an
//! empty one, and no lock is ever taken.
//!
//! Entries are keyed by a 128-bit SipHash of the reduced input, under two
//! random keys drawn per thread, rather than by the input itself: keeping
//! a thousand inputs alive (a few KiB of small allocations each) cost more
//! memory and allocator time than hashing twice. SipHash is a keyed PRF,
//! so a client cannot aim at a collision without the keys, and two of the
//! ~2^20 inputs a busy gateway sees colliding by chance has a probability
//! near 2^-88.
//!
//! Bounded by two generations: entries go to the current map; when it
//! holds half the capacity, it becomes the previous map (the old previous
//! is dropped). A hit in the previous map moves the entry back, so what is
//! used often stays and memory never exceeds the capacity.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use regorus::Value;

use super::Decision;

/// Whether a decision came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    Hit,
    Miss,
    /// Not cacheable: the set reads the whole input or calls a volatile
    /// builtin, or the cache is off.
    Bypassed,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::Hit => "hit",
            CacheUse::Miss => "miss",
            CacheUse::Bypassed => "bypassed",
        }
    }
}

pub(crate) struct DecisionCache {
    capacity: usize,
    hashers: [RandomState; 2],
    current: HashMap<u128, Decision>,
    previous: HashMap<u128, Decision>,
}

impl DecisionCache {
    /// A cache of at most `capacity` decisions (at least 2).
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            capacity: capacity.max(2),
            hashers: [RandomState::new(), RandomState::new()],
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key of an input: its 128-bit hash.
    pub fn key(&self, input: &Value) -> u128 {
        let [a, b] = self.hashers.each_ref().map(|hasher| {
            let mut h = hasher.build_hasher();
            hash_value(input, &mut h);
            h.finish()
        });
        (u128::from(a) << 64) | u128::from(b)
    }

    /// The decision stored under `key`.
    pub fn get(&mut self, key: u128) -> Option<Decision> {
        if let Some(d) = self.current.get(&key) {
            return Some(d.clone());
        }
        let d = self.previous.remove(&key)?;
        let found = d.clone();
        self.insert(key, d);
        Some(found)
    }

    pub fn insert(&mut self, key: u128, decision: Decision) {
        if self.current.len() >= self.capacity / 2 && !self.current.contains_key(&key) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, decision);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Hashes a value consistently with its `Eq`: equal values hash equal
/// (numbers through their `f64` form, since `1` and `1.0` are equal).
fn hash_value<H: Hasher>(v: &Value, h: &mut H) {
    match v {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => {
            1u8.hash(h);
            b.hash(h);
        }
        Value::Number(n) => {
            2u8.hash(h);
            n.as_f64().map(f64::to_bits).hash(h);
        }
        Value::String(s) => {
            3u8.hash(h);
            s.hash(h);
        }
        Value::Array(a) => {
            4u8.hash(h);
            a.len().hash(h);
            for item in a.iter() {
                hash_value(item, h);
            }
        }
        Value::Set(s) => {
            5u8.hash(h);
            for item in s.iter() {
                hash_value(item, h);
            }
        }
        Value::Object(o) => {
            6u8.hash(h);
            o.len().hash(h);
            for (k, item) in o.iter() {
                hash_value(k, h);
                hash_value(item, h);
            }
        }
        Value::Undefined => 7u8.hash(h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(code: &str) -> Decision {
        Decision {
            allow: code.is_empty(),
            deny: if code.is_empty() {
                vec![]
            } else {
                vec![super::super::Reason {
                    code: code.into(),
                    message: String::new(),
                }]
            },
            warn: vec![],
            response: None,
        }
    }

    fn key(path: &str) -> Value {
        Value::from_json_str(&format!(r#"{{"request": {{"path": "{path}", "n": 1}}}}"#)).unwrap()
    }

    #[test]
    fn equal_values_share_a_key_and_different_ones_do_not() {
        let mut c = DecisionCache::new(8);
        let a = c.key(&key("/a"));
        assert_eq!(a, c.key(&key("/a")));
        assert_ne!(a, c.key(&key("/b")));
        // Both halves differ, not just one.
        let b = c.key(&key("/b"));
        assert_ne!(a >> 64, b >> 64);
        assert_ne!(a as u64, b as u64);
        // Structure counts, not just the strings in order.
        let flat = Value::from_json_str(r#"{"a": "b", "c": "d"}"#).unwrap();
        let nested = Value::from_json_str(r#"{"a": {"b": "c"}, "d": null}"#).unwrap();
        assert_ne!(c.key(&flat), c.key(&nested));
        let one = Value::from_json_str(r#"{"n": 1}"#).unwrap();
        let one_f = Value::from_json_str(r#"{"n": 1.0}"#).unwrap();
        assert_eq!(one, one_f);
        assert_eq!(c.key(&one), c.key(&one_f));
        c.insert(a, decision("x"));
        assert_eq!(c.get(a), Some(decision("x")));
        assert_eq!(c.get(b), None);
    }

    #[test]
    fn bounded_by_capacity_and_recently_used_entries_stay() {
        let mut c = DecisionCache::new(4);
        let keys: Vec<Value> = (0..10).map(|i| key(&format!("/{i}"))).collect();
        let hot = c.key(&keys[0]);
        c.insert(hot, decision(""));
        for k in &keys[1..] {
            let k = c.key(k);
            c.insert(k, decision("x"));
            assert!(c.len() <= c.capacity(), "{} entries", c.len());
            // Used between every insertion: never evicted.
            assert_eq!(c.get(hot), Some(decision("")));
        }
        let first = c.key(&keys[1]);
        assert_eq!(c.get(first), None, "old, unused entry evicted");
    }
}
