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
//! first one, does. A deadline fires once its instant has passed, at most [`TICK`] (5 ms)
//! late: the driver scans its list at most once per tick, so a thread whose upstream calls
//! time out one after another (a stalled service, thousands in flight) pays one scan per
//! tick, not one per deadline. (tokio's timer fires within its 1 ms resolution.)
//!
//! The driver is spawned on the runtime of the first deadline that needs it, and marks its
//! list driverless when that runtime drops it (a test's runtime ending): the next deadline on
//! the thread spawns a new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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
    /// When the driver next scans the list (`None`: it waits to be woken). A new deadline
    /// earlier than this moves it (and wakes the driver); a scan sets it to the earliest
    /// deadline left, but not sooner than [`TICK`] after the scan.
    armed: Option<Instant>,
    /// Wakes the driver.
    driver: Option<Waker>,
    /// Whether a driver task exists for this list.
    driven: bool,
    /// Scans of the list so far.
    scans: u64,
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
        let earlier = inner.armed.is_none_or(|a| until < a);
        if earlier {
            // The driver sleeps past this deadline, or not at all: it re-arms (no scan).
            inner.armed = Some(until);
        }
        if !inner.driven {
            inner.driven = true;
            inner.driver = None;
            // Spawned outside the lock: a runtime that is shutting down drops the task at once,
            // and the driver's drop takes the lock.
            drop(inner);
            tokio::spawn(Driver { shard: self, sleep: Box::pin(tokio::time::sleep_until(until.into())) });
        } else if earlier && let Some(d) = inner.driver.take() {
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

/// The least time between two scans of a list: a deadline fires at most this late, and a
/// thread whose upstream calls time out one after another (a stalled service) scans its list
/// at most this often, not once per deadline.
const TICK: Duration = Duration::from_millis(5);

impl Future for Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut due = Vec::new();
            let target = {
                let mut inner = self.shard.lock();
                if inner.driver.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    inner.driver = Some(cx.waker().clone());
                }
                // The runtime's clock (the sleep's): a paused test clock is followed too.
                let now = tokio::time::Instant::now().into_std();
                match inner.armed {
                    Some(at) if at <= now => {
                        inner.scans += 1;
                        let mut next: Option<Instant> = None;
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
                        inner.armed = next.map(|n| n.max(now + TICK));
                    }
                    _ => {}
                }
                inner.armed
            };
            due.into_iter().for_each(Waker::wake);
            let Some(at) = target else { return Poll::Pending };
            if self.sleep.deadline().into_std() != at {
                self.sleep.as_mut().reset(at.into());
            }
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

    #[tokio::test]
    async fn deadlines_passing_one_after_another_share_scans() {
        // 40 deadlines 1 ms apart (a stalled service timing out request after request): every
        // one fires, none before its instant, in a scan per TICK (5 ms) instead of one each.
        let first = Instant::now() + Duration::from_millis(20);
        let scans_before = SHARD.with(|s| s.lock().scans);
        let waits = (0..40u32).map(|i| async move {
            let until = first + Duration::from_millis(1) * i;
            let fut = std::pin::pin!(std::future::pending::<()>());
            assert_eq!(timeout_at(until, fut).await, Err(Elapsed));
            assert!(Instant::now() >= until);
        });
        futures_util::future::join_all(waits).await;
        let scans = SHARD.with(|s| s.lock().scans) - scans_before;
        assert!(scans <= 14, "{scans} scans for 40 deadlines over 40 ms");
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

    #[test]
    fn a_runtime_shutting_down_does_not_deadlock_the_list() {
        // A runtime that is shut down drops a spawned driver at once (its drop takes the lock).
        // On a thread of its own, so a deadlock fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let handle = rt.handle().clone();
            rt.shutdown_background();
            let _guard = handle.enter();
            let fut = std::pin::pin!(std::future::pending::<()>());
            let mut t = std::pin::pin!(timeout_at(Instant::now() + Duration::from_secs(1), fut));
            let pending = poll_once(&mut t).is_pending();
            let _ = tx.send((pending, SHARD.with(|s| s.lock().driven)));
        });
        let (pending, driven) = rx.recv_timeout(Duration::from_secs(10)).expect("registering did not deadlock");
        assert!(pending);
        assert!(!driven, "the dropped driver marked the list driverless");
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
