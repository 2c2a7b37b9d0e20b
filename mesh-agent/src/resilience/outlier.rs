//! Passive outlier detection: ejecting endpoints that keep failing real traffic.
//!
//! Each endpoint counts its consecutive failures (every [`FailureKind`] counts: connect
//! failures, resets, timeouts, 5xx, gRPC UNAVAILABLE; any success resets the count). At
//! `consecutive_failures` it is ejected for `base_ejection × times ejected so far`
//! (capped at `max_ejection`), so an endpoint that keeps relapsing stays out longer.
//! Ejections end by the clock alone; no traffic is needed to bring an endpoint back.
//!
//! A set never has more than `floor(max_ejection_ratio × set size)` endpoints ejected at
//! once. The default ratio is 0.5: a detector that misreads a shared cause (a bad
//! deploy of a dependency, a network blip) as per-endpoint failure can at worst halve
//! capacity, never empty the set, and a single-endpoint set is never ejected.
//!
//! [`FailureKind`]: super::outcome::FailureKind

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::ConfigError;
use super::clock::{AtomicInstant, SharedClock};
use super::outcome::Outcome;

/// Default consecutive failures that eject an endpoint.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default duration of a first ejection.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Longest ejection, however often the endpoint was ejected before.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
/// Default largest share of a set that may be ejected at once.
pub const DEFAULT_MAX_EJECTION_RATIO: f64 = 0.5;

/// How a set's outlier detection behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Disabled detection never ejects.
    pub enabled: bool,
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// Duration of a first ejection; the n-th lasts n times as long.
    pub base_ejection: Duration,
    /// Cap on one ejection's duration.
    pub max_ejection: Duration,
    /// Largest share (0..=1) of the set ejected at once.
    pub max_ejection_ratio: f64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            enabled: true,
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejection_ratio: DEFAULT_MAX_EJECTION_RATIO,
        }
    }
}

impl OutlierConfig {
    /// Detection that never ejects.
    pub fn disabled() -> Self {
        OutlierConfig { enabled: false, ..OutlierConfig::default() }
    }

    /// The control plane's policy with the defaults above for zero fields;
    /// `enabled: false` (the message's default) disables detection.
    pub fn from_api(api: &mesh_api::OutlierDetection) -> Result<Self, ConfigError> {
        if !api.enabled {
            return Ok(OutlierConfig::disabled());
        }
        let base_ejection = if api.base_ejection_ms == 0 {
            DEFAULT_BASE_EJECTION
        } else {
            Duration::from_millis(api.base_ejection_ms.into())
        };
        Ok(OutlierConfig {
            enabled: true,
            consecutive_failures: if api.consecutive_failures == 0 {
                DEFAULT_CONSECUTIVE_FAILURES
            } else {
                api.consecutive_failures
            },
            base_ejection,
            max_ejection: DEFAULT_MAX_EJECTION.max(base_ejection),
            max_ejection_ratio: if api.max_ejection_ratio == 0.0 {
                DEFAULT_MAX_EJECTION_RATIO
            } else {
                super::check_ratio("outlier_detection.max_ejection_ratio", api.max_ejection_ratio)?
            },
        })
    }
}

/// One endpoint's outlier bookkeeping; lives in the endpoint, judged by its set's
/// [`OutlierDetector`].
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_failures: AtomicU32,
    ejected_until: AtomicInstant,
    times_ejected: AtomicU32,
}

impl OutlierState {
    /// Fresh state: never ejected.
    pub fn new() -> Self {
        OutlierState::default()
    }

    /// How many times this endpoint has been ejected.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    /// When the current ejection ends; `None` when not ejected (an expired ejection may
    /// still read here until the next availability check clears it).
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until.load()
    }
}

/// Counters of one set's detector, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierStats {
    /// Endpoints ejected right now.
    pub ejected_now: usize,
    /// Ejections so far.
    pub ejections: u64,
    /// Ejections refused because the set's cap was reached.
    pub refused: u64,
}

/// Decides ejections for one endpoint set, enforcing the set-wide cap.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    clock: SharedClock,
    set_size: AtomicUsize,
    /// End times of the ejections in force (expired ones are pruned when consulted).
    /// Only touched when an endpoint crosses its failure threshold, never on the pick path.
    active: Mutex<Vec<Instant>>,
    ejections: AtomicU64,
    refused: AtomicU64,
}

impl OutlierDetector {
    /// A detector for a set of `set_size` endpoints.
    pub fn new(config: OutlierConfig, clock: SharedClock, set_size: usize) -> Self {
        OutlierDetector {
            config,
            clock,
            set_size: AtomicUsize::new(set_size),
            active: Mutex::new(Vec::new()),
            ejections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// Tells the detector the set's new size (the cap is a share of it).
    pub fn set_size(&self, size: usize) {
        self.set_size.store(size, Ordering::Relaxed);
    }

    /// Most endpoints that may be ejected at once.
    pub fn max_ejected(&self) -> usize {
        let size = self.set_size.load(Ordering::Relaxed);
        (self.config.max_ejection_ratio.clamp(0.0, 1.0) * size as f64).floor() as usize
    }

    /// Whether `state`'s endpoint is ejected now.
    pub fn is_ejected(&self, state: &OutlierState) -> bool {
        let Some(until) = state.ejected_until.load() else {
            return false;
        };
        if self.clock.now() < until {
            return true;
        }
        // Expired: forget it so later checks on the pick path skip the clock.
        state.ejected_until.clear_if(until);
        false
    }

    /// Feeds one outcome; returns when the endpoint's ejection ends if this outcome
    /// ejected it.
    pub fn record(&self, state: &OutlierState, outcome: Outcome) -> Option<Instant> {
        if !self.config.enabled {
            return None;
        }
        if !outcome.is_failure() {
            state.consecutive_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if failures < self.config.consecutive_failures.max(1) || self.is_ejected(state) {
            return None;
        }
        let now = self.clock.now();
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        active.retain(|until| *until > now);
        // Checked again under the lock: two failures racing must eject once.
        if self.is_ejected(state) {
            return None;
        }
        if active.len() >= self.max_ejected() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let times = state.times_ejected.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let duration = self.config.base_ejection.saturating_mul(times).min(self.config.max_ejection);
        let until = now + duration;
        active.push(until);
        state.ejected_until.store(until);
        state.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?duration, times, "endpoint ejected as an outlier");
        Some(until)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> OutlierStats {
        let now = self.clock.now();
        let active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        OutlierStats {
            ejected_now: active.iter().filter(|until| **until > now).count(),
            ejections: self.ejections.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::resilience::clock::ManualClock;
    use crate::resilience::outcome::FailureKind;

    const FAIL: Outcome = Outcome::Failure(FailureKind::HttpStatus(503));
    const CONNECT: Outcome = Outcome::Failure(FailureKind::ConnectFailure);

    fn detector(size: usize) -> (Arc<ManualClock>, OutlierDetector) {
        let clock = ManualClock::new();
        (clock.clone(), OutlierDetector::new(OutlierConfig::default(), clock, size))
    }

    #[test]
    fn ejects_after_consecutive_failures_and_success_resets_the_count() {
        let (_clock, d) = detector(4);
        let s = OutlierState::new();
        for _ in 0..4 {
            assert_eq!(d.record(&s, FAIL), None);
        }
        d.record(&s, Outcome::Success);
        for _ in 0..4 {
            assert_eq!(d.record(&s, CONNECT), None);
        }
        assert!(!d.is_ejected(&s));
        assert!(d.record(&s, CONNECT).is_some());
        assert!(d.is_ejected(&s));
        assert_eq!(d.stats().ejections, 1);
    }

    #[test]
    fn ejection_expires_by_clock_and_grows_with_each_relapse() {
        let (clock, d) = detector(4);
        let s = OutlierState::new();
        for _ in 0..5 {
            d.record(&s, FAIL);
        }
        clock.advance(Duration::from_secs(29));
        assert!(d.is_ejected(&s));
        clock.advance(Duration::from_secs(1));
        assert!(!d.is_ejected(&s), "first ejection lasts the base 30 s");
        for _ in 0..5 {
            d.record(&s, FAIL);
        }
        clock.advance(Duration::from_secs(59));
        assert!(d.is_ejected(&s), "second ejection lasts 2 x base");
        clock.advance(Duration::from_secs(1));
        assert!(!d.is_ejected(&s));
        assert_eq!(s.times_ejected(), 2);
    }

    #[test]
    fn ejection_duration_is_capped() {
        let (clock, d) = detector(2);
        let s = OutlierState::new();
        for _ in 0..20 {
            for _ in 0..5 {
                d.record(&s, FAIL);
            }
            clock.advance(DEFAULT_MAX_EJECTION);
            assert!(!d.is_ejected(&s), "no ejection outlasts the cap");
        }
    }

    #[test]
    fn never_ejects_more_than_the_max_share() {
        let (clock, d) = detector(5);
        let states: Vec<OutlierState> = (0..5).map(|_| OutlierState::new()).collect();
        for s in &states {
            for _ in 0..5 {
                d.record(s, FAIL);
            }
        }
        // floor(0.5 * 5) = 2.
        assert_eq!(states.iter().filter(|s| d.is_ejected(s)).count(), 2);
        assert_eq!(d.stats().refused, 3);
        // Once the first ejections expire, others may go.
        clock.advance(DEFAULT_BASE_EJECTION);
        for s in &states[2..] {
            for _ in 0..5 {
                d.record(s, FAIL);
            }
        }
        assert_eq!(states.iter().filter(|s| d.is_ejected(s)).count(), 2);
        assert!(d.is_ejected(&states[2]) && d.is_ejected(&states[3]));
    }

    #[test]
    fn single_endpoint_set_is_never_ejected() {
        let (_clock, d) = detector(1);
        let s = OutlierState::new();
        for _ in 0..50 {
            d.record(&s, FAIL);
        }
        assert!(!d.is_ejected(&s));
    }

    #[test]
    fn from_api_defaults_and_validation() {
        let api = mesh_api::OutlierDetection { enabled: true, ..Default::default() };
        assert_eq!(OutlierConfig::from_api(&api).expect("valid"), OutlierConfig::default());
        assert!(!OutlierConfig::from_api(&mesh_api::OutlierDetection::default()).expect("valid").enabled);
        let bad =
            mesh_api::OutlierDetection { enabled: true, max_ejection_ratio: -0.1, ..Default::default() };
        assert!(OutlierConfig::from_api(&bad).is_err());
    }
}
