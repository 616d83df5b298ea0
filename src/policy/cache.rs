//! The decision cache: the last decisions of one worker thread, keyed on
//! the part of the input the policy set reads (see [`super::reads`]).
//!
//! A policy set is a pure function of its input and its data as long as it
//! calls no volatile builtin, so a request whose read fields equal an
//! earlier request's gets the earlier decision without running the VM. The
//! cache belongs to one thread and one compiled set: a reload starts an
//! empty one, and no lock is ever taken.
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
    hasher: RandomState,
    current: HashMap<u64, (Value, Decision)>,
    previous: HashMap<u64, (Value, Decision)>,
}

impl DecisionCache {
    /// A cache of at most `capacity` decisions (at least 2).
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            capacity: capacity.max(2),
            hasher: RandomState::new(),
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key's hash, to pass to [`Self::get`] and [`Self::insert`].
    pub fn hash(&self, key: &Value) -> u64 {
        let mut h = self.hasher.build_hasher();
        hash_value(key, &mut h);
        h.finish()
    }

    /// The decision stored for `key`. Keys are compared whole: a hash
    /// collision is a miss, never another input's decision.
    pub fn get(&mut self, hash: u64, key: &Value) -> Option<Decision> {
        if let Some((k, d)) = self.current.get(&hash) {
            return (k == key).then(|| d.clone());
        }
        let (k, d) = self.previous.remove(&hash)?;
        if &k != key {
            return None;
        }
        let found = d.clone();
        self.store(hash, k, d);
        Some(found)
    }

    pub fn insert(&mut self, hash: u64, key: Value, decision: Decision) {
        self.store(hash, key, decision);
    }

    fn store(&mut self, hash: u64, key: Value, decision: Decision) {
        if self.current.len() >= self.capacity / 2 && !self.current.contains_key(&hash) {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(hash, (key, decision));
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
    fn equal_values_hash_equal_and_a_collision_is_a_miss() {
        let mut c = DecisionCache::new(8);
        let a = key("/a");
        let h = c.hash(&a);
        assert_eq!(h, c.hash(&key("/a")));
        assert_ne!(h, c.hash(&key("/b")));
        let one = Value::from_json_str(r#"{"n": 1}"#).unwrap();
        let one_f = Value::from_json_str(r#"{"n": 1.0}"#).unwrap();
        assert_eq!(one, one_f);
        assert_eq!(c.hash(&one), c.hash(&one_f));
        c.insert(h, a.clone(), decision("x"));
        assert_eq!(c.get(h, &a), Some(decision("x")));
        // Same hash slot, another key: not the stored decision.
        assert_eq!(c.get(h, &key("/b")), None);
    }

    #[test]
    fn bounded_by_capacity_and_recently_used_entries_stay() {
        let mut c = DecisionCache::new(4);
        let keys: Vec<Value> = (0..10).map(|i| key(&format!("/{i}"))).collect();
        let hot = &keys[0];
        let hot_hash = c.hash(hot);
        c.insert(hot_hash, hot.clone(), decision(""));
        for k in &keys[1..] {
            let h = c.hash(k);
            c.insert(h, k.clone(), decision("x"));
            assert!(c.len() <= c.capacity(), "{} entries", c.len());
            // Used between every insertion: never evicted.
            assert_eq!(c.get(hot_hash, hot), Some(decision("")));
        }
        let first = c.hash(&keys[1]);
        assert_eq!(c.get(first, &keys[1]), None, "old, unused entry evicted");
    }
}
