//! The decision cache: the last decisions of one worker thread, keyed on
//! the part of the input the policy set reads (see [`super::reads`]).
//!
//! A policy set is a pure function of its input and its data as long as it
//! calls no volatile builtin, so a request whose read fields equal an
//! earlier request's gets the earlier decision without running the VM. The
//! cache belongs to one thread and one compiled set: a reload starts an
//! empty one, and no lock is ever taken.
//!
//! Entries are keyed by a 128-bit SipHash-1-3 of the read fields, under a
//! random key drawn per thread, rather than by the input itself: the key is
//! computed from the pipeline's typed fields without building the Rego
//! document (built on a miss only), and keeping a thousand documents alive
//! (a few KiB of small allocations each) cost more memory and allocator
//! time than the hash. SipHash is a keyed PRF, so a client cannot aim at a
//! collision without the key, and two of the ~2^20 inputs a busy gateway
//! sees colliding by chance has a probability near 2^-88.
//!
//! Bounded by two generations: entries go to the current map; when it
//! holds half the capacity, it becomes the previous map (the old previous
//! is dropped). A hit in the previous map moves the entry back, so what is
//! used often stays and memory never exceeds the capacity.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, RandomState};

use regorus::Value;
use siphasher::sip128::Hasher128;
use std::cell::Cell;

use super::InputReads;

/// What a document's read fields are fed to (see
/// [`super::ReadableInput::hash_key`]): their bytes, gathered in one buffer
/// and hashed in one pass by [`KeyHasher::finish128`]. A key is fed many
/// small pieces (a tag byte, a field name, a short string) and SipHash
/// pays per call; the bytes hashed, and so the keys, are the same as
/// feeding SipHash piece by piece.
pub struct KeyHasher {
    keys: (u64, u64),
    bytes: Vec<u8>,
}

impl KeyHasher {
    fn new(keys: (u64, u64), mut bytes: Vec<u8>) -> Self {
        bytes.clear();
        KeyHasher { keys, bytes }
    }

    /// The 128-bit SipHash-1-3 of everything fed, under the keys.
    pub fn finish128(&self) -> u128 {
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        std::hash::Hasher::write(&mut h, &self.bytes);
        h.finish128().as_u128()
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    fn write_u8(&mut self, i: u8) {
        self.bytes.push(i);
    }

    /// Keys are read through [`KeyHasher::finish128`]; this is its low half.
    fn finish(&self) -> u64 {
        self.finish128() as u64
    }
}

/// The largest buffer a cache keeps between keys: a set that reads every
/// header of a request with a huge cookie should not pin that much per
/// thread.
const KEY_BUFFER_KEPT: usize = 16 * 1024;

/// Type tags written before each part of a keyed document, so that
/// different shapes never feed the hash the same bytes.
pub(crate) mod tag {
    pub const NULL: u8 = 0;
    pub const BOOL: u8 = 1;
    pub const UINT: u8 = 2;
    pub const INT: u8 = 3;
    pub const FLOAT: u8 = 4;
    pub const STRING: u8 = 5;
    pub const ARRAY: u8 = 6;
    pub const SET: u8 = 7;
    pub const OBJECT: u8 = 8;
    pub const UNDEFINED: u8 = 9;
    /// A typed record (geo, destination) hashed through its `Hash`.
    pub const RECORD: u8 = 10;
    /// A value keyed by its [`super::digest`].
    pub const DIGEST: u8 = 11;
    /// Closes an object (field names are UTF-8: they never start with 0xfe).
    pub const END: u8 = 0xfe;
}

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

/// The maps' hasher: a key is already a keyed 128-bit hash, so its low half
/// is used as it is rather than hashed again with SipHash (a client cannot
/// aim keys at one bucket without the cache's secret keys).
#[derive(Default)]
struct KeyIsHash(u64);

impl std::hash::Hasher for KeyIsHash {
    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys reach here, through `write_u128`; any other
        // input still spreads over the buckets.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Decisions = HashMap<u128, Decision, BuildHasherDefault<KeyIsHash>>;

pub(crate) struct DecisionCache {
    capacity: usize,
    keys: (u64, u64),
    current: Decisions,
    previous: Decisions,
    /// The [`KeyHasher`] buffer, kept from one key to the next.
    buffer: Cell<Vec<u8>>,
}

impl DecisionCache {
    /// A cache of at most `capacity` decisions (at least 2).
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            capacity: capacity.max(2),
            // RandomState draws its keys from the OS's randomness.
            keys: (
                RandomState::new().hash_one(0u8),
                RandomState::new().hash_one(1u8),
            ),
            current: Decisions::default(),
            previous: Decisions::default(),
            buffer: Cell::new(Vec::with_capacity(512)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key of what `feed` writes: its 128-bit keyed hash.
    pub fn key(&self, feed: impl FnOnce(&mut KeyHasher)) -> u128 {
        let mut h = KeyHasher::new(self.keys, self.buffer.take());
        feed(&mut h);
        let key = h.finish128();
        if h.bytes.capacity() <= KEY_BUFFER_KEPT {
            self.buffer.set(h.bytes);
        }
        key
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

/// Feeds `h` with `value`: equal values feed equal bytes (numbers as
/// their `f64` form when they have one, since `1` and `1.0` are equal).
pub(crate) fn hash_value(value: &Value, h: &mut KeyHasher) {
    match value {
        Value::Null => tag::NULL.hash(h),
        Value::Bool(b) => tagged(tag::BOOL, b, h),
        Value::Number(n) => match n.as_f64() {
            Some(f) => tagged(tag::FLOAT, &f.to_bits(), h),
            None => tagged(tag::FLOAT, &value.to_string(), h),
        },
        Value::String(s) => tagged(tag::STRING, s, h),
        Value::Array(a) => {
            tag::ARRAY.hash(h);
            a.len().hash(h);
            for item in a.iter() {
                hash_value(item, h);
            }
        }
        Value::Set(s) => {
            tag::SET.hash(h);
            s.len().hash(h);
            for item in s.iter() {
                hash_value(item, h);
            }
        }
        Value::Object(o) => {
            tag::OBJECT.hash(h);
            o.len().hash(h);
            for (k, item) in o.iter() {
                hash_value(k, h);
                hash_value(item, h);
            }
        }
        Value::Undefined => tag::UNDEFINED.hash(h),
    }
}

/// Feeds `h` with a type tag, then `value`.
pub(crate) fn tagged<T: Hash + ?Sized>(tag: u8, value: &T, h: &mut KeyHasher) {
    tag.hash(h);
    value.hash(h);
}

/// A fixed-key 128-bit digest of a value the gateway keeps built (the
/// ingress destination), computed once so that requests key it in one
/// step. Fixed keys are fine here: the value comes from the configuration
/// and the geo databases, not from clients.
pub fn digest(value: &Value) -> u128 {
    let mut h = KeyHasher::new((0x7265_6d70_6172_7400, 0x6465_7374_0000_0001), Vec::new());
    hash_value(value, &mut h);
    h.finish128()
}

/// Feeds `h` with `reads.prune(value)` without building it.
pub(crate) fn hash_pruned(reads: &InputReads, value: &Value, h: &mut KeyHasher) {
    let (InputReads::Fields(fields), Value::Object(object)) = (reads, value) else {
        return hash_value(value, h);
    };
    tag::OBJECT.hash(h);
    for (key, item) in object.iter() {
        let Value::String(name) = key else { continue };
        if let Some(sub) = fields.get(name.as_ref()) {
            name.hash(h);
            hash_pruned(sub, item, h);
        }
    }
    tag::END.hash(h);
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

    fn doc(path: &str) -> Value {
        Value::from_json_str(&format!(r#"{{"request": {{"path": "{path}", "n": 1}}}}"#)).unwrap()
    }

    fn key_of(c: &DecisionCache, v: &Value) -> u128 {
        c.key(|h| hash_value(v, h))
    }

    fn pieces<H: std::hash::Hasher>(h: &mut H) {
        tag::STRING.hash(h);
        "contacts".hash(h);
        42u64.hash(h);
        (-7i64).hash(h);
        Some("FR").hash(h);
    }

    #[test]
    fn a_key_is_siphash_of_the_pieces_fed_in_order_whatever_the_buffer_held() {
        use std::hash::Hasher;
        let c = DecisionCache::new(8);
        let mut direct = siphasher::sip128::SipHasher13::new_with_keys(c.keys.0, c.keys.1);
        pieces(&mut direct);
        let expected = direct.finish128().as_u128();
        // A longer key first, so the kept buffer holds stale bytes.
        let long = c.key(|h| h.write(&[0xab; 600]));
        assert_eq!(c.key(pieces), expected);
        assert_eq!(c.key(|h| h.write(&[0xab; 600])), long);
        assert_ne!(long, expected);
    }

    #[test]
    fn equal_values_share_a_key_and_different_ones_do_not() {
        let mut c = DecisionCache::new(8);
        let a = key_of(&c, &doc("/a"));
        assert_eq!(a, key_of(&c, &doc("/a")));
        assert_ne!(a, key_of(&c, &doc("/b")));
        // Both halves differ, not just one.
        let b = key_of(&c, &doc("/b"));
        assert_ne!(a >> 64, b >> 64);
        assert_ne!(a as u64, b as u64);
        // Structure counts, not just the strings in order.
        let flat = Value::from_json_str(r#"{"a": "b", "c": "d"}"#).unwrap();
        let nested = Value::from_json_str(r#"{"a": {"b": "c"}, "d": null}"#).unwrap();
        assert_ne!(key_of(&c, &flat), key_of(&c, &nested));
        let one = Value::from_json_str(r#"{"n": 1}"#).unwrap();
        let one_f = Value::from_json_str(r#"{"n": 1.0}"#).unwrap();
        assert_eq!(one, one_f);
        assert_eq!(key_of(&c, &one), key_of(&c, &one_f));
        // Another thread's cache draws another hash key.
        assert_ne!(key_of(&DecisionCache::new(8), &one), key_of(&c, &one));
        c.insert(a, decision("x"));
        assert_eq!(c.get(a), Some(decision("x")));
        assert_eq!(c.get(b), None);
    }

    #[test]
    fn bounded_by_capacity_and_recently_used_entries_stay() {
        let mut c = DecisionCache::new(4);
        let keys: Vec<Value> = (0..10).map(|i| doc(&format!("/{i}"))).collect();
        let hot = key_of(&c, &keys[0]);
        c.insert(hot, decision(""));
        for k in &keys[1..] {
            let k = key_of(&c, k);
            c.insert(k, decision("x"));
            assert!(c.len() <= c.capacity(), "{} entries", c.len());
            // Used between every insertion: never evicted.
            assert_eq!(c.get(hot), Some(decision("")));
        }
        let first = key_of(&c, &keys[1]);
        assert_eq!(c.get(first), None, "old, unused entry evicted");
    }
}

#[cfg(test)]
mod pruned_tests {
    use super::*;

    #[test]
    fn hashing_a_pruned_view_equals_hashing_the_pruned_value() {
        let c = DecisionCache::new(8);
        let mut reads = InputReads::nothing();
        reads.add(&["a".into(), "b".into()]);
        reads.add(&["c".into()]);
        let v = Value::from_json_str(r#"{"a": {"b": [1, "x"], "z": 2}, "c": {"d": null}, "e": 3}"#)
            .unwrap();
        let via_view = c.key(|h| hash_pruned(&reads, &v, h));
        let pruned = reads.prune(&v);
        let via_value = c.key(|h| hash_pruned(&reads, &pruned, h));
        assert_eq!(via_view, via_value);
        let other =
            Value::from_json_str(r#"{"a": {"b": [1, "y"], "z": 2}, "c": {"d": null}}"#).unwrap();
        assert_ne!(via_view, c.key(|h| hash_pruned(&reads, &other, h)));
        // A field that is not read does not change the key.
        let unread =
            Value::from_json_str(r#"{"a": {"b": [1, "x"], "z": 9}, "c": {"d": null}}"#).unwrap();
        assert_eq!(via_view, c.key(|h| hash_pruned(&reads, &unread, h)));
    }
}
