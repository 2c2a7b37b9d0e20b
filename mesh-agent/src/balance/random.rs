//! Random: a uniformly random available endpoint.
//!
//! Cheap and stateless, and with many independent proxies it spreads load about as well
//! as round robin without their cursors falling into step. A few random draws are tried
//! before falling back to a scan from a random point. Weights only decide membership.

use super::guard::PickGuard;
use super::{LbConfig, Member, PickContext, Pool, Strategy};
use crate::resilience::clock::LazyNow;

/// Random draws before falling back to a scan.
const DRAWS: usize = 3;

/// Random-choice state for one tier.
#[derive(Debug)]
pub struct Random {
    members: Box<[Member]>,
}

impl Strategy for Random {
    fn build(_pool: &Pool, members: Vec<Member>, _config: &LbConfig) -> Self {
        Random { members: members.into_boxed_slice() }
    }

    fn pick(&self, pool: &Pool, _ctx: &PickContext<'_>) -> Option<PickGuard> {
        let len = self.members.len() as u64;
        if len == 0 {
            return None;
        }
        let now = LazyNow::new(&*pool.clock);
        for _ in 0..DRAWS {
            let index = self.members[pool.random.below(len) as usize].index;
            if pool.available(index)
                && !pool.ramp_skip(index, &now)
                && let Some(guard) = pool.admit(index)
            {
                return Some(guard);
            }
        }
        pool.scan(&self.members, pool.random.below(len) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{addr, set_with, spec, tally};
    use super::super::{Algorithm, LbConfig, build};

    #[test]
    fn picks_are_roughly_uniform() {
        let (_clock, set) = set_with((0..4).map(|i| spec(i, 1)).collect());
        let b = build(&LbConfig::with_algorithm(Algorithm::Random), &set);
        let counts = tally(&*b, 8000);
        for i in 0..4 {
            let c = counts.get(&addr(i)).copied().unwrap_or(0);
            assert!((1800..2200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn falls_back_to_a_scan_when_draws_miss() {
        // One available endpoint among many: three random draws usually miss it, the
        // scan must still find it every time.
        let (_clock, set) = set_with((0..50).map(|i| spec(i, 1)).collect());
        for e in &set.endpoints()[1..] {
            e.set_healthy(false);
        }
        let b = build(&LbConfig::with_algorithm(Algorithm::Random), &set);
        assert_eq!(tally(&*b, 500).get(&addr(0)), Some(&500));
    }
}
