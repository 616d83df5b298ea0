//! The clock of `header_read_timeout` on HTTP/1.1 connections: a coarse
//! timer (fires up to [`RESOLUTION`] late) kept out of tokio's timer wheel.
//!
//! hyper arms a new timer each time it starts reading a request head and
//! drops it once the head is in: on a keep-alive connection, once per
//! request. In tokio's wheel, a timer whose deadline is earlier than every
//! other pending one makes the runtime wake its own driver (an `eventfd`
//! write, then an extra `epoll_wait` round). The header deadline (30 s by
//! default) is earlier than the upstream's response deadline (60 s), so
//! whenever a worker's only pending timers were requests waiting on the
//! CRM, the next request head cost that wake-up: about 0.4 per request at
//! moderate load (`perf record -e syscalls:sys_enter_write`). A timeout of
//! seconds does not need a precise clock: here arming is a push on a
//! per-worker list, and one task ticking every [`RESOLUTION`] wakes the
//! reads whose deadline has passed and forgets the ones dropped meanwhile.
//! Its own timer is then usually the worker's earliest, so the response
//! deadlines registered meanwhile do not wake the driver either (the
//! ticker itself may, at most four times a second).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How late a timeout may fire.
pub const RESOLUTION: Duration = Duration::from_millis(250);

/// One per worker (per listener's connection builder).
#[derive(Clone, Default)]
pub struct HeadTimer {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Armed timers not yet fired, in no order.
    armed: Mutex<Vec<(Instant, Weak<Slot>)>>,
    ticking: AtomicBool,
}

/// Where a pending sleep leaves its waker for the ticker.
#[derive(Default)]
struct Slot {
    waker: Mutex<Option<Waker>>,
}

struct HeadSleep {
    deadline: Instant,
    shared: Arc<Shared>,
    slot: Option<Arc<Slot>>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline,
            shared: Arc::clone(&self.shared),
            slot: None,
        })
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let slot = match &self.slot {
            Some(slot) => Arc::clone(slot),
            None => {
                let slot = Arc::new(Slot::default());
                self.shared.arm(self.deadline, Arc::downgrade(&slot));
                self.slot = Some(Arc::clone(&slot));
                slot
            }
        };
        if let Ok(mut waker) = slot.waker.lock() {
            match &mut *waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                other => *other = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Shared {
    fn arm(self: &Arc<Self>, deadline: Instant, slot: Weak<Slot>) {
        if let Ok(mut armed) = self.armed.lock() {
            armed.push((deadline, slot));
        }
        if !self.ticking.swap(true, Ordering::Relaxed) {
            // On the worker's runtime, as the connections it times.
            tokio::spawn(tick(Arc::downgrade(self)));
        }
    }
}

/// Every [`RESOLUTION`]: wakes the sleeps whose deadline passed, forgets
/// the dropped ones. Ends with the timer.
async fn tick(shared: Weak<Shared>) {
    let mut interval = tokio::time::interval(RESOLUTION);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut due = Vec::new();
        if let Ok(mut armed) = shared.armed.lock() {
            armed.retain(|(deadline, slot)| match slot.upgrade() {
                None => false,
                Some(slot) if *deadline <= now => {
                    due.push(slot);
                    false
                }
                Some(_) => true,
            });
        }
        for slot in due {
            let waker = slot.waker.lock().ok().and_then(|mut w| w.take());
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    fn poll_once(f: Pin<&mut dyn hyper::rt::Sleep>) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        f.poll(&mut cx)
    }

    #[tokio::test]
    async fn a_sleep_fires_after_its_deadline_and_a_dropped_one_is_forgotten() {
        let timer = HeadTimer::default();
        let started = Instant::now();
        // Armed, then dropped before its deadline: the ticker forgets it.
        let mut dropped = timer.sleep(Duration::from_millis(100));
        assert!(poll_once(dropped.as_mut()).is_pending());
        assert_eq!(timer.shared.armed.lock().unwrap().len(), 1);
        drop(dropped);
        let fired = tokio::time::timeout(
            Duration::from_secs(10),
            timer.sleep(Duration::from_millis(300)),
        )
        .await;
        assert!(fired.is_ok(), "the sleep never fired");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        // The fired entry is gone at once; the dropped one by the next tick.
        tokio::time::sleep(RESOLUTION * 2).await;
        assert_eq!(timer.shared.armed.lock().unwrap().len(), 0);
        // A deadline already past is ready without the ticker.
        let mut past = timer.sleep_until(Instant::now() - Duration::from_millis(1));
        assert!(poll_once(past.as_mut()).is_ready());
    }
}
