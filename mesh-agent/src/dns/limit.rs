//! The per-source budget of forwarded queries: a token bucket per source address,
//! in a table of bounded size. A workload flooding the agent with names outside the
//! registry spends its own budget, not the node resolver's capacity or other
//! workloads' share of the forwarding slots.

use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::Instant};

/// Source addresses tracked at once; beyond it, new sources are refused until idle
/// ones (whose buckets are full again) are forgotten.
pub const MAX_SOURCES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source address.
#[derive(Debug)]
pub struct SourceLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl SourceLimiter {
    /// `rate` queries per second per source, bursts of up to `burst`.
    pub fn new(rate: u32, burst: u32, max_sources: usize) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            max_sources: max_sources.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `source` may forward one more query at `now`.
    pub fn admit(&self, source: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&source) && buckets.len() >= self.max_sources {
            // Forget the sources that have been quiet long enough to be full again:
            // they lose nothing by starting over.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
            if buckets.len() >= self.max_sources {
                return false;
            }
        }
        let bucket = buckets.entry(source).or_insert(Bucket { tokens: self.burst, at: now });
        if refill(bucket, now, self.rate, self.burst) >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Brings `b` up to `now` and returns its tokens.
fn refill(b: &mut Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate).min(burst);
    b.at = now;
    b.tokens
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let l = SourceLimiter::new(10, 5, 16);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| l.admit(a, t0)).count(), 5);
        // Another source has its own bucket.
        assert!(l.admit(b, t0));
        // 10 per second: one more every 100 ms.
        assert!(l.admit(a, t0 + Duration::from_millis(100)));
        assert!(!l.admit(a, t0 + Duration::from_millis(110)));
        // Never more than the burst, however long the silence.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| l.admit(a, later)).count(), 5);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_idle_sources() {
        let l = SourceLimiter::new(10, 2, 2);
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        let t0 = Instant::now();
        assert!(l.admit(ip(1), t0) && l.admit(ip(2), t0));
        // Both are still spending: a third source is refused.
        assert!(!l.admit(ip(3), t0));
        // Once they are full again, they are forgotten to make room.
        assert!(l.admit(ip(3), t0 + Duration::from_secs(1)));
        assert!(l.buckets.lock().unwrap().len() <= 2);
    }
}
