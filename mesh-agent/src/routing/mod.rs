//! HTTP routes: which share of a service's requests goes where, and what happens
//! on the way (a per-route timeout and retry policy, injected faults, a mirror).
//!
//! Two stages, so the request path does no configuration work:
//! - when a snapshot's table is built, each service port's routes are validated
//!   and compiled ([`compile`]: regexes built, durations and statuses parsed); an
//!   invalid route refuses the snapshot, naming the field;
//! - when the balancing state is rebuilt for that table, each route's backends are
//!   resolved to balancers ([`resolve`]): a subset is a balancer over the matching
//!   endpoints of the service's own endpoint set, so breaker, ejection and load
//!   state stay one per endpoint whichever route reached it.
//!
//! Per request the calling agent takes the first route whose matches the request
//! meets ([`Routes::select`]), draws a backend by weight, and sends it there; a
//! request no route matches goes to the service's endpoints as without routes. A
//! new snapshot applies to the very next request, on open connections too.

pub mod matching;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use mesh_api as api;
use mesh_api::routes::RouteError;
use serde::Serialize;

use crate::balance::Balancer;
use crate::discovery::table::Route;
use crate::resilience::random::RandomSource;
use crate::resilience::retry::RetryPolicy;
use matching::{Match, RequestView};

/// A route as the data path applies it.
#[derive(Debug)]
pub struct HttpRoute {
    pub name: Arc<str>,
    matches: Vec<Match>,
    pub backends: Vec<BackendRef>,
    /// Replaces the service's request timeout.
    pub timeout: Option<Duration>,
    /// Replaces the service's retry policy.
    pub retry: Option<RetryPolicy>,
    pub fault: Fault,
    pub mirror: Option<Mirror>,
}

/// Where a backend is: a service port (this one by default) and an endpoint subset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    /// `namespace/name`; `None`: the route's own service.
    pub service: Option<Arc<str>>,
    /// `None`: the port the request arrived on.
    pub port: Option<u16>,
    /// Endpoint labels; empty: every endpoint.
    pub subset: BTreeMap<String, String>,
    pub weight: u32,
}

impl BackendRef {
    fn from_api(b: &api::RouteBackend) -> Self {
        BackendRef {
            service: (!b.service.is_empty()).then(|| b.service.as_str().into()),
            port: u16::try_from(b.port).ok().filter(|p| *p != 0),
            subset: b.subset.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            weight: b.weight,
        }
    }

    /// The service and port this names, given the route's own.
    pub fn target<'a>(&'a self, own: &'a Route) -> (&'a str, u16) {
        (self.service.as_deref().unwrap_or(&own.service), self.port.unwrap_or(own.port))
    }

    /// Whether this is the route's own service, every endpoint: no balancer of its own.
    fn is_whole_own_service(&self) -> bool {
        self.service.is_none() && self.port.is_none() && self.subset.is_empty()
    }

    /// `shop/web:80` or `shop/web:80{version=v2}`, for errors and logs.
    pub fn describe(&self, own: &Route) -> String {
        let (service, port) = self.target(own);
        let mut s = format!("{service}:{port}");
        if !self.subset.is_empty() {
            let labels: Vec<String> = self.subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("{{{}}}", labels.join(",")));
        }
        s
    }

    /// Whether an endpoint with `labels` is in the subset.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.subset.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Faults injected into a share of a route's requests, delay first.
#[derive(Debug, Default)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<Abort>,
}

/// The answer an aborted request gets instead of being sent.
#[derive(Debug, Clone, Copy)]
pub struct Abort {
    pub status: StatusCode,
    /// For gRPC requests, when set: answered with this `grpc-status`.
    pub grpc_status: Option<u32>,
    pub percent: f64,
}

impl Fault {
    /// The delay for this request, drawn against its share.
    pub fn delay(&self, random: &dyn RandomSource) -> Option<Duration> {
        self.delay.and_then(|(d, percent)| chosen(percent, random).then_some(d))
    }

    /// The abort for this request, drawn against its share.
    pub fn abort(&self, random: &dyn RandomSource) -> Option<Abort> {
        self.abort.filter(|a| chosen(a.percent, random))
    }
}

/// A copy of a share of a route's requests sent elsewhere, the answer dropped.
#[derive(Debug)]
pub struct Mirror {
    pub backend: BackendRef,
    pub percent: f64,
}

/// Whether a request falls in a share of `percent` (0 to 100).
pub fn chosen(percent: f64, random: &dyn RandomSource) -> bool {
    percent >= 100.0 || (percent > 0.0 && random.next_f64() * 100.0 < percent)
}

impl HttpRoute {
    fn compile(i: usize, r: &api::HttpRoute) -> Result<Self, RouteError> {
        let at = format!("routes[{i}]");
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| Match::compile(&format!("{at}.matches[{j}]"), m))
            .collect::<Result<_, _>>()?;
        let retry = r
            .retries
            .as_ref()
            .map(RetryPolicy::from_api)
            .transpose()
            .map_err(|e| RouteError { field: format!("{at}.retries"), message: e.to_string() })?;
        let fault = match &r.fault {
            None => Fault::default(),
            Some(f) => Fault {
                delay: (f.delay_percent > 0.0)
                    .then(|| (Duration::from_millis(f.delay_ms.into()), f.delay_percent)),
                abort: if f.abort_percent > 0.0 {
                    Some(Abort {
                        status: StatusCode::from_u16(f.abort_http_status as u16).map_err(|_| RouteError {
                            field: format!("{at}.fault.abort_http_status"),
                            message: format!("{} is not an HTTP status", f.abort_http_status),
                        })?,
                        grpc_status: (f.abort_grpc_status != 0).then_some(f.abort_grpc_status),
                        percent: f.abort_percent,
                    })
                } else {
                    None
                },
            },
        };
        Ok(HttpRoute {
            name: r.name.as_str().into(),
            matches,
            backends: r.backends.iter().map(BackendRef::from_api).collect(),
            timeout: (r.timeout_ms != 0).then(|| Duration::from_millis(r.timeout_ms.into())),
            retry,
            fault,
            mirror: r.mirror.as_ref().and_then(|m| {
                let backend = BackendRef::from_api(m.backend.as_ref()?);
                (m.percent > 0.0).then_some(Mirror { backend, percent: m.percent })
            }),
        })
    }

    /// Whether the request meets the route (a route without matches takes all).
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req))
    }

    fn needs_path(&self) -> bool {
        self.matches.iter().any(Match::needs_path)
    }
}

/// Validates a service's routes and compiles those that apply to `port`.
pub fn compile(
    routes: &[api::HttpRoute],
    ports: &[api::ServicePort],
    port: u16,
) -> Result<Arc<[Arc<HttpRoute>]>, RouteError> {
    mesh_api::routes::validate(routes, ports)?;
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.ports.is_empty() || r.ports.contains(&u32::from(port)))
        .map(|(i, r)| HttpRoute::compile(i, r).map(Arc::new))
        .collect()
}

/// The service port a backend names and a balancer over its subset.
pub type Resolved = (Arc<Route>, Arc<dyn Balancer>);

/// A backend resolved for one table: the service port it names and a balancer over
/// its subset, or why it cannot be reached.
#[derive(Debug, Clone)]
pub struct Backend {
    pub target: Result<Resolved, Arc<str>>,
    pub weight: u32,
}

impl Backend {
    pub fn new(route: Arc<Route>, balancer: Arc<dyn Balancer>, weight: u32) -> Self {
        Backend { target: Ok((route, balancer)), weight }
    }

    pub fn unknown(why: String, weight: u32) -> Self {
        Backend { target: Err(why.into()), weight }
    }
}

/// A route with its backends resolved.
#[derive(Debug)]
pub struct RouteState {
    pub rule: Arc<HttpRoute>,
    backends: Vec<Backend>,
    total_weight: u64,
    pub mirror: Option<Backend>,
}

impl RouteState {
    /// Draws a backend by weight (a single backend without drawing).
    pub fn backend(&self, random: &dyn RandomSource) -> &Backend {
        if self.backends.len() == 1 {
            return &self.backends[0];
        }
        let mut n = random.below(self.total_weight);
        for b in &self.backends {
            let w = u64::from(b.weight);
            if n < w {
                return b;
            }
            n -= w;
        }
        // Unreachable with a positive total (validation refuses all-zero weights).
        &self.backends[0]
    }
}

/// The resolved routes of one service port.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Box<[RouteState]>,
    needs_path: bool,
}

impl Routes {
    /// Whether there are routes to apply.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether some match reads the path (only then is it normalised per request).
    pub fn needs_path(&self) -> bool {
        self.needs_path
    }

    /// The first route the request meets.
    pub fn select(&self, req: &RequestView<'_>) -> Option<&RouteState> {
        self.routes.iter().find(|r| r.rule.matches(req))
    }

    pub fn iter(&self) -> impl Iterator<Item = &RouteState> {
        self.routes.iter()
    }
}

/// Resolves `route`'s compiled routes: `own` serves backends naming the whole
/// service, `lookup` builds the others (a balancer over a subset, another
/// service's), or says why it cannot.
pub fn resolve(route: &Route, own: &Backend, lookup: &dyn Fn(&BackendRef) -> Backend) -> Routes {
    let resolve_one = |b: &BackendRef| {
        if b.is_whole_own_service() { Backend { weight: b.weight, ..own.clone() } } else { lookup(b) }
    };
    let routes: Box<[RouteState]> = route
        .http_routes
        .iter()
        .map(|rule| {
            let backends: Vec<Backend> = if rule.backends.is_empty() {
                vec![Backend { weight: 1, ..own.clone() }]
            } else {
                rule.backends.iter().map(resolve_one).collect()
            };
            let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
            let mirror = rule.mirror.as_ref().map(|m| resolve_one(&m.backend));
            RouteState { rule: rule.clone(), backends, total_weight, mirror }
        })
        .collect();
    let needs_path = routes.iter().any(|r| r.rule.needs_path());
    Routes { routes, needs_path }
}

#[cfg(test)]
mod tests;
