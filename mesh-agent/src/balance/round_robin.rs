//! Round robin: each available endpoint in turn.
//!
//! A shared atomic cursor picks the starting point; unavailable endpoints are stepped
//! over, so their turns go to the next endpoint. Weights only decide membership
//! (weight 0 is out); use weighted round robin to honour them.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::guard::PickGuard;
use super::{LbConfig, Member, PickContext, Pool, Strategy};

/// Round-robin state for one tier.
#[derive(Debug)]
pub struct RoundRobin {
    members: Box<[Member]>,
    next: AtomicUsize,
}

impl Strategy for RoundRobin {
    fn build(_pool: &Pool, members: Vec<Member>, _config: &LbConfig) -> Self {
        RoundRobin { members: members.into_boxed_slice(), next: AtomicUsize::new(0) }
    }

    fn pick(&self, pool: &Pool, _ctx: &PickContext<'_>) -> Option<PickGuard> {
        if self.members.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        pool.scan(&self.members, start)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::super::test_support::{addr, set_with, spec};
    use super::super::{Algorithm, LbConfig, PickContext, build};

    proptest! {
        #[test]
        fn n_picks_over_n_healthy_endpoints_hit_each_exactly_once(n in 1u32..64, warmup in 0usize..100) {
            let (_clock, set) = set_with((0..n).map(|i| spec(i, 1 + i % 3)).collect());
            let b = build(&LbConfig::with_algorithm(Algorithm::RoundRobin), &set);
            for _ in 0..warmup {
                let _ = b.pick(&PickContext::default());
            }
            for _round in 0..3 {
                let picked: Vec<_> =
                    (0..n).filter_map(|_| b.pick(&PickContext::default()).map(|g| g.addr())).collect();
                let distinct: HashSet<_> = picked.iter().copied().collect();
                prop_assert_eq!(picked.len(), n as usize);
                prop_assert_eq!(distinct, (0..n).map(addr).collect::<HashSet<_>>());
            }
        }
    }

    #[test]
    fn unavailable_endpoint_turns_go_to_the_next() {
        let (_clock, set) = set_with((0..3).map(|i| spec(i, 1)).collect());
        set.endpoints()[1].set_healthy(false);
        let b = build(&LbConfig::with_algorithm(Algorithm::RoundRobin), &set);
        let picked: Vec<_> =
            (0..6).filter_map(|_| b.pick(&PickContext::default()).map(|g| g.addr())).collect();
        assert_eq!(picked, [addr(0), addr(2), addr(2), addr(0), addr(2), addr(2)]);
    }
}
