//! A per-endpoint circuit breaker.
//!
//! While **closed** it admits everything and remembers whether each of the last `window`
//! requests failed. Once at least `min_requests` outcomes are known and the failed share
//! reaches `failure_rate`, it **opens**: nothing is admitted for the reset timeout
//! (jittered by ±`reset_jitter` so that breakers opened together do not probe together).
//! After that it is **half-open**: at most `half_open_probes` requests may be in flight at
//! once; `close_after_successes` consecutive probe successes close it and any probe failure
//! opens it again.
//!
//! The closed state is answered from one atomic load, so the pick path pays nothing for a
//! healthy endpoint; the window and transitions sit behind a short mutex taken only when an
//! outcome is recorded or the breaker is not closed.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::ConfigError;
use super::clock::{AtomicInstant, SharedClock};
use super::random::SharedRandom;

/// Default share of failures in the window that opens the breaker.
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
/// Default number of most recent requests the failure rate is computed over.
pub const DEFAULT_WINDOW: u32 = 20;
/// Default time the breaker stays open before probing.
pub const DEFAULT_RESET_TIMEOUT: Duration = Duration::from_secs(10);
/// Default jitter applied to the reset timeout (±10 %).
pub const DEFAULT_RESET_JITTER: f64 = 0.1;
/// Default number of probes allowed in flight while half-open.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 3;
/// Default number of consecutive probe successes that close the breaker.
pub const DEFAULT_CLOSE_AFTER_SUCCESSES: u32 = 3;

/// How a breaker decides to open and close.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// A disabled breaker admits everything and records nothing.
    pub enabled: bool,
    /// Share of failures (0..=1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// How many of the most recent outcomes are remembered.
    pub window: u32,
    /// Outcomes needed in the window before the breaker may open (at most `window`), so
    /// one early failure cannot open it.
    pub min_requests: u32,
    /// How long the breaker stays open before probing.
    pub reset_timeout: Duration,
    /// Relative jitter of the reset timeout (0.1 = ±10 %).
    pub reset_jitter: f64,
    /// Probes allowed in flight at once while half-open.
    pub half_open_probes: u32,
    /// Consecutive probe successes that close the breaker.
    pub close_after_successes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_rate: DEFAULT_FAILURE_RATE,
            window: DEFAULT_WINDOW,
            min_requests: DEFAULT_WINDOW,
            reset_timeout: DEFAULT_RESET_TIMEOUT,
            reset_jitter: DEFAULT_RESET_JITTER,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            close_after_successes: DEFAULT_CLOSE_AFTER_SUCCESSES,
        }
    }
}

impl BreakerConfig {
    /// A breaker that never opens.
    pub fn disabled() -> Self {
        BreakerConfig { enabled: false, ..BreakerConfig::default() }
    }

    /// The control plane's breaker policy, with the defaults above for zero fields.
    /// `enabled: false` (also the message's default) gives a disabled breaker.
    pub fn from_api(api: &mesh_api::CircuitBreaker) -> Result<Self, ConfigError> {
        if !api.enabled {
            return Ok(BreakerConfig::disabled());
        }
        let failure_rate = if api.failure_rate == 0.0 {
            DEFAULT_FAILURE_RATE
        } else {
            super::check_ratio("circuit_breaker.failure_rate", api.failure_rate)?
        };
        let window = if api.window == 0 { DEFAULT_WINDOW } else { api.window };
        let nonzero = |v: u32, default: u32| if v == 0 { default } else { v };
        Ok(BreakerConfig {
            enabled: true,
            failure_rate,
            window,
            min_requests: window,
            reset_timeout: if api.reset_timeout_ms == 0 {
                DEFAULT_RESET_TIMEOUT
            } else {
                Duration::from_millis(api.reset_timeout_ms.into())
            },
            reset_jitter: DEFAULT_RESET_JITTER,
            half_open_probes: nonzero(api.half_open_probes, DEFAULT_HALF_OPEN_PROBES),
            close_after_successes: nonzero(api.close_after_successes, DEFAULT_CLOSE_AFTER_SUCCESSES),
        })
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Admitting everything and watching the failure rate.
    Closed,
    /// Refusing everything until the reset timeout passes.
    Open,
    /// Admitting a few probes to find out whether the endpoint recovered.
    HalfOpen,
}

impl BreakerState {
    /// Lower-case name for metrics labels and the admin page.
    pub fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A breaker's state and counters, for metrics and the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerStats {
    /// Current state (an open breaker whose timeout has passed reads as open until the
    /// next request turns it half-open).
    pub state: BreakerState,
    /// Outcomes currently in the window.
    pub window_requests: u32,
    /// Failures among them.
    pub window_failures: u32,
    /// Probes in flight while half-open.
    pub probes_in_flight: u32,
    /// How many times the breaker has opened.
    pub times_opened: u64,
    /// Requests refused because the breaker was open or its probes were taken.
    pub rejected: u64,
}

/// Permission to send one request, returned by [`CircuitBreaker::try_acquire`]; hand it
/// back with [`CircuitBreaker::record`] or [`CircuitBreaker::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission(AdmissionKind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdmissionKind {
    Normal,
    /// A half-open probe, tagged with the half-open episode it belongs to so a late answer
    /// from an earlier episode cannot count in a later one.
    Probe(u64),
}

impl Admission {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(self.0, AdmissionKind::Probe(_))
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// One endpoint's circuit breaker (see the module documentation).
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: SharedClock,
    random: SharedRandom,
    state: AtomicU8,
    open_until: AtomicInstant,
    /// Written only under `inner`'s lock; read without it by [`Self::would_admit`].
    probes_in_flight: AtomicU32,
    times_opened: AtomicU64,
    rejected: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    window: Window,
    /// Bumped on every transition; probes carry it.
    episode: u64,
    successes: u32,
}

/// The last `capacity` outcomes as a ring of "failed?" flags.
#[derive(Debug)]
struct Window {
    failed: Box<[bool]>,
    next: usize,
    len: usize,
    failures: usize,
}

impl Window {
    fn new(capacity: u32) -> Self {
        let capacity = usize::try_from(capacity.max(1)).unwrap_or(1);
        Window { failed: vec![false; capacity].into_boxed_slice(), next: 0, len: 0, failures: 0 }
    }

    fn push(&mut self, failed: bool) {
        if self.len == self.failed.len() {
            if self.failed[self.next] {
                self.failures -= 1;
            }
        } else {
            self.len += 1;
        }
        self.failed[self.next] = failed;
        if failed {
            self.failures += 1;
        }
        self.next = (self.next + 1) % self.failed.len();
    }

    fn clear(&mut self) {
        self.next = 0;
        self.len = 0;
        self.failures = 0;
    }
}

impl CircuitBreaker {
    /// A closed breaker. `random` jitters the reset timeout.
    pub fn new(config: BreakerConfig, clock: SharedClock, random: SharedRandom) -> Self {
        let window = Window::new(config.window);
        CircuitBreaker {
            config,
            clock,
            random,
            state: AtomicU8::new(CLOSED),
            open_until: AtomicInstant::unset(),
            probes_in_flight: AtomicU32::new(0),
            times_opened: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            inner: Mutex::new(Inner { window, episode: 0, successes: 0 }),
        }
    }

    /// The configuration this breaker follows.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_deadline_passed(&self) -> bool {
        self.open_until.load().is_none_or(|until| self.clock.now() >= until)
    }

    /// Whether [`Self::try_acquire`] would probably admit a request now. Cheap and
    /// side-effect free, for balancers that look at several endpoints before choosing one.
    pub fn would_admit(&self) -> bool {
        if !self.config.enabled {
            return true;
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => self.open_deadline_passed(),
            _ => self.probes_in_flight.load(Ordering::Acquire) < self.config.half_open_probes,
        }
    }

    /// Asks to send one request. `None` means the breaker refuses it (open, or all
    /// half-open probe slots taken).
    pub fn try_acquire(&self) -> Option<Admission> {
        if !self.config.enabled {
            return Some(Admission(AdmissionKind::Normal));
        }
        let state = self.state.load(Ordering::Acquire);
        if state == CLOSED {
            return Some(Admission(AdmissionKind::Normal));
        }
        if state == OPEN && !self.open_deadline_passed() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut inner = self.lock();
        match self.state.load(Ordering::Acquire) {
            CLOSED => return Some(Admission(AdmissionKind::Normal)),
            OPEN if self.open_deadline_passed() => self.half_open(&mut inner),
            OPEN => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            _ => {}
        }
        if self.probes_in_flight.load(Ordering::Acquire) < self.config.half_open_probes {
            self.probes_in_flight.fetch_add(1, Ordering::AcqRel);
            Some(Admission(AdmissionKind::Probe(inner.episode)))
        } else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Records how an admitted request ended.
    pub fn record(&self, admission: Admission, failed: bool) {
        if !self.config.enabled {
            return;
        }
        let mut inner = self.lock();
        match (self.state.load(Ordering::Acquire), admission.0) {
            (CLOSED, _) => {
                inner.window.push(failed);
                let len = inner.window.len;
                let min = self.config.min_requests.clamp(1, self.config.window.max(1));
                if len >= min as usize
                    && inner.window.failures as f64 >= self.config.failure_rate * len as f64
                {
                    self.open(&mut inner, self.clock.now());
                }
            }
            (HALF_OPEN, AdmissionKind::Probe(episode)) if episode == inner.episode => {
                self.probes_in_flight.fetch_sub(1, Ordering::AcqRel);
                if failed {
                    self.open(&mut inner, self.clock.now());
                } else {
                    inner.successes += 1;
                    if inner.successes >= self.config.close_after_successes.max(1) {
                        self.close(&mut inner);
                    }
                }
            }
            // Answers to requests admitted before the last transition say nothing about
            // the current episode.
            _ => {}
        }
    }

    /// Gives back an admission whose request ended without a verdict (cancelled, or the
    /// caller chose not to report), so a half-open probe slot is not lost.
    pub fn release(&self, admission: Admission) {
        if !self.config.enabled {
            return;
        }
        if let AdmissionKind::Probe(episode) = admission.0 {
            let inner = self.lock();
            if self.state.load(Ordering::Acquire) == HALF_OPEN && episode == inner.episode {
                self.probes_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        let jitter = self.config.reset_jitter.clamp(0.0, 1.0) * (2.0 * self.random.next_f64() - 1.0);
        let timeout = self.config.reset_timeout.mul_f64((1.0 + jitter).max(0.0));
        self.open_until.store(now + timeout);
        self.begin_episode(inner, OPEN);
        self.times_opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?timeout, "circuit breaker opened");
    }

    fn half_open(&self, inner: &mut Inner) {
        self.begin_episode(inner, HALF_OPEN);
    }

    fn close(&self, inner: &mut Inner) {
        self.open_until.clear();
        self.begin_episode(inner, CLOSED);
    }

    fn begin_episode(&self, inner: &mut Inner, state: u8) {
        inner.episode += 1;
        inner.successes = 0;
        inner.window.clear();
        self.probes_in_flight.store(0, Ordering::Release);
        self.state.store(state, Ordering::Release);
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// State and counters, for metrics and the admin endpoint.
    pub fn stats(&self) -> BreakerStats {
        let inner = self.lock();
        BreakerStats {
            state: self.state(),
            window_requests: u32::try_from(inner.window.len).unwrap_or(u32::MAX),
            window_failures: u32::try_from(inner.window.failures).unwrap_or(u32::MAX),
            probes_in_flight: self.probes_in_flight.load(Ordering::Acquire),
            times_opened: self.times_opened.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::resilience::clock::ManualClock;
    use crate::resilience::random::FixedRandom;

    fn breaker(config: BreakerConfig, jitter_draw: f64) -> (Arc<ManualClock>, CircuitBreaker) {
        let clock = ManualClock::new();
        let b = CircuitBreaker::new(config, clock.clone(), Arc::new(FixedRandom(jitter_draw)));
        (clock, b)
    }

    fn send(b: &CircuitBreaker, failed: bool) {
        let admission = b.try_acquire().expect("admitted");
        b.record(admission, failed);
    }

    fn open_it(b: &CircuitBreaker) {
        for _ in 0..20 {
            send(b, true);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn opens_at_threshold_only_after_minimum_requests() {
        let (_clock, b) = breaker(BreakerConfig::default(), 0.5);
        // 19 failures: rate is 100 % but the window has not seen 20 requests yet.
        for _ in 0..19 {
            send(&b, true);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        send(&b, true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        assert!(!b.would_admit());
        let stats = b.stats();
        assert_eq!(stats.times_opened, 1);
        assert_eq!(stats.rejected, 1);
    }

    #[test]
    fn below_threshold_stays_closed_and_window_slides() {
        let (_clock, b) = breaker(BreakerConfig::default(), 0.5);
        // 9 failures in 20: 45 % < 50 %.
        for i in 0..20 {
            send(&b, i % 2 == 0 && i < 18);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.stats().window_failures, 9);
        // Twenty successes push every failure out of the window.
        for _ in 0..20 {
            send(&b, false);
        }
        assert_eq!(b.stats().window_failures, 0);
        // Exactly 50 % opens it.
        for _ in 0..10 {
            send(&b, true);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn reset_timeout_is_jittered_by_the_injected_source() {
        // Draw 0.0 -> -10 %: half-open after 9 s.
        let (clock, b) = breaker(BreakerConfig::default(), 0.0);
        open_it(&b);
        clock.advance(Duration::from_millis(8_999));
        assert!(b.try_acquire().is_none());
        clock.advance(Duration::from_millis(1));
        assert!(b.try_acquire().is_some());
        assert_eq!(b.state(), BreakerState::HalfOpen);

        // Draw ~1.0 -> +10 %: still open at 10.9 s.
        let (clock, b) = breaker(BreakerConfig::default(), 1.0);
        open_it(&b);
        clock.advance(Duration::from_millis(10_900));
        assert!(b.try_acquire().is_none());
        clock.advance(Duration::from_millis(200));
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn half_open_limits_probes_and_closes_after_successes() {
        let config = BreakerConfig { half_open_probes: 2, close_after_successes: 3, ..Default::default() };
        let (clock, b) = breaker(config, 0.5);
        open_it(&b);
        clock.advance(Duration::from_secs(10));
        let p1 = b.try_acquire().expect("probe 1");
        let p2 = b.try_acquire().expect("probe 2");
        assert!(p1.is_probe() && p2.is_probe());
        assert!(b.try_acquire().is_none(), "only two probes at once");
        assert!(!b.would_admit());
        b.record(p1, false);
        b.record(p2, false);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p3 = b.try_acquire().expect("probe 3");
        b.record(p3, false);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.stats().window_requests, 0, "closing starts a fresh window");
    }

    #[test]
    fn probe_failure_reopens_and_stale_probe_answers_are_ignored() {
        let (clock, b) = breaker(BreakerConfig::default(), 0.5);
        open_it(&b);
        clock.advance(Duration::from_secs(10));
        let stale = b.try_acquire().expect("probe");
        let failing = b.try_acquire().expect("probe");
        b.record(failing, true);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.stats().times_opened, 2);
        clock.advance(Duration::from_secs(10));
        let fresh = b.try_acquire().expect("new episode probe");
        // The probe from the earlier episode answers late: it must not count.
        b.record(stale, false);
        assert_eq!(b.stats().probes_in_flight, 1);
        b.record(fresh, false);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn released_probe_frees_its_slot() {
        let config = BreakerConfig { half_open_probes: 1, ..Default::default() };
        let (clock, b) = breaker(config, 0.5);
        open_it(&b);
        clock.advance(Duration::from_secs(10));
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_none());
        b.release(probe);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn disabled_breaker_never_opens() {
        let (_clock, b) = breaker(BreakerConfig::disabled(), 0.5);
        for _ in 0..100 {
            send(&b, true);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn from_api_fills_defaults_and_rejects_bad_ratios() {
        let api = mesh_api::CircuitBreaker { enabled: true, ..Default::default() };
        let config = BreakerConfig::from_api(&api).expect("valid");
        assert_eq!(config, BreakerConfig::default());
        let off = BreakerConfig::from_api(&mesh_api::CircuitBreaker::default()).expect("valid");
        assert!(!off.enabled);
        let custom = mesh_api::CircuitBreaker {
            enabled: true,
            failure_rate: 0.25,
            window: 8,
            reset_timeout_ms: 500,
            half_open_probes: 1,
            close_after_successes: 2,
        };
        let config = BreakerConfig::from_api(&custom).expect("valid");
        assert_eq!((config.window, config.min_requests), (8, 8));
        assert_eq!(config.reset_timeout, Duration::from_millis(500));
        let bad = mesh_api::CircuitBreaker { enabled: true, failure_rate: 1.5, ..Default::default() };
        assert!(BreakerConfig::from_api(&bad).is_err());
    }
}
