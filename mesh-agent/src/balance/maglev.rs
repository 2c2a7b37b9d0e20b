//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! A lookup table of prime size M (65,537 by default) is filled by letting members take
//! turns claiming their next free slot along their own permutation of the table
//! (`offset + j × skip mod M`, both from hashes of the address). Each member ends up
//! with M/N slots, give or take one, and a pick is one table read. Removing or adding a
//! member mostly moves the slots it owns, but, unlike a ring, some other slots move
//! too; the tests bound that.
//!
//! When a slot's owner is unavailable the pick tries the following slots, whose owners
//! are spread over all members, so the unavailable member's keys spread evenly.
//! Weights only decide membership.

use super::guard::PickGuard;
use super::hash::{hash_endpoint, spread_key};
use super::{LbConfig, Member, PickContext, Pool, Strategy};

const OFFSET_SEED: u64 = 0x6f66_6673_6574;
const SKIP_SEED: u64 = 0x736b_6970;
const EMPTY: u32 = u32::MAX;

/// The smallest prime at least `n` (and at least 2).
pub(crate) fn next_prime(n: u32) -> u32 {
    let is_prime = |c: u32| c >= 2 && (2..).take_while(|d: &u32| d.saturating_mul(*d) <= c).all(|d| c % d != 0);
    (n.max(2)..=u32::MAX).find(|c| is_prime(*c)).unwrap_or(u32::MAX)
}

/// A Maglev table for one tier.
#[derive(Debug)]
pub struct Maglev {
    /// Endpoint index per slot.
    table: Box<[u32]>,
}

impl Maglev {
    /// Fills a table of `size` slots (a prime) for `members`.
    fn populate(pool: &Pool, members: &[Member], size: u32) -> Box<[u32]> {
        if members.is_empty() {
            return Box::new([]);
        }
        let size64 = u64::from(size);
        let mut table = vec![EMPTY; size as usize];
        let perms: Vec<(u64, u64)> = members
            .iter()
            .map(|m| {
                let addr = pool.endpoint(m.index).addr();
                let offset = hash_endpoint(&addr, OFFSET_SEED) % size64;
                let skip = hash_endpoint(&addr, SKIP_SEED) % (size64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; members.len()];
        let mut filled = 0u32;
        'fill: loop {
            for (i, m) in members.iter().enumerate() {
                let (offset, skip) = perms[i];
                // Each permutation visits every slot (skip < size, size prime), so this
                // finds a free slot while any remains.
                loop {
                    let slot = ((offset + next[i] * skip) % size64) as usize;
                    next[i] += 1;
                    if table[slot] == EMPTY {
                        table[slot] = m.index;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    break 'fill;
                }
            }
        }
        table.into_boxed_slice()
    }
}

impl Strategy for Maglev {
    fn build(pool: &Pool, members: Vec<Member>, config: &LbConfig) -> Self {
        let size = next_prime(config.maglev_table_size.max(3));
        Maglev { table: Self::populate(pool, &members, size) }
    }

    fn pick(&self, pool: &Pool, ctx: &PickContext<'_>) -> Option<PickGuard> {
        let len = self.table.len();
        if len == 0 {
            return None;
        }
        let key = ctx.hash_key.unwrap_or_else(|| pool.random.next_u64());
        let start = (spread_key(key) % len as u64) as usize;
        let (wrapped, ahead) = self.table.split_at(start);
        let mut last = EMPTY;
        for index in ahead.iter().chain(wrapped).copied() {
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
