//! Slow start: a new or recovered endpoint gets a growing share of traffic instead of
//! its full share at once, so cold caches, JIT warm-up and empty pools are not hit by a
//! stampede.
//!
//! Over the window, an endpoint's weight factor rises linearly from 10 % to 100 % of
//! its weight (starting at 10 %, not 0, so the endpoint takes some traffic at once and
//! starts warming). The ramp starts when the endpoint is added to a set after its first
//! update, or when the control plane marks it healthy again. How each algorithm uses
//! the factor:
//! - weighted round robin: effective weight = weight × factor;
//! - least request: the load score is in-flight ÷ (weight × factor), so a ramping
//!   endpoint looks busier than it is;
//! - round robin and random: a ramping endpoint is passed over with probability
//!   1 − factor (and still taken if nothing else is available);
//! - ring hash and Maglev: not applied. Their point is that a key keeps its endpoint;
//!   sending part of a new endpoint's keys elsewhere during the ramp would break that
//!   affinity twice.

use std::time::Duration;

use super::endpoint::Endpoint;
use crate::resilience::clock::LazyNow;

/// The factor of a fully ramped endpoint, in thousandths.
pub const FULL: u32 = 1000;
/// The factor at the start of a ramp, in thousandths.
pub const START: u32 = 100;

/// A slow-start policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlowStart {
    window: Duration,
}

impl SlowStart {
    /// Ramps over `window`; zero disables slow start.
    pub fn new(window: Duration) -> Self {
        SlowStart { window }
    }

    /// The endpoint's weight factor now, in thousandths (`START..=FULL`).
    pub fn factor_milli(&self, endpoint: &Endpoint, now: &LazyNow<'_>) -> u32 {
        let since = endpoint.ready_since();
        if self.window.is_zero() || !since.is_set() {
            return FULL;
        }
        let Some(started) = since.load() else {
            return FULL;
        };
        let elapsed = now.get().saturating_duration_since(started);
        if elapsed >= self.window {
            // Over: forget the start so later picks skip the clock.
            since.clear_if(started);
            return FULL;
        }
        let progress = elapsed.as_nanos() * u128::from(FULL - START) / self.window.as_nanos().max(1);
        START + u32::try_from(progress).unwrap_or(FULL - START)
    }
}
