//! Per-client rate limiting with token buckets.
//!
//! Each client (by identity or IP, see [`ClientKey`]) has a bucket of `burst` tokens that
//! refills at `requests_per_second`; a request takes one token or is answered
//! [`Decision::Limited`] with the time until a token is back, for a 429 with Retry-After.
//! The receiving agent keeps a limiter per service for its workloads, keyed by caller
//! identity ([`crate::inbound::rate_limit`]); the calling agent one per service port
//! for endpoints outside the mesh ([`crate::l7::outbound`]).
//!
//! The key map is bounded so a flood of distinct clients cannot grow memory without
//! limit. It is split into shards (less lock contention), and each shard keeps two
//! generations of buckets: lookups move a bucket from the old generation to the current
//! one, and when the current one is full, or a whole idle period has passed, the old
//! generation is dropped and the current one becomes old. A client therefore keeps its
//! bucket as long as it keeps sending; only clients silent for a full generation lose
//! theirs, and by then their buckets have usually refilled anyway.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::clock::SharedClock;

/// Default cap on the buckets one limiter keeps.
pub const DEFAULT_MAX_CLIENTS: usize = 65_536;
/// Default time after which an unused bucket may be dropped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const SHARDS: usize = 16;

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A verified peer identity (SPIFFE ID).
    Identity(String),
    /// The client's address, when no identity is known.
    Ip(IpAddr),
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allowed,
    /// Refuse (429); a token will be available after `retry_after`.
    Limited {
        /// Time until the client's next token.
        retry_after: Duration,
    },
}

impl Decision {
    /// Whole seconds for an HTTP Retry-After header (rounded up, at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Decision::Allowed => None,
            Decision::Limited { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(secs.max(1))
            }
        }
    }
}

/// A rate-limit policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitConfig {
    /// Token refill rate per client.
    pub requests_per_second: f64,
    /// Bucket size: requests a client may send at once after being idle.
    pub burst: u32,
    /// Most clients tracked at once.
    pub max_clients: usize,
    /// How long a bucket may go unused before it may be dropped.
    pub idle_timeout: Duration,
}

impl RateLimitConfig {
    /// The control plane's policy; `None` when it disables limiting
    /// (`requests_per_second` 0). A zero burst means one second's worth of tokens.
    pub fn from_api(api: &mesh_api::RateLimit) -> Option<Self> {
        if api.requests_per_second == 0 {
            return None;
        }
        Some(RateLimitConfig {
            requests_per_second: f64::from(api.requests_per_second),
            burst: if api.burst == 0 { api.requests_per_second } else { api.burst },
            max_clients: DEFAULT_MAX_CLIENTS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        })
    }
}

/// One client's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

#[derive(Debug)]
struct Shard<K> {
    current: HashMap<K, Bucket>,
    previous: HashMap<K, Bucket>,
    generation_started: Instant,
}

/// Token buckets for many clients in bounded memory (see the module documentation).
#[derive(Debug)]
pub struct RateLimiter<K = ClientKey> {
    config: RateLimitConfig,
    clock: SharedClock,
    hasher: RandomState,
    shard_capacity: usize,
    shards: Box<[Mutex<Shard<K>>]>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter with `config`.
    pub fn new(config: RateLimitConfig, clock: SharedClock) -> Self {
        let now = clock.now();
        // Each shard holds up to two generations of `shard_capacity`.
        let shard_capacity = (config.max_clients / SHARDS / 2).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    current: HashMap::new(),
                    previous: HashMap::new(),
                    generation_started: now,
                })
            })
            .collect();
        RateLimiter { config, clock, hasher: RandomState::new(), shard_capacity, shards }
    }

    /// The policy in force.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Takes a token for `client`'s request, or says how long until one is available.
    pub fn check(&self, client: &K) -> Decision {
        let now = self.clock.now();
        let rate = self.config.requests_per_second.max(f64::MIN_POSITIVE);
        let burst = f64::from(self.config.burst.max(1));
        let shard_index = (self.hasher.hash_one(client) % SHARDS as u64) as usize;
        let mut shard = self.shards[shard_index].lock().unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *shard;

        self.rotate_if_idle(shard, now);
        if !shard.current.contains_key(client) {
            let bucket = shard.previous.remove(client).unwrap_or(Bucket { tokens: burst, refilled_at: now });
            if shard.current.len() >= self.shard_capacity {
                shard.previous = std::mem::take(&mut shard.current);
                shard.generation_started = now;
            }
            shard.current.insert(client.clone(), bucket);
        }
        let Some(bucket) = shard.current.get_mut(client) else {
            return Decision::Allowed;
        };
        let elapsed = now.saturating_duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Decision::Allowed
        } else {
            Decision::Limited { retry_after: Duration::from_secs_f64((1.0 - bucket.tokens) / rate) }
        }
    }

    /// Returns the token a request of `client` took, for a request that another
    /// limit then refused: a request held to several limits takes a token from each
    /// or from none. Nothing happens when the bucket is gone, and a bucket never
    /// holds more than `burst`.
    pub fn give_back(&self, client: &K) {
        let burst = f64::from(self.config.burst.max(1));
        let shard_index = (self.hasher.hash_one(client) % SHARDS as u64) as usize;
        let mut shard = self.shards[shard_index].lock().unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *shard;
        if let Some(bucket) = shard.current.get_mut(client).or_else(|| shard.previous.get_mut(client)) {
            bucket.tokens = (bucket.tokens + 1.0).min(burst);
        }
    }

    fn rotate_if_idle(&self, shard: &mut Shard<K>, now: Instant) {
        if now.saturating_duration_since(shard.generation_started) >= self.config.idle_timeout {
            shard.previous = std::mem::take(&mut shard.current);
            shard.generation_started = now;
        }
    }

    /// Ages every shard whose generation is older than the idle timeout, dropping
    /// buckets unused for a whole generation. Lookups do this for their own shard; call
    /// this periodically so quiet shards release memory too.
    pub fn evict_idle(&self) {
        let now = self.clock.now();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            self.rotate_if_idle(&mut shard, now);
        }
    }

    /// Buckets held now (both generations), for metrics and tests.
    pub fn tracked_clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(PoisonError::into_inner);
                s.current.len() + s.previous.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::resilience::clock::ManualClock;

    fn limiter(rps: u32, burst: u32) -> (Arc<ManualClock>, RateLimiter) {
        let clock = ManualClock::new();
        let config = RateLimitConfig::from_api(&mesh_api::RateLimit { requests_per_second: rps, burst })
            .expect("enabled");
        (clock.clone(), RateLimiter::new(config, clock))
    }

    fn ip(n: u32) -> ClientKey {
        ClientKey::Ip(IpAddr::from(n.to_be_bytes()))
    }

    #[test]
    fn burst_then_limited_with_retry_after_then_refill() {
        let (clock, rl) = limiter(2, 3);
        let me = ip(1);
        for _ in 0..3 {
            assert_eq!(rl.check(&me), Decision::Allowed);
        }
        let limited = rl.check(&me);
        assert_eq!(limited, Decision::Limited { retry_after: Duration::from_millis(500) });
        assert_eq!(limited.retry_after_secs(), Some(1));
        clock.advance(Duration::from_millis(499));
        assert!(matches!(rl.check(&me), Decision::Limited { .. }));
        clock.advance(Duration::from_millis(1));
        assert_eq!(rl.check(&me), Decision::Allowed);
        // Refill never exceeds the burst.
        clock.advance(Duration::from_secs(3600));
        let allowed = (0..10).filter(|_| rl.check(&me) == Decision::Allowed).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn clients_are_limited_independently() {
        let (_clock, rl) = limiter(1, 1);
        assert_eq!(rl.check(&ip(1)), Decision::Allowed);
        assert!(matches!(rl.check(&ip(1)), Decision::Limited { .. }));
        assert_eq!(rl.check(&ip(2)), Decision::Allowed);
        assert_eq!(rl.check(&ClientKey::Identity("spiffe://td/ns/a/sa/b".into())), Decision::Allowed);
    }

    #[test]
    fn identities_have_their_own_buckets() {
        let (_clock, rl) = limiter(1, 2);
        let (frontend, batch) = (
            ClientKey::Identity("spiffe://cluster.local/ns/shop/sa/frontend".into()),
            ClientKey::Identity("spiffe://cluster.local/ns/shop/sa/batch".into()),
        );
        let frontend_again = ClientKey::Identity("spiffe://cluster.local/ns/shop/sa/frontend".into());
        assert_eq!(rl.check(&frontend), Decision::Allowed);
        assert_eq!(rl.check(&frontend_again), Decision::Allowed, "the same identity, wherever it calls from");
        assert!(matches!(rl.check(&frontend), Decision::Limited { .. }), "one bucket for both");
        assert_eq!(rl.check(&batch), Decision::Allowed, "another identity has its own");
        assert_eq!(rl.check(&batch), Decision::Allowed);
        assert!(matches!(rl.check(&batch), Decision::Limited { .. }));
    }

    #[test]
    fn a_token_given_back_is_there_again_but_never_above_the_burst() {
        let (_clock, rl) = limiter(1, 2);
        let me = ip(1);
        assert_eq!(rl.check(&me), Decision::Allowed);
        assert_eq!(rl.check(&me), Decision::Allowed);
        rl.give_back(&me);
        assert_eq!(rl.check(&me), Decision::Allowed);
        assert!(matches!(rl.check(&me), Decision::Limited { .. }));
        for _ in 0..5 {
            rl.give_back(&me);
        }
        let allowed = (0..5).filter(|_| rl.check(&me) == Decision::Allowed).count();
        assert_eq!(allowed, 2, "capped at the burst");
        rl.give_back(&ip(2));
        assert_eq!(rl.tracked_clients(), 1, "giving back to an unknown client makes no bucket");
    }

    #[test]
    fn zero_rate_disables_and_zero_burst_defaults_to_rate() {
        assert!(RateLimitConfig::from_api(&mesh_api::RateLimit::default()).is_none());
        let c = RateLimitConfig::from_api(&mesh_api::RateLimit { requests_per_second: 5, burst: 0 });
        assert_eq!(c.map(|c| c.burst), Some(5));
    }

    #[test]
    fn key_map_stays_bounded_under_a_flood_of_clients() {
        let clock = ManualClock::new();
        let config = RateLimitConfig {
            requests_per_second: 1.0,
            burst: 1,
            max_clients: 320,
            idle_timeout: Duration::from_secs(60),
        };
        let rl = RateLimiter::new(config, clock.clone());
        let heavy = ip(0);
        assert_eq!(rl.check(&heavy), Decision::Allowed);
        for n in 1..20_000 {
            rl.check(&ip(n));
            // The heavy client keeps sending; it must keep its (empty) bucket. Checked
            // every 10 clients: losing a bucket takes two generation turns of its
            // shard (20 newcomers there), which 10 clients cannot cause, whatever
            // the hasher's seed (every 50 could, rarely: the test was flaky).
            if n % 10 == 0 {
                assert!(matches!(rl.check(&heavy), Decision::Limited { .. }), "at client {n}");
            }
        }
        assert!(rl.tracked_clients() <= 320, "{}", rl.tracked_clients());
    }

    #[test]
    fn idle_buckets_are_dropped() {
        let (clock, rl) = limiter(1, 1);
        for n in 0..100 {
            rl.check(&ip(n));
        }
        clock.advance(DEFAULT_IDLE_TIMEOUT);
        rl.evict_idle();
        assert_eq!(rl.tracked_clients(), 100, "one idle period only ages the buckets");
        rl.check(&ip(5));
        clock.advance(DEFAULT_IDLE_TIMEOUT);
        rl.evict_idle();
        assert_eq!(rl.tracked_clients(), 1, "only the client seen in the last period remains");
    }
}
