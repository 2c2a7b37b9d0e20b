//! Endpoint state shared by every balancing algorithm, and the set that keeps it across
//! control-plane updates.
//!
//! An [`Endpoint`] carries what the control plane says (address, weight, locality,
//! health) and what this agent learned from traffic (requests in flight, circuit
//! breaker, outlier ejection, when it became ready for slow start). The learned part
//! must survive snapshot updates, so an [`EndpointSet`] reconciles each new endpoint
//! list by address and keeps the existing `Arc<Endpoint>` where it can.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::Error;
use super::guard::PickGuard;
use crate::observe::labels::MeshName;
use crate::resilience::breaker::{BreakerConfig, BreakerStats, CircuitBreaker};
use crate::resilience::clock::{AtomicInstant, SharedClock};
use crate::resilience::outlier::{OutlierConfig, OutlierDetector, OutlierState};
use crate::resilience::random::SharedRandom;

/// Where an endpoint (or a caller) runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// Region (e.g. "eu-west1"); empty when unknown.
    pub region: String,
    /// Zone within the region (e.g. "eu-west1-b"); empty when unknown.
    pub zone: String,
}

impl Locality {
    /// A locality from its names.
    pub fn new(region: impl Into<String>, zone: impl Into<String>) -> Self {
        Locality { region: region.into(), zone: zone.into() }
    }

    /// Whether the region is known (locality preference needs at least that).
    pub fn is_known(&self) -> bool {
        !self.region.is_empty()
    }
}

/// What the control plane says about one endpoint of one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative weight; 0 means never selected (unless every weight is 0).
    pub weight: u32,
    /// Where it runs.
    pub locality: Locality,
    /// Health according to the control plane.
    pub healthy: bool,
}

impl EndpointSpec {
    /// The spec of `endpoint` for `port` of its service. The target port is, first
    /// found: the endpoint's named port for the service port's name, the endpoint's
    /// port, the service port's target port, the service port itself.
    pub fn from_api(endpoint: &mesh_api::Endpoint, port: &mesh_api::ServicePort) -> Result<Self, Error> {
        let ip: IpAddr =
            endpoint.address.parse().map_err(|_| Error::InvalidAddress(endpoint.address.clone()))?;
        let target =
            [endpoint.named_ports.get(&port.name).copied(), Some(endpoint.port), Some(port.target_port)]
                .into_iter()
                .flatten()
                .find(|p| *p != 0)
                .unwrap_or(port.port);
        let target = u16::try_from(target).map_err(|_| Error::InvalidPort(target))?;
        if target == 0 {
            return Err(Error::InvalidPort(0));
        }
        let locality = endpoint
            .locality
            .as_ref()
            .map(|l| Locality::new(l.region.clone(), l.zone.clone()))
            .unwrap_or_default();
        Ok(EndpointSpec {
            addr: SocketAddr::new(ip, target),
            weight: endpoint.weight,
            locality,
            healthy: endpoint.health() != mesh_api::Health::Unhealthy,
        })
    }
}

/// What every endpoint of one set shares: the service it belongs to (the label of its
/// metrics), the clock, randomness and the set's outlier detector (whose ejection cap
/// is a share of the set).
#[derive(Debug)]
pub(crate) struct SetShared {
    pub(crate) service: MeshName,
    pub(crate) clock: SharedClock,
    pub(crate) random: SharedRandom,
    pub(crate) outlier: OutlierDetector,
}

/// One endpoint and everything the agent knows about it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    locality: Locality,
    weight: AtomicU32,
    healthy: AtomicBool,
    in_flight: AtomicU64,
    /// When it was added or last became healthy; cleared once slow start is over.
    ready_since: AtomicInstant,
    breaker: CircuitBreaker,
    outlier: OutlierState,
    pub(crate) set: Arc<SetShared>,
}

/// An endpoint's state for metrics and the admin page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    /// Its address.
    pub addr: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Health according to the control plane.
    pub healthy: bool,
    /// Requests in flight through this agent.
    pub in_flight: u64,
    /// Whether outlier detection has it ejected now.
    pub ejected: bool,
    /// How many times it has been ejected.
    pub times_ejected: u32,
    /// Its circuit breaker.
    pub breaker: BreakerStats,
}

impl Endpoint {
    fn new(spec: EndpointSpec, breaker: &BreakerConfig, set: &Arc<SetShared>, ramp: bool) -> Self {
        let ready_since = if ramp { AtomicInstant::new(set.clock.now()) } else { AtomicInstant::unset() };
        Endpoint {
            addr: spec.addr,
            locality: spec.locality,
            weight: AtomicU32::new(spec.weight),
            healthy: AtomicBool::new(spec.healthy),
            in_flight: AtomicU64::new(0),
            ready_since,
            breaker: CircuitBreaker::new(breaker.clone(), set.clock.clone(), set.random.clone()),
            outlier: OutlierState::new(),
            set: set.clone(),
        }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it runs.
    pub fn locality(&self) -> &Locality {
        &self.locality
    }

    /// Its weight as last set by the control plane.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Health according to the control plane.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sets the control plane's health verdict; becoming healthy starts a slow-start ramp.
    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::AcqRel);
        if healthy && !was {
            self.ready_since.store(self.set.clock.now());
        }
    }

    /// Requests in flight through this agent.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Its circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Its outlier-ejection bookkeeping.
    pub fn outlier(&self) -> &OutlierState {
        &self.outlier
    }

    /// Whether outlier detection has it ejected now.
    pub fn is_ejected(&self) -> bool {
        self.set.outlier.is_ejected(&self.outlier)
    }

    /// When its slow-start ramp began, while it is still ramping (or until a pick
    /// notices the ramp is over).
    pub fn ramping_since(&self) -> Option<Instant> {
        self.ready_since.load()
    }

    pub(crate) fn ready_since(&self) -> &AtomicInstant {
        &self.ready_since
    }

    /// Whether a balancer may pick it now: healthy, not ejected, breaker admitting.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_ejected() && self.breaker.would_admit()
    }

    /// Claims the endpoint for one request: checks availability, takes a breaker
    /// admission and counts the request in flight until the guard drops.
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<PickGuard> {
        if !self.is_healthy() || self.is_ejected() {
            return None;
        }
        let admission = self.breaker.try_acquire()?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(PickGuard::new(self.clone(), admission))
    }

    pub(crate) fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Its state for metrics and the admin page.
    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            addr: self.addr,
            weight: self.weight(),
            healthy: self.is_healthy(),
            in_flight: self.in_flight(),
            ejected: self.is_ejected(),
            times_ejected: self.outlier.times_ejected(),
            breaker: self.breaker.stats(),
        }
    }
}

/// One service port's endpoints, kept across control-plane updates.
///
/// Build a balancer over it with [`super::build`] after each [`EndpointSet::update`].
/// The breaker and outlier policies are fixed for the set's life: when the control
/// plane changes them, make a new set (breaker and ejection state start over).
#[derive(Debug)]
pub struct EndpointSet {
    shared: Arc<SetShared>,
    breaker: BreakerConfig,
    endpoints: Vec<Arc<Endpoint>>,
    updated: bool,
}

impl EndpointSet {
    /// An empty set of `service`'s endpoints.
    pub fn new(
        service: MeshName,
        clock: SharedClock,
        random: SharedRandom,
        breaker: BreakerConfig,
        outlier: OutlierConfig,
    ) -> Self {
        let detector = OutlierDetector::new(outlier, clock.clone(), 0);
        EndpointSet {
            shared: Arc::new(SetShared { service, clock, random, outlier: detector }),
            breaker,
            endpoints: Vec::new(),
            updated: false,
        }
    }

    /// Replaces the endpoint list. Endpoints whose address (and locality) are unchanged
    /// keep their state; weight and health are updated in place. Endpoints added after
    /// the first update start a slow-start ramp (the first list is the steady state, not
    /// a wave of newcomers). Duplicate addresses keep the first entry.
    pub fn update(&mut self, specs: impl IntoIterator<Item = EndpointSpec>) {
        let mut old: HashMap<SocketAddr, Arc<Endpoint>> =
            self.endpoints.drain(..).map(|e| (e.addr, e)).collect();
        let mut seen = std::collections::HashSet::new();
        for spec in specs {
            if !seen.insert(spec.addr) {
                continue;
            }
            let endpoint = match old.remove(&spec.addr) {
                Some(existing) if existing.locality == spec.locality => {
                    existing.weight.store(spec.weight, Ordering::Relaxed);
                    existing.set_healthy(spec.healthy);
                    existing
                }
                _ => Arc::new(Endpoint::new(spec, &self.breaker, &self.shared, self.updated)),
            };
            self.endpoints.push(endpoint);
        }
        self.updated = true;
        self.shared.outlier.set_size(self.endpoints.len());
    }

    /// The endpoints, in the order of the last update.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The set's outlier detector (for its counters).
    pub fn outlier_detector(&self) -> &OutlierDetector {
        &self.shared.outlier
    }

    /// A view of the endpoints `keep` selects, for a balancer over a route's subset:
    /// the same endpoints (state and all), not copies.
    pub fn subset(&self, keep: impl Fn(SocketAddr) -> bool) -> EndpointSet {
        EndpointSet {
            shared: self.shared.clone(),
            breaker: self.breaker.clone(),
            endpoints: self.endpoints.iter().filter(|e| keep(e.addr)).cloned().collect(),
            updated: self.updated,
        }
    }

    pub(crate) fn shared(&self) -> &Arc<SetShared> {
        &self.shared
    }
}
