//! Time as a dependency.
//!
//! Breakers, ejections, budgets, buckets and slow start all depend on time. They read it
//! through [`Clock`] so tests move time forward by hand ([`ManualClock`]) instead of
//! sleeping, and so the same logic runs unchanged under the real clock ([`SystemClock`]).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A source of the current instant.
pub trait Clock: Send + Sync + Debug {
    /// The current instant; never goes backwards.
    fn now(&self) -> Instant;
}

/// A clock shared by every piece of one service's state.
pub type SharedClock = Arc<dyn Clock>;

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

impl SystemClock {
    /// The system clock as a [`SharedClock`].
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

/// A clock that only moves when told to, for deterministic tests.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock standing at an arbitrary (but fixed) instant.
    pub fn new() -> Arc<Self> {
        Arc::new(ManualClock { base: epoch(), offset_nanos: AtomicU64::new(0) })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.offset_nanos.fetch_add(duration_nanos(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_nanos.load(Ordering::SeqCst))
    }
}

/// The process-wide reference instant that [`AtomicInstant`] counts from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An optional [`Instant`] that can be read and written without a lock.
///
/// Stored as nanoseconds after a process-wide epoch, plus one, so that zero can mean
/// "unset". Used on the pick path (ejection deadlines, breaker reset deadlines, slow-start
/// start times), where taking a lock per endpoint per pick would cost too much.
#[derive(Debug, Default)]
pub struct AtomicInstant(AtomicU64);

impl AtomicInstant {
    /// An unset instant.
    pub const fn unset() -> Self {
        AtomicInstant(AtomicU64::new(0))
    }

    /// A set instant.
    pub fn new(at: Instant) -> Self {
        AtomicInstant(AtomicU64::new(Self::encode(at)))
    }

    fn encode(at: Instant) -> u64 {
        duration_nanos(at.saturating_duration_since(epoch())).saturating_add(1)
    }

    /// The stored instant, or `None` when unset.
    pub fn load(&self) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Some(epoch() + Duration::from_nanos(n - 1)),
        }
    }

    /// Whether an instant is stored, without computing it.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }

    /// Stores `at`.
    pub fn store(&self, at: Instant) {
        self.0.store(Self::encode(at), Ordering::Release);
    }

    /// Clears the stored instant.
    pub fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Clears the stored instant if it is still `at` (so a concurrent newer store wins).
    pub fn clear_if(&self, at: Instant) {
        let _ = self.0.compare_exchange(Self::encode(at), 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The current instant, read from the clock at most once and only if asked for.
///
/// A pick may need the time for several endpoints (slow start) or for none at all;
/// this keeps it to at most one clock read per pick.
#[derive(Debug)]
pub struct LazyNow<'a> {
    clock: &'a dyn Clock,
    at: std::cell::Cell<Option<Instant>>,
}

impl<'a> LazyNow<'a> {
    /// Not read yet.
    pub fn new(clock: &'a dyn Clock) -> Self {
        LazyNow { clock, at: std::cell::Cell::new(None) }
    }

    /// The instant of the first call.
    pub fn get(&self) -> Instant {
        match self.at.get() {
            Some(at) => at,
            None => {
                let at = self.clock.now();
                self.at.set(Some(at));
                at
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1500));
    }

    #[test]
    fn atomic_instant_round_trips_and_clears() {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(3));
        let slot = AtomicInstant::unset();
        assert_eq!(slot.load(), None);
        slot.store(clock.now());
        assert_eq!(slot.load(), Some(clock.now()));
        slot.clear();
        assert!(!slot.is_set());
        // The epoch itself is representable (distinct from unset).
        let at_epoch = AtomicInstant::new(epoch());
        assert_eq!(at_epoch.load(), Some(epoch()));
    }
}
