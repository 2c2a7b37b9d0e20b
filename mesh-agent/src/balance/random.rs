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
