//! Services' rate limits (`policy.rate_limit`), enforced by the receiving agent per
//! calling identity.
//!
//! **Why at the destination.** A limit kept by the calling agent is per calling
//! node: N nodes running the same client get N times the limit, and the limit holds
//! only as long as every caller's agent applies it. The receiving agent sees every
//! caller of its workloads and knows each one's proven SPIFFE ID, so a caller's
//! replicas share one bucket wherever they run, and a caller cannot opt out.
//!
//! **Buckets** are per workload port (an endpoint's address and target port on this
//! node, as authorization binds its rules) and caller: a caller over mutual TLS by
//! its SPIFFE ID, a plaintext caller (accepted under `mtls: permissive`) by its
//! source address. So each endpoint admits `requests_per_second` (and `burst` at once)
//! from each caller, as a sidecar's local rate limit would, whatever node the endpoint
//! shares with others. Each limiter bounds its buckets ([`RateLimiter`]).
//!
//! **Several services.** When several services select a workload port, each one's
//! limit applies, as each one's rules do: a request takes a token from every limit
//! or, refused by one, from none.
//!
//! **Across snapshots** a service keeps its limiter, buckets included, as long as its
//! limit is unchanged (as [`crate::balance::service`] carries its state), so a push
//! of the route table forgives no caller; a changed limit starts afresh, a service
//! that no longer limits (or is gone) drops its buckets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::discovery::table::RouteTable;
use crate::resilience::clock::{SharedClock, SystemClock};
use crate::resilience::rate_limit::{ClientKey, Decision, RateLimitConfig, RateLimiter};

/// Whose bucket: the workload port called, and the caller.
pub type CallerKey = (SocketAddr, ClientKey);

/// The caller's bucket key for `target`: its proven SPIFFE ID, or (plaintext) its
/// address, v4-mapped IPv6 taken as IPv4 so one client has one bucket.
pub fn caller_key(target: SocketAddr, identity: Option<&str>, addr: SocketAddr) -> CallerKey {
    let client = match identity {
        Some(id) => ClientKey::Identity(id.to_owned()),
        None => ClientKey::Ip(addr.ip().to_canonical()),
    };
    (target, client)
}

/// Every service's limiter on this agent (one per agent, shared by its workloads).
pub struct DestinationLimits {
    clock: SharedClock,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// The table the limiters were last matched with: its address and version
    /// (versions repeat in tests and across a control-plane restart).
    table: Option<(usize, u64)>,
    by_service: HashMap<Arc<str>, Arc<RateLimiter<CallerKey>>>,
}

impl Default for DestinationLimits {
    fn default() -> Self {
        DestinationLimits::new(SystemClock::shared())
    }
}

impl DestinationLimits {
    /// No limiter yet, on `clock` (tests inject theirs).
    pub fn new(clock: SharedClock) -> Self {
        DestinationLimits { clock, kept: Mutex::new(Kept::default()) }
    }

    /// The limits `target` is held to under `table`: one per service with a limit
    /// that selects it on `node`. Meant to be asked once per stream and table (the
    /// caller keeps the answer), not per request.
    pub fn for_target(&self, table: &Arc<RouteTable>, node: &str, target: SocketAddr) -> TargetLimits {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (Arc::as_ptr(table) as usize, table.version);
        if kept.table != Some(id) {
            // Drop the limiters of services gone or changed, before anything adds more.
            let limits: HashMap<&str, RateLimitConfig> = table
                .routes()
                .iter()
                .filter_map(|r| Some((&*r.service, r.service_policy.rate_limit?)))
                .collect();
            kept.by_service.retain(|service, l| limits.get(&**service) == Some(l.config()));
            kept.table = Some(id);
        }
        let mut limiters: Vec<(Arc<str>, Arc<RateLimiter<CallerKey>>)> = Vec::new();
        for (route, _) in table.selecting(target).filter(|(_, ep)| ep.node == node) {
            let Some(config) = route.service_policy.rate_limit else { continue };
            // A service listing the port under two of its ports is one service.
            if limiters.iter().any(|(s, _)| *s == route.service) {
                continue;
            }
            let limiter = kept
                .by_service
                .entry(route.service.clone())
                .and_modify(|l| {
                    if *l.config() != config {
                        *l = Arc::new(RateLimiter::new(config, self.clock.clone()));
                    }
                })
                .or_insert_with(|| Arc::new(RateLimiter::new(config, self.clock.clone())))
                .clone();
            limiters.push((route.service.clone(), limiter));
        }
        limiters.sort_by(|a, b| a.0.cmp(&b.0));
        TargetLimits { limiters }
    }

    /// Buckets held for every service, for tests and metrics.
    pub fn tracked_callers(&self) -> usize {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.by_service.values().map(|l| l.tracked_clients()).sum()
    }
}

/// The limits of one workload port, by service name.
#[derive(Default)]
pub struct TargetLimits {
    limiters: Vec<(Arc<str>, Arc<RateLimiter<CallerKey>>)>,
}

/// A request refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The service whose limit refused it.
    pub service: Arc<str>,
    /// Until the caller has a token of that limit again.
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds for an HTTP `Retry-After` header (rounded up, at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        Decision::Limited { retry_after: self.retry_after }.retry_after_secs().unwrap_or(1)
    }
}

impl TargetLimits {
    /// Whether no service selecting the port limits it.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }

    /// Takes a token for `key` from every limit, or refuses and takes none: the
    /// tokens taken before a limit refused are given back, so a request one service
    /// refuses does not spend the caller's allowance at another. Limits are asked in
    /// service order; the first to refuse names the wait.
    pub fn check(&self, key: &CallerKey) -> Result<(), Limited> {
        for (i, (service, limiter)) in self.limiters.iter().enumerate() {
            if let Decision::Limited { retry_after } = limiter.check(key) {
                for (_, taken) in &self.limiters[..i] {
                    taken.give_back(key);
                }
                return Err(Limited { service: service.clone(), retry_after });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mesh_api as api;

    use super::*;
    use crate::resilience::clock::ManualClock;

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";

    fn target() -> SocketAddr {
        "10.0.0.5:8080".parse().unwrap()
    }

    /// A service listing the workload port 10.0.0.5:8080 on node `server`, with a
    /// limit of `rps` per second and a burst of `burst` (none when `rps` is 0).
    fn service(name: &str, rps: u32, burst: u32) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "shop".into(),
            ports: vec![api::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            endpoints: vec![api::Endpoint {
                address: "10.0.0.5".into(),
                port: 8080,
                weight: 1,
                node: "server".into(),
                agent_address: "10.0.0.5:15008".into(),
                identity: format!("spiffe://cluster.local/ns/shop/sa/{name}"),
                ..Default::default()
            }],
            policy: (rps > 0).then(|| api::Policy {
                rate_limit: Some(api::RateLimit { requests_per_second: rps, burst }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn table(version: u64, services: Vec<api::Service>) -> Arc<RouteTable> {
        let snapshot = api::Snapshot { services, ..Default::default() };
        Arc::new(RouteTable::build(version, &snapshot, 1000).unwrap())
    }

    fn limits() -> (Arc<ManualClock>, DestinationLimits) {
        let clock = ManualClock::new();
        (clock.clone(), DestinationLimits::new(clock))
    }

    /// Requests `key` gets through, of `n` sent at once.
    fn allowed(limits: &TargetLimits, key: &CallerKey, n: usize) -> usize {
        (0..n).filter(|_| limits.check(key).is_ok()).count()
    }

    #[test]
    fn a_caller_is_limited_by_its_identity_wherever_it_calls_from() {
        let (_clock, registry) = limits();
        let t = table(1, vec![service("api", 1, 3)]);
        let limits = registry.for_target(&t, "server", target());
        // The same service account calling from two nodes is one caller.
        let from_node_a = caller_key(target(), Some(FRONTEND), "10.1.0.1:40000".parse().unwrap());
        let from_node_b = caller_key(target(), Some(FRONTEND), "10.1.0.2:40000".parse().unwrap());
        assert_eq!(allowed(&limits, &from_node_a, 2), 2);
        assert_eq!(allowed(&limits, &from_node_b, 5), 1, "node b shares node a's bucket");
        let limited = limits.check(&from_node_a).unwrap_err();
        assert_eq!(&*limited.service, "shop/api");
        assert_eq!(limited.retry_after, Duration::from_secs(1));
        assert_eq!(limited.retry_after_secs(), 1);
        // Another identity has its own bucket.
        let batch = caller_key(target(), Some(BATCH), "10.1.0.1:40001".parse().unwrap());
        assert_eq!(allowed(&limits, &batch, 5), 3);
    }

    #[test]
    fn plaintext_callers_are_limited_by_address() {
        let (_clock, registry) = limits();
        let t = table(1, vec![service("api", 1, 1)]);
        let limits = registry.for_target(&t, "server", target());
        let v4 = caller_key(target(), None, "192.0.2.7:1000".parse().unwrap());
        let mapped = caller_key(target(), None, "[::ffff:192.0.2.7]:2000".parse().unwrap());
        assert_eq!(v4, mapped, "one client, whatever the socket's family");
        assert!(limits.check(&v4).is_ok());
        assert!(limits.check(&mapped).is_err());
        let other = caller_key(target(), None, "192.0.2.8:1000".parse().unwrap());
        assert!(limits.check(&other).is_ok());
    }

    #[test]
    fn buckets_outlive_a_snapshot_with_the_same_limit_and_not_a_changed_one() {
        let (clock, registry) = limits();
        let key = caller_key(target(), Some(FRONTEND), "10.1.0.1:40000".parse().unwrap());
        let t1 = table(1, vec![service("api", 1, 2)]);
        assert_eq!(allowed(&registry.for_target(&t1, "server", target()), &key, 5), 2);

        // A new table (another service added, the limit the same): still empty.
        let t2 = table(2, vec![service("api", 1, 2), service("other", 0, 0)]);
        let limits = registry.for_target(&t2, "server", target());
        assert_eq!(allowed(&limits, &key, 5), 0, "a push forgives no caller");
        clock.advance(Duration::from_secs(1));
        assert_eq!(allowed(&limits, &key, 5), 1, "and the bucket refills as before");

        // A changed limit starts afresh.
        let t3 = table(3, vec![service("api", 1, 4)]);
        assert_eq!(allowed(&registry.for_target(&t3, "server", target()), &key, 5), 4);

        // A service that no longer limits drops its buckets.
        assert!(registry.tracked_callers() > 0);
        let t4 = table(4, vec![service("api", 0, 0)]);
        assert!(registry.for_target(&t4, "server", target()).is_empty());
        assert_eq!(registry.tracked_callers(), 0);
    }

    #[test]
    fn every_selecting_service_limits_and_a_refused_request_takes_no_token() {
        let (_clock, registry) = limits();
        // "api" allows 3 at once, "audit" 1; both select the workload port.
        let t = table(1, vec![service("api", 1, 3), service("audit", 1, 1), service("open", 0, 0)]);
        let limits = registry.for_target(&t, "server", target());
        let key = caller_key(target(), Some(FRONTEND), "10.1.0.1:40000".parse().unwrap());
        assert!(limits.check(&key).is_ok());
        let refused = limits.check(&key).unwrap_err();
        assert_eq!(&*refused.service, "shop/audit", "the stricter limit refuses");
        // Only the refused service's limit applies to the port alone; "api" still
        // holds two tokens, the refused requests having taken none of its three.
        let api_only = registry.for_target(&table(2, vec![service("api", 1, 3)]), "server", target());
        assert_eq!(allowed(&api_only, &key, 5), 2);
    }

    #[test]
    fn only_workloads_of_this_node_are_limited_here() {
        let (_clock, registry) = limits();
        let t = table(1, vec![service("api", 1, 1)]);
        assert!(registry.for_target(&t, "elsewhere", target()).is_empty());
        assert!(registry.for_target(&t, "server", "10.0.0.5:9999".parse().unwrap()).is_empty());
    }

    #[test]
    fn buckets_stay_bounded_under_a_flood_of_callers() {
        let (_clock, registry) = limits();
        let t = table(1, vec![service("api", 1, 1)]);
        let limits = registry.for_target(&t, "server", target());
        for n in 0..100_000u32 {
            let _ = limits.check(&caller_key(target(), None, SocketAddr::from((n.to_be_bytes(), 1))));
        }
        let held = registry.tracked_callers();
        assert!(held <= crate::resilience::rate_limit::DEFAULT_MAX_CLIENTS, "{held} buckets");
    }
}
