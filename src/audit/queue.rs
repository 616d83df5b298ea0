//! The queue between the request workers and the writer thread.
//!
//! A worker appends its record, already serialised, to a shared chunk under
//! a short lock (a copy of about a kilobyte); the writer takes whole chunks,
//! swapping in a buffer it has emptied. Two or three buffers go round, so a
//! record costs no allocation, no message and no buffer of its own on
//! either side, and the queue's memory is its records' bytes. A channel of
//! per-record buffers, which this replaced, paid a send, a receive and a
//! pooled buffer per record, and held each record in a buffer of 1.5 KiB
//! (docs/performance.md, session 16).
//!
//! Chunks hold at most [`MAX_CHUNK`] records, so the writer never takes
//! more than that in one go and a backlog is never moved in memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// Records per chunk at most: the most the writer takes with one write.
pub const MAX_CHUNK: usize = 4096;
/// A buffer larger than this is freed after use rather than kept: a chunk
/// under steady load is a few hundred KiB, a full one about 4 MiB.
const MAX_KEPT: usize = 1 << 20;

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

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let r = &self.bytes[start..end];
            start = end;
            r
        })
    }

    /// Empties it, keeping its buffers unless a burst made them large.
    pub fn clear(&mut self) {
        if self.bytes.capacity() > MAX_KEPT {
            *self = Records::default();
        } else {
            self.bytes.clear();
            self.ends.clear();
            self.acks.clear();
        }
    }

    /// Moves every record of `other` after this one's, emptying `other`.
    pub fn append(&mut self, other: &mut Records) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.ends.extend(other.ends.iter().map(|e| e + base));
        self.acks.append(&mut other.acks);
        other.clear();
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
        if s.chunks.back().is_none_or(|c| c.len() >= MAX_CHUNK) {
            let fresh = s.spare.pop().unwrap_or_default();
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

    /// Writer side: moves whole chunks into `hand` while it holds fewer than
    /// `limit` records (at least one chunk when `hand` is empty), with the
    /// sync requests now answerable. `holding` is set to the records in
    /// hand before the queue is seen without them, so that a reader of
    /// both counts them twice rather than not at all.
    pub fn take(&self, hand: &mut Records, limit: usize, holding: &AtomicUsize) -> Taken {
        let mut s = self.lock();
        while let Some(front) = s.chunks.front() {
            if front.is_empty() || (!hand.is_empty() && hand.len() + front.len() > limit) {
                break;
            }
            let Some(mut chunk) = s.chunks.pop_front() else {
                break;
            };
            let n = chunk.len();
            if hand.is_empty() {
                std::mem::swap(hand, &mut chunk);
            } else {
                hand.append(&mut chunk);
            }
            chunk.clear();
            if chunk.bytes.capacity() > 0 && s.spare.len() < 2 {
                s.spare.push(chunk);
            }
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

    fn strings(r: &Records) -> Vec<String> {
        r.iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn records_come_out_in_order_in_whole_chunks_and_the_buffers_go_round() {
        let queue = Arc::new(Queue::new(3 * MAX_CHUNK));
        let _sender = queue.sender();
        let holding = AtomicUsize::new(0);
        for i in 0..MAX_CHUNK + 2 {
            assert_eq!(
                queue.push(format!("r{i}").as_bytes(), None, false),
                Pushed::Queued
            );
        }
        assert_eq!(queue.len(), MAX_CHUNK + 2);
        let mut hand = Records::default();
        // The first chunk is full: the next one is not taken with it
        // while the limit says no more.
        queue.take(&mut hand, MAX_CHUNK, &holding);
        assert_eq!(hand.len(), MAX_CHUNK);
        assert_eq!(holding.load(Ordering::Acquire), MAX_CHUNK);
        assert_eq!(strings(&hand)[..2], ["r0", "r1"]);
        assert_eq!(strings(&hand)[MAX_CHUNK - 1], format!("r{}", MAX_CHUNK - 1));
        assert_eq!(queue.len(), 2);
        // Held records (a failed write) take more only within the limit.
        queue.take(&mut hand, MAX_CHUNK + 1, &holding);
        assert_eq!(hand.len(), MAX_CHUNK, "2 more would pass the limit");
        queue.take(&mut hand, MAX_CHUNK + 2, &holding);
        assert_eq!(hand.len(), MAX_CHUNK + 2);
        assert_eq!(
            strings(&hand)[MAX_CHUNK..],
            [format!("r{MAX_CHUNK}"), format!("r{}", MAX_CHUNK + 1)]
        );
        assert_eq!(queue.len(), 0);

        // Steady state: the writer's emptied buffer becomes the next chunk,
        // so records allocate nothing.
        hand.clear();
        queue.push(b"a", None, false);
        queue.take(&mut hand, MAX_CHUNK, &holding);
        let first = hand.bytes.as_ptr();
        hand.clear();
        queue.push(b"b", None, false);
        queue.take(&mut hand, MAX_CHUNK, &holding);
        hand.clear();
        queue.push(b"c", None, false);
        queue.take(&mut hand, MAX_CHUNK, &holding);
        assert_eq!(strings(&hand), ["c"]);
        assert_eq!(hand.bytes.as_ptr(), first, "two buffers go round");
    }

    #[test]
    fn a_sync_is_answerable_once_every_record_before_it_is_taken() {
        let queue = Arc::new(Queue::new(2 * MAX_CHUNK));
        let _sender = queue.sender();
        let holding = AtomicUsize::new(0);
        for _ in 0..MAX_CHUNK + 1 {
            queue.push(b"{}", None, false);
        }
        let (tx, rx) = mpsc::channel();
        assert!(queue.sync(tx));
        queue.push(b"{}", None, false);
        let mut hand = Records::default();
        let taken = queue.take(&mut hand, MAX_CHUNK, &holding);
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
        let mut hand = Records::default();
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
        let mut hand = Records::default();
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
