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
        pool.first_on_ring(self.walk(key))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::{addr, mapping, set_with, spec, tally};
    use super::super::{Algorithm, LbConfig, build};

    const KEYS: u64 = 4000;

    fn ring() -> LbConfig {
        LbConfig::with_algorithm(Algorithm::RingHash)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn removing_one_endpoint_moves_only_its_keys(n in 2u32..30, removed in 0u32..30) {
            let removed = removed % n;
            let (_clock, mut set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let before = mapping(&*build(&ring(), &set), 0..KEYS);
            set.update((0..n).filter(|i| *i != removed).map(|i| spec(i, 1)).collect::<Vec<_>>());
            let after = mapping(&*build(&ring(), &set), 0..KEYS);
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                if b != a {
                    prop_assert_eq!(*b, Some(addr(removed)), "a key moved off a surviving endpoint");
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            prop_assert!(share <= 1.5 / f64::from(n) + 0.02, "moved {} of keys with n={}", share, n);
        }

        #[test]
        fn adding_one_endpoint_moves_keys_only_to_it(n in 1u32..30) {
            let (_clock, mut set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let before = mapping(&*build(&ring(), &set), 0..KEYS);
            set.update((0..=n).map(|i| spec(i, 1)).collect::<Vec<_>>());
            let after = mapping(&*build(&ring(), &set), 0..KEYS);
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                if b != a {
                    prop_assert_eq!(*a, Some(addr(n)), "a key moved between old endpoints");
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            prop_assert!(share <= 1.5 / f64::from(n + 1) + 0.02, "moved {} of keys with n={}", share, n);
        }
    }

    #[test]
    fn keys_spread_evenly_and_stick() {
        let (_clock, set) = set_with((0..10).map(|i| spec(i, 1)).collect());
        let b = build(&ring(), &set);
        for (_, c) in tally(&*b, 20_000) {
            assert!((1200..2800).contains(&c), "{c}");
        }
        assert_eq!(mapping(&*b, 0..500), mapping(&*b, 0..500), "same key, same endpoint");
        // Rebuilding (an agent restart) maps every key the same way.
        assert_eq!(mapping(&*b, 0..500), mapping(&*build(&ring(), &set), 0..500));
    }

    #[test]
    fn unavailable_owner_moves_only_its_keys() {
        let (_clock, set) = set_with((0..5).map(|i| spec(i, 1)).collect());
        let b = build(&ring(), &set);
        let before = mapping(&*b, 0..2000);
        set.endpoints()[2].set_healthy(false);
        let after = mapping(&*b, 0..2000);
        for (b, a) in before.iter().zip(&after) {
            if *b == Some(addr(2)) {
                assert_ne!(*a, Some(addr(2)));
            } else {
                assert_eq!(a, b);
            }
        }
    }
}
