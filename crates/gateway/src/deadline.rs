//! Deadlines for the upstream leg without a timer per request.
//!
//! `tokio::time::timeout_at` puts an entry into the runtime's timer wheel when the request
//! first waits and takes it out when the request ends (a lock of the time driver each, and
//! the driver's bookkeeping): ≈ 500 instructions per proxied request in callgrind, for a
//! timer that almost never fires.
//!
//! Here a deadline is an entry in its thread's list (a free-list slab behind an uncontended
//! mutex): its waker and its instant. One driver task per thread sleeps until the earliest
//! deadline it knew of when it last looked, then wakes what is due and sleeps again. A new
//! deadline later than the one the driver sleeps towards (the usual case: one timeout per
//! route, so later requests end later) does not wake the driver; an earlier one, or the
//! first one, does. A deadline fires when its instant has passed, as with tokio's timer
//! (whose resolution is also a millisecond).
//!
//! The driver is spawned on the runtime of the first deadline that needs it, and marks its
//! list driverless when that runtime drops it (a test's runtime ending): the next deadline on
//! the thread spawns a new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Polls `fut` until it finishes or `until` passes.
pub fn timeout_at<F: Future>(until: Instant, fut: Pin<&mut F>) -> Timeout<'_, F> {
    Timeout { fut, until, slot: None }
}

/// The future of [`timeout_at`].
pub struct Timeout<'a, F> {
    fut: Pin<&'a mut F>,
    until: Instant,
    /// Its entry, once it waited.
    slot: Option<(&'static Shard, usize)>,
}

impl<F: Future> Future for Timeout<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(v) = self.fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match self.slot {
            None => {
                let shard = SHARD.with(|s| *s);
                let key = shard.register(self.until, cx.waker());
                self.slot = Some((shard, key));
                Poll::Pending
            }
            Some((shard, key)) => {
                let mut inner = shard.lock();
                let e = inner.entry(key);
                if e.fired {
                    return Poll::Ready(Err(Elapsed));
                }
                if !e.waker.will_wake(cx.waker()) {
                    e.waker = cx.waker().clone();
                }
                Poll::Pending
            }
        }
    }
}

impl<F> Drop for Timeout<'_, F> {
    fn drop(&mut self) {
        if let Some((shard, key)) = self.slot.take() {
            let waker = shard.lock().remove(key);
            // Dropped outside the lock (a waker's drop may run arbitrary code).
            drop(waker);
        }
    }
}

thread_local! {
    /// This thread's deadlines (one allocation per thread that ever waits on one).
    static SHARD: &'static Shard = Box::leak(Box::new(Shard { inner: Mutex::new(Inner::default()) }));
}

struct Shard {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Slot>,
    /// Head of the free list.
    free: Option<usize>,
    live: usize,
    /// What the driver sleeps towards (`None`: it waits to be woken).
    armed: Option<Instant>,
    /// Wakes the driver.
    driver: Option<Waker>,
    /// Whether a driver task exists for this list.
    driven: bool,
}

enum Slot {
    Used(Entry),
    Free(Option<usize>),
}

struct Entry {
    until: Instant,
    waker: Waker,
    fired: bool,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; a poisoned list is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&'static self, until: Instant, waker: &Waker) -> usize {
        let mut inner = self.lock();
        let entry = Entry { until, waker: waker.clone(), fired: false };
        let key = match inner.free {
            Some(k) => {
                let Slot::Free(next) = inner.slots[k] else { unreachable!("the free list holds free slots") };
                inner.free = next;
                inner.slots[k] = Slot::Used(entry);
                k
            }
            None => {
                inner.slots.push(Slot::Used(entry));
                inner.slots.len() - 1
            }
        };
        inner.live += 1;
        if !inner.driven {
            inner.driven = true;
            inner.armed = None;
            inner.driver = None;
            tokio::spawn(Driver { shard: self, sleep: Box::pin(tokio::time::sleep_until(until.into())) });
        } else if inner.armed.is_none_or(|a| until < a)
            && let Some(d) = inner.driver.take()
        {
            // The driver sleeps past this deadline, or not at all: it re-arms.
            drop(inner);
            d.wake();
        }
        key
    }
}

impl Inner {
    fn entry(&mut self, key: usize) -> &mut Entry {
        match &mut self.slots[key] {
            Slot::Used(e) => e,
            Slot::Free(_) => unreachable!("a live deadline's slot is used"),
        }
    }

    fn remove(&mut self, key: usize) -> Waker {
        let Slot::Used(e) = std::mem::replace(&mut self.slots[key], Slot::Free(self.free)) else {
            unreachable!("a live deadline's slot is used")
        };
        self.free = Some(key);
        self.live -= 1;
        e.waker
    }
}

/// Wakes the deadlines of one thread's list as they pass.
struct Driver {
    shard: &'static Shard,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut due = Vec::new();
            let next = {
                let mut inner = self.shard.lock();
                let mut next: Option<Instant> = None;
                if inner.live > 0 {
                    // The runtime's clock (the sleep's): a paused test clock is followed too.
                    let now = tokio::time::Instant::now().into_std();
                    for slot in &mut inner.slots {
                        if let Slot::Used(e) = slot
                            && !e.fired
                        {
                            if e.until <= now {
                                e.fired = true;
                                due.push(e.waker.clone());
                            } else {
                                next = Some(next.map_or(e.until, |n| n.min(e.until)));
                            }
                        }
                    }
                }
                inner.armed = next;
                if inner.driver.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    inner.driver = Some(cx.waker().clone());
                }
                next
            };
            due.into_iter().for_each(Waker::wake);
            let Some(at) = next else { return Poll::Pending };
            self.sleep.as_mut().reset(at.into());
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Its runtime is going away: the thread's next deadline starts another driver.
        let mut inner = self.shard.lock();
        inner.driven = false;
        inner.driver = None;
        inner.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One poll with a waker that does nothing (registers the deadline).
    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_future_that_finishes_in_time_is_not_cut() {
        let fut = std::pin::pin!(tokio::time::sleep(Duration::from_millis(10)));
        let r = timeout_at(Instant::now() + Duration::from_secs(1), fut).await;
        assert_eq!(r, Ok(()));
    }

    #[tokio::test]
    async fn deadlines_fire_in_order_whatever_order_they_were_made_in() {
        // Later first (the driver sleeps towards it), then an earlier one that must wake it.
        let start = Instant::now();
        let long = std::pin::pin!(std::future::pending::<()>());
        let short = std::pin::pin!(std::future::pending::<()>());
        let long = timeout_at(start + Duration::from_millis(300), long);
        let short = timeout_at(start + Duration::from_millis(30), short);
        let mut long = std::pin::pin!(long);
        // Registered first.
        assert!(poll_once(&mut long).is_pending());
        assert_eq!(short.await, Err(Elapsed));
        let short_at = start.elapsed();
        assert!(short_at >= Duration::from_millis(30) && short_at < Duration::from_millis(300), "{short_at:?}");
        assert_eq!(long.await, Err(Elapsed));
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_a_new_driver() {
        for _ in 0..3 {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let fut = std::pin::pin!(std::future::pending::<()>());
                let r = timeout_at(Instant::now() + Duration::from_millis(20), fut).await;
                assert_eq!(r, Err(Elapsed));
            });
        }
    }

    #[tokio::test]
    async fn dropped_deadlines_leave_the_list_and_their_slots_are_reused() {
        let until = Instant::now() + Duration::from_secs(60);
        for _ in 0..100 {
            let fut = std::pin::pin!(std::future::pending::<()>());
            let mut t = std::pin::pin!(timeout_at(until, fut));
            assert!(poll_once(&mut t).is_pending());
        }
        let (slots, live) = SHARD.with(|s| {
            let inner = s.lock();
            (inner.slots.len(), inner.live)
        });
        assert_eq!(live, 0);
        assert!(slots <= 2, "{slots} slots for one deadline at a time");
    }
}
