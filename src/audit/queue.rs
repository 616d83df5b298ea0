//! The queue between the request workers and the writer thread.
//!
//! A worker appends its record, already serialised, to the queue's current
//! chunk under a short lock (a copy of about a kilobyte); the writer takes
//! whole chunks and hands back the ones it has written. Chunks have a fixed
//! size ([`CHUNK_BYTES`]) and go round: a record costs no allocation, no
//! message and no buffer of its own, a backlog is never moved or regrown in
//! memory, and what stays allocated after a burst is bounded
//! ([`SPARE_CHUNKS`]). A channel of per-record buffers, which this
//! replaced, paid a send, a receive and a pooled buffer per record and held
//! each record in a buffer of 1.5 KiB; buffers that grow by doubling, tried
//! first, held twice what a long batch needed (docs/performance.md,
//! session 16).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// A chunk's size: about 120 records of the shipped shape. A record larger
/// than this gets a chunk of its own size, not kept after use.
pub const CHUNK_BYTES: usize = 128 * 1024;
/// Emptied chunks kept for reuse at most (2 MiB).
const SPARE_CHUNKS: usize = 16;

/// Serialised records, one after the other, and the sync-mode
/// acknowledgements of those that carry one.
#[derive(Default)]
pub struct Records {
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
    pub(super) acks: Vec<oneshot::Sender<bool>>,
}

impl Records {
    fn with_capacity(bytes: usize) -> Records {
        Records {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(bytes / 512),
            acks: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of all the records.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        self.ends.push(self.bytes.len());
    }

    /// Whether `record` fits without growing the chunk.
    fn has_room_for(&self, record: &[u8]) -> bool {
        self.bytes.capacity() - self.bytes.len() >= record.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.bytes[start..end];
            start = end;
            r
        })
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.acks.clear();
    }
}

/// The records the writer has in hand: whole chunks taken from the queue,
/// in order, and the chunks it has written, to hand back at the next take.
#[derive(Default)]
pub struct Hand {
    chunks: Vec<Records>,
    written: Vec<Records>,
    len: usize,
}

impl Hand {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn byte_len(&self) -> usize {
        self.chunks.iter().map(Records::byte_len).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().flat_map(Records::iter)
    }

    /// Moves the acknowledgements of every record in hand to `acks`.
    pub fn take_acks(&mut self, acks: &mut Vec<oneshot::Sender<bool>>) {
        for c in &mut self.chunks {
            acks.append(&mut c.acks);
        }
    }

    /// Drops the records (written, or given up): their chunks go back to
    /// the queue at the next take.
    pub fn clear(&mut self) {
        for mut c in self.chunks.drain(..) {
            c.clear();
            self.written.push(c);
        }
        self.len = 0;
    }

    #[cfg(test)]
    pub fn of(records: Records) -> Hand {
        Hand {
            len: records.len(),
            chunks: vec![records],
            written: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn append(&mut self, other: Hand) {
        self.len += other.len;
        self.chunks.extend(other.chunks);
    }
}

/// What became of a pushed record.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued at once.
    Queued,
    /// Queued after waiting for room (the queue was full).
    QueuedAfterWait,
    /// Not queued: the queue was full and the caller does not wait.
    Full,
    /// Not queued: the writer is gone.
    Closed,
}

/// Why the writer woke.
#[derive(Debug, PartialEq, Eq)]
pub enum Woke {
    Work,
    TimedOut,
    /// Every sender is gone and nothing is left.
    Closed,
}

/// What the writer took: records went into its hand; these are the sync
/// requests whose records are all in hand now.
pub struct Taken {
    pub syncs: Vec<mpsc::Sender<std::io::Result<()>>>,
    /// Every sender is gone and the queue is empty: nothing more will come.
    pub closed: bool,
}

struct State {
    /// Filled at the back; the writer takes from the front.
    chunks: VecDeque<Records>,
    /// Emptied buffers, reused for new chunks.
    spare: Vec<Records>,
    /// Records in `chunks`.
    queued: usize,
    /// Records ever pushed and ever taken: a sync request waits until
    /// `taken` reaches the `pushed` it saw.
    pushed: u64,
    taken: u64,
    syncs: Vec<(u64, mpsc::Sender<std::io::Result<()>>)>,
    senders: usize,
    writer_gone: bool,
    writer_waiting: bool,
    senders_waiting: usize,
}

pub struct Queue {
    state: Mutex<State>,
    /// The writer waits here for work.
    work: Condvar,
    /// Senders wait here for room.
    room: Condvar,
    capacity: usize,
}

impl Queue {
    /// A queue of at most `capacity` records (at least 1), with no sender
    /// yet: make them with [`Queue::sender`].
    pub fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                spare: Vec::new(),
                queued: 0,
                pushed: 0,
                taken: 0,
                syncs: Vec::new(),
                senders: 0,
                writer_gone: false,
                writer_waiting: false,
                senders_waiting: 0,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    // A panic while holding the lock leaves the state consistent: every
    // change under it is a push or a move of whole values.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records waiting in the queue now.
    pub fn len(&self) -> usize {
        self.lock().queued
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends one record (with its acknowledgement in sync mode). When the
    /// queue is full, waits for room if `wait`, else returns
    /// [`Pushed::Full`]. Blocks the calling thread, like the writer it waits
    /// for.
    pub fn push(&self, record: &[u8], ack: Option<oneshot::Sender<bool>>, wait: bool) -> Pushed {
        let mut s = self.lock();
        let mut waited = false;
        while s.queued >= self.capacity && !s.writer_gone {
            if !wait {
                return Pushed::Full;
            }
            waited = true;
            s.senders_waiting += 1;
            s = self.room.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.senders_waiting -= 1;
        }
        if s.writer_gone {
            return Pushed::Closed;
        }
        let full = s
            .chunks
            .back()
            .is_none_or(|c| !c.is_empty() && !c.has_room_for(record));
        if full {
            let fresh = match s.spare.pop() {
                Some(c) if c.has_room_for(record) => c,
                _ => Records::with_capacity(CHUNK_BYTES.max(record.len())),
            };
            s.chunks.push_back(fresh);
        }
        if let Some(chunk) = s.chunks.back_mut() {
            chunk.push(record);
            chunk.acks.extend(ack);
        }
        s.queued += 1;
        s.pushed += 1;
        if s.writer_waiting {
            self.work.notify_one();
        }
        if waited {
            Pushed::QueuedAfterWait
        } else {
            Pushed::Queued
        }
    }

    /// Asks the writer to answer once every record pushed so far is written
    /// and fsynced. False if the writer is gone.
    pub fn sync(&self, reply: mpsc::Sender<std::io::Result<()>>) -> bool {
        let mut s = self.lock();
        if s.writer_gone {
            return false;
        }
        let mark = s.pushed;
        s.syncs.push((mark, reply));
        if s.writer_waiting {
            self.work.notify_one();
        }
        true
    }

    /// A new sender: the writer stops once every sender is dropped.
    pub fn sender(self: &std::sync::Arc<Self>) -> QueueSender {
        self.lock().senders += 1;
        QueueSender(std::sync::Arc::clone(self))
    }

    /// Writer side: waits until there is something to take (records or a
    /// sync request), `timeout` passes, or every sender is gone with
    /// nothing left.
    pub fn wait(&self, timeout: Option<Duration>) -> Woke {
        let mut s = self.lock();
        loop {
            if s.queued > 0 || !s.syncs.is_empty() {
                return Woke::Work;
            }
            if s.senders == 0 {
                return Woke::Closed;
            }
            s.writer_waiting = true;
            let timed_out;
            (s, timed_out) = match timeout {
                None => (
                    self.work.wait(s).unwrap_or_else(PoisonError::into_inner),
                    false,
                ),
                Some(t) => {
                    let (s, r) = self
                        .work
                        .wait_timeout(s, t)
                        .unwrap_or_else(PoisonError::into_inner);
                    (s, r.timed_out())
                }
            };
            s.writer_waiting = false;
            if timed_out && s.queued == 0 && s.syncs.is_empty() {
                return Woke::TimedOut;
            }
        }
    }

    /// Writer side: takes back the chunks `hand` has written, then moves
    /// whole chunks into it while it holds at most `limit` records (at
    /// least one chunk when it is empty), with the sync requests now
    /// answerable. `holding` is set to the records in hand before the queue
    /// is seen without them, so that a reader of both counts them twice
    /// rather than not at all.
    pub fn take(&self, hand: &mut Hand, limit: usize, holding: &AtomicUsize) -> Taken {
        let mut s = self.lock();
        for c in hand.written.drain(..) {
            if s.spare.len() < SPARE_CHUNKS && c.bytes.capacity() <= CHUNK_BYTES {
                s.spare.push(c);
            }
        }
        while let Some(front) = s.chunks.front() {
            if !hand.is_empty() && hand.len + front.len() > limit {
                break;
            }
            let Some(chunk) = s.chunks.pop_front() else {
                break;
            };
            let n = chunk.len();
            hand.chunks.push(chunk);
            hand.len += n;
            s.queued -= n;
            s.taken += n as u64;
        }
        holding.store(hand.len(), Ordering::Release);
        let taken = s.taken;
        let mut syncs = Vec::new();
        if !s.syncs.is_empty() {
            let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut s.syncs)
                .into_iter()
                .partition(|(mark, _)| *mark <= taken);
            s.syncs = later;
            syncs = ready.into_iter().map(|(_, reply)| reply).collect();
        }
        if s.senders_waiting > 0 {
            self.room.notify_all();
        }
        Taken {
            syncs,
            closed: s.senders == 0 && s.queued == 0,
        }
    }

    /// Writer side: marks the writer gone, so that senders stop waiting and
    /// their records are counted lost rather than queued for no one.
    pub fn close_writer(&self) {
        self.lock().writer_gone = true;
        self.room.notify_all();
    }
}

/// A handle that keeps the writer running; cloned with the sink.
pub struct QueueSender(std::sync::Arc<Queue>);

impl QueueSender {
    pub fn queue(&self) -> &Queue {
        &self.0
    }
}

impl Clone for QueueSender {
    fn clone(&self) -> Self {
        self.0.sender()
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        if s.senders == 0 {
            self.0.work.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn strings(hand: &Hand) -> Vec<String> {
        hand.iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    /// A record of `n` bytes.
    fn record(i: usize, n: usize) -> Vec<u8> {
        let mut r = format!("r{i}-").into_bytes();
        r.resize(n, b'.');
        r
    }

    #[test]
    fn records_come_out_in_order_in_whole_chunks_and_the_chunks_go_round() {
        let queue = Arc::new(Queue::new(10_000));
        let _sender = queue.sender();
        let holding = AtomicUsize::new(0);
        // 1 KiB records: 128 to a chunk.
        let per_chunk = CHUNK_BYTES / 1024;
        for i in 0..per_chunk + 2 {
            assert_eq!(queue.push(&record(i, 1024), None, false), Pushed::Queued);
        }
        assert_eq!(queue.len(), per_chunk + 2);
        assert_eq!(queue.lock().chunks.len(), 2);
        let mut hand = Hand::default();
        // Not the second chunk while the limit says no more.
        queue.take(&mut hand, per_chunk + 1, &holding);
        assert_eq!(hand.len(), per_chunk);
        assert_eq!(holding.load(Ordering::Acquire), per_chunk);
        assert_eq!(queue.len(), 2);
        queue.take(&mut hand, per_chunk + 2, &holding);
        assert_eq!(hand.len(), per_chunk + 2);
        assert_eq!(queue.len(), 0);
        let got = strings(&hand);
        assert_eq!(got.len(), per_chunk + 2);
        for (i, r) in got.iter().enumerate() {
            assert!(r.starts_with(&format!("r{i}-")), "{i}: {}", &r[..8]);
            assert_eq!(r.len(), 1024);
        }

        // Written chunks come back and carry the next records: nothing
        // is allocated for them.
        let chunk = hand.chunks[0].bytes.as_ptr();
        hand.clear();
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(queue.lock().spare.len(), 2);
        queue.push(b"next", None, false);
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(strings(&hand), ["next"]);
        let reused = hand.chunks[0].bytes.as_ptr();
        assert!(
            reused == chunk || queue.lock().spare[0].bytes.as_ptr() == chunk,
            "a written chunk is reused"
        );

        // A record larger than a chunk gets a chunk of its own, not kept.
        hand.clear();
        queue.push(&record(0, CHUNK_BYTES + 1), None, false);
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(hand.chunks[0].byte_len(), CHUNK_BYTES + 1);
        hand.clear();
        queue.take(&mut hand, usize::MAX, &holding);
        assert!(queue
            .lock()
            .spare
            .iter()
            .all(|c| c.bytes.capacity() <= CHUNK_BYTES));
    }

    #[test]
    fn memory_kept_after_a_burst_is_bounded() {
        let queue = Arc::new(Queue::new(100_000));
        let _sender = queue.sender();
        let holding = AtomicUsize::new(0);
        for i in 0..50 * CHUNK_BYTES / 1024 {
            queue.push(&record(i, 1024), None, false);
        }
        let mut hand = Hand::default();
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(hand.chunks.len(), 50);
        hand.clear();
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(queue.lock().spare.len(), SPARE_CHUNKS);
    }

    #[test]
    fn a_sync_is_answerable_once_every_record_before_it_is_taken() {
        let queue = Arc::new(Queue::new(10_000));
        let _sender = queue.sender();
        let holding = AtomicUsize::new(0);
        let per_chunk = CHUNK_BYTES / 1024;
        for i in 0..per_chunk + 1 {
            queue.push(&record(i, 1024), None, false);
        }
        let (tx, rx) = mpsc::channel();
        assert!(queue.sync(tx));
        queue.push(b"after", None, false);
        let mut hand = Hand::default();
        let taken = queue.take(&mut hand, per_chunk, &holding);
        assert!(
            taken.syncs.is_empty(),
            "one record before it is still queued"
        );
        let taken = queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(taken.syncs.len(), 1);
        taken.syncs[0].send(Ok(())).unwrap();
        assert!(rx.recv().unwrap().is_ok());
        assert_eq!(queue.wait(Some(Duration::ZERO)), Woke::TimedOut);
    }

    #[test]
    fn a_full_queue_drops_or_waits_for_room() {
        let queue = Arc::new(Queue::new(2));
        let sender = queue.sender();
        let holding = AtomicUsize::new(0);
        assert_eq!(queue.push(b"1", None, false), Pushed::Queued);
        assert_eq!(queue.push(b"2", None, true), Pushed::Queued);
        assert_eq!(queue.push(b"3", None, false), Pushed::Full);
        assert_eq!(queue.len(), 2);
        let waiting = std::thread::spawn({
            let sender = sender.clone();
            move || sender.queue().push(b"4", None, true)
        });
        // The sender waits until the writer takes.
        while queue.lock().senders_waiting == 0 {
            std::thread::yield_now();
        }
        let mut hand = Hand::default();
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(waiting.join().unwrap(), Pushed::QueuedAfterWait);
        assert_eq!(strings(&hand), ["1", "2"]);
        hand.clear();
        queue.take(&mut hand, usize::MAX, &holding);
        assert_eq!(strings(&hand), ["4"]);
    }

    #[test]
    fn the_writer_stops_when_the_last_sender_goes_and_senders_stop_when_the_writer_goes() {
        let queue = Arc::new(Queue::new(1));
        let sender = queue.sender();
        let other = sender.clone();
        queue.push(b"last", None, false);
        drop(sender);
        drop(other);
        // What was queued before is still taken.
        assert_eq!(queue.wait(None), Woke::Work);
        let mut hand = Hand::default();
        let taken = queue.take(&mut hand, usize::MAX, &AtomicUsize::new(0));
        assert!(taken.closed);
        assert_eq!(queue.wait(None), Woke::Closed);

        let queue = Arc::new(Queue::new(1));
        let sender = queue.sender();
        queue.push(b"1", None, false);
        let blocked = std::thread::spawn({
            let sender = sender.clone();
            move || sender.queue().push(b"2", None, true)
        });
        while queue.lock().senders_waiting == 0 {
            std::thread::yield_now();
        }
        queue.close_writer();
        assert_eq!(blocked.join().unwrap(), Pushed::Closed);
        assert_eq!(queue.push(b"3", None, false), Pushed::Closed);
        let (tx, _rx) = mpsc::channel();
        assert!(!queue.sync(tx));
    }
}
