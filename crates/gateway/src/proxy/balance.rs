//! Instance choice: weighted round robin, least request (power of two choices), consistent
//! hashing. Lock-free: an atomic cursor over a precomputed schedule, atomics for in-flight
//! counts, a precomputed hash ring with a binary search.

use super::Instance;
use crate::config::resilience::Policy;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Virtual nodes per unit of weight on the hash ring.
const VNODES_PER_WEIGHT: u32 = 160;

/// FNV-1a 64 with a splitmix64 finaliser: stable across processes (unlike `DefaultHasher`),
/// well spread for ring placement.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(1);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    hash64(&((t as u64) ^ (N.fetch_add(1, Ordering::Relaxed) as u64).rotate_left(32)).to_le_bytes()) | 1
}

/// A fast thread-local xorshift64* number (not for secrets).
pub fn random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// The balancer of one service.
pub struct Balancer {
    policy: Policy,
    schedule: Box<[u16]>,
    ring: Box<[(u64, u16)]>,
    cursor: AtomicUsize,
}

impl Balancer {
    /// Precomputes the schedule (weights interleaved) and the ring.
    pub fn new(policy: Policy, instances: &[Arc<Instance>]) -> Self {
        let max_w = instances.iter().map(|i| i.weight).max().unwrap_or(1);
        // Interleaved weighted schedule: round r includes every instance with weight > r.
        let mut schedule = Vec::new();
        for r in 0..max_w {
            for (i, inst) in instances.iter().enumerate() {
                if inst.weight > r {
                    schedule.push(i as u16);
                }
            }
        }
        let mut ring = Vec::new();
        if policy == Policy::ConsistentHash {
            for (i, inst) in instances.iter().enumerate() {
                for v in 0..inst.weight * VNODES_PER_WEIGHT {
                    ring.push((hash64(format!("{}#{v}", inst.url).as_bytes()), i as u16));
                }
            }
            ring.sort_unstable();
        }
        Self { policy, schedule: schedule.into(), ring: ring.into(), cursor: AtomicUsize::new(0) }
    }

    /// The instance for this request, skipping unavailable ones and `exclude` (the instance a
    /// retry just failed on) when another is available.
    pub fn pick(
        &self,
        instances: &[Arc<Instance>],
        key: Option<&[u8]>,
        now_ms: u64,
        exclude: Option<usize>,
    ) -> Option<usize> {
        let ok = |i: usize| instances[i].available(now_ms) && Some(i) != exclude;
        let first = match self.policy {
            Policy::RoundRobin => self.round_robin(&ok),
            Policy::LeastRequest => self.least_request(instances, &ok),
            Policy::ConsistentHash => match key {
                Some(k) => self.ring_lookup(hash64(k), &ok),
                None => self.round_robin(&ok),
            },
        };
        first.or_else(|| {
            // Only the excluded instance is left: better it than nothing.
            exclude.filter(|&i| instances[i].available(now_ms))
        })
    }

    fn round_robin(&self, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.schedule.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|k| self.schedule[(start + k) % n] as usize).find(|&i| ok(i))
    }

    fn least_request(&self, instances: &[Arc<Instance>], ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = instances.len();
        let a = (random() % n as u64) as usize;
        let b = if n > 1 { (a + 1 + (random() % (n as u64 - 1)) as usize) % n } else { a };
        let load =
            |i: usize| instances[i].inflight.load(Ordering::Relaxed) as u64 * 1000 / u64::from(instances[i].weight);
        match (ok(a), ok(b)) {
            (true, true) => Some(if load(b) < load(a) { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            // Both unavailable: the least loaded available one.
            (false, false) => (0..n).filter(|&i| ok(i)).min_by_key(|&i| load(i)),
        }
    }

    fn ring_lookup(&self, h: u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|(p, _)| *p < h);
        let n = self.ring.len();
        (0..n).map(|k| self.ring[(start + k) % n].1 as usize).find(|&i| ok(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insts(weights: &[u32]) -> Vec<Arc<Instance>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Arc::new(Instance::new(&format!("http://127.0.0.1:{}", 1000 + i), *w).unwrap()))
            .collect()
    }

    #[test]
    fn weighted_round_robin() {
        let is = insts(&[1, 3]);
        let b = Balancer::new(Policy::RoundRobin, &is);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[b.pick(&is, None, 0, None).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300]);
    }

    #[test]
    fn consistent_hash_moves_only_the_leaving_share() {
        let is = insts(&[1, 1, 1]);
        let b = Balancer::new(Policy::ConsistentHash, &is);
        let keys: Vec<String> = (0..3000).map(|i| format!("acct-{i}")).collect();
        let before: Vec<usize> = keys.iter().map(|k| b.pick(&is, Some(k.as_bytes()), 0, None).unwrap()).collect();
        let spread = (0..3).map(|i| before.iter().filter(|&&x| x == i).count()).collect::<Vec<_>>();
        assert!(spread.iter().all(|&c| c > 700 && c < 1300), "{spread:?}");
        is[1].eject_for_test();
        for (k, was) in keys.iter().zip(&before) {
            let now = b.pick(&is, Some(k.as_bytes()), 0, None).unwrap();
            if *was != 1 {
                assert_eq!(now, *was, "{k} moved although its instance stayed");
            } else {
                assert_ne!(now, 1);
            }
        }
    }
}
