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
