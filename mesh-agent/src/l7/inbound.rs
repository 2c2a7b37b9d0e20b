//! The server side of L7: HTTP for a workload of this node is served by hyper, so
//! each request is authorized on its method and path (not only the caller's
//! identity), gets `x-forwarded-*` and the caller's identity, is counted and
//! logged, and goes to the local workload on a kept-alive connection.
//!
//! It arrives as requests of a peer agent's direct connection ([`Shared::serve_direct`]:
//! each names its target, and is admitted like a CONNECT would be), inside a CONNECT
//! stream ([`Inbound::serve`]: upgrades, older peers, and HTTP found in a stream the
//! sending agent relayed as bytes), or as plaintext from outside the mesh
//! ([`crate::inbound::plain`]). Whatever the way, every request:
//!
//! 1. has its path normalised ([`crate::authz::path`]; an ambiguous one is answered
//!    400), and is authorized on that path, against every service selecting the
//!    workload ([`crate::authz`]);
//! 2. takes a token from the rate limit of every service selecting the workload, in
//!    the caller's bucket ([`crate::inbound::rate_limit`]), or is answered 429 with
//!    `Retry-After` (gRPC: RESOURCE_EXHAUSTED);
//! 3. loses every identity header the client sent (`x-forwarded-client-cert`,
//!    `x-forwarded-client-identity`) and, from a caller over mutual TLS, gets its
//!    proven identity in Envoy's `x-forwarded-client-cert` format
//!    (`By=<this workload's SPIFFE ID>;URI=<caller's SPIFFE ID>`) and, for
//!    convenience, the bare caller's ID in `x-forwarded-client-identity`; a plaintext
//!    caller gets neither;
//! 4. reaches the workload with the normalised path, the one that was authorized.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::body::{BodyEnd, Observed, grpc_status};
use super::headers::{Arrival, is_upgrade, rewrite_inbound, strip_hop_by_hop};
use super::outbound::{error_response, is_grpc};
use super::pool::{Body, Dial, UpstreamPool, Version};
use crate::authz::{Decision, Principal, UNAUTHENTICATED, decide, path};
use crate::discovery::RouteStore;
use crate::identity::SpiffeId;
use crate::inbound::rate_limit::{CallerKey, DestinationLimits, TargetLimits, caller_key};
use crate::intercept::ActiveMode;
use crate::listener::Direction;
use crate::observe::Records;
use crate::observe::access_log::AccessRecord;
use crate::observe::labels::MeshName;
use crate::observe::metrics::{RequestLabels, RequestMetrics, RequestOutcome};
use crate::observe::spans::HopSpan;
use crate::observe::trace::{Origin, TraceContext};
use crate::tunnel::{PROTOCOL_HEADER, REASON_HEADER, TARGET_HEADER};
use crate::workload_identity::IdentitySlot;

/// The destination's authorization rules and rate limits as of the route table in
/// force: a policy change reaches streams that were admitted before it, at their
/// next request.
pub struct Policy {
    routes: Arc<RouteStore>,
    node: String,
    limits: Arc<DestinationLimits>,
    /// Table version, and the decision and limits for it.
    current: Mutex<(u64, Current)>,
}

/// What the policy says for one stream under one table.
#[derive(Clone)]
struct Current {
    decision: Arc<Result<Decision, String>>,
    limits: Arc<TargetLimits>,
}

impl Policy {
    /// Starts from the decision that admitted the stream to `target`.
    pub fn new(
        routes: Arc<RouteStore>,
        node: String,
        limits: Arc<DestinationLimits>,
        target: SocketAddr,
        admitted: Decision,
    ) -> Self {
        let table = routes.table();
        let current = Current {
            decision: Arc::new(Ok(admitted)),
            limits: Arc::new(limits.for_target(&table, &node, target)),
        };
        Policy { routes, node, limits, current: Mutex::new((table.version, current)) }
    }

    /// The decision for `caller` and `target`, and `target`'s limits, under the
    /// current table.
    fn current(&self, caller: Principal<'_>, target: SocketAddr) -> Current {
        let table = self.routes.table();
        {
            let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.0 == table.version {
                return current.1.clone();
            }
        }
        let current = Current {
            decision: Arc::new(decide(&self.routes, &self.node, caller, target)),
            limits: Arc::new(self.limits.for_target(&table, &self.node, target)),
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (table.version, current.clone());
        current
    }
}

pub use super::headers::{X_FORWARDED_CLIENT_CERT, X_FORWARDED_CLIENT_IDENTITY};

/// Who sends a stream's requests, which says what in them to trust.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The SPIFFE ID the peer proved over mutual TLS; `None` for plaintext from
    /// outside the mesh (the principal `unauthenticated`).
    pub identity: Option<SpiffeId>,
    /// The peer's address (a peer agent's, or the plaintext client's).
    pub addr: SocketAddr,
    /// The requests were written by a peer agent's L7 proxy, whose
    /// `x-mesh-client-addr` names the original client. Otherwise (HTTP found in bytes
    /// a peer relayed unread, or plaintext) the client wrote them, and that header is
    /// dropped like any forgery.
    pub via_peer_proxy: bool,
}

/// One stream's (or one direct target's) HTTP requests to one local workload.
pub struct Inbound {
    caller: Caller,
    /// The caller as rules and logs name it.
    principal: String,
    pub target: SocketAddr,
    pub service: MeshName,
    pub policy: Policy,
    pub version: Version,
    shared: Arc<Shared>,
    /// Cancelled when the agent shuts down: the connection then closes gracefully.
    pub shutdown: CancellationToken,
    metrics: RequestMetrics,
    /// Requests come from a direct connection: one refused before reaching the
    /// workload is marked so the sending agent may try another endpoint.
    direct: bool,
    /// The identity headers' values for a caller over mutual TLS, made once per stream.
    identity_headers: Option<(HeaderValue, HeaderValue)>,
    /// The caller's rate-limit bucket at `target`, made once per stream.
    limit_key: CallerKey,
}

impl Inbound {
    /// The stream of `caller` to `target`, admitted by `decision`.
    pub fn new(
        shared: Arc<Shared>,
        caller: Caller,
        target: SocketAddr,
        decision: Decision,
        version: Version,
        shutdown: CancellationToken,
    ) -> Self {
        let principal =
            caller.identity.as_ref().map_or_else(|| UNAUTHENTICATED.to_owned(), ToString::to_string);
        let service = MeshName::known(&decision.service);
        let metrics = RequestMetrics::new(RequestLabels {
            direction: Direction::Inbound,
            source_workload: MeshName::unknown(),
            source_identity: MeshName::known(&principal),
            destination_service: service.clone(),
            mtls: caller.identity.is_some(),
        });
        let identity_headers = caller.identity.as_ref().and_then(|_| {
            // This agent presented its workload identity to get here; should it be
            // gone, the caller's is still worth saying.
            let xfcc = match shared.identity.get() {
                Some(own) => format!("By={};URI={principal}", own.workload.id()),
                None => format!("URI={principal}"),
            };
            Some((HeaderValue::from_str(&xfcc).ok()?, HeaderValue::from_str(&principal).ok()?))
        });
        let policy = Policy::new(
            shared.routes.clone(),
            shared.node.clone(),
            shared.rate_limits.clone(),
            target,
            decision,
        );
        let limit_key = caller_key(target, caller.identity.as_ref().map(|_| principal.as_str()), caller.addr);
        Inbound {
            caller,
            principal,
            target,
            service,
            policy,
            version,
            shared,
            shutdown,
            metrics,
            direct: false,
            identity_headers,
            limit_key,
        }
    }

    fn caller_principal(&self) -> Principal<'_> {
        match self.caller.identity {
            Some(_) => Principal::Authenticated(&self.principal),
            None => Principal::Unauthenticated,
        }
    }

    /// Serves the stream until the peer closes it (or the agent shuts down).
    pub async fn serve<I>(self, io: I) -> Result<(), super::ServeError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (version, timeouts, shutdown) = (self.version, self.shared.downstream, self.shutdown.clone());
        let this = Arc::new(self);
        let service = hyper::service::service_fn(move |req| this.clone().proxy(req));
        super::serve_http(io, version, service, &timeouts, &shutdown, super::Served::Client).await
    }

    async fn proxy(self: Arc<Self>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let method = crate::observe::labels::method(req.method());
        // The trace context matters only to the access log and span export; with both
        // off it passes through unread.
        let records = &self.shared.records;
        let traced = records.is_on().then(|| TraceContext::from_headers(req.headers()));
        let sampled = traced.as_ref().is_some_and(|(trace, _)| trace.sampled());
        // With span export on, this hop is a span of its own: the workload gets a new
        // parent id (the span's). Otherwise the context passes through untouched.
        let hop = traced.as_ref().filter(|_| records.exports_span(sampled)).map(|(trace, _)| {
            let hop = trace.child();
            hop.apply(req.headers_mut());
            hop
        });
        // Built only when the access log or span export reads it.
        let mut record = traced.filter(|_| records.wants_http(sampled)).map(|(trace, origin)| {
            let mut r = AccessRecord::http(Direction::Inbound, self.shared.mode, self.caller.addr);
            r.source_identity = Some(self.metrics.labels().source_identity.clone());
            r.destination_service = Some(self.service.clone());
            r.destination_endpoint = Some(self.target);
            r.protocol = Some(if grpc { "grpc" } else { self.version.name() });
            r.method = Some(req.method().as_str().to_owned());
            r.path = Some(req.uri().path().to_owned());
            r.trace_id = Some(trace.trace_id());
            r.request_id = Some(trace.request_id().to_owned());
            r.span = hop.as_ref().map(|hop| HopSpan {
                span_id: hop.parent_id(),
                parent_id: (origin == Origin::Propagated).then(|| trace.parent_id()),
                flags: hop.flags(),
                tracestate: hop.tracestate().cloned(),
            });
            Box::new(r)
        });

        // Matched and forwarded in one form, so what was authorized is what is served.
        let normalised = match path::normalize(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                warn!(target: "mesh_agent::conn", peer_identity = %self.principal, service = %self.service,
                    method = %req.method(), path = req.uri().path(), error = %e, "request refused: ambiguous path");
                if let Some(r) = record.as_mut() {
                    r.error = Some(format!("bad path: {e}"));
                }
                self.account(record, method, StatusCode::BAD_REQUEST, None, 0, 0, start);
                return Ok(error_response(StatusCode::BAD_REQUEST, &format!("bad request path: {e}"), grpc));
            }
        };
        if normalised != req.uri().path() {
            match with_path(req.uri(), &normalised) {
                Some(uri) => *req.uri_mut() = uri,
                None => {
                    self.account(record, method, StatusCode::BAD_REQUEST, None, 0, 0, start);
                    return Ok(error_response(StatusCode::BAD_REQUEST, "bad request path", grpc));
                }
            }
        }
        if let Some(r) = record.as_mut() {
            r.path = Some(normalised.clone());
        }
        let caller = self.caller_principal();
        let Current { decision, limits } = self.policy.current(caller, self.target);
        let verdict = match &*decision {
            Ok(d) => d.allows(caller, req.method().as_str(), &normalised),
            Err(_) => false,
        };
        if !verdict {
            let services = match &*decision {
                Ok(d) => d.services(),
                Err(e) => e.clone(),
            };
            warn!(target: "mesh_agent::conn", peer_identity = %self.principal, service = %self.service,
                services = %services, method = %req.method(), path = %normalised,
                "request denied by authorization policy");
            crate::observe::metrics::authorization_denied(&self.service, &self.principal, "request");
            if let Some(r) = record.as_mut() {
                r.error = Some("denied by authorization policy".into());
            }
            self.account(record, method, StatusCode::FORBIDDEN, None, 0, 0, start);
            return Ok(error_response(StatusCode::FORBIDDEN, "denied by authorization policy", grpc));
        }
        // After authorization: a request refused anyway spends no token.
        if let Err(limited) = limits.check(&self.limit_key) {
            // Debug, not warn: a caller over its limit may send thousands a second.
            debug!(target: "mesh_agent::conn", peer_identity = %self.principal, peer = %self.caller.addr,
                service = %limited.service, retry_after_ms = limited.retry_after.as_millis() as u64,
                "request rate limited");
            if let Some(r) = record.as_mut() {
                r.error = Some(format!("rate limited by {}", limited.service));
            }
            self.account(record, method, StatusCode::TOO_MANY_REQUESTS, None, 0, 0, start);
            let mut resp = error_response(StatusCode::TOO_MANY_REQUESTS, "rate limited", grpc);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(limited.retry_after_secs()));
            return Ok(resp);
        }

        let upgrade = self.version == Version::Http1 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // A reference-counted copy, not a new string: the head is rewritten meanwhile.
        let uri_authority = req.uri().authority().cloned();
        let arrival = Arrival {
            peer_addr: self.caller.addr,
            via_peer_proxy: self.caller.via_peer_proxy,
            identity: self.identity_headers.as_ref().map(|(xfcc, id)| (xfcc, id)),
            authority: uri_authority.as_ref().map(|a| a.as_str()),
        };
        let host = rewrite_inbound(req.headers_mut(), upgrade, arrival);
        if let Some(r) = record.as_mut() {
            r.authority = host;
        }

        let request_bytes = Arc::new(AtomicU64::new(0));
        let req = req.map(|b| Observed::new(b, Some(request_bytes.clone()), None).boxed_unsync());
        // Boxed for the reason `outbound` boxes its sends: most of the request's state.
        let send = self.shared.upstreams.send(
            self.target,
            &Dial::Plain,
            self.version,
            self.shared.connect_timeout,
            req,
        );
        let sent = Box::pin(send).await;
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                let status = match e {
                    super::pool::SendError::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    super::pool::SendError::Request(_) => StatusCode::BAD_GATEWAY,
                };
                if let Some(r) = record.as_mut() {
                    r.error = Some(e.to_string());
                }
                self.account(record, method, status, None, request_bytes.load(Ordering::Relaxed), 0, start);
                let message = format!("local workload: {e}");
                let mut resp = error_response(status, &message, grpc);
                if self.direct && status == StatusCode::SERVICE_UNAVAILABLE {
                    // Not connected: the request never reached the workload.
                    mark_refused(&mut resp, &message);
                }
                return Ok(resp);
            }
        };
        match client_upgrade {
            Some(client_upgrade) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(super::outbound::splice_upgrade(
                    client_upgrade,
                    upstream_upgrade,
                    self.shared.downstream.idle,
                    self.shutdown.clone(),
                ));
            }
            _ => strip_hop_by_hop(resp.headers_mut(), false),
        }
        // Only this agent may say a request was refused before the workload.
        resp.headers_mut().remove(REASON_HEADER);
        let status = resp.status();
        let header_grpc = grpc_status(resp.headers());
        let this = self.clone();
        let on_end = Box::new(move |end: BodyEnd| {
            if let (Some(r), Some(e)) = (record.as_mut(), &end.error) {
                r.error = Some(e.clone());
            }
            let sent = request_bytes.load(Ordering::Relaxed);
            this.account(record, method, status, end.grpc_status.or(header_grpc), sent, end.bytes, start);
        });
        Ok(resp.map(|b| Observed::new(b, None, Some(on_end)).boxed_unsync()))
    }

    #[allow(clippy::too_many_arguments)]
    fn account(
        &self,
        record: Option<Box<AccessRecord>>,
        method: &'static str,
        status: StatusCode,
        grpc: Option<u32>,
        sent: u64,
        received: u64,
        start: Instant,
    ) {
        let duration = start.elapsed();
        self.metrics.record(&RequestOutcome {
            method,
            status: Some(status.as_u16()),
            grpc_status: grpc,
            duration,
            request_bytes: sent,
            response_bytes: received,
        });
        if let Some(mut record) = record {
            record.response_code = Some(status.as_u16());
            record.grpc_status = grpc;
            record.latency = Some(duration);
            record.bytes_sent = sent;
            record.bytes_received = received;
            self.shared.records.emit(*record);
        }
    }
}

/// `uri` with its path replaced (scheme, authority and query kept).
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// What every stream's requests need, whichever way they came (one per agent).
pub struct Shared {
    pub routes: Arc<RouteStore>,
    /// This node's name: only endpoints registered on it are reachable.
    pub node: String,
    pub upstreams: Arc<UpstreamPool>,
    pub connect_timeout: Duration,
    pub mode: ActiveMode,
    pub records: Records,
    /// Time limits of the connections served.
    pub downstream: super::DownstreamTimeouts,
    /// This node's workload identity: the `By=` of `x-forwarded-client-cert`.
    pub identity: IdentitySlot,
    /// Services' rate limits, one set per agent: a caller's bucket is the same
    /// whichever way (and connection) its requests come.
    pub rate_limits: Arc<DestinationLimits>,
}

/// Targets one direct connection has admitted (distinct local workloads, so few).
const MAX_TARGETS_PER_CONNECTION: usize = 1024;

/// One peer agent's direct connection: its requests, each admitted for its target
/// and then proxied as a CONNECT stream's would be.
struct DirectConnection {
    shared: Arc<Shared>,
    peer_id: SpiffeId,
    peer_addr: SocketAddr,
    shutdown: CancellationToken,
    /// Per (target, version): the admitted stream state, so metrics labels, the
    /// policy decision and the identity header are made once, not per request.
    targets: Mutex<HashMap<(SocketAddr, Version), Arc<Inbound>>>,
}

impl Shared {
    /// Serves the direct connection of the peer agent `peer_id` at `peer_addr` until
    /// it closes (or, after `shutdown`, gracefully with a GOAWAY).
    pub async fn serve_direct<I>(
        self: Arc<Self>,
        peer_id: SpiffeId,
        peer_addr: SocketAddr,
        io: I,
        shutdown: CancellationToken,
    ) -> Result<(), super::ServeError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let timeouts = self.downstream;
        let conn = Arc::new(DirectConnection {
            shared: self,
            peer_id,
            peer_addr,
            shutdown: shutdown.clone(),
            targets: Mutex::new(HashMap::new()),
        });
        let service = hyper::service::service_fn(move |req| conn.clone().request(req));
        super::serve_http(io, Version::Http2, service, &timeouts, &shutdown, super::Served::PeerAgent).await
    }
}

impl DirectConnection {
    async fn request(self: Arc<Self>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let headers = req.headers_mut();
        let target = headers.remove(TARGET_HEADER);
        let target = target.as_ref().and_then(|v| v.to_str().ok()?.parse::<SocketAddr>().ok());
        let version = match headers.remove(PROTOCOL_HEADER).as_ref().map(HeaderValue::as_bytes) {
            Some(b"http1") => Some(Version::Http1),
            Some(b"http2") => Some(Version::Http2),
            _ => None,
        };
        let (Some(target), Some(version)) = (target, version) else {
            return Ok(refused(
                StatusCode::BAD_REQUEST,
                "missing or malformed x-mesh-target or x-mesh-protocol",
            ));
        };
        let inbound = match self.admit(target, version) {
            Ok(inbound) => inbound,
            Err(reason) => {
                warn!(peer_id = %self.peer_id, peer = %self.peer_addr, target = %target, reason = %reason,
                    "direct HTTP request refused: no such workload here");
                return Ok(refused(StatusCode::MISDIRECTED_REQUEST, &reason));
            }
        };
        if version == Version::Http1 {
            // Back to what the client sent: origin-form, its own Host header.
            let (mut parts, body) = req.into_parts();
            parts.version = http::Version::HTTP_11;
            let origin = parts.uri.path_and_query().cloned();
            parts.uri = origin.map(http::Uri::from).unwrap_or_else(|| http::Uri::from_static("/"));
            req = Request::from_parts(parts, body);
        }
        inbound.proxy(req).await
    }

    /// The admitted state for `target`, which must be a workload of this node (as
    /// for a CONNECT; re-checked when the route table changes, through [`Policy`]).
    /// Whether the peer may make the request is decided per request by
    /// [`Inbound::proxy`], which answers a denial with 403 and counts and logs it.
    fn admit(&self, target: SocketAddr, version: Version) -> Result<Arc<Inbound>, String> {
        let cached = self.targets.lock().unwrap_or_else(|e| e.into_inner()).get(&(target, version)).cloned();
        if let Some(inbound) = cached {
            if let Err(e) = &*inbound.policy.current(inbound.caller_principal(), target).decision {
                return Err(e.clone());
            }
            return Ok(inbound);
        }
        let shared = &self.shared;
        let peer = self.peer_id.to_string();
        let decision = decide(&shared.routes, &shared.node, Principal::Authenticated(&peer), target)?;
        let caller =
            Caller { identity: Some(self.peer_id.clone()), addr: self.peer_addr, via_peer_proxy: true };
        let mut inbound =
            Inbound::new(shared.clone(), caller, target, decision, version, self.shutdown.clone());
        inbound.direct = true;
        let inbound = Arc::new(inbound);
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if targets.len() < MAX_TARGETS_PER_CONNECTION {
            targets.insert((target, version), inbound.clone());
        }
        Ok(inbound)
    }
}

/// An answer for a request refused before it reached a workload, marked so with
/// [`REASON_HEADER`] (the sending agent treats it as a failure to connect).
fn refused(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = error_response(status, reason, false);
    mark_refused(&mut resp, reason);
    resp
}

fn mark_refused(resp: &mut Response<Body>, reason: &str) {
    let value = HeaderValue::from_str(reason).unwrap_or_else(|_| HeaderValue::from_static("refused"));
    resp.headers_mut().insert(REASON_HEADER, value);
}
