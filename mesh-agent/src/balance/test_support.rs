//! Helpers for the balancer tests.

use std::net::SocketAddr;
use std::sync::Arc;

use super::endpoint::{EndpointSet, EndpointSpec, Locality};
use crate::observe::labels::MeshName;
use crate::resilience::breaker::BreakerConfig;
use crate::resilience::clock::ManualClock;
use crate::resilience::outlier::OutlierConfig;
use crate::resilience::random::SeededRandom;

/// The address of test endpoint `n`.
pub(crate) fn addr(n: u32) -> SocketAddr {
    let [_, b, c, d] = n.to_be_bytes();
    SocketAddr::from(([10, b, c, d], 8080))
}

/// A healthy endpoint `n` with `weight`, in no particular locality.
pub(crate) fn spec(n: u32, weight: u32) -> EndpointSpec {
    EndpointSpec { addr: addr(n), weight, locality: Locality::default(), healthy: true }
}

/// A set with a manual clock, a seeded random source, and breakers and outlier
/// detection at their defaults, already holding `specs`.
pub(crate) fn set_with(specs: Vec<EndpointSpec>) -> (Arc<ManualClock>, EndpointSet) {
    set_with_config(specs, BreakerConfig::default(), OutlierConfig::default())
}

pub(crate) fn set_with_config(
    specs: Vec<EndpointSpec>,
    breaker: BreakerConfig,
    outlier: OutlierConfig,
) -> (Arc<ManualClock>, EndpointSet) {
    let clock = ManualClock::new();
    let mut set = EndpointSet::new(
        MeshName::known("test/service"),
        clock.clone(),
        SeededRandom::new(42),
        breaker,
        outlier,
    );
    set.update(specs);
    (clock, set)
}

/// How many of `picks` picks (hash keys 0..picks) each endpoint address got.
pub(crate) fn tally(
    balancer: &dyn super::Balancer,
    picks: u64,
) -> std::collections::HashMap<SocketAddr, u64> {
    let mut counts = std::collections::HashMap::new();
    for key in 0..picks {
        let ctx = super::PickContext { hash_key: Some(key), locality: None };
        if let Some(guard) = balancer.pick(&ctx) {
            *counts.entry(guard.addr()).or_default() += 1;
        }
    }
    counts
}

/// The endpoint address each hash key in `keys` maps to.
pub(crate) fn mapping(balancer: &dyn super::Balancer, keys: std::ops::Range<u64>) -> Vec<Option<SocketAddr>> {
    keys.map(|key| {
        balancer.pick(&super::PickContext { hash_key: Some(key), locality: None }).map(|g| g.addr())
    })
    .collect()
}
