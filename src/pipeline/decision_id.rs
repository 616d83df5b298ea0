//! Decision ids: UUIDv7 (time-ordered, so the trail sorts by time), made
//! without a system call or a lock per request.
//!
//! Each thread draws a random 64-bit seed once; every id is the current
//! millisecond, then the seed mixed with a per-thread counter (SplitMix64).
//! Two ids of one thread never repeat (the counter is a bijection's input);
//! ids of two threads collide only if their 64-bit seeds do.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::time::SystemTime;

thread_local! {
    static STATE: Cell<(u64, u64)> = Cell::new((seed(), 0));
}

/// A random seed from the OS, through std's randomly keyed hasher.
fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A new decision id at wall-clock time `now`.
pub fn next(now: SystemTime) -> crate::input::RequestId {
    let (seed, counter) = STATE.with(|s| {
        let (seed, counter) = s.get();
        s.set((seed, counter.wrapping_add(1)));
        (seed, counter)
    });
    let mixed = splitmix64(seed ^ splitmix64(counter));
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&mixed.to_le_bytes());
    bytes[8..].copy_from_slice(&(counter as u16).to_le_bytes());
    let millis = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Encoded in place, without the formatter, into an id kept inline.
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let encoded = uuid::Builder::from_unix_timestamp_millis(millis, &bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    // Cannot fail: 36 characters fit an id's 64.
    crate::input::RequestId::from(encoded).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_unique_and_time_ordered() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_000);
        let t1 = t0 + std::time::Duration::from_millis(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = next(t0);
            let u = uuid::Uuid::parse_str(&id).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert!(seen.insert(id));
        }
        assert!(next(t1) > next(t0), "later ids sort after earlier ones");
        let other = std::thread::spawn(move || next(t0)).join().unwrap();
        assert!(!seen.contains(&other));
    }
}
