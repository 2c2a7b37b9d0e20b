//! Per-service balancing state: the control plane's policy for a service port,
//! parsed once per snapshot, and the balancer built over its endpoints.
//!
//! A snapshot replaces the route table wholesale, but what the agent learned from
//! traffic (in-flight counts, breaker state, ejections, the retry budget, rate-limit
//! buckets) must outlive it, or every push would forgive a failing endpoint. So
//! [`Services`] keeps one [`EndpointSet`] per service port across tables and rebuilds
//! only the balancer; the rebuild happens the first time a connection or request
//! meets a newer table, under a short std lock never held across an `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::{Balancer, EndpointSet, EndpointSpec, HashKeySource, LbConfig, Locality, PickContext, PickGuard};
use crate::discovery::table::{Route, RouteTable};
use crate::resilience::breaker::BreakerConfig;
use crate::resilience::clock::{SharedClock, SystemClock};
use crate::resilience::outlier::OutlierConfig;
use crate::resilience::random::{SharedRandom, ThreadRandom};
use crate::resilience::rate_limit::{RateLimitConfig, RateLimiter};
use crate::resilience::retry::{RetryBudget, RetryPolicy};
use crate::routing::{Backend, BackendRef, Routes};

/// A service's policy as the data path applies it, validated when the snapshot is
/// (an invalid field NACKs the whole snapshot, naming the field).
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    pub lb: LbConfig,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    pub outlier: OutlierConfig,
    pub rate_limit: Option<RateLimitConfig>,
    /// Connect timeout to an endpoint; `None` keeps the agent's `--connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// Whole request (all tries, up to the response headers); `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// Idle time after which a pooled upstream connection is closed.
    pub idle_timeout: Option<Duration>,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            lb: LbConfig::default(),
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::disabled(),
            outlier: OutlierConfig::disabled(),
            rate_limit: None,
            connect_timeout: None,
            request_timeout: None,
            idle_timeout: None,
        }
    }
}

fn millis(ms: u32) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms.into()))
}

impl ServicePolicy {
    /// The control plane's policy (absent parts take their defaults). The error names
    /// the policy field at fault.
    pub fn from_api(api: Option<&mesh_api::Policy>) -> Result<Self, String> {
        let Some(api) = api else { return Ok(ServicePolicy::default()) };
        let mut p = ServicePolicy::default();
        if let Some(lb) = &api.load_balancer {
            p.lb = LbConfig::from_api(lb).map_err(|e| format!("load_balancer: {e}"))?;
        }
        if let Some(r) = &api.retries {
            p.retry = RetryPolicy::from_api(r).map_err(|e| e.to_string())?;
        }
        if let Some(b) = &api.circuit_breaker {
            p.breaker = BreakerConfig::from_api(b).map_err(|e| e.to_string())?;
        }
        if let Some(o) = &api.outlier_detection {
            p.outlier = OutlierConfig::from_api(o).map_err(|e| e.to_string())?;
        }
        p.rate_limit = api.rate_limit.as_ref().and_then(RateLimitConfig::from_api);
        if let Some(t) = &api.timeouts {
            p.connect_timeout = millis(t.connect_ms);
            p.request_timeout = millis(t.request_ms);
            p.idle_timeout = millis(t.idle_ms);
        }
        Ok(p)
    }
}

/// Everything the data path needs to send one request or connection to a service
/// port: the route of the current table, its balancer, and the shared retry budget
/// and rate limiter.
#[derive(Debug)]
pub struct ServiceState {
    pub route: Arc<Route>,
    pub policy: Arc<ServicePolicy>,
    balancer: Arc<dyn Balancer>,
    /// The service itself as a route backend: where requests no route takes go.
    pub own: Backend,
    pub routes: Routes,
    pub budget: Arc<RetryBudget>,
    /// The service's rate limit on the calling side, which applies only to endpoints
    /// outside the mesh: meshed ones are limited by their own agent
    /// ([`crate::inbound::rate_limit`]).
    pub rate_limiter: Option<Arc<RateLimiter>>,
    pub random: SharedRandom,
}

impl ServiceState {
    /// Picks and claims an endpoint; `None` when none is available (all unhealthy,
    /// ejected or with an open circuit).
    pub fn pick(&self, hash_key: Option<u64>, locality: Option<&Locality>) -> Option<PickGuard> {
        self.balancer.pick(&PickContext { hash_key, locality })
    }

    /// Claims the endpoint at `addr` itself, for a caller that dialled its address
    /// rather than the service's; `None` when the service has no such endpoint or it
    /// is unavailable (unhealthy, ejected or with an open circuit).
    pub fn claim(&self, addr: SocketAddr) -> Option<PickGuard> {
        self.endpoints().iter().find(|e| e.addr() == addr)?.try_admit()
    }

    /// Where the consistent-hash key comes from, if the policy hashes.
    pub fn hash_key_source(&self) -> Option<&HashKeySource> {
        self.policy.lb.hash_key.as_ref()
    }

    /// The balancer's endpoints (with their breaker and ejection state), for admin
    /// and metrics.
    pub fn endpoints(&self) -> &[Arc<super::Endpoint>] {
        self.balancer.endpoints()
    }
}

/// State that must survive snapshot updates, per service port.
#[derive(Debug)]
struct Carried {
    policy: Arc<ServicePolicy>,
    set: EndpointSet,
    budget: Arc<RetryBudget>,
    rate_limiter: Option<Arc<RateLimiter>>,
}

type Key = (Arc<str>, u16);

#[derive(Debug, Default)]
struct Built {
    version: u64,
    /// Identity of the table the states were built from (versions repeat in tests
    /// and across a control-plane restart that reseeds them).
    table: usize,
    states: HashMap<Key, Arc<ServiceState>>,
}

/// Balancing state of every service port, rebuilt lazily per route table.
#[derive(Debug)]
pub struct Services {
    built: ArcSwap<Built>,
    carried: Mutex<HashMap<Key, Carried>>,
    clock: SharedClock,
    random: SharedRandom,
}

impl Default for Services {
    fn default() -> Self {
        Services::new(SystemClock::shared(), ThreadRandom::shared())
    }
}

impl Services {
    /// An empty registry on `clock` and `random` (tests inject theirs).
    pub fn new(clock: SharedClock, random: SharedRandom) -> Self {
        Services {
            built: ArcSwap::from_pointee(Built::default()),
            carried: Mutex::new(HashMap::new()),
            clock,
            random,
        }
    }

    /// The state of `route` (a route of `table`), rebuilding every service's
    /// balancer first if `table` is newer than the last one seen.
    pub fn state(&self, table: &Arc<RouteTable>, route: &Arc<Route>) -> Option<Arc<ServiceState>> {
        let id = Arc::as_ptr(table) as usize;
        let key: Key = (route.service.clone(), route.port);
        let built = self.built.load();
        if built.table == id && built.version == table.version {
            return built.states.get(&key).cloned();
        }
        drop(built);
        self.rebuild(table).states.get(&key).cloned()
    }

    fn rebuild(&self, table: &Arc<RouteTable>) -> Arc<Built> {
        let id = Arc::as_ptr(table) as usize;
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have rebuilt while this one waited for the lock.
        let current = self.built.load_full();
        if current.table == id && current.version == table.version {
            return current;
        }
        let mut defaults = HashMap::with_capacity(table.routes().len());
        let mut keep = HashMap::with_capacity(table.routes().len());
        for route in table.routes() {
            let key: Key = (route.service.clone(), route.port);
            let policy = route.service_policy.clone();
            let mut entry = match carried.remove(&key) {
                // Breaker and outlier settings are fixed for a set's life.
                Some(c) if c.policy.breaker == policy.breaker && c.policy.outlier == policy.outlier => c,
                _ => Carried {
                    policy: policy.clone(),
                    set: EndpointSet::new(
                        crate::observe::labels::MeshName::known(&route.service),
                        self.clock.clone(),
                        self.random.clone(),
                        policy.breaker.clone(),
                        policy.outlier.clone(),
                    ),
                    budget: Arc::new(RetryBudget::with_defaults(self.clock.clone())),
                    rate_limiter: None,
                },
            };
            if entry.rate_limiter.as_ref().map(|l| l.config()) != policy.rate_limit.as_ref() {
                entry.rate_limiter =
                    policy.rate_limit.map(|c| Arc::new(RateLimiter::new(c, self.clock.clone())));
            }
            entry.policy = policy.clone();
            entry.set.update(route.endpoints.iter().map(|e| EndpointSpec {
                addr: e.addr,
                weight: e.weight,
                locality: Locality::new(e.region.clone(), e.zone.clone()),
                healthy: e.healthy,
            }));
            defaults.insert(key.clone(), super::build(&policy.lb, &entry.set));
            keep.insert(key, entry);
        }
        // Routes second: a backend may name any service port of the table.
        let mut states = HashMap::with_capacity(table.routes().len());
        for route in table.routes() {
            let key: Key = (route.service.clone(), route.port);
            let (Some(entry), Some(balancer)) = (keep.get(&key), defaults.get(&key)) else { continue };
            let own = Backend::new(route.clone(), balancer.clone(), 1);
            let lookup = |b: &BackendRef| backend(table, route, b, &keep, &defaults);
            let routes = crate::routing::resolve(route, &own, &lookup);
            states.insert(
                key,
                Arc::new(ServiceState {
                    route: route.clone(),
                    policy: entry.policy.clone(),
                    balancer: balancer.clone(),
                    own,
                    routes,
                    budget: entry.budget.clone(),
                    rate_limiter: entry.rate_limiter.clone(),
                    random: self.random.clone(),
                }),
            );
        }
        *carried = keep;
        let built = Arc::new(Built { version: table.version, table: id, states });
        self.built.store(built.clone());
        built
    }

    /// Every service port's state of the last table seen, for admin and metrics.
    pub fn snapshot(&self) -> Vec<Arc<ServiceState>> {
        self.built.load().states.values().cloned().collect()
    }
}

/// Resolves a route backend of `route` against the table being built: a balancer
/// over the named service port's endpoints in the subset (sharing their state), or
/// why there is none.
fn backend(
    table: &RouteTable,
    route: &Route,
    b: &BackendRef,
    sets: &HashMap<Key, Carried>,
    defaults: &HashMap<Key, Arc<dyn Balancer>>,
) -> Backend {
    let (service, port) = b.target(route);
    let Some(target) = table.service_port(service, port) else {
        return Backend::unknown(
            format!("backend {} is not a known service port", b.describe(route)),
            b.weight,
        );
    };
    let key: Key = (target.service.clone(), target.port);
    let (Some(entry), Some(whole)) = (sets.get(&key), defaults.get(&key)) else {
        return Backend::unknown(format!("backend {} has no balancing state", b.describe(route)), b.weight);
    };
    if b.subset.is_empty() {
        return Backend::new(target.clone(), whole.clone(), b.weight);
    }
    let members: std::collections::HashSet<SocketAddr> =
        target.endpoints.iter().filter(|e| b.selects(&e.labels)).map(|e| e.addr).collect();
    let balancer = super::build(&entry.policy.lb, &entry.set.subset(|a| members.contains(&a)));
    Backend::new(target.clone(), balancer, b.weight)
}

/// One service port's balancing state, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BalancingDump {
    pub service: String,
    pub port: u16,
    pub algorithm: String,
    pub endpoints: Vec<EndpointDump>,
}

/// One endpoint as the balancer sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointDump {
    pub address: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    pub in_flight: u64,
    pub ejected: bool,
    pub times_ejected: u32,
    /// `closed`, `open` or `half-open`.
    pub circuit: &'static str,
    pub circuit_times_opened: u64,
    pub circuit_rejected: u64,
}

impl Services {
    /// Every service port's balancer and endpoint state (breaker, ejection, load),
    /// sorted by service and port.
    pub fn dump(&self) -> Vec<BalancingDump> {
        let mut out: Vec<BalancingDump> = self
            .snapshot()
            .iter()
            .map(|s| BalancingDump {
                service: s.route.service.to_string(),
                port: s.route.port,
                algorithm: format!("{:?}", s.policy.lb.algorithm),
                endpoints: s
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let st = e.stats();
                        EndpointDump {
                            address: st.addr,
                            weight: st.weight,
                            healthy: st.healthy,
                            in_flight: st.in_flight,
                            ejected: st.ejected,
                            times_ejected: st.times_ejected,
                            circuit: st.breaker.state.as_str(),
                            circuit_times_opened: st.breaker.times_opened,
                            circuit_rejected: st.breaker.rejected,
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
        out
    }

    /// Publishes every endpoint's circuit-breaker state as a gauge.
    pub fn publish_metrics(&self) {
        use crate::observe::{labels::MeshName, metrics};
        for s in self.snapshot() {
            let service = MeshName::known(&s.route.service);
            for e in s.endpoints() {
                let state = match e.breaker().state() {
                    crate::resilience::breaker::BreakerState::Closed => metrics::BreakerState::Closed,
                    crate::resilience::breaker::BreakerState::Open => metrics::BreakerState::Open,
                    crate::resilience::breaker::BreakerState::HalfOpen => metrics::BreakerState::HalfOpen,
                };
                metrics::set_circuit_breaker_state(&service, &MeshName::known(&e.addr().to_string()), state);
            }
        }
    }
}

/// An endpoint's address as its route lists it, for the meshed details (identity,
/// agent) of a picked endpoint.
pub fn target_of(route: &Route, addr: SocketAddr) -> Option<&crate::discovery::table::EndpointTarget> {
    route.endpoint(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api as api;

    fn snapshot(endpoints: &[&str], policy: Option<api::Policy>) -> api::Snapshot {
        api::Snapshot {
            services: vec![api::Service {
                name: "web".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".into()],
                ports: vec![api::ServicePort { name: "http".into(), port: 80, ..Default::default() }],
                endpoints: endpoints
                    .iter()
                    .map(|a| api::Endpoint {
                        address: (*a).into(),
                        port: 8080,
                        weight: 1,
                        ..Default::default()
                    })
                    .collect(),
                policy,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn table(version: u64, s: &api::Snapshot) -> Arc<RouteTable> {
        Arc::new(RouteTable::build(version, s, 1000).unwrap())
    }

    fn vip() -> SocketAddr {
        "10.96.0.10:80".parse().unwrap()
    }

    #[test]
    fn round_robin_gives_each_endpoint_one_of_n_requests() {
        let services = Services::default();
        let t = table(1, &snapshot(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], None));
        let state = services.state(&t, t.by_addr(vip()).unwrap()).unwrap();
        let mut seen: Vec<SocketAddr> = (0..3).map(|_| state.pick(None, None).unwrap().addr()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "3 requests over 3 endpoints must hit each once");
    }

    #[test]
    fn unhealthy_endpoints_are_never_picked_and_none_left_means_none() {
        let services = Services::default();
        let mut s = snapshot(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], None);
        s.services[0].endpoints[1].health = api::Health::Unhealthy as i32;
        let t = table(1, &s);
        let state = services.state(&t, t.by_addr(vip()).unwrap()).unwrap();
        let unhealthy: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        for _ in 0..10 {
            assert_ne!(state.pick(None, None).unwrap().addr(), unhealthy);
        }
        for e in &mut s.services[0].endpoints {
            e.health = api::Health::Unhealthy as i32;
        }
        let t = table(2, &s);
        let state = services.state(&t, t.by_addr(vip()).unwrap()).unwrap();
        assert!(state.pick(None, None).is_none(), "no healthy endpoint: nothing to pick");
    }

    #[test]
    fn endpoint_state_survives_a_new_snapshot() {
        let services = Services::default();
        let s = snapshot(&["10.0.0.1", "10.0.0.2"], None);
        let t1 = table(1, &s);
        let a = services.state(&t1, t1.by_addr(vip()).unwrap()).unwrap();
        let guard = a.pick(None, None).unwrap();
        let t2 = table(2, &s);
        let b = services.state(&t2, t2.by_addr(vip()).unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&a, &b), "a newer table rebuilds the balancer");
        let ep = b.endpoints().iter().find(|e| e.addr() == guard.addr()).unwrap();
        assert_eq!(ep.in_flight(), 1, "in-flight count carried over to the new balancer");
        drop(guard);
        assert_eq!(ep.in_flight(), 0);
        assert!(Arc::ptr_eq(&b.budget, &a.budget), "the retry budget carries over");
    }

    #[test]
    fn each_ejection_counts_once_for_its_service() {
        use crate::resilience::clock::ManualClock;
        use crate::resilience::outcome::{FailureKind, Outcome};
        use crate::resilience::random::SeededRandom;

        let policy = api::Policy {
            outlier_detection: Some(api::OutlierDetection {
                enabled: true,
                consecutive_failures: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let clock = ManualClock::new();
        let services = Services::new(clock.clone(), SeededRandom::new(7));
        let t = table(1, &snapshot(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], Some(policy)));
        let state = services.state(&t, t.by_addr(vip()).unwrap()).unwrap();
        let bad: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let endpoint = state.endpoints().iter().find(|e| e.addr() == bad).unwrap().clone();
        // Only the bad endpoint fails; the others answer, so nothing else is ejected.
        let traffic = |requests: usize| {
            for _ in 0..requests {
                let Some(guard) = state.pick(None, None) else { continue };
                let outcome = if guard.addr() == bad {
                    Outcome::Failure(FailureKind::HttpStatus(503))
                } else {
                    Outcome::Success
                };
                guard.report(outcome);
            }
        };
        let (recorder, handle) = crate::observe::metrics::build(None).expect("recorder");
        let ejections = || {
            let text = handle.render();
            let line = format!("mesh_outlier_ejections_total{{service=\"default/web\",endpoint=\"{bad}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(line.as_str())).map(str::to_owned)
        };
        metrics::with_local_recorder(&recorder, || {
            // Round robin over three: the bad endpoint's third failure comes by request 9.
            traffic(9);
            assert!(endpoint.is_ejected(), "three consecutive failures eject");
            assert_eq!(ejections().as_deref(), Some("1"));
            // Still ejected (30 s base): more traffic and metric publishing add nothing.
            for _ in 0..5 {
                traffic(10);
                services.publish_metrics();
                clock.advance(Duration::from_secs(5));
            }
            assert!(endpoint.is_ejected());
            assert_eq!(endpoint.outlier().times_ejected(), 1);
            assert_eq!(ejections().as_deref(), Some("1"));
        });
    }

    #[test]
    fn an_invalid_policy_field_is_named() {
        let policy = api::Policy {
            outlier_detection: Some(api::OutlierDetection {
                enabled: true,
                max_ejection_ratio: 2.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = RouteTable::build(1, &snapshot(&["10.0.0.1"], Some(policy)), 10).unwrap_err();
        assert!(err.to_string().contains("outlier_detection.max_ejection_ratio"), "{err}");
    }
}
