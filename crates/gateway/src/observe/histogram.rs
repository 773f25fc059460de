//! A lock-free Prometheus histogram for the request path.
//!
//! prometheus-client's `Histogram` takes a mutex on every observation; a request makes five
//! (duration, upstream latency, request and response size, overhead), and with one series per
//! route shared by every worker thread those locks are contended. Here an observation is two
//! relaxed atomic adds and a compare-and-swap on the sum. A scrape reads the buckets one by one
//! and derives the count from them, so `_count` always equals the `+Inf` bucket; the sum may be
//! a few observations ahead or behind the buckets, as with any concurrent histogram.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds (a `+Inf` bucket is added). Clones share the series.
#[derive(Clone, Debug)]
pub struct Histogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending, `+Inf` last.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative).
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().chain(std::iter::once(f64::INFINITY)).collect();
        let counts = bounds.iter().map(|_| AtomicU64::new(0)).collect();
        Self { inner: Arc::new(Inner { bounds, counts, sum: AtomicU64::new(0f64.to_bits()) }) }
    }

    /// Records one observation (NaN counts in `+Inf`).
    pub fn observe(&self, v: f64) {
        let i = &self.inner;
        let idx = i.bounds.iter().position(|b| v <= *b).unwrap_or(i.bounds.len() - 1);
        i.counts[idx].fetch_add(1, Ordering::Relaxed);
        let mut cur = i.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match i.sum.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// `(sum, count, per-bucket counts)` as a scrape sees them.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let i = &self.inner;
        let buckets: Vec<(f64, u64)> =
            i.bounds.iter().zip(i.counts.iter()).map(|(b, c)| (*b, c.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        (f64::from_bits(i.sum.load(Ordering::Relaxed)), count, buckets)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them_and_encode_cumulatively() {
        let h = Histogram::new([1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, f64::NAN] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(buckets.iter().map(|b| b.1).collect::<Vec<_>>(), [2, 1, 2]);
        assert!(sum.is_nan(), "NaN propagates into the sum, as in prometheus-client");
        let ok = Histogram::new([1.0]);
        ok.observe(0.25);
        ok.observe(4.0);
        let mut reg = Registry::default();
        reg.register("t", "help", ok.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in ["t_sum 4.25", "t_count 2", "t_bucket{le=\"1.0\"} 1", "t_bucket{le=\"+Inf\"} 2"] {
            assert!(out.contains(line), "{line} missing in\n{out}");
        }
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = Histogram::new([10.0]);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..10_000).for_each(|_| h.observe(1.0)));
            }
        });
        let (sum, count, _) = h.snapshot();
        assert_eq!((sum, count), (40_000.0, 40_000));
    }
}
