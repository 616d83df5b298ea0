//! Buffered mode's queue: one lane of records per request worker, taken
//! whole by the writer.
//!
//! A worker appends each record to its own lane, under a lock no other
//! worker takes; the writer takes a lane's whole batch at once, leaving an
//! empty one in its place. So records cross from the workers to the
//! writer's thread a batch at a time, not one by one: a queue shared by
//! every worker and the writer cost about 0.8 µs of machine time per
//! record on a 2-core host (docs/performance.md, session 15).
//!
//! The writer chains a batch's records in the order they were queued
//! across all lanes: each record carries the time it was queued (a
//! monotonic clock, the same on every core), and the batches taken
//! together are merged by it. The trail reads as a single queue would
//! have made it.
//!
//! Sync mode keeps the one-by-one queue: each record there carries its
//! acknowledgement and is waited for.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use crate::config::OnFull;

/// One lane: its batch, and where a worker waits for room.
///
/// Aligned to its own cache lines, so that workers appending to
/// neighbouring lanes do not contend for one line.
#[repr(align(128))]
struct Lane {
    batch: Mutex<Batch>,
    room: Condvar,
}

/// Records queued in one lane, or taken from it, back to back.
#[derive(Default)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    /// Each record: when it was queued and where it is in `bytes`.
    records: Vec<(u64, Range<usize>)>,
    /// A worker waits for room in the lane this batch was taken from.
    waited_on: bool,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
        self.waited_on = false;
    }
}

/// A record appended to a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pushed {
    /// Queued. `first`: the lane was empty, so the writer must be told
    /// (once per batch); `waited`: the lane was full and the worker waited
    /// for the writer to take it (`on_full = "block"`).
    Queued { first: bool, waited: bool },
    /// The lane was full and `on_full = "drop"`: not queued.
    Dropped,
}

/// Every lane of one trail.
pub(super) struct Lanes {
    lanes: Box<[Lane]>,
    /// Records one lane holds at most: the queue's capacity shared out.
    per_lane: usize,
}

/// A batch kept for reuse larger than this is freed instead: one burst
/// does not pin its memory (a batch under steady load is a few hundred KiB).
const MAX_KEPT: usize = 1 << 20;

impl Default for Lanes {
    /// One lane, holding as many records as the default queue.
    fn default() -> Lanes {
        Lanes::new(1, crate::config::AuditConfig::default().queue_capacity)
    }
}

impl Lanes {
    /// `count` lanes (at least one) sharing `capacity` records.
    pub fn new(count: usize, capacity: usize) -> Lanes {
        let count = count.max(1);
        Lanes {
            lanes: (0..count)
                .map(|_| Lane {
                    batch: Mutex::default(),
                    room: Condvar::new(),
                })
                .collect(),
            per_lane: capacity.div_ceil(count).max(1),
        }
    }

    fn lock(&self, lane: usize) -> MutexGuard<'_, Batch> {
        let lane = &self.lanes[lane % self.lanes.len()];
        // A record written half-way by a panicking writer of JSON is not
        // in `records`, so the batch stays sound.
        lane.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one record, which `write` writes, to `lane`. When the lane
    /// is full, `on_full` decides: wait until the writer takes it, or drop
    /// the record.
    pub fn push(&self, lane: usize, on_full: OnFull, write: impl FnOnce(&mut Vec<u8>)) -> Pushed {
        let slot = &self.lanes[lane % self.lanes.len()];
        let mut batch = self.lock(lane);
        let mut waited = false;
        while batch.records.len() >= self.per_lane {
            if on_full == OnFull::Drop {
                return Pushed::Dropped;
            }
            waited = true;
            batch.waited_on = true;
            batch = slot
                .room
                .wait(batch)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let first = batch.records.is_empty();
        let start = batch.bytes.len();
        write(&mut batch.bytes);
        let end = batch.bytes.len();
        batch.records.push((queued_at(), start..end));
        Pushed::Queued { first, waited }
    }

    /// Records waiting in the lanes now.
    pub fn waiting(&self) -> usize {
        (0..self.lanes.len()).map(|i| self.lock(i).len()).sum()
    }

    /// Takes every non-empty lane's batch into `held`, leaving an empty
    /// batch from `spares` in its place, and wakes the workers waiting for
    /// room. Returns how many records were taken.
    pub fn take_all(&self, held: &mut Held, spares: &mut Vec<Batch>) -> usize {
        let mut taken = Vec::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            let mut batch = self.lock(i);
            if batch.records.is_empty() {
                continue;
            }
            let full = std::mem::replace(&mut *batch, spares.pop().unwrap_or_default());
            drop(batch);
            if full.waited_on {
                lane.room.notify_all();
            }
            taken.push(full);
        }
        held.add(taken)
    }
}

/// When a record is queued: nanoseconds on a monotonic clock that every
/// thread reads alike.
fn queued_at() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The records the writer has in hand, in the order it chains them: those
/// that came through the one-by-one queue (sync mode) in arrival order,
/// then those taken from the lanes, merged by the time they were queued.
#[derive(Default)]
pub(super) struct Held {
    /// Records from the queue, each in a buffer of its own.
    pub lines: Vec<Vec<u8>>,
    batches: Vec<Batch>,
    /// The lanes' records in chaining order: (batch, range in its bytes).
    order: Vec<(usize, Range<usize>)>,
}

impl Held {
    /// Records that came one by one (tests, and sync mode's queue).
    #[cfg(test)]
    pub fn from_lines(lines: Vec<Vec<u8>>) -> Held {
        Held {
            lines,
            ..Held::default()
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len() + self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each record's bytes, in chaining order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.lines.iter().map(Vec::as_slice).chain(
            self.order
                .iter()
                .map(|(b, range)| &self.batches[*b].bytes[range.clone()]),
        )
    }

    /// Adds batches taken from the lanes after the records already held,
    /// merged among themselves by the time each record was queued.
    fn add(&mut self, batches: Vec<Batch>) -> usize {
        let first = self.batches.len();
        let mut new: Vec<(u64, usize, Range<usize>)> = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            new.extend(
                batch
                    .records
                    .iter()
                    .map(|(at, range)| (*at, first + i, range.clone())),
            );
        }
        // Stable: records queued at the same instant keep lane order.
        new.sort_by_key(|(at, _, _)| *at);
        let n = new.len();
        self.order
            .extend(new.into_iter().map(|(_, batch, range)| (batch, range)));
        self.batches.extend(batches);
        n
    }

    /// Empties this once its records are written: the lanes' batches go
    /// back to `spares` for the next take, the queue's buffers are returned.
    pub fn clear(&mut self, spares: &mut Vec<Batch>) -> Vec<Vec<u8>> {
        self.order.clear();
        for mut batch in self.batches.drain(..) {
            if batch.bytes.capacity() <= MAX_KEPT {
                batch.clear();
                spares.push(batch);
            }
        }
        std::mem::take(&mut self.lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn push(lanes: &Lanes, lane: usize, text: &str) -> Pushed {
        lanes.push(lane, OnFull::Block, |out| {
            out.extend_from_slice(text.as_bytes())
        })
    }

    fn texts(held: &Held) -> Vec<String> {
        held.iter()
            .map(|r| String::from_utf8(r.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn records_from_every_lane_are_chained_in_the_order_they_were_queued() {
        let lanes = Lanes::new(3, 100);
        assert_eq!(
            push(&lanes, 1, "a"),
            Pushed::Queued {
                first: true,
                waited: false
            }
        );
        assert_eq!(
            push(&lanes, 0, "b"),
            Pushed::Queued {
                first: true,
                waited: false
            }
        );
        assert_eq!(
            push(&lanes, 1, "c"),
            Pushed::Queued {
                first: false,
                waited: false
            }
        );
        push(&lanes, 2, "d");
        push(&lanes, 0, "e");
        assert_eq!(lanes.waiting(), 5);

        let (mut held, mut spares) = (Held::from_lines(vec![b"q".to_vec()]), Vec::new());
        assert_eq!(lanes.take_all(&mut held, &mut spares), 5);
        assert_eq!(lanes.waiting(), 0);
        // The queue's records first, then the lanes' merged by time.
        assert_eq!(texts(&held), ["q", "a", "b", "c", "d", "e"]);

        // Held records stay first; later ones follow.
        push(&lanes, 2, "f");
        push(&lanes, 0, "g");
        assert_eq!(lanes.take_all(&mut held, &mut spares), 2);
        assert_eq!(texts(&held), ["q", "a", "b", "c", "d", "e", "f", "g"]);
        assert_eq!(held.len(), 8);

        // Written: the batches come back empty for the next take.
        let lines = held.clear(&mut spares);
        assert_eq!(lines, [b"q".to_vec()]);
        assert!(held.is_empty());
        assert_eq!(spares.len(), 5);
        assert!(spares.iter().all(|b| b.len() == 0 && b.bytes.is_empty()));
        push(&lanes, 1, "h");
        assert_eq!(lanes.take_all(&mut held, &mut spares), 1);
        assert_eq!(spares.len(), 4, "a spare took the lane's place");
        assert_eq!(texts(&held), ["h"]);
    }

    #[test]
    fn a_full_lane_drops_or_waits_for_the_writer() {
        // Capacity 4 over 2 lanes: 2 records each.
        let lanes = Arc::new(Lanes::new(2, 4));
        push(&lanes, 0, "a");
        push(&lanes, 0, "b");
        assert_eq!(
            lanes.push(0, OnFull::Drop, |out| out.push(b'x')),
            Pushed::Dropped
        );
        // The other lane has room of its own.
        assert!(matches!(
            lanes.push(1, OnFull::Drop, |out| out.push(b'c')),
            Pushed::Queued { .. }
        ));

        let blocked = {
            let lanes = Arc::clone(&lanes);
            std::thread::spawn(move || push(&lanes, 0, "d"))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished(), "waits while the lane is full");
        let (mut held, mut spares) = (Held::default(), Vec::new());
        assert_eq!(lanes.take_all(&mut held, &mut spares), 3);
        assert_eq!(
            blocked.join().unwrap(),
            Pushed::Queued {
                first: true,
                waited: true
            }
        );
        assert_eq!(texts(&held), ["a", "b", "c"]);
        lanes.take_all(&mut held, &mut spares);
        assert_eq!(texts(&held), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_lane_is_sound_after_a_panic_while_writing_a_record() {
        let lanes = Arc::new(Lanes::new(1, 10));
        push(&lanes, 0, "a");
        let l = Arc::clone(&lanes);
        let panicked = std::thread::spawn(move || {
            l.push(0, OnFull::Block, |out| {
                out.extend_from_slice(b"half");
                panic!("a bug while writing a record");
            })
        })
        .join();
        assert!(panicked.is_err());
        push(&lanes, 0, "b");
        let (mut held, mut spares) = (Held::default(), Vec::new());
        lanes.take_all(&mut held, &mut spares);
        assert_eq!(
            texts(&held),
            ["a", "b"],
            "the half-written record is not one"
        );
    }
}
