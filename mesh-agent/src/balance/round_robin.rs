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
