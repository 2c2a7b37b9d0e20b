//! Least request with the power of two choices.
//!
//! Two distinct random members are compared and the one with fewer requests in flight
//! (relative to its weight × slow-start factor) wins. Comparing two instead of all
//! keeps a pick O(1) while still steering away from busy endpoints, and it avoids the
//! herd effect of every proxy sending to the single least-loaded endpoint.
//!
//! The load score of an endpoint is `(in_flight + 1) / (weight × factor)`; the two
//! scores are compared by cross-multiplying, so there is no division at all.

use super::guard::PickGuard;
use super::{LbConfig, Member, PickContext, Pool, Strategy};
use crate::resilience::clock::LazyNow;

/// Random pairs tried before falling back to a full scan.
const DRAWS: usize = 3;

/// Least-request state for one tier.
#[derive(Debug)]
pub struct LeastRequest {
    members: Box<[Member]>,
}

impl LeastRequest {
    /// Whether `a` is at most as loaded as `b` (in-flight per unit of effective weight).
    fn lighter(pool: &Pool, a: Member, b: Member, now: &LazyNow<'_>) -> bool {
        let load = |m: Member| u128::from(pool.endpoint(m.index).in_flight()) + 1;
        let capacity = |m: Member| u128::from(m.weight) * u128::from(pool.factor(m.index, now));
        load(a) * capacity(b) <= load(b) * capacity(a)
    }

    /// The least-loaded available member by a full scan (when random pairs kept
    /// landing on unavailable endpoints).
    fn scan_least(&self, pool: &Pool, now: &LazyNow<'_>) -> Option<PickGuard> {
        let mut best: Option<Member> = None;
        for m in self.members.iter().copied() {
            if pool.available(m.index) && best.is_none_or(|b| !Self::lighter(pool, b, m, now)) {
                best = Some(m);
            }
        }
        best.and_then(|m| pool.admit(m.index)).or_else(|| pool.scan(&self.members, 0))
    }
}

impl Strategy for LeastRequest {
    fn build(_pool: &Pool, members: Vec<Member>, _config: &LbConfig) -> Self {
        LeastRequest { members: members.into_boxed_slice() }
    }

    fn pick(&self, pool: &Pool, _ctx: &PickContext<'_>) -> Option<PickGuard> {
        let len = self.members.len() as u64;
        match len {
            0 => return None,
            1 => return pool.admit(self.members[0].index),
            _ => {}
        }
        let now = LazyNow::new(&*pool.clock);
        for _ in 0..DRAWS {
            let first = pool.random.below(len);
            let mut second = pool.random.below(len - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (self.members[first as usize], self.members[second as usize]);
            let choice = match (pool.available(a.index), pool.available(b.index)) {
                (true, true) => Some(if Self::lighter(pool, a, b, &now) { a } else { b }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => None,
            };
            if let Some(guard) = choice.and_then(|m| pool.admit(m.index)) {
                return Some(guard);
            }
        }
        self.scan_least(pool, &now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::super::test_support::{addr, set_with, spec};
    use super::super::{Algorithm, Balancer, LbConfig, PickContext, PickGuard, build};

    fn p2c() -> LbConfig {
        LbConfig::with_algorithm(Algorithm::LeastRequest)
    }

    fn hold(b: &dyn Balancer, n: usize) -> Vec<PickGuard> {
        (0..n).filter_map(|_| b.pick(&PickContext::default())).collect()
    }

    #[test]
    fn sends_to_the_less_loaded_of_two() {
        let (_clock, set) = set_with(vec![spec(0, 1), spec(1, 1)]);
        let b = build(&p2c(), &set);
        // Load endpoint 0 with three requests from elsewhere.
        let busy: Vec<_> = (0..3).filter_map(|_| set.endpoints()[0].try_admit()).collect();
        let next = hold(&*b, 3);
        assert!(next.iter().all(|g| g.addr() == addr(1)), "two endpoints: both are always compared");
        drop(busy);
        drop(next);
        assert!(set.endpoints().iter().all(|e| e.in_flight() == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn held_requests_spread_evenly(n in 2u32..48, per in 4usize..16) {
            let (_clock, set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let b = build(&p2c(), &set);
            let held = hold(&*b, n as usize * per);
            prop_assert_eq!(held.len(), n as usize * per);
            let loads: Vec<u64> = set.endpoints().iter().map(|e| e.in_flight()).collect();
            let max = loads.iter().copied().max().unwrap_or(0);
            // Power of two choices keeps the maximum within a few of the mean (random
            // choice would be ~3 standard deviations, sqrt(per), above it).
            prop_assert!(max <= per as u64 + 3, "loads {:?}", loads);
        }
    }

    #[test]
    fn in_flight_follows_weights() {
        let (_clock, set) = set_with(vec![spec(0, 3), spec(1, 1)]);
        let b = build(&p2c(), &set);
        let _held = hold(&*b, 400);
        let (a, c) = (set.endpoints()[0].in_flight(), set.endpoints()[1].in_flight());
        assert!((a as f64 / c as f64 - 3.0).abs() < 0.1, "{a} vs {c}");
    }

    #[test]
    fn ramping_endpoint_takes_a_smaller_share() {
        let (clock, mut set) = set_with(vec![spec(0, 1)]);
        set.update(vec![spec(0, 1), spec(1, 1)]);
        let config = LbConfig { slow_start: Duration::from_secs(10), ..p2c() };
        let b = build(&config, &set);
        {
            let _held = hold(&*b, 110);
            // Factor 0.1: endpoint 1 looks ten times as busy per request.
            assert!(set.endpoints()[1].in_flight() <= 11, "{}", set.endpoints()[1].in_flight());
        }
        clock.advance(Duration::from_secs(10));
        let _held = hold(&*b, 110);
        assert_eq!(set.endpoints()[1].in_flight(), 55);
    }
}
