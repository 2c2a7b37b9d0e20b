//! The memory request bodies held for retries may take, all requests together.
//!
//! A request that may be retried has its body (at most
//! [`crate::l7::outbound::REPLAY_BUFFER`]) read whole before the first try, and kept
//! until the request is over. One such body is small; thousands of concurrent
//! requests, or clients that send part of a body and stall, would add up. The
//! [`ReplayBudget`] caps the sum: a request that finds it spent is streamed once,
//! without retries, and the hit is counted (`mesh_limit_hits_total{limit="retry_buffer"}`).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Default total of request bodies held for retries.
pub const DEFAULT_REPLAY_BUDGET: usize = 32 * 1024 * 1024;

/// Bytes held for retries now, against a maximum.
#[derive(Debug)]
pub struct ReplayBudget {
    held: AtomicUsize,
    max: usize,
}

static GLOBAL: ReplayBudget = ReplayBudget::new(DEFAULT_REPLAY_BUDGET);

impl ReplayBudget {
    pub const fn new(max: usize) -> ReplayBudget {
        ReplayBudget { held: AtomicUsize::new(0), max }
    }

    /// The agent's budget.
    pub fn global() -> &'static ReplayBudget {
        &GLOBAL
    }

    /// Holds `bytes` until the reservation is dropped; `None` if they do not fit.
    pub fn reserve(&'static self, bytes: usize) -> Option<Reservation> {
        let mut held = self.held.load(Ordering::Relaxed);
        loop {
            let next = held.checked_add(bytes).filter(|n| *n <= self.max)?;
            match self.held.compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    metrics::gauge!(crate::observe::limits::RETRY_BUFFER_BYTES).set(next as f64);
                    return Some(Reservation { budget: self, bytes });
                }
                Err(now) => held = now,
            }
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The maximum.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Bytes of one request's body, held for its retries.
#[derive(Debug)]
pub struct Reservation {
    budget: &'static ReplayBudget,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let before = self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        metrics::gauge!(crate::observe::limits::RETRY_BUFFER_BYTES)
            .set(before.saturating_sub(self.bytes) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_the_maximum_and_frees_on_drop() {
        static BUDGET: ReplayBudget = ReplayBudget::new(100);
        let a = BUDGET.reserve(60).unwrap();
        assert!(BUDGET.reserve(41).is_none(), "over the maximum");
        let b = BUDGET.reserve(40).unwrap();
        assert_eq!(BUDGET.held(), 100);
        assert!(BUDGET.reserve(1).is_none());
        drop(a);
        assert!(BUDGET.reserve(60).is_some(), "a finished request frees its bytes");
        drop(b);
        assert_eq!(BUDGET.held(), 0);
        assert!(BUDGET.reserve(usize::MAX).is_none(), "no overflow");
    }
}
