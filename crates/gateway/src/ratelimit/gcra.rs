//! GCRA (the generic cell rate algorithm): token-bucket semantics on one number per key, the
//! theoretical arrival time (TAT). The same arithmetic runs in memory (here, on an atomic) and
//! in Redis (the Lua script in [`super::redis`]), so one instance and many behave alike.
//!
//! With emission interval `T = per / rate` and bucket size `B`, a request at `now` is allowed
//! when `max(TAT, now) + T - now <= B·T`; TAT then moves to `max(TAT, now) + T`. A fresh key
//! admits exactly `B` requests at once, then one per `T`.

use crate::config::LimitConfig;
use std::sync::atomic::{AtomicU64, Ordering};

/// A limit in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Emission interval `T` (ns).
    pub interval: u64,
    /// `B·T` (ns).
    pub tolerance: u64,
    /// Bucket size `B`.
    pub burst: u32,
}

impl Rate {
    /// From config: `rate` per `per`, bucket `burst` (default `rate`).
    pub fn new(c: &LimitConfig) -> Self {
        let per = c.per.get().as_nanos() as u64;
        let interval = (per / u64::from(c.rate.max(1))).max(1);
        let burst = c.burst.unwrap_or(c.rate).max(1);
        Self { interval, tolerance: interval.saturating_mul(u64::from(burst)), burst }
    }
}

/// What a limiter said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Let through.
    pub allowed: bool,
    /// Bucket size (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests still allowed right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Nanoseconds until the bucket is full again (`RateLimit-Reset`).
    pub reset: u64,
    /// Nanoseconds until the next request would be allowed (`Retry-After`), when refused.
    pub retry_after: u64,
}

impl Decision {
    /// Computes the decision from the stored TAT (`tat`, ns) at `now` (ns).
    pub fn compute(tat: u64, now: u64, r: &Rate) -> (Self, u64) {
        let base = tat.max(now);
        let new_tat = base + r.interval;
        let diff = new_tat - now;
        if diff > r.tolerance {
            let used = base - now;
            let d = Self { allowed: false, limit: r.burst, remaining: 0, reset: used, retry_after: diff - r.tolerance };
            (d, tat)
        } else {
            let remaining = ((r.tolerance - diff) / r.interval) as u32;
            (Self { allowed: true, limit: r.burst, remaining, reset: diff, retry_after: 0 }, new_tat)
        }
    }
}

/// One GCRA check on an atomic TAT; lock-free (a compare-and-swap loop).
pub fn check(tat: &AtomicU64, now: u64, r: &Rate) -> Decision {
    let mut cur = tat.load(Ordering::Relaxed);
    loop {
        let (d, new) = Decision::compute(cur, now, r);
        if !d.allowed || new == cur {
            return d;
        }
        match tat.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return d,
            Err(actual) => cur = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn rate(rate: u32, burst: u32) -> Rate {
        Rate::new(&LimitConfig { rate, per: HumanDuration::from_secs(1), burst: Some(burst) })
    }

    #[test]
    fn burst_then_steady() {
        let r = rate(10, 5);
        let tat = AtomicU64::new(0);
        let now = 1_000_000_000_000;
        let allowed = (0..25).filter(|_| check(&tat, now, &r).allowed).count();
        assert_eq!(allowed, 5, "exactly the burst at one instant");
        let d = check(&tat, now, &r);
        assert!(!d.allowed && d.retry_after == 100_000_000, "{d:?}");
        // 100 ms later one more token.
        assert!(check(&tat, now + 100_000_000, &r).allowed);
        assert!(!check(&tat, now + 100_000_000, &r).allowed);
        // After a full second the bucket is full again.
        let later = now + 2_000_000_000;
        assert_eq!((0..10).filter(|_| check(&tat, later, &r).allowed).count(), 5);
    }

    #[test]
    fn remaining_counts_down() {
        let r = rate(1, 3);
        let tat = AtomicU64::new(0);
        let rem: Vec<u32> = (0..3).map(|_| check(&tat, 10_000_000_000, &r).remaining).collect();
        assert_eq!(rem, [2, 1, 0]);
    }
}
