//! Consistent hashing on a ring of virtual nodes.
//!
//! Each member is placed on a 64-bit ring at `virtual_nodes` points (hashes of its
//! address and the point's number); a key goes to the first point at or after its hash,
//! found by binary search. Adding or removing one of N members moves only the keys
//! between its points and their predecessors, about 1/N of all keys, and nothing else.
//! When the owner of a key's point is unavailable the walk continues clockwise, so its
//! keys spread over the following points' owners while every other key stays put.
//!
//! Weights only decide membership: every member gets the same number of points, so a
//! weight change never remaps keys.

use super::guard::PickGuard;
use super::hash::{hash_endpoint, spread_key};
use super::{LbConfig, Member, PickContext, Pool, Strategy};

/// A hash ring for one tier.
#[derive(Debug)]
pub struct RingHash {
    /// Points sorted by position: (position, endpoint index).
    ring: Box<[(u64, u32)]>,
}

impl RingHash {
    /// Endpoint indices clockwise from `key`'s point, once round the ring.
    fn walk(&self, key: u64) -> impl Iterator<Item = u32> + '_ {
        let hash = spread_key(key);
        let start = self.ring.partition_point(|(position, _)| *position < hash);
        let (wrapped, ahead) = self.ring.split_at(start);
        ahead.iter().chain(wrapped).map(|(_, index)| *index)
    }
}

impl Strategy for RingHash {
    fn build(pool: &Pool, members: Vec<Member>, config: &LbConfig) -> Self {
        let points = config.virtual_nodes.max(1);
        let mut ring = Vec::with_capacity(members.len() * points as usize);
        for m in &members {
            let addr = pool.endpoint(m.index).addr();
            ring.extend((0..points).map(|n| (hash_endpoint(&addr, u64::from(n)), m.index)));
        }
        ring.sort_unstable();
        RingHash { ring: ring.into_boxed_slice() }
    }

    fn pick(&self, pool: &Pool, ctx: &PickContext<'_>) -> Option<PickGuard> {
        let key = ctx.hash_key.unwrap_or_else(|| pool.random.next_u64());
        let mut last = u32::MAX;
        for index in self.walk(key) {
            // Consecutive points often share an owner; test each run once.
            if index == last {
                continue;
            }
            last = index;
            if pool.available(index)
                && let Some(guard) = pool.admit(index)
            {
                return Some(guard);
            }
        }
        None
    }
}
