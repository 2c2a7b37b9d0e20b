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
    let is_prime = |c: u32| {
        c >= 2 && (2..).take_while(|d: &u32| d.saturating_mul(*d) <= c).all(|d| !c.is_multiple_of(d))
    };
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
        pool.first_on_ring(ahead.iter().chain(wrapped).copied())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::super::test_support::{addr, mapping, set_with, spec};
    use super::super::{Algorithm, LbConfig, Pool, Strategy, build};
    use super::*;

    const KEYS: u64 = 4000;

    fn maglev() -> LbConfig {
        LbConfig::with_algorithm(Algorithm::Maglev)
    }

    #[test]
    fn next_prime_rounds_up_to_a_prime() {
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(1000), 1009);
    }

    #[test]
    fn table_slots_are_shared_within_one() {
        for n in [1u32, 3, 16, 100] {
            let (_clock, set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let pool = Pool {
                endpoints: set.endpoints().to_vec().into_boxed_slice(),
                slow_start: Default::default(),
                random: set.shared().random.clone(),
                clock: set.shared().clock.clone(),
            };
            let members: Vec<_> = (0..n).map(|index| Member { index, weight: 1 }).collect();
            let table = Maglev::build(&pool, members, &maglev()).table;
            assert_eq!(table.len(), 65_537);
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for slot in table.iter() {
                *counts.entry(*slot).or_default() += 1;
            }
            let (min, max) = (counts.values().min(), counts.values().max());
            assert_eq!(counts.len(), n as usize);
            assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{n}: {min:?}..{max:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn removing_one_endpoint_disrupts_little(n in 3u32..40, removed in 0u32..40) {
            let removed = removed % n;
            let (_clock, mut set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let before = mapping(&*build(&maglev(), &set), 0..KEYS);
            set.update((0..n).filter(|i| *i != removed).map(|i| spec(i, 1)).collect::<Vec<_>>());
            let after = mapping(&*build(&maglev(), &set), 0..KEYS);
            let lost = before.iter().filter(|b| **b == Some(addr(removed))).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            // Every key of the removed endpoint moves (about 1/n, the table is balanced);
            // Maglev moves a few others too (measured: well under 1 % of keys), far fewer
            // than a rehash, which would move (n-1)/n of all keys.
            let share = moved as f64 / KEYS as f64;
            prop_assert!(share <= 1.2 / f64::from(n) + 0.02, "moved {} with n={}", share, n);
            let collateral = (moved - lost) as f64 / KEYS as f64;
            prop_assert!(collateral <= 0.2 / f64::from(n) + 0.005, "collateral {} with n={}", collateral, n);
        }

        #[test]
        fn adding_one_endpoint_disrupts_little(n in 2u32..40) {
            let (_clock, mut set) = set_with((0..n).map(|i| spec(i, 1)).collect());
            let before = mapping(&*build(&maglev(), &set), 0..KEYS);
            set.update((0..=n).map(|i| spec(i, 1)).collect::<Vec<_>>());
            let after = mapping(&*build(&maglev(), &set), 0..KEYS);
            let gained = after.iter().filter(|a| **a == Some(addr(n))).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let share = moved as f64 / KEYS as f64;
            prop_assert!(share <= 1.2 / f64::from(n + 1) + 0.02, "moved {} with n={}", share, n);
            let collateral = (moved - gained) as f64 / KEYS as f64;
            prop_assert!(collateral <= 0.2 / f64::from(n + 1) + 0.005, "collateral {} with n={}", collateral, n);
        }
    }
}
