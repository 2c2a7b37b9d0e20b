//! Locality preference: same zone, then same region, then anywhere.
//!
//! When the policy is locality-aware, the balancer is built as tiers, each a full
//! instance of the algorithm over a subset: one per zone, one per region, one over all
//! endpoints. A pick with a known caller locality tries the caller's zone tier, then its
//! region tier, then the global tier; a tier answers `None` when none of its endpoints
//! can take the request, which is what moves the pick outward. Without locality
//! awareness, or without a caller locality, only the global tier is used.
//!
//! This is strict preference: one available endpoint in the caller's zone takes all of
//! the zone's traffic. Spreading by tier capacity (as Envoy's locality weighting does)
//! is left for when the control plane sends capacities.

use std::collections::HashMap;
use std::sync::Arc;

use super::endpoint::{Endpoint, EndpointSet};
use super::guard::PickGuard;
use super::slow_start::SlowStart;
use super::{Balancer, LbConfig, Member, PickContext, Pool, Strategy};

/// The tiers of one region.
#[derive(Debug)]
struct RegionTier<S> {
    zones: HashMap<String, S>,
    /// `None` when the region has a single zone (its zone tier is the whole region).
    all: Option<S>,
}

/// A region's members, and its members by zone.
type RegionMembers<'a> = (Vec<Member>, HashMap<&'a str, Vec<Member>>);

/// An algorithm `S` arranged in locality tiers (see the module documentation).
#[derive(Debug)]
pub(crate) struct Tiered<S> {
    pool: Pool,
    global: S,
    regions: HashMap<String, RegionTier<S>>,
}

/// The members of a set: weight-0 endpoints are left out unless all weights are 0, in
/// which case every endpoint counts with weight 1.
fn members(endpoints: &[Arc<Endpoint>]) -> Vec<Member> {
    let all_zero = endpoints.iter().all(|e| e.weight() == 0);
    endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let weight = if all_zero { 1 } else { e.weight() };
            let index = u32::try_from(i).ok()?;
            (weight > 0).then_some(Member { index, weight })
        })
        .collect()
}

impl<S: Strategy> Tiered<S> {
    /// Builds every tier of `S` over `set`'s endpoints.
    pub(crate) fn build(config: &LbConfig, set: &EndpointSet) -> Self {
        let shared = set.shared();
        let pool = Pool {
            endpoints: set.endpoints().to_vec().into_boxed_slice(),
            slow_start: SlowStart::new(config.slow_start),
            random: shared.random.clone(),
            clock: shared.clock.clone(),
        };
        let all = members(&pool.endpoints);
        let mut regions = HashMap::new();
        if config.locality_aware {
            let mut grouped: HashMap<&str, RegionMembers<'_>> = HashMap::new();
            for m in &all {
                let locality = pool.endpoint(m.index).locality();
                if !locality.is_known() {
                    continue;
                }
                let (region, zones) = grouped.entry(locality.region.as_str()).or_default();
                region.push(*m);
                if !locality.zone.is_empty() {
                    zones.entry(locality.zone.as_str()).or_default().push(*m);
                }
            }
            for (region, (region_members, zones)) in grouped {
                let single_zone = zones.len() == 1 && zones.values().all(|z| z.len() == region_members.len());
                let all = (!single_zone).then(|| S::build(&pool, region_members, config));
                let zones =
                    zones.into_iter().map(|(z, m)| (z.to_owned(), S::build(&pool, m, config))).collect();
                regions.insert(region.to_owned(), RegionTier { zones, all });
            }
        }
        let global = S::build(&pool, all, config);
        Tiered { pool, global, regions }
    }
}

impl<S: Strategy> Balancer for Tiered<S> {
    fn pick(&self, ctx: &PickContext<'_>) -> Option<PickGuard> {
        if let Some(locality) = ctx.locality
            && let Some(region) = self.regions.get(locality.region.as_str())
        {
            if let Some(zone) = region.zones.get(locality.zone.as_str())
                && let Some(guard) = zone.pick(&self.pool, ctx)
            {
                return Some(guard);
            }
            if let Some(all) = &region.all
                && let Some(guard) = all.pick(&self.pool, ctx)
            {
                return Some(guard);
            }
        }
        self.global.pick(&self.pool, ctx)
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.pool.endpoints
    }
}
