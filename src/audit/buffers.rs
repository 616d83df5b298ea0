//! Record buffers that go round: a request worker serialises its record
//! into a buffer taken from the pool, and the writer hands the buffer back
//! once the record is written. Without this, every record was allocated on
//! a worker thread and freed on the writer thread, a cross-thread free that
//! the allocator settles late: under load that alone lifted the resident
//! size by 10–20 MiB (docs/performance.md).

use std::sync::{Mutex, PoisonError};

/// Buffers kept for reuse at most (about 1.5 MiB).
const KEPT: usize = 1024;
/// A buffer that grew past this for an unusually large record is freed
/// rather than kept, so that one such record does not pin its memory.
const LARGEST: usize = 16 * 1024;
/// A new buffer's size: a record of the shipped shape fits without growing.
const FIRST_CAPACITY: usize = 1536;

#[derive(Default)]
pub(super) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// An empty buffer: a returned one when there is one, else a new one.
    pub fn take(&self) -> Vec<u8> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        reused.unwrap_or_else(|| Vec::with_capacity(FIRST_CAPACITY))
    }

    /// Keeps written records' buffers for reuse (emptied), up to [`KEPT`].
    pub fn give_back(&self, buffers: impl Iterator<Item = Vec<u8>>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        for mut b in buffers {
            if free.len() >= KEPT {
                break;
            }
            if b.capacity() <= LARGEST {
                b.clear();
                free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_the_pool_is_bounded() {
        let pool = BufferPool::default();
        let mut b = pool.take();
        b.extend_from_slice(b"{\"decision_id\":\"a\"}");
        let ptr = b.as_ptr();
        pool.give_back(std::iter::once(b));
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the returned buffer is reused");

        let huge = Vec::with_capacity(LARGEST + 1);
        pool.give_back(std::iter::once(huge));
        assert!(
            pool.free.lock().unwrap().is_empty(),
            "oversized buffers are not kept"
        );

        pool.give_back((0..KEPT + 10).map(|_| Vec::with_capacity(8)));
        assert_eq!(pool.free.lock().unwrap().len(), KEPT);
    }
}
