//! The server side of L7: HTTP arriving from a peer agent is served by hyper, so
//! each request is authorized on its method and path (not only the peer's
//! identity), gets `x-forwarded-*`, is counted and logged, and goes to the local
//! workload on a kept-alive connection.
//!
//! It arrives either as requests of a direct connection ([`Direct`]: each names its
//! target, and is admitted like a CONNECT would be) or inside a CONNECT stream
//! ([`Inbound::serve`]: upgrades, and older peers).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::body::{BodyEnd, Observed, grpc_status};
use super::headers::{Arrival, is_upgrade, rewrite_inbound, strip_hop_by_hop};
use super::outbound::{error_response, is_grpc};
use super::pool::{Body, Dial, UpstreamPool, Version};
use crate::authz::{Decision, allowed, decide};
use crate::discovery::RouteStore;
use crate::identity::SpiffeId;
use crate::intercept::ActiveMode;
use crate::listener::Direction;
use crate::observe::Records;
use crate::observe::access_log::AccessRecord;
use crate::observe::labels::MeshName;
use crate::observe::metrics::{RequestLabels, RequestMetrics, RequestOutcome};
use crate::observe::spans::HopSpan;
use crate::observe::trace::{Origin, TraceContext};
use crate::tunnel::{PROTOCOL_HEADER, REASON_HEADER, TARGET_HEADER};

/// The destination's authorization rules as of the route table in force: a policy
/// change reaches streams that were admitted before it, at their next request.
pub struct Policy {
    routes: Arc<RouteStore>,
    node: String,
    /// Table version and the decision made for it.
    current: Mutex<(u64, Arc<Result<Decision, String>>)>,
}

impl Policy {
    /// Starts from the decision that admitted the stream.
    pub fn new(routes: Arc<RouteStore>, node: String, admitted: Decision) -> Self {
        let version = routes.table().version;
        Policy { routes, node, current: Mutex::new((version, Arc::new(Ok(admitted)))) }
    }

    /// The decision for `peer` and `target` under the current table.
    fn current(&self, peer: &SpiffeId, target: SocketAddr) -> Arc<Result<Decision, String>> {
        let table = self.routes.table();
        {
            let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.0 == table.version {
                return current.1.clone();
            }
        }
        let decision = Arc::new(decide(&self.routes, &self.node, peer, target));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (table.version, decision.clone());
        decision
    }
}

/// One tunnel stream's HTTP requests to one local workload.
pub struct Inbound {
    pub peer_id: SpiffeId,
    pub peer_addr: SocketAddr,
    pub target: SocketAddr,
    pub service: MeshName,
    pub policy: Policy,
    pub version: Version,
    pub upstreams: Arc<UpstreamPool>,
    pub connect_timeout: Duration,
    pub mode: ActiveMode,
    pub records: Records,
    /// Time limits of the stream's HTTP connection.
    pub downstream: super::DownstreamTimeouts,
    /// Cancelled when the agent shuts down: the connection then closes gracefully.
    pub shutdown: CancellationToken,
    metrics: RequestMetrics,
    /// Requests come from a direct connection: one refused before reaching the
    /// workload is marked so the sending agent may try another endpoint.
    direct: bool,
    peer_str: String,
    /// `x-forwarded-client-identity`'s value, made once per stream.
    peer_header: Option<HeaderValue>,
}

impl Inbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peer_id: SpiffeId,
        peer_addr: SocketAddr,
        target: SocketAddr,
        service: MeshName,
        policy: Policy,
        version: Version,
        upstreams: Arc<UpstreamPool>,
        connect_timeout: Duration,
        mode: ActiveMode,
        records: Records,
        downstream: super::DownstreamTimeouts,
        shutdown: CancellationToken,
    ) -> Self {
        let peer_str = peer_id.to_string();
        let metrics = RequestMetrics::new(RequestLabels {
            direction: Direction::Inbound,
            source_workload: MeshName::unknown(),
            source_identity: MeshName::known(&peer_str),
            destination_service: service.clone(),
        });
        Inbound {
            peer_id,
            peer_addr,
            target,
            service,
            policy,
            version,
            upstreams,
            connect_timeout,
            mode,
            records,
            downstream,
            shutdown,
            metrics,
            direct: false,
            peer_header: HeaderValue::from_str(&peer_str).ok(),
            peer_str,
        }
    }

    /// Serves the stream until the peer closes it (or the agent shuts down).
    pub async fn serve<I>(self, io: I) -> Result<(), super::ServeError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (version, timeouts, shutdown) = (self.version, self.downstream, self.shutdown.clone());
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
        let traced = self.records.is_on().then(|| TraceContext::from_headers(req.headers()));
        let sampled = traced.as_ref().is_some_and(|(trace, _)| trace.sampled());
        // With span export on, this hop is a span of its own: the workload gets a new
        // parent id (the span's). Otherwise the context passes through untouched.
        let hop = traced.as_ref().filter(|_| self.records.exports_span(sampled)).map(|(trace, _)| {
            let hop = trace.child();
            hop.apply(req.headers_mut());
            hop
        });
        // Built only when the access log or span export reads it.
        let mut record = traced.filter(|_| self.records.wants_http(sampled)).map(|(trace, origin)| {
            let mut r = AccessRecord::http(Direction::Inbound, self.mode, self.peer_addr);
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

        let decision = self.policy.current(&self.peer_id, self.target);
        let verdict = match &*decision {
            Ok(d) => allowed(&d.rules, &self.peer_str, req.method().as_str(), req.uri().path()),
            Err(_) => false,
        };
        if !verdict {
            warn!(target: "mesh_agent::conn", peer_identity = %self.peer_id, service = %self.service,
                method = %req.method(), path = req.uri().path(), "request denied by authorization policy");
            if let Some(r) = record.as_mut() {
                r.error = Some("denied by authorization policy".into());
            }
            self.account(record, method, StatusCode::FORBIDDEN, None, 0, 0, start);
            return Ok(error_response(StatusCode::FORBIDDEN, "denied by authorization policy", grpc));
        }

        let upgrade = self.version == Version::Http1 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // A reference-counted copy, not a new string: the head is rewritten meanwhile.
        let uri_authority = req.uri().authority().cloned();
        let arrival = Arrival {
            peer_addr: self.peer_addr,
            identity: self.peer_header.as_ref(),
            authority: uri_authority.as_ref().map(|a| a.as_str()),
        };
        let host = rewrite_inbound(req.headers_mut(), upgrade, arrival);
        if let Some(r) = record.as_mut() {
            r.authority = host;
        }

        let request_bytes = Arc::new(AtomicU64::new(0));
        let req = req.map(|b| Observed::new(b, Some(request_bytes.clone()), None).boxed_unsync());
        // Boxed for the reason `outbound` boxes its sends: most of the request's state.
        let send = self.upstreams.send(self.target, &Dial::Plain, self.version, self.connect_timeout, req);
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
                    self.downstream.idle,
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
            self.records.emit(*record);
        }
    }
}

/// What every direct connection's requests need (one per agent).
pub struct Direct {
    pub routes: Arc<RouteStore>,
    /// This node's name: only endpoints registered on it are reachable.
    pub node: String,
    pub upstreams: Arc<UpstreamPool>,
    pub connect_timeout: Duration,
    pub mode: ActiveMode,
    pub records: Records,
    /// Time limits of the connection.
    pub downstream: super::DownstreamTimeouts,
}

/// Targets one direct connection has admitted (distinct local workloads, so few).
const MAX_TARGETS_PER_CONNECTION: usize = 1024;

/// One peer agent's direct connection: its requests, each admitted for its target
/// and then proxied as a CONNECT stream's would be.
struct DirectConnection {
    shared: Arc<Direct>,
    peer_id: SpiffeId,
    peer_addr: SocketAddr,
    shutdown: CancellationToken,
    /// Per (target, version): the admitted stream state, so metrics labels, the
    /// policy decision and the identity header are made once, not per request.
    targets: Mutex<HashMap<(SocketAddr, Version), Arc<Inbound>>>,
}

impl Direct {
    /// Serves the direct connection of the peer agent `peer_id` at `peer_addr` until
    /// it closes (or, after `shutdown`, gracefully with a GOAWAY).
    pub async fn serve<I>(
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
            if let Err(e) = &*inbound.policy.current(&self.peer_id, target) {
                return Err(e.clone());
            }
            return Ok(inbound);
        }
        let shared = &self.shared;
        let decision = decide(&shared.routes, &shared.node, &self.peer_id, target)?;
        let mut inbound = Inbound::new(
            self.peer_id.clone(),
            self.peer_addr,
            target,
            MeshName::known(&decision.service),
            Policy::new(shared.routes.clone(), shared.node.clone(), decision),
            version,
            shared.upstreams.clone(),
            shared.connect_timeout,
            shared.mode,
            shared.records.clone(),
            shared.downstream,
            self.shutdown.clone(),
        );
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
