//! Randomness as a dependency.
//!
//! Balancers draw a random number on most picks, and breakers and retries jitter their
//! timers. They read randomness through [`RandomSource`] so tests can fix it
//! ([`SeededRandom`]) and production gets a fast, lock-free generator
//! ([`ThreadRandom`]). None of this needs cryptographic quality.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of uniformly distributed random numbers.
pub trait RandomSource: Send + Sync + Debug {
    /// A uniformly distributed `u64`.
    fn next_u64(&self) -> u64;

    /// A uniformly distributed number in `[0, 1)`.
    fn next_f64(&self) -> f64 {
        // 53 high bits give every representable value in [0, 1) with an even step.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniformly distributed number in `[0, n)`; zero when `n` is zero.
    fn below(&self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for balancing and free of division.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A random source shared by the pieces of one service's state.
pub type SharedRandom = Arc<dyn RandomSource>;

/// SplitMix64's output step: spreads a counter into well-mixed 64-bit values.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A per-thread generator seeded from the OS's hash keys: no lock, no shared cache line.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRandom;

impl ThreadRandom {
    /// The thread generator as a [`SharedRandom`].
    pub fn shared() -> SharedRandom {
        Arc::new(ThreadRandom)
    }
}

thread_local! {
    static THREAD_STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0x6d65_7368u64));
}

impl RandomSource for ThreadRandom {
    fn next_u64(&self) -> u64 {
        THREAD_STATE.with(|state| {
            let next = state.get().wrapping_add(GOLDEN_GAMMA);
            state.set(next);
            mix64(next)
        })
    }
}

/// A deterministic generator (SplitMix64 over an atomic counter), for tests and
/// reproducible simulations.
#[derive(Debug)]
pub struct SeededRandom(AtomicU64);

impl SeededRandom {
    /// A generator that yields the same sequence for the same seed.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(SeededRandom(AtomicU64::new(seed)))
    }
}

impl RandomSource for SeededRandom {
    fn next_u64(&self) -> u64 {
        mix64(self.0.fetch_add(GOLDEN_GAMMA, Ordering::Relaxed).wrapping_add(GOLDEN_GAMMA))
    }
}

/// A source that always returns the same fraction, for tests that pin jitter to an edge.
#[derive(Debug, Clone, Copy)]
pub struct FixedRandom(pub f64);

impl RandomSource for FixedRandom {
    fn next_u64(&self) -> u64 {
        (self.0.clamp(0.0, 1.0) * u64::MAX as f64) as u64
    }

    fn next_f64(&self) -> f64 {
        self.0.clamp(0.0, 1.0 - f64::EPSILON)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sequences_repeat_and_stay_in_range() {
        let a = SeededRandom::new(7);
        let b = SeededRandom::new(7);
        let draws = |r: &SeededRandom| (r.next_u64(), r.next_f64(), r.below(10));
        for _ in 0..100 {
            let (x, f, n) = draws(&a);
            assert_eq!((x, f, n), draws(&b));
            assert!((0.0..1.0).contains(&f));
            assert!(n < 10);
        }
        assert_ne!(draws(&SeededRandom::new(8)), draws(&SeededRandom::new(7)));
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn below_is_roughly_uniform() {
        let rng = ThreadRandom;
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[rng.below(4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
