//! A circuit breaker per service, on atomics (no well-kept crate does this).
//!
//! Closed → open after `consecutive_failures` failures in a row, or when the failure ratio over
//! a sliding window (ten buckets) reaches `failure_ratio` with at least `min_requests`. Open
//! refuses at once (503 with `Retry-After`) for the open interval; then half-open lets at most
//! `half_open_probes` requests through: a success closes the breaker, a failure reopens it with
//! the interval doubled (capped).

use crate::config::resilience::BreakerConfig;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

const BUCKETS: usize = 10;

/// Breaker states, as exported by the `breaker_state` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Requests flow.
    Closed = 0,
    /// Requests are refused.
    Open = 1,
    /// A few probes flow.
    HalfOpen = 2,
}

impl State {
    fn from(v: u8) -> Self {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

struct Bucket {
    epoch: AtomicU64,
    ok: AtomicU32,
    fail: AtomicU32,
}

/// The breaker.
pub struct Breaker {
    cfg: BreakerConfig,
    state: AtomicU8,
    consecutive: AtomicU32,
    buckets: [Bucket; BUCKETS],
    bucket_ms: u64,
    opened_at: AtomicU64,
    interval_ms: AtomicU64,
    probes: AtomicU32,
}

/// Permission to send; `probe` when it is one of the half-open probes.
#[derive(Debug)]
pub struct Permit {
    probe: bool,
}

/// What happened to a state (for logs and metrics).
pub type Transition = Option<(State, State)>;

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: &BreakerConfig) -> Self {
        let bucket_ms = (cfg.window.get().as_millis() as u64 / BUCKETS as u64).max(1);
        Self {
            cfg: cfg.clone(),
            state: AtomicU8::new(State::Closed as u8),
            consecutive: AtomicU32::new(0),
            buckets: std::array::from_fn(|_| Bucket {
                epoch: AtomicU64::new(0),
                ok: AtomicU32::new(0),
                fail: AtomicU32::new(0),
            }),
            bucket_ms,
            opened_at: AtomicU64::new(0),
            interval_ms: AtomicU64::new(cfg.open_interval.get().as_millis() as u64),
            probes: AtomicU32::new(0),
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        State::from(self.state.load(Ordering::Acquire))
    }

    /// May a request go now? `Err(ms)` carries the time until the next probe window.
    pub fn acquire(&self, now_ms: u64) -> (Result<Permit, u64>, Transition) {
        if !self.cfg.enabled {
            return (Ok(Permit { probe: false }), None);
        }
        match self.state() {
            State::Closed => (Ok(Permit { probe: false }), None),
            State::Open => {
                let until = self.opened_at.load(Ordering::Acquire) + self.interval_ms.load(Ordering::Acquire);
                if now_ms < until {
                    return (Err(until - now_ms), None);
                }
                // Time to probe: one caller moves the breaker to half-open.
                let moved = self
                    .state
                    .compare_exchange(State::Open as u8, State::HalfOpen as u8, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                if moved {
                    self.probes.store(0, Ordering::Release);
                }
                let (r, _) = self.acquire_half_open();
                (r, moved.then_some((State::Open, State::HalfOpen)))
            }
            State::HalfOpen => self.acquire_half_open(),
        }
    }

    fn acquire_half_open(&self) -> (Result<Permit, u64>, Transition) {
        let n = self.probes.fetch_add(1, Ordering::AcqRel);
        if n < self.cfg.half_open_probes {
            (Ok(Permit { probe: true }), None)
        } else {
            self.probes.fetch_sub(1, Ordering::AcqRel);
            (Err(self.interval_ms.load(Ordering::Acquire).min(1000)), None)
        }
    }

    fn bucket(&self, now_ms: u64) -> &Bucket {
        let epoch = now_ms / self.bucket_ms;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let old = b.epoch.load(Ordering::Acquire);
        if old != epoch && b.epoch.compare_exchange(old, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            b.ok.store(0, Ordering::Release);
            b.fail.store(0, Ordering::Release);
        }
        b
    }

    fn window(&self, now_ms: u64) -> (u32, u32) {
        let epoch = now_ms / self.bucket_ms;
        let mut ok = 0;
        let mut fail = 0;
        for b in &self.buckets {
            if epoch.saturating_sub(b.epoch.load(Ordering::Acquire)) < BUCKETS as u64 {
                ok += b.ok.load(Ordering::Relaxed);
                fail += b.fail.load(Ordering::Relaxed);
            }
        }
        (ok, fail)
    }

    /// Gives back a permit whose try ended without an outcome (cancelled, or nothing to send it
    /// to): a half-open probe slot is freed for the next caller. (Saturating: the breaker may
    /// have moved on and reset its slots meanwhile.)
    pub fn abandon(&self, permit: Permit) {
        if permit.probe && self.cfg.enabled && self.state() == State::HalfOpen {
            let _ = self.probes.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// Records the outcome of a request that held `permit`.
    pub fn record(&self, permit: Permit, success: bool, now_ms: u64) -> Transition {
        if !self.cfg.enabled {
            return None;
        }
        let b = self.bucket(now_ms);
        if success {
            b.ok.fetch_add(1, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
            if permit.probe && self.state() == State::HalfOpen {
                self.state.store(State::Closed as u8, Ordering::Release);
                self.interval_ms.store(self.cfg.open_interval.get().as_millis() as u64, Ordering::Release);
                for b in &self.buckets {
                    b.ok.store(0, Ordering::Relaxed);
                    b.fail.store(0, Ordering::Relaxed);
                }
                return Some((State::HalfOpen, State::Closed));
            }
            return None;
        }
        b.fail.fetch_add(1, Ordering::Relaxed);
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        match self.state() {
            State::HalfOpen if permit.probe => {
                let next = (self.interval_ms.load(Ordering::Acquire) * 2)
                    .min(self.cfg.max_open_interval.get().as_millis() as u64);
                self.interval_ms.store(next, Ordering::Release);
                self.opened_at.store(now_ms, Ordering::Release);
                self.state.store(State::Open as u8, Ordering::Release);
                Some((State::HalfOpen, State::Open))
            }
            State::Closed => {
                let (ok, fail) = self.window(now_ms);
                let total = ok + fail;
                let ratio_trip = total >= self.cfg.min_requests
                    && total > 0
                    && f64::from(fail) / f64::from(total) >= self.cfg.failure_ratio;
                if n >= self.cfg.consecutive_failures || ratio_trip {
                    self.opened_at.store(now_ms, Ordering::Release);
                    if self
                        .state
                        .compare_exchange(State::Closed as u8, State::Open as u8, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return Some((State::Closed, State::Open));
                    }
                }
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            open_interval: HumanDuration::from_millis(100),
            max_open_interval: HumanDuration::from_millis(400),
            half_open_probes: 2,
            ..Default::default()
        }
    }

    #[test]
    fn opens_probes_and_closes() {
        let b = Breaker::new(&cfg());
        for t in 0..3 {
            let (p, _) = b.acquire(t);
            b.record(p.unwrap(), false, t);
        }
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.acquire(50).0.unwrap_err(), 52, "opened at t=2 for 100 ms");
        // After the interval: two probes, the third is refused.
        let (p1, tr) = b.acquire(200);
        assert_eq!(tr, Some((State::Open, State::HalfOpen)));
        let p1 = p1.unwrap();
        let _p2 = b.acquire(200).0.unwrap();
        assert!(b.acquire(200).0.is_err(), "probes are bounded");
        // A failed probe reopens with a doubled interval.
        assert_eq!(b.record(p1, false, 210), Some((State::HalfOpen, State::Open)));
        assert!(b.acquire(350).0.is_err(), "interval doubled to 200ms");
        let p = b.acquire(420).0.unwrap();
        assert_eq!(b.record(p, true, 420), Some((State::HalfOpen, State::Closed)));
        assert!(b.acquire(421).0.is_ok());
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot_once() {
        let b = Breaker::new(&cfg());
        for t in 0..3 {
            b.record(b.acquire(t).0.unwrap(), false, t);
        }
        let p1 = b.acquire(200).0.unwrap();
        let p2 = b.acquire(200).0.unwrap();
        assert!(b.acquire(200).0.is_err());
        b.abandon(p1);
        let p3 = b.acquire(200).0.expect("the abandoned probe's slot is free again");
        assert!(b.acquire(200).0.is_err(), "only that one");
        // Abandoned after the breaker moved on (closed by p2): nothing to give back, no underflow.
        assert_eq!(b.record(p2, true, 210), Some((State::HalfOpen, State::Closed)));
        b.abandon(p3);
        assert_eq!(b.state(), State::Closed);
        assert!(b.acquire(220).0.is_ok());
    }

    #[test]
    fn ratio_trips() {
        let b =
            Breaker::new(&BreakerConfig { consecutive_failures: 1000, min_requests: 10, failure_ratio: 0.5, ..cfg() });
        for i in 0..10u64 {
            let p = b.acquire(i).0.unwrap();
            b.record(p, i % 2 == 0, i);
        }
        assert_eq!(b.state(), State::Open);
    }
}
