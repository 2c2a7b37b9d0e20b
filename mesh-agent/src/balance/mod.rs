//! Load balancing: choosing one endpoint of a service for each request (HTTP) or
//! connection (TCP).
//!
//! The control plane's [`mesh_api::LoadBalancer`] policy becomes an [`LbConfig`];
//! [`build`] turns it and an [`EndpointSet`] into a [`Balancer`] whose
//! [`Balancer::pick`] returns a [`PickGuard`] for the chosen endpoint, or `None` when no
//! endpoint can take the request (the proxy answers 503 or refuses the connection).
//!
//! Every algorithm:
//! - skips endpoints that are unhealthy (control plane), ejected (outlier detection) or
//!   whose circuit breaker refuses;
//! - when the policy is locality-aware and the caller's locality is known, picks among
//!   the caller's zone first, then its region, then everything (see [`locality`]);
//! - leaves out weight-0 endpoints, unless every weight is 0, in which case all count
//!   equally;
//! - does its preparation when the balancer is built (index lists, rings, tables), so
//!   a pick allocates nothing and takes no lock, except smooth weighted round robin's
//!   short lock around its running weights.
//!
//! Algorithms: [`round_robin`], [`least_request`] (power of two choices),
//! [`weighted`] (smooth weighted round robin), [`ring_hash`], [`maglev`], [`random`];
//! [`slow_start`] says how each ramps up new endpoints.
//!
//! On each control-plane update: [`EndpointSet::update`] with the new endpoints (their
//! breaker, ejection and in-flight state carries over), then [`build`] a new balancer
//! and swap it in; guards from the old balancer stay valid.

pub mod endpoint;
pub mod guard;
pub mod hash;
pub mod least_request;
pub mod locality;
pub mod maglev;
pub mod random;
pub mod ring_hash;
pub mod round_robin;
pub mod service;
pub mod slow_start;
pub mod weighted;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

pub use endpoint::{Endpoint, EndpointSet, EndpointSpec, EndpointStats, Locality};
pub use guard::PickGuard;

use crate::resilience::clock::{LazyNow, SharedClock};
use crate::resilience::random::SharedRandom;
use slow_start::SlowStart;

/// A load-balancing policy or endpoint the agent cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The policy names an algorithm this agent does not know.
    #[error("unknown load-balancing algorithm {0}")]
    UnknownAlgorithm(i32),
    /// An endpoint address is not an IP literal.
    #[error("endpoint address {0:?} is not an IP address")]
    InvalidAddress(String),
    /// An endpoint port is 0 or above 65535.
    #[error("endpoint port {0} is out of range")]
    InvalidPort(u32),
    /// A ring-hash policy asks for more virtual nodes per endpoint than the ring may hold.
    #[error("virtual_nodes {0} is over the limit of {max}", max = mesh_api::limits::MAX_VIRTUAL_NODES)]
    TooManyVirtualNodes(u32),
}

/// Which algorithm picks endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Each endpoint in turn.
    RoundRobin,
    /// The less loaded of two random endpoints.
    LeastRequest,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Consistent hashing on a ring of virtual nodes.
    RingHash,
    /// Consistent hashing with a Maglev lookup table.
    Maglev,
    /// Uniformly at random.
    Random,
}

/// Where the proxy takes the consistent-hash key from (it computes the key and passes
/// it in [`PickContext::hash_key`]; see [`hash::hash_bytes`] and [`hash::hash_ip`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKeySource {
    /// A request header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceAddress,
}

/// Virtual nodes per endpoint on a hash ring when the policy says 0.
pub const DEFAULT_VIRTUAL_NODES: u32 = 150;
/// Maglev lookup-table size (prime, and far above any endpoint count we expect).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65_537;

/// A service's load-balancing policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Where the hash key comes from (ring hash and Maglev).
    pub hash_key: Option<HashKeySource>,
    /// Ring-hash virtual nodes per endpoint.
    pub virtual_nodes: u32,
    /// Maglev table size; rounded up to a prime.
    pub maglev_table_size: u32,
    /// Ramp-up window for new or recovered endpoints; zero disables slow start.
    pub slow_start: Duration,
    /// Prefer the caller's zone, then region.
    pub locality_aware: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            algorithm: Algorithm::RoundRobin,
            hash_key: None,
            virtual_nodes: DEFAULT_VIRTUAL_NODES,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            slow_start: Duration::ZERO,
            locality_aware: false,
        }
    }
}

impl LbConfig {
    /// A default policy with `algorithm`.
    pub fn with_algorithm(algorithm: Algorithm) -> Self {
        LbConfig { algorithm, ..LbConfig::default() }
    }

    /// The control plane's policy, with defaults for zero fields.
    pub fn from_api(api: &mesh_api::LoadBalancer) -> Result<Self, Error> {
        use mesh_api::hash_key::Source;
        let algorithm = match mesh_api::Algorithm::try_from(api.algorithm) {
            Ok(mesh_api::Algorithm::RoundRobin) => Algorithm::RoundRobin,
            Ok(mesh_api::Algorithm::LeastRequest) => Algorithm::LeastRequest,
            Ok(mesh_api::Algorithm::WeightedRoundRobin) => Algorithm::WeightedRoundRobin,
            Ok(mesh_api::Algorithm::RingHash) => Algorithm::RingHash,
            Ok(mesh_api::Algorithm::Maglev) => Algorithm::Maglev,
            Ok(mesh_api::Algorithm::Random) => Algorithm::Random,
            Err(_) => return Err(Error::UnknownAlgorithm(api.algorithm)),
        };
        if api.virtual_nodes > mesh_api::limits::MAX_VIRTUAL_NODES {
            return Err(Error::TooManyVirtualNodes(api.virtual_nodes));
        }
        let hash_key = api.hash_key.as_ref().and_then(|k| k.source.as_ref()).and_then(|s| match s {
            Source::Header(name) => Some(HashKeySource::Header(name.clone())),
            Source::Cookie(name) => Some(HashKeySource::Cookie(name.clone())),
            Source::SourceAddress(true) => Some(HashKeySource::SourceAddress),
            Source::SourceAddress(false) => None,
        });
        Ok(LbConfig {
            algorithm,
            hash_key,
            virtual_nodes: if api.virtual_nodes == 0 { DEFAULT_VIRTUAL_NODES } else { api.virtual_nodes },
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            slow_start: Duration::from_millis(api.slow_start_ms.into()),
            locality_aware: api.locality_aware,
        })
    }
}

/// What the caller knows about a request that may steer the pick.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext<'a> {
    /// The consistent-hash key (ring hash, Maglev). Without one those algorithms pick a
    /// random point, i.e. behave as random balancing.
    pub hash_key: Option<u64>,
    /// The caller's locality, for locality-aware policies.
    pub locality: Option<&'a Locality>,
}

/// Chooses endpoints for one service port.
pub trait Balancer: Send + Sync + Debug {
    /// Picks an endpoint and claims it for one request; `None` when no endpoint is
    /// available.
    fn pick(&self, ctx: &PickContext<'_>) -> Option<PickGuard>;

    /// The endpoints this balancer was built over.
    fn endpoints(&self) -> &[Arc<Endpoint>];
}

/// Builds the balancer `config` asks for over `set`'s current endpoints.
pub fn build(config: &LbConfig, set: &EndpointSet) -> Arc<dyn Balancer> {
    match config.algorithm {
        Algorithm::RoundRobin => Arc::new(locality::Tiered::<round_robin::RoundRobin>::build(config, set)),
        Algorithm::LeastRequest => {
            Arc::new(locality::Tiered::<least_request::LeastRequest>::build(config, set))
        }
        Algorithm::WeightedRoundRobin => {
            Arc::new(locality::Tiered::<weighted::SmoothWeighted>::build(config, set))
        }
        Algorithm::RingHash => Arc::new(locality::Tiered::<ring_hash::RingHash>::build(config, set)),
        Algorithm::Maglev => Arc::new(locality::Tiered::<maglev::Maglev>::build(config, set)),
        Algorithm::Random => Arc::new(locality::Tiered::<random::Random>::build(config, set)),
    }
}

/// An endpoint an algorithm may choose, with its static weight (already adjusted for
/// the all-zero rule, so never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    /// Index into [`Pool::endpoints`].
    pub(crate) index: u32,
    pub(crate) weight: u32,
}

/// The endpoints a balancer was built over and the services its algorithms share.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) endpoints: Box<[Arc<Endpoint>]>,
    pub(crate) slow_start: SlowStart,
    pub(crate) random: SharedRandom,
    pub(crate) clock: SharedClock,
}

impl Pool {
    pub(crate) fn endpoint(&self, index: u32) -> &Arc<Endpoint> {
        &self.endpoints[index as usize]
    }

    pub(crate) fn available(&self, index: u32) -> bool {
        self.endpoint(index).is_available()
    }

    pub(crate) fn admit(&self, index: u32) -> Option<PickGuard> {
        self.endpoint(index).try_admit()
    }

    /// Slow-start weight factor in thousandths (1000 = full weight).
    pub(crate) fn factor(&self, index: u32, now: &LazyNow<'_>) -> u32 {
        self.slow_start.factor_milli(self.endpoint(index), now)
    }

    /// For unweighted algorithms: whether to pass over a ramping endpoint this time,
    /// with probability one minus its slow-start factor.
    pub(crate) fn ramp_skip(&self, index: u32, now: &LazyNow<'_>) -> bool {
        let factor = self.factor(index, now);
        factor < slow_start::FULL && self.random.below(u64::from(slow_start::FULL)) >= u64::from(factor)
    }

    /// Admits the first endpoint along a hash ring's `walk` that is available and takes
    /// the request. Neighbouring points (or table slots) often share an endpoint; each
    /// run of one is tried once.
    pub(crate) fn first_on_ring(&self, walk: impl Iterator<Item = u32>) -> Option<PickGuard> {
        let mut last = None;
        for index in walk {
            if last == Some(index) {
                continue;
            }
            last = Some(index);
            if self.available(index)
                && let Some(guard) = self.admit(index)
            {
                return Some(guard);
            }
        }
        None
    }

    /// Admits the first endpoint that takes the request, walking `members` from `start`
    /// round the end. Ramping endpoints are passed over once with their slow-start odds
    /// and come back only if nothing else is available.
    pub(crate) fn scan(&self, members: &[Member], start: usize) -> Option<PickGuard> {
        let len = members.len();
        if len == 0 {
            return None;
        }
        let now = LazyNow::new(&*self.clock);
        let mut deferred = None;
        let mut at = start % len;
        for _ in 0..len {
            let index = members[at].index;
            at += 1;
            if at == len {
                at = 0;
            }
            if !self.available(index) {
                continue;
            }
            if self.ramp_skip(index, &now) {
                deferred.get_or_insert(index);
                continue;
            }
            if let Some(guard) = self.admit(index) {
                return Some(guard);
            }
        }
        deferred.and_then(|index| self.admit(index))
    }
}

/// One algorithm over one group of members (a locality tier).
pub(crate) trait Strategy: Send + Sync + Debug + Sized + 'static {
    /// Prepares everything a pick needs.
    fn build(pool: &Pool, members: Vec<Member>, config: &LbConfig) -> Self;

    /// Picks and admits an endpoint, or `None` when none of the members is available.
    fn pick(&self, pool: &Pool, ctx: &PickContext<'_>) -> Option<PickGuard>;
}

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
