//! Latency quantiles in fixed memory, for the worker's run summary.
//!
//! The summary used to keep one sample per message, which a worker that runs for days at
//! thousands of messages a second cannot afford. Counts in log-spaced buckets (ten per
//! decade, from 0.1 ms to about 28 hours) answer a quantile within one bucket, about 26%,
//! in a few hundred bytes. Prometheus histograms carry the same figures for operators;
//! this one is for `bench-kafka`'s printout.

/// Buckets per factor of ten.
const PER_DECADE: f64 = 10.0;
/// The lower bound of the first bucket, in milliseconds.
const SMALLEST_MS: f64 = 0.1;
/// Buckets: 0.1 ms × 10^(90/10) = 10^8 ms, about 28 hours; slower records land in the last.
const BUCKETS: usize = 90;

/// A histogram of latencies in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS],
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, ms: f64) {
        let position = if ms > SMALLEST_MS {
            ((ms / SMALLEST_MS).log10() * PER_DECADE).floor() as usize
        } else {
            0
        };
        self.counts[position.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The upper bound of the bucket that holds the `q` quantile (0 ≤ q ≤ 1), in
    /// milliseconds; NaN when nothing was recorded.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (position, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return upper_bound(position);
            }
        }
        upper_bound(BUCKETS - 1)
    }
}

fn upper_bound(position: usize) -> f64 {
    SMALLEST_MS * 10f64.powf((position + 1) as f64 / PER_DECADE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_one_bucket_of_the_exact_ones() {
        let mut histogram = LatencyHistogram::default();
        // 1..=10000 ms: the exact p50 is 5000, the p99 9900.
        for ms in 1..=10_000 {
            histogram.record(f64::from(ms));
        }
        assert_eq!(histogram.count(), 10_000);
        for (q, exact) in [(0.5, 5000.0), (0.99, 9900.0)] {
            let estimate = histogram.quantile(q);
            assert!(
                estimate >= exact && estimate <= exact * 10f64.powf(0.1),
                "q {q}: {estimate} for {exact}"
            );
        }
        assert!(LatencyHistogram::default().quantile(0.5).is_nan());
    }

    #[test]
    fn extreme_values_are_counted_not_lost() {
        let mut histogram = LatencyHistogram::default();
        histogram.record(0.0);
        histogram.record(-3.0);
        histogram.record(1e12);
        assert_eq!(histogram.count(), 3);
        assert!(histogram.quantile(1.0) > 1e7);
        assert!(histogram.quantile(0.1) <= 0.2);
    }
}
