//! The shape of the agents' edge reports (`EdgeReport` in `discovery.proto`): the
//! latency buckets both sides must agree on, the bounds, and quantiles from buckets.
//!
//! Agents count each request's latency in fixed buckets rather than sending their
//! own percentiles, because percentiles of two agents cannot be combined and bucket
//! counts simply add: the control plane merges reports of every agent and window,
//! then reads p50/p99 off the sum.

/// Upper bounds (inclusive, in milliseconds) of the latency buckets; a last,
/// open-ended bucket follows, so a report carries `LATENCY_BUCKETS_MS.len() + 1`
/// counts.
pub const LATENCY_BUCKETS_MS: [f64; 16] = [
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// How many counts a report's `latency_buckets` holds.
pub const LATENCY_BUCKET_COUNT: usize = LATENCY_BUCKETS_MS.len() + 1;

/// The most edges one report carries; the rest are counted in `dropped_edges`.
pub const MAX_EDGES_PER_REPORT: usize = 1_000;

/// The most breaker, ejection and workload entries one report carries, each.
pub const MAX_NODE_ENTRIES_PER_REPORT: usize = 1_000;

/// The bucket a latency of `ms` milliseconds falls in.
pub fn latency_bucket(ms: f64) -> usize {
    LATENCY_BUCKETS_MS.iter().position(|&bound| ms <= bound).unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// The `q` quantile (0..=1) of the latencies counted in `buckets`, in milliseconds,
/// interpolated linearly inside its bucket (as Prometheus' `histogram_quantile`);
/// `None` when nothing was counted. The open-ended bucket answers its lower bound.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS_MS.get(i - 1).copied().unwrap_or(0.0) };
            let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else { return Some(lower) };
            let within = ((rank - seen as f64) / count as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        seen += count;
    }
    LATENCY_BUCKETS_MS.last().copied()
}

/// Adds `from` into `into` bucket by bucket; counts past [`LATENCY_BUCKET_COUNT`]
/// (a report from a newer agent with more buckets) go to the last bucket.
pub fn merge_buckets(into: &mut [u64; LATENCY_BUCKET_COUNT], from: &[u64]) {
    for (i, &count) in from.iter().enumerate() {
        let slot = i.min(LATENCY_BUCKET_COUNT - 1);
        into[slot] = into[slot].saturating_add(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds_with_an_open_end() {
        assert_eq!(latency_bucket(0.1), 0);
        assert_eq!(latency_bucket(0.25), 0);
        assert_eq!(latency_bucket(3.0), 4);
        assert_eq!(latency_bucket(1e9), LATENCY_BUCKETS_MS.len());
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut b = [0u64; LATENCY_BUCKET_COUNT];
        assert_eq!(quantile_ms(&b, 0.5), None);
        b[latency_bucket(4.0)] = 100; // (2.5, 5]
        let p50 = quantile_ms(&b, 0.5).unwrap();
        assert!((p50 - 3.75).abs() < 1e-9, "{p50}");
        b[latency_bucket(200.0)] = 2; // (100, 250]
        let p99 = quantile_ms(&b, 0.99).unwrap();
        assert!(p99 > 100.0 && p99 <= 250.0, "{p99}");
        assert!(quantile_ms(&b, 0.5).unwrap() <= 5.0);
    }

    #[test]
    fn merged_buckets_add_and_fold_extra_counts_into_the_last() {
        let mut into = [0u64; LATENCY_BUCKET_COUNT];
        merge_buckets(&mut into, &[1, 2]);
        let mut longer = vec![0u64; LATENCY_BUCKET_COUNT + 2];
        longer[0] = 3;
        longer[LATENCY_BUCKET_COUNT + 1] = 5;
        merge_buckets(&mut into, &longer);
        assert_eq!((into[0], into[1], into[LATENCY_BUCKET_COUNT - 1]), (4, 2, 5));
    }
}
