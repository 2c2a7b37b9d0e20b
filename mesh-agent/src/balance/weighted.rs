//! Smooth weighted round robin (as in nginx).
//!
//! Every pick adds each available member's effective weight (weight × slow-start
//! factor) to its running score, takes the member with the highest score and subtracts
//! the total from it. Over any run of picks each member's share matches its weight
//! exactly, and picks of a heavy member are spread out instead of bunched (weights 5:1:1
//! give a a b a c a a, not a a a a a b c).
//!
//! The running scores sit behind a mutex held for one pass over the tier's members;
//! only integer additions happen under it.

use std::sync::{Mutex, PoisonError};

use super::guard::PickGuard;
use super::{LbConfig, Member, PickContext, Pool, Strategy};
use crate::resilience::clock::LazyNow;

/// Smooth weighted round-robin state for one tier.
#[derive(Debug)]
pub struct SmoothWeighted {
    members: Box<[Member]>,
    scores: Mutex<Box<[i64]>>,
}

impl SmoothWeighted {
    /// Chooses a member and updates the running scores; `None` when no member is
    /// available.
    fn choose(&self, pool: &Pool) -> Option<u32> {
        let now = LazyNow::new(&*pool.clock);
        let mut scores = self.scores.lock().unwrap_or_else(PoisonError::into_inner);
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, m) in self.members.iter().enumerate() {
            if !pool.available(m.index) {
                continue;
            }
            let effective = i64::from(m.weight) * i64::from(pool.factor(m.index, &now));
            scores[i] += effective;
            total += effective;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        scores[best] -= total;
        Some(self.members[best].index)
    }
}

impl Strategy for SmoothWeighted {
    fn build(_pool: &Pool, members: Vec<Member>, _config: &LbConfig) -> Self {
        let scores = vec![0; members.len()].into_boxed_slice();
        SmoothWeighted { members: members.into_boxed_slice(), scores: Mutex::new(scores) }
    }

    fn pick(&self, pool: &Pool, _ctx: &PickContext<'_>) -> Option<PickGuard> {
        let index = self.choose(pool)?;
        // The breaker may refuse at the last moment (its half-open probes taken by a
        // concurrent pick); then any member that admits will do.
        pool.admit(index).or_else(|| pool.scan(&self.members, 0))
    }
}
