//! Retries: which failures are retried, how long to wait between tries, and a budget
//! that keeps retries from multiplying load when an upstream is already struggling.
//!
//! A retry is made only when all of these hold:
//! - the request can be replayed ([`is_replayable`]): the proxy still has the whole body;
//! - the failure is one the policy retries on (per-try timeouts are always retried when
//!   a per-try timeout is configured, since that is what the setting is for);
//! - attempts are left;
//! - the service's [`RetryBudget`] has room.
//!
//! Between tries the proxy waits a "full jitter" backoff: uniformly random in
//! `[0, min(max, base × 2^retry))`, which spreads synchronized clients apart.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::ConfigError;
use super::clock::SharedClock;
use super::outcome::FailureKind;
use super::random::RandomSource;

/// Default first backoff step.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Default backoff cap.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Default share of requests that may be retried.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retries per second allowed whatever the ratio, so a quiet service still retries.
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;
/// Span of time the budget counts requests and retries over.
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Failures a policy retries on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `connect-failure`: the connection could not be made.
    pub connect_failure: bool,
    /// `reset`: the connection broke before a full response.
    pub reset: bool,
    /// `503`: the endpoint answered 503 Service Unavailable.
    pub status_503: bool,
    /// `unavailable`: the gRPC status was UNAVAILABLE.
    pub grpc_unavailable: bool,
}

impl RetryOn {
    /// Parses the proto's condition names.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, ConfigError> {
        let mut on = RetryOn::default();
        for name in names {
            match name.as_ref().trim() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "503" => on.status_503 = true,
                "unavailable" => on.grpc_unavailable = true,
                other => return Err(ConfigError::UnknownRetryCondition(other.to_owned())),
            }
        }
        Ok(on)
    }

    /// Whether `failure` is one of these conditions.
    pub fn matches(&self, failure: FailureKind) -> bool {
        match failure {
            FailureKind::ConnectFailure => self.connect_failure,
            FailureKind::Reset => self.reset,
            FailureKind::HttpStatus(503) => self.status_503,
            FailureKind::HttpStatus(_) | FailureKind::Timeout => false,
            FailureKind::GrpcUnavailable => self.grpc_unavailable,
        }
    }
}

/// A service's retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries including the first (1 = no retries).
    pub max_attempts: u32,
    /// Deadline of each try; `None` leaves only the request's overall timeout.
    pub per_try_timeout: Option<Duration>,
    /// Failures worth retrying.
    pub retry_on: RetryOn,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff.
    pub backoff_max: Duration,
    /// Share of requests the budget lets be retried.
    pub budget_ratio: f64,
}

impl Default for RetryPolicy {
    /// No retries.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            per_try_timeout: None,
            retry_on: RetryOn::default(),
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            budget_ratio: DEFAULT_BUDGET_RATIO,
        }
    }
}

/// Why a failed try is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The policy does not retry this kind of failure.
    NotRetryable,
    /// Every allowed attempt was made.
    AttemptsExhausted,
    /// The proxy no longer holds the body, so it cannot send the request again.
    NotReplayable,
    /// The service's retry budget is spent.
    BudgetExhausted,
}

/// What to do after a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait this long, then try again (on a freshly picked endpoint).
    Retry {
        /// The backoff to wait.
        after: Duration,
    },
    /// Return the failure to the client.
    GiveUp(GiveUp),
}

impl RetryPolicy {
    /// The control plane's policy with defaults for zero fields.
    pub fn from_api(api: &mesh_api::RetryPolicy) -> Result<Self, ConfigError> {
        let backoff_base = match api.backoff_base_ms {
            0 => DEFAULT_BACKOFF_BASE,
            ms => Duration::from_millis(ms.into()),
        };
        let backoff_max = match api.backoff_max_ms {
            0 => DEFAULT_BACKOFF_MAX.max(backoff_base),
            ms => Duration::from_millis(ms.into()).max(backoff_base),
        };
        Ok(RetryPolicy {
            max_attempts: api.attempts.max(1),
            per_try_timeout: match api.per_try_timeout_ms {
                0 => None,
                ms => Some(Duration::from_millis(ms.into())),
            },
            retry_on: RetryOn::parse(&api.retry_on)?,
            backoff_base,
            backoff_max,
            budget_ratio: match api.budget_ratio {
                0.0 => DEFAULT_BUDGET_RATIO,
                r => super::check_ratio("retries.budget_ratio", r)?,
            },
        })
    }

    /// Whether the policy retries `failure` at all.
    pub fn retries(&self, failure: FailureKind) -> bool {
        self.max_attempts > 1
            && (self.retry_on.matches(failure)
                || (failure == FailureKind::Timeout && self.per_try_timeout.is_some()))
    }

    /// The backoff before retry number `retry` (0 for the first retry): uniform in
    /// `[0, min(max, base × 2^retry)]`.
    pub fn backoff(&self, retry: u32, random: &dyn RandomSource) -> Duration {
        let ceiling = self.backoff_base.saturating_mul(1u32 << retry.min(31)).min(self.backoff_max);
        ceiling.mul_f64(random.next_f64())
    }

    /// Starts the bookkeeping of one client request; counts it in `budget`.
    pub fn start<'a>(&'a self, budget: &'a RetryBudget) -> RetryState<'a> {
        budget.record_request();
        RetryState { policy: self, budget, attempts: 1 }
    }
}

/// One client request's retry bookkeeping (see [`RetryPolicy::start`]).
#[derive(Debug)]
pub struct RetryState<'a> {
    policy: &'a RetryPolicy,
    budget: &'a RetryBudget,
    attempts: u32,
}

impl RetryState<'_> {
    /// Tries made so far (starts at 1: the original).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Decides what follows a failed try. `replayable` says whether the request can be
    /// sent again (see [`is_replayable`]). A `Retry` decision has already taken its
    /// share of the budget and counted the attempt.
    pub fn on_failure(
        &mut self,
        failure: FailureKind,
        replayable: bool,
        random: &dyn RandomSource,
    ) -> RetryDecision {
        if !self.policy.retries(failure) {
            return RetryDecision::GiveUp(GiveUp::NotRetryable);
        }
        if self.attempts >= self.policy.max_attempts {
            return RetryDecision::GiveUp(GiveUp::AttemptsExhausted);
        }
        if !replayable {
            return RetryDecision::GiveUp(GiveUp::NotReplayable);
        }
        if !self.budget.try_withdraw(self.policy.budget_ratio) {
            return RetryDecision::GiveUp(GiveUp::BudgetExhausted);
        }
        let after = self.policy.backoff(self.attempts - 1, random);
        self.attempts += 1;
        RetryDecision::Retry { after }
    }
}

/// What the proxy knows about a request body before sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body (no Content-Length and no chunked encoding in HTTP/1; END_STREAM on the
    /// HEADERS frame in HTTP/2).
    Empty,
    /// A body of exactly this many bytes (Content-Length).
    Known(u64),
    /// A body of unknown length (chunked, or HTTP/2 without Content-Length).
    Unknown,
}

/// Whether a request can be sent again after a failed try: it must have no body, or a
/// body of known length the proxy buffers whole (at most `buffer_cap` bytes). Streamed
/// bodies of unknown length are gone once sent. CONNECT is a tunnel, never replayed.
///
/// Idempotency is the policy's business, not this function's: `connect-failure` never
/// reached the application, while retrying `reset` or `503` on a POST trusts the
/// service to tolerate a repeat.
pub fn is_replayable(method: &str, body: BodyLength, buffer_cap: u64) -> bool {
    if method.eq_ignore_ascii_case("CONNECT") {
        return false;
    }
    match body {
        BodyLength::Empty => true,
        BodyLength::Known(len) => len <= buffer_cap,
        BodyLength::Unknown => false,
    }
}

/// Limits retries to a share of a service's requests over a sliding window, with a
/// floor of retries per second so a quiet service can still retry.
///
/// Requests and retries are counted in ten slots spanning the window; the oldest slot
/// is recycled as time moves, so the window slides in tenth steps.
#[derive(Debug)]
pub struct RetryBudget {
    clock: SharedClock,
    min_per_sec: u32,
    slot_len: Duration,
    start: Instant,
    slots: Mutex<[Slot; BUDGET_SLOTS]>,
}

const BUDGET_SLOTS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Which slot-length interval since `start` this slot counts; stale when older than
    /// the window.
    index: u64,
    requests: u64,
    retries: u64,
}

/// Requests and retries currently counted by a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    /// Original requests in the window.
    pub requests: u64,
    /// Retries in the window.
    pub retries: u64,
}

impl RetryBudget {
    /// A budget over `window` allowing at least `min_per_sec` retries per second.
    pub fn new(clock: SharedClock, window: Duration, min_per_sec: u32) -> Self {
        let window = window.max(Duration::from_millis(BUDGET_SLOTS as u64));
        let start = clock.now();
        RetryBudget {
            clock,
            min_per_sec,
            slot_len: window / BUDGET_SLOTS as u32,
            start,
            slots: Mutex::new([Slot::default(); BUDGET_SLOTS]),
        }
    }

    /// A budget with the default window and floor.
    pub fn with_defaults(clock: SharedClock) -> Self {
        RetryBudget::new(clock, DEFAULT_BUDGET_WINDOW, DEFAULT_MIN_RETRIES_PER_SEC)
    }

    fn current_index(&self) -> u64 {
        let elapsed = self.clock.now().saturating_duration_since(self.start);
        u64::try_from(elapsed.as_nanos() / self.slot_len.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    fn with_slots<T>(&self, f: impl FnOnce(&mut [Slot; BUDGET_SLOTS], u64) -> T) -> T {
        let index = self.current_index();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut slots[(index % BUDGET_SLOTS as u64) as usize];
        if slot.index != index {
            *slot = Slot { index, requests: 0, retries: 0 };
        }
        f(&mut slots, index)
    }

    fn totals(slots: &[Slot; BUDGET_SLOTS], index: u64) -> BudgetStats {
        let live = slots.iter().filter(|s| s.index + BUDGET_SLOTS as u64 > index && s.index <= index);
        live.fold(BudgetStats { requests: 0, retries: 0 }, |acc, s| BudgetStats {
            requests: acc.requests + s.requests,
            retries: acc.retries + s.retries,
        })
    }

    /// Counts one original request.
    pub fn record_request(&self) {
        self.with_slots(|slots, index| slots[(index % BUDGET_SLOTS as u64) as usize].requests += 1);
    }

    /// Takes one retry from the budget if `ratio` of the window's requests (or the
    /// per-second floor) leaves room; counts it when it does.
    pub fn try_withdraw(&self, ratio: f64) -> bool {
        let window_secs = (self.slot_len * BUDGET_SLOTS as u32).as_secs_f64();
        let floor = f64::from(self.min_per_sec) * window_secs;
        self.with_slots(|slots, index| {
            let totals = Self::totals(slots, index);
            let allowed = (ratio * totals.requests as f64).max(floor);
            if (totals.retries + 1) as f64 <= allowed {
                slots[(index % BUDGET_SLOTS as u64) as usize].retries += 1;
                true
            } else {
                false
            }
        })
    }

    /// What the window holds now.
    pub fn stats(&self) -> BudgetStats {
        self.with_slots(|slots, index| Self::totals(slots, index))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::resilience::clock::ManualClock;
    use crate::resilience::random::{FixedRandom, SeededRandom};

    fn policy(attempts: u32, retry_on: &[&str]) -> RetryPolicy {
        let api = mesh_api::RetryPolicy {
            attempts,
            retry_on: retry_on.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        RetryPolicy::from_api(&api).expect("valid policy")
    }

    #[test]
    fn retries_only_listed_conditions_up_to_attempts() {
        let clock = ManualClock::new();
        let budget = RetryBudget::with_defaults(clock);
        let p = policy(3, &["connect-failure", "503"]);
        let rng = FixedRandom(0.5);
        let mut state = p.start(&budget);
        assert_eq!(
            state.on_failure(FailureKind::Reset, true, &rng),
            RetryDecision::GiveUp(GiveUp::NotRetryable)
        );
        assert_eq!(
            state.on_failure(FailureKind::HttpStatus(500), true, &rng),
            RetryDecision::GiveUp(GiveUp::NotRetryable)
        );
        assert!(matches!(
            state.on_failure(FailureKind::ConnectFailure, true, &rng),
            RetryDecision::Retry { .. }
        ));
        assert!(matches!(
            state.on_failure(FailureKind::HttpStatus(503), true, &rng),
            RetryDecision::Retry { .. }
        ));
        assert_eq!(state.attempts(), 3);
        assert_eq!(
            state.on_failure(FailureKind::ConnectFailure, true, &rng),
            RetryDecision::GiveUp(GiveUp::AttemptsExhausted)
        );
        let mut other = p.start(&budget);
        assert_eq!(
            other.on_failure(FailureKind::ConnectFailure, false, &rng),
            RetryDecision::GiveUp(GiveUp::NotReplayable)
        );
    }

    #[test]
    fn zero_or_one_attempt_disables_and_unknown_condition_is_an_error() {
        assert!(!policy(0, &["reset"]).retries(FailureKind::Reset));
        assert!(!policy(1, &["reset"]).retries(FailureKind::Reset));
        assert!(policy(2, &["reset"]).retries(FailureKind::Reset));
        assert!(policy(2, &["unavailable"]).retries(FailureKind::GrpcUnavailable));
        let api = mesh_api::RetryPolicy { retry_on: vec!["5xx".into()], ..Default::default() };
        assert_eq!(RetryPolicy::from_api(&api), Err(ConfigError::UnknownRetryCondition("5xx".into())));
        let api = mesh_api::RetryPolicy { budget_ratio: 2.0, ..Default::default() };
        assert!(RetryPolicy::from_api(&api).is_err());
    }

    #[test]
    fn per_try_timeout_makes_timeouts_retryable() {
        let mut p = policy(2, &["reset"]);
        assert!(!p.retries(FailureKind::Timeout));
        p.per_try_timeout = Some(Duration::from_millis(100));
        assert!(p.retries(FailureKind::Timeout));
    }

    #[test]
    fn backoff_grows_exponentially_to_the_cap() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let top = FixedRandom(1.0);
        let near = |d: Duration, ms: f64| (d.as_secs_f64() * 1000.0 - ms).abs() < 0.01;
        assert!(near(p.backoff(0, &top), 10.0));
        assert!(near(p.backoff(1, &top), 20.0));
        assert!(near(p.backoff(3, &top), 80.0));
        assert!(near(p.backoff(4, &top), 100.0));
        assert!(near(p.backoff(40, &top), 100.0), "huge retry counts do not overflow");
        assert_eq!(p.backoff(2, &FixedRandom(0.0)), Duration::ZERO);
    }

    proptest! {
        #[test]
        fn backoff_is_within_full_jitter_bounds(retry in 0u32..64, seed: u64) {
            let p = RetryPolicy::default();
            let rng = SeededRandom::new(seed);
            let d = p.backoff(retry, &*rng);
            let ceiling = p.backoff_base.saturating_mul(1u32 << retry.min(31)).min(p.backoff_max);
            prop_assert!(d <= ceiling);
        }
    }

    #[test]
    fn budget_caps_retries_at_ratio_of_requests() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(clock.clone(), Duration::from_secs(10), 0);
        let mut granted = 0;
        for _ in 0..1000 {
            budget.record_request();
            if budget.try_withdraw(0.2) {
                granted += 1;
            }
            clock.advance(Duration::from_millis(5));
        }
        assert_eq!(granted, 200);
        assert_eq!(budget.stats(), BudgetStats { requests: 1000, retries: 200 });
    }

    #[test]
    fn budget_window_slides_and_floor_allows_low_traffic_retries() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(clock.clone(), Duration::from_secs(10), 1);
        // No requests at all: the floor still allows 1/s over 10 s.
        let granted = (0..50).filter(|_| budget.try_withdraw(0.2)).count();
        assert_eq!(granted, 10);
        // After the window has passed, the old retries no longer count.
        clock.advance(Duration::from_secs(10));
        assert_eq!(budget.stats().retries, 0);
        assert!(budget.try_withdraw(0.2));
    }

    #[test]
    fn exhausted_budget_stops_retries() {
        let clock = ManualClock::new();
        let budget = RetryBudget::new(clock, Duration::from_secs(10), 0);
        let p = policy(5, &["reset"]);
        let rng = SeededRandom::new(1);
        let mut outcomes = Vec::new();
        for _ in 0..10 {
            let mut state = p.start(&budget);
            outcomes.push(state.on_failure(FailureKind::Reset, true, &*rng));
        }
        let retried = outcomes.iter().filter(|d| matches!(d, RetryDecision::Retry { .. })).count();
        assert_eq!(retried, 2, "20 % of 10 requests");
        assert!(outcomes.contains(&RetryDecision::GiveUp(GiveUp::BudgetExhausted)));
    }

    #[test]
    fn replayable_only_with_a_buffered_or_absent_body() {
        assert!(is_replayable("GET", BodyLength::Empty, 0));
        assert!(is_replayable("POST", BodyLength::Known(1024), 64 * 1024));
        assert!(!is_replayable("POST", BodyLength::Known(1 << 20), 64 * 1024));
        assert!(!is_replayable("POST", BodyLength::Unknown, 64 * 1024));
        assert!(!is_replayable("connect", BodyLength::Empty, 64 * 1024));
    }
}
