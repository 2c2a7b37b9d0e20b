//! The client side of L7: an intercepted HTTP/1.1 or HTTP/2 connection to a service
//! is served by hyper, and every request is balanced, retried and timed on its own.
//!
//! Per request: trace context and request id (continued or started), hop-by-hop
//! headers removed, then tries: pick an endpoint (skipping unhealthy, ejected and
//! circuit-open ones), for an endpoint outside the mesh the service's rate limit
//! (`Outbound::calling_side_limit`), send on a pooled connection (plain or through
//! the tunnel), classify the result (5xx, gRPC UNAVAILABLE, reset, timeout)
//! for the endpoint's breaker and outlier detection, and retry what the policy and
//! the retry budget allow. The response body streams back; when it ends the request
//! is counted, logged and its endpoint claim released.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::body::{BodyEnd, Observed, grpc_status};
use super::headers::{is_upgrade, strip_hop_by_hop};
use super::pool::{Body, Dial, SendError, UpstreamBody, Version};
use crate::balance::service::{ServiceState, target_of};
use crate::balance::{HashKeySource, PickGuard, hash};
use crate::discovery::table::{Route, addr_header};
use crate::forward::Accepted;
use crate::listener::{Direction, ProxyContext};
use crate::observe::access_log::AccessRecord;
use crate::observe::labels::MeshName;
use crate::observe::metrics::{RequestLabels, RequestMetrics, RequestOutcome};
use crate::observe::spans::HopSpan;
use crate::observe::trace::{Origin, TraceContext};
use crate::resilience::outcome::{FailureKind, GRPC_UNAVAILABLE, Outcome};
use crate::resilience::rate_limit::{ClientKey, Decision};
use crate::resilience::retry::{BodyLength, RetryDecision, is_replayable};
use crate::routing::RouteState;
use crate::routing::matching::RequestView;

/// Request bodies up to this size are buffered so a failed try can be sent again.
pub const REPLAY_BUFFER: u64 = 64 * 1024;

/// A body buffered for retries must arrive whole within this; a client that sends
/// part of it and stalls gets 408 instead of holding the buffer.
pub const REPLAY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Reserves room in the agent's budget for a body of `length` to be held for
/// retries; `None` (counted and logged) when the budget is spent: the request then
/// goes once, without retries.
fn reserve_replay(length: BodyLength) -> Option<crate::resilience::replay::Reservation> {
    let bytes = match length {
        BodyLength::Known(n) => usize::try_from(n).unwrap_or(usize::MAX),
        BodyLength::Empty | BodyLength::Unknown => 0,
    };
    let budget = crate::resilience::replay::ReplayBudget::global();
    let reservation = budget.reserve(bytes);
    if reservation.is_none() {
        crate::observe::limits::hit(
            crate::observe::limits::Limit::RetryBuffer,
            format_args!(
                "{} bytes of request bodies held for retries; a request of {bytes} goes without retries",
                budget.max()
            ),
        );
    }
    reservation
}

/// Header carrying the client's address from the sending agent to the receiving
/// one (which turns it into `x-forwarded-for`); always overwritten on the way out,
/// so a workload cannot forge it.
pub const CLIENT_ADDR_HEADER: &str = "x-mesh-client-addr";

/// Header naming the endpoint that answered, for debugging (`curl -v`).
const ENDPOINT_HEADER: &str = "x-mesh-endpoint";

/// One client connection's requests.
pub struct Outbound {
    pub ctx: Arc<ProxyContext>,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub version: Version,
    metrics: RequestMetrics,
    service: MeshName,
    /// [`CLIENT_ADDR_HEADER`]'s value, made once per connection.
    client_addr: Option<HeaderValue>,
    /// The client dialled this meshed endpoint by its address: every request goes
    /// to it, through its agent, never to another endpoint of the service.
    pinned: Option<SocketAddr>,
}

impl Outbound {
    pub fn new(ctx: Arc<ProxyContext>, conn: &Accepted, version: Version, service: &str) -> Self {
        let (peer, orig_dst) = (conn.peer, conn.orig_dst);
        let source_identity = ctx
            .identity
            .get()
            .map(|i| MeshName::known(&i.workload.id().to_string()))
            .unwrap_or_else(MeshName::unknown);
        let service = MeshName::known(service);
        // Requests go to the endpoint's agent over mutual TLS when it is meshed; the
        // dashboard shows the edge as mTLS when the service's endpoints are.
        let mtls = ctx
            .routes
            .table()
            .by_addr(orig_dst)
            .is_some_and(|route| route.endpoints.iter().any(|e| crate::mtls::meshed(e).is_some()));
        let metrics = RequestMetrics::new(RequestLabels {
            direction: Direction::Outbound,
            source_workload: ctx.workload.clone(),
            source_identity,
            destination_service: service.clone(),
            mtls,
        });
        let client_addr = HeaderValue::from_str(&peer.ip().to_canonical().to_string()).ok();
        Outbound { ctx, peer, orig_dst, version, metrics, service, client_addr, pinned: None }
    }

    /// Sends every request to `endpoint` (see [`crate::forward::route::Destination`]).
    pub fn pinned(mut self, endpoint: Option<SocketAddr>) -> Self {
        self.pinned = endpoint;
        self
    }

    /// Serves the connection until the client closes it (or the agent shuts down).
    pub async fn serve<I>(self, io: I) -> Result<(), super::ServeError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let this = Arc::new(self);
        let (version, ctx) = (this.version, this.ctx.clone());
        let service = hyper::service::service_fn(move |req| this.clone().proxy(req));
        super::serve_http(io, version, service, &ctx.downstream, &ctx.shutdown, super::Served::Client).await
    }

    async fn proxy(self: Arc<Self>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let start = Instant::now();
        let grpc = is_grpc(req.headers());
        let table = self.ctx.routes.table();
        let route = match self.pinned {
            None => table.by_addr(self.orig_dst),
            Some(endpoint) => table.meshed_endpoint(endpoint).map(|(route, _)| route),
        };
        let Some(state) = route.and_then(|route| self.ctx.services.state(&table, route)) else {
            return Ok(error_response(StatusCode::SERVICE_UNAVAILABLE, "service is no longer known", grpc));
        };
        drop(table);

        let (mut trace, origin) = TraceContext::from_headers(req.headers());
        if origin == Origin::Generated
            && let Some(spans) = &self.ctx.records.spans
        {
            trace.set_sampled(spans.sample_new_trace());
        }
        let hop = trace.child();
        hop.apply(req.headers_mut());

        // Built only when someone reads it: with the access log and span export off,
        // a request allocates nothing for it.
        let mut record = self.ctx.records.wants_http(hop.sampled()).then(|| {
            let mut r = AccessRecord::http(Direction::Outbound, self.ctx.mode, self.peer);
            r.destination_service = Some(self.service.clone());
            r.original_destination = Some(self.orig_dst);
            r.protocol = Some(if grpc { "grpc" } else { self.version.name() });
            r.method = Some(req.method().as_str().to_owned());
            r.path = Some(req.uri().path().to_owned());
            r.authority = authority(&req);
            r.trace_id = Some(hop.trace_id());
            r.request_id = Some(hop.request_id().to_owned());
            r.source_identity = Some(self.metrics.labels().source_identity.clone());
            r.source_workload = Some(self.metrics.labels().source_workload.clone());
            if self.ctx.records.exports_span(hop.sampled()) {
                r.span = Some(HopSpan {
                    span_id: hop.parent_id(),
                    parent_id: (origin == Origin::Propagated).then(|| trace.parent_id()),
                    flags: hop.flags(),
                    tracestate: hop.tracestate().cloned(),
                });
            }
            Box::new(r)
        });
        let method_label = crate::observe::labels::method(req.method());

        let (routed, target_route, target_balancer, mirror) =
            match self.route(&state, &req, &mut record, grpc).await {
                Routed::Send { route, target: (r, b), mirror } => (route, r, b, mirror),
                Routed::Answered(status, resp) => {
                    self.finish_local(record, method_label, status, start);
                    return Ok(resp);
                }
            };

        let upgrade = self.version == Version::Http1 && is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        if let Some(v) = &self.client_addr {
            req.headers_mut().insert(CLIENT_ADDR_HEADER, v.clone());
        }
        let hash_key = state.hash_key_source().and_then(|src| hash_key(src, req.headers(), self.peer));

        let request_bytes = Arc::new(AtomicU64::new(0));
        let (parts, body) = req.into_parts();
        let length = body_length(&parts.headers, &body);
        let policy = &state.policy;
        let retry_policy = routed.and_then(|r| r.rule.retry.as_ref()).unwrap_or(&policy.retry);
        let request_timeout = routed.and_then(|r| r.rule.timeout).or(policy.request_timeout);
        // A replayable body is read whole first (bounded by REPLAY_BUFFER, by
        // REPLAY_READ_TIMEOUT, and by the agent's total for bodies held for retries
        // and mirrors); any other streams through once.
        let reservation = ((retry_policy.max_attempts > 1 || mirror.is_some())
            && !upgrade
            && is_replayable(parts.method.as_str(), length, REPLAY_BUFFER))
        .then(|| reserve_replay(length))
        .flatten();
        let replayable = reservation.is_some();
        let mut body = match reservation {
            Some(reservation) => {
                let read = Limited::new(body, REPLAY_BUFFER as usize).collect();
                let read = match tokio::time::timeout(REPLAY_READ_TIMEOUT, read).await {
                    Ok(Ok(collected)) => Ok(collected.to_bytes()),
                    Ok(Err(e)) => Err((StatusCode::BAD_REQUEST, format!("client: {e}"))),
                    Err(_) => {
                        Err((StatusCode::REQUEST_TIMEOUT, "request body not received in time".to_owned()))
                    }
                };
                match read {
                    Ok(bytes) => RequestBody::Buffered { bytes, _held: reservation },
                    Err((status, why)) => {
                        let resp = error_response(status, "request body could not be read", grpc);
                        if let Some(r) = record.as_mut() {
                            r.error = Some(why);
                        }
                        self.finish_local(record, method_label, status, start);
                        return Ok(resp);
                    }
                }
            }
            None => RequestBody::Stream(Some(body)),
        };
        if let Some((route, mirror_backend)) = mirror {
            self.mirror(route, mirror_backend, &parts, &body, length, hash_key);
        }
        let connect_timeout = policy.connect_timeout.unwrap_or(self.ctx.connect_timeout);
        let target = Target { route: target_route, balancer: &**target_balancer, retry: retry_policy };
        // Built inside the call (not bound first): a bound future would take room in
        // this future's state twice (see `deadline`).
        let result = super::deadline::within(
            request_timeout,
            self.tries(
                &state,
                &target,
                &parts,
                &mut body,
                replayable,
                hash_key,
                connect_timeout,
                &request_bytes,
                &mut record,
            ),
        )
        .await
        .unwrap_or_else(|limit| Err(Failed::Timeout(limit)));
        match result {
            Ok((mut resp, guard, outcome)) => {
                if let Some(client_upgrade) = downstream_upgrade
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let upstream_upgrade = hyper::upgrade::on(&mut resp);
                    tokio::spawn(splice_upgrade(
                        client_upgrade,
                        upstream_upgrade,
                        self.ctx.downstream.idle,
                        self.ctx.shutdown.clone(),
                    ));
                } else {
                    strip_hop_by_hop(resp.headers_mut(), false);
                }
                let status = resp.status();
                // One lookup of the answering endpoint for the record and the header.
                let target = target_of(target_route, guard.addr());
                if let Some(r) = record.as_mut() {
                    r.response_code = Some(status.as_u16());
                    r.destination_endpoint = Some(guard.addr());
                    if let Some((_, identity)) = target.and_then(crate::mtls::meshed) {
                        r.destination_identity = Some(MeshName::known(&identity.to_string()));
                    }
                }
                let endpoint_header =
                    target.map_or_else(|| addr_header(guard.addr()), |t| t.addr_header.clone());
                resp.headers_mut().insert(ENDPOINT_HEADER, endpoint_header);
                let header_grpc = grpc_status(resp.headers());
                let this = self.clone();
                let on_end = Box::new(move |end: BodyEnd| {
                    this.finish(
                        record,
                        guard,
                        outcome,
                        method_label,
                        status,
                        header_grpc,
                        end,
                        start,
                        &request_bytes,
                    )
                });
                Ok(resp.map(|b| Observed::new(b, None, Some(on_end)).boxed_unsync()))
            }
            Err(Failed::RateLimited(decision)) => {
                // Not logged: a client over its limit may send thousands a second.
                let secs = decision.retry_after_secs().unwrap_or(1);
                let mut resp = error_response(StatusCode::TOO_MANY_REQUESTS, "rate limited", grpc);
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                if let Some(r) = record.as_mut() {
                    r.error = Some("rate limited".into());
                }
                self.finish_local(record, method_label, StatusCode::TOO_MANY_REQUESTS, start);
                Ok(resp)
            }
            Err(failed) => {
                let (status, message) = failed.status();
                if let Some(r) = record.as_mut() {
                    r.error = Some(message.clone());
                }
                warn!(target: "mesh_agent::conn", service = %self.service, src = %self.peer, error = %message,
                    "request failed");
                self.finish_local(record, method_label, status, start);
                Ok(error_response(status, &message, grpc))
            }
        }
    }

    /// Applies the service's routes to a request: the route it takes (recorded), that
    /// route's faults (the delay waited here), and the backend drawn by weight; the
    /// service itself when no route takes it, or when the client dialled one endpoint
    /// by its address (routes are for the service, not for a pinned endpoint).
    async fn route<'s, B>(
        &self,
        state: &'s ServiceState,
        req: &Request<B>,
        record: &mut Option<Box<AccessRecord>>,
        grpc: bool,
    ) -> Routed<'s> {
        let routed = match self.pinned {
            None if !state.routes.is_empty() => select_route(state, req),
            _ => None,
        };
        let backend = routed.map_or(&state.own, |r| r.backend(&*state.random));
        if let Some(route) = routed {
            if let Some(r) = record.as_mut() {
                r.route = Some(route.rule.name.clone());
            }
            if let Some(delay) = route.rule.fault.delay(&*state.random) {
                crate::observe::metrics::fault_injected(&self.service, &route.rule.name, "delay");
                tokio::time::sleep(delay).await;
            }
            if let Some(abort) = route.rule.fault.abort(&*state.random) {
                crate::observe::metrics::fault_injected(&self.service, &route.rule.name, "abort");
                return Routed::Answered(abort.status, aborted(abort, grpc));
            }
        }
        let target = match &backend.target {
            Ok(resolved) => resolved,
            Err(why) => {
                // As Gateway API asks of a backend that cannot be resolved.
                if let Some(r) = record.as_mut() {
                    r.error = Some(why.to_string());
                }
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                return Routed::Answered(status, error_response(status, why, grpc));
            }
        };
        let mirror = routed.and_then(|r| {
            let percent = r.rule.mirror.as_ref()?.percent;
            let backend = r.mirror.as_ref()?;
            crate::routing::chosen(percent, &*state.random).then_some((r, backend))
        });
        Routed::Send { route: routed, target, mirror }
    }

    /// Sends a copy of the request to the route's mirror, when its body is in hand
    /// (empty, or held whole for retries and mirrors); otherwise counts it dropped.
    fn mirror(
        &self,
        route: &RouteState,
        backend: &crate::routing::Backend,
        parts: &http::request::Parts,
        body: &RequestBody,
        length: BodyLength,
        hash_key: Option<u64>,
    ) {
        let held = match body {
            RequestBody::Buffered { bytes, .. } => Some(bytes.clone()),
            RequestBody::Stream(_) if length == BodyLength::Empty => Some(Bytes::new()),
            RequestBody::Stream(_) => None,
        };
        match held {
            Some(body) => super::mirror::spawn(
                &self.ctx,
                &self.service,
                &route.rule.name,
                backend,
                super::mirror::Copy { parts, body, version: self.version, hash_key },
            ),
            None => crate::observe::metrics::mirrored(&self.service, &route.rule.name, "dropped"),
        }
    }

    /// Every try of one request, up to the response headers of the last.
    #[allow(clippy::too_many_arguments)]
    async fn tries(
        &self,
        state: &ServiceState,
        target: &Target<'_>,
        parts: &http::request::Parts,
        body: &mut RequestBody,
        replayable: bool,
        hash_key: Option<u64>,
        connect_timeout: Duration,
        request_bytes: &Arc<AtomicU64>,
        record: &mut Option<Box<AccessRecord>>,
    ) -> Result<(Response<UpstreamBody>, PickGuard, Outcome), Failed> {
        let mut retry = target.retry.start(&state.budget);
        loop {
            let picked = match self.pinned {
                Some(endpoint) => state.claim(endpoint),
                None => target
                    .balancer
                    .pick(&crate::balance::PickContext { hash_key, locality: self.ctx.locality.as_ref() }),
            };
            let Some(guard) = picked else {
                return Err(Failed::NoEndpoint(target.balancer.endpoints().len()));
            };
            let endpoint = guard.addr();
            let dial = dial_for(target.route, endpoint);
            if retry.attempts() == 1
                && let Some(decision @ Decision::Limited { .. }) = self.calling_side_limit(state, &dial)
            {
                // Dropped without a report: the endpoint was never tried.
                drop(guard);
                return Err(Failed::RateLimited(decision));
            }
            let Some(mut req) = body.request(parts, request_bytes) else {
                return Err(Failed::Upstream("request body already sent".into()));
            };
            if matches!(dial, Dial::Plain) {
                // Only a receiving agent reads (and removes) it; an app must not see it.
                req.headers_mut().remove(CLIENT_ADDR_HEADER);
            }
            let idle = state.policy.idle_timeout;
            let send_timeout = state.policy.retry.per_try_timeout;
            // Boxed: the send future is most of a request's state, and the request's
            // future is moved whole when hyper spawns or boxes it; one allocation
            // per try is cheaper than carrying (and copying) it inline.
            let sent = super::deadline::within(
                send_timeout,
                Box::pin(self.ctx.upstreams.send_with_idle(
                    endpoint,
                    &dial,
                    self.version,
                    connect_timeout,
                    idle,
                    req,
                )),
            )
            .await;
            let (failure, resp) = match sent {
                Err(limit) => (FailureKind::Timeout, Err(Failed::Timeout(limit))),
                Ok(Err(SendError::Connect { endpoint, message })) => {
                    (FailureKind::ConnectFailure, Err(Failed::Connect(format!("{endpoint}: {message}"))))
                }
                Ok(Err(SendError::Request(e))) => {
                    (FailureKind::Reset, Err(Failed::Upstream(format!("{endpoint}: {e}"))))
                }
                Ok(Ok(resp)) => {
                    let outcome = match grpc_status(resp.headers()) {
                        Some(code) => Outcome::from_grpc_status(code as i32),
                        None => Outcome::from_http_status(resp.status().as_u16()),
                    };
                    match outcome {
                        Outcome::Success => return Ok((resp, guard, outcome)),
                        Outcome::Failure(kind) => (kind, Ok(resp)),
                    }
                }
            };
            let decision = retry.on_failure(failure, replayable, &*state.random);
            match decision {
                RetryDecision::Retry { after } => {
                    debug!(service = %state.route.service, endpoint = %endpoint, failure = ?failure,
                        after_ms = after.as_millis() as u64, "retrying request");
                    guard.report(Outcome::Failure(failure));
                    crate::observe::metrics::retry(&self.service);
                    if let Some(r) = record.as_mut() {
                        r.retries = Some(retry.attempts() - 1);
                    }
                    if !after.is_zero() {
                        tokio::time::sleep(after).await;
                    }
                }
                RetryDecision::GiveUp(why) => {
                    if retry.attempts() > 1 {
                        debug!(service = %state.route.service, reason = ?why, "not retrying");
                    }
                    return match resp {
                        // The endpoint's own error response goes back to the client.
                        Ok(resp) => Ok((resp, guard, Outcome::Failure(failure))),
                        Err(e) => {
                            guard.report(Outcome::Failure(failure));
                            Err(e)
                        }
                    };
                }
            }
        }
    }

    /// The service's rate limit as the calling side applies it, to a request whose
    /// first try goes to `dial`; `None` when it does not apply here.
    ///
    /// A meshed endpoint is limited by its own agent, per calling identity
    /// ([`crate::inbound::rate_limit`]): limiting here too would be per calling node,
    /// N nodes getting N times the limit, and a second bucket for the same request.
    /// An endpoint outside the mesh has no agent to do it, so its requests are
    /// limited here, still per calling node but at least per caller: by the calling
    /// workload's identity when it has one (all its clients, whatever their
    /// address, share one bucket), else by the client's address.
    fn calling_side_limit(&self, state: &ServiceState, dial: &Dial) -> Option<Decision> {
        let limiter = state.rate_limiter.as_ref()?;
        if !matches!(dial, Dial::Plain) {
            return None;
        }
        let client = match self.ctx.identity.get() {
            Some(ident) => ClientKey::Identity(ident.workload.id().to_string()),
            None => ClientKey::Ip(self.peer.ip().to_canonical()),
        };
        Some(limiter.check(&client))
    }

    /// Accounts a request answered by the agent itself (rate limit, no endpoint, all
    /// tries failed).
    fn finish_local(
        &self,
        record: Option<Box<AccessRecord>>,
        method: &'static str,
        status: StatusCode,
        start: Instant,
    ) {
        let duration = start.elapsed();
        self.metrics.record(&RequestOutcome {
            method,
            status: Some(status.as_u16()),
            grpc_status: None,
            duration,
            request_bytes: 0,
            response_bytes: 0,
        });
        if let Some(mut record) = record {
            record.response_code = Some(status.as_u16());
            record.latency = Some(duration);
            self.ctx.log_access(*record);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        record: Option<Box<AccessRecord>>,
        guard: PickGuard,
        outcome: Outcome,
        method: &'static str,
        status: StatusCode,
        header_grpc: Option<u32>,
        end: BodyEnd,
        start: Instant,
        request_bytes: &AtomicU64,
    ) {
        let grpc = end.grpc_status.or(header_grpc);
        if end.complete {
            let outcome = match (outcome, end.grpc_status) {
                (Outcome::Success, Some(code)) if code as i32 == GRPC_UNAVAILABLE => {
                    Outcome::Failure(FailureKind::GrpcUnavailable)
                }
                (o, _) => o,
            };
            guard.report(outcome);
        } else if end.error.is_some() {
            guard.report(Outcome::Failure(FailureKind::Reset));
        } else {
            // The client went away: no verdict on the endpoint.
            drop(guard);
        }
        let duration = start.elapsed();
        let sent = request_bytes.load(Ordering::Relaxed);
        self.metrics.record(&RequestOutcome {
            method,
            status: Some(status.as_u16()),
            grpc_status: grpc,
            duration,
            request_bytes: sent,
            response_bytes: end.bytes,
        });
        if let Some(mut record) = record {
            record.grpc_status = grpc;
            record.latency = Some(duration);
            record.bytes_sent = sent;
            record.bytes_received = end.bytes;
            if let Some(e) = end.error {
                record.error = Some(e);
            }
            self.ctx.log_access(*record);
        }
    }
}

/// What a service's routes made of a request.
enum Routed<'s> {
    /// Send it: the route that took it (if any), the service port and balancer of the
    /// backend drawn, and the mirror to copy it to.
    Send {
        route: Option<&'s RouteState>,
        target: &'s crate::routing::Resolved,
        mirror: Option<(&'s RouteState, &'s crate::routing::Backend)>,
    },
    /// Answered by the agent (an injected abort, a backend that cannot be resolved).
    Answered(StatusCode, Response<Body>),
}

/// Where a request's tries go: the chosen backend's service port and balancer, and
/// the retry policy in force (the route's, else the service's).
struct Target<'a> {
    route: &'a Route,
    balancer: &'a dyn crate::balance::Balancer,
    retry: &'a crate::resilience::retry::RetryPolicy,
}

/// The first of the service's routes the request meets. The path is normalised
/// only when some route matches on it.
fn select_route<'s, B>(state: &'s ServiceState, req: &Request<B>) -> Option<&'s RouteState> {
    let normalized =
        state.routes.needs_path().then(|| crate::authz::path::normalize(req.uri().path()).ok()).flatten();
    let view = RequestView {
        path: normalized.as_deref(),
        method: req.method(),
        headers: req.headers(),
        query: req.uri().query().unwrap_or(""),
    };
    state.routes.select(&view)
}

/// The answer to a request a route's fault aborts: a gRPC request gets the gRPC
/// status when one is set, else the HTTP status.
fn aborted(abort: crate::routing::Abort, grpc: bool) -> Response<Body> {
    match abort.grpc_status {
        Some(code) if grpc => {
            let mut resp = error_response(StatusCode::OK, "fault injected", true);
            resp.headers_mut().insert("grpc-status", HeaderValue::from(code));
            resp
        }
        _ => error_response(abort.status, "fault injected", false),
    }
}

/// The request body across tries: buffered (replayable) or streamed once.
enum RequestBody {
    /// The whole body, and its share of the agent's budget for bodies held for retries.
    Buffered {
        bytes: Bytes,
        _held: crate::resilience::replay::Reservation,
    },
    Stream(Option<Incoming>),
}

impl RequestBody {
    /// The request for the next try; `None` when a streamed body was already sent.
    fn request(&mut self, parts: &http::request::Parts, counter: &Arc<AtomicU64>) -> Option<Request<Body>> {
        let body: Body = match self {
            RequestBody::Buffered { bytes, .. } => {
                counter.store(bytes.len() as u64, Ordering::Relaxed);
                Full::new(bytes.clone()).map_err(|never| match never {}).boxed_unsync()
            }
            RequestBody::Stream(body) => {
                Observed::new(body.take()?, Some(counter.clone()), None).boxed_unsync()
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        Some(req)
    }
}

/// Why a request got no usable response.
#[derive(Debug)]
enum Failed {
    /// Refused by the service's rate limit on this side (answered 429 with Retry-After).
    RateLimited(Decision),
    NoEndpoint(usize),
    Connect(String),
    Upstream(String),
    Timeout(Duration),
}

impl Failed {
    fn status(&self) -> (StatusCode, String) {
        match self {
            Failed::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate limited".to_owned()),
            Failed::NoEndpoint(n) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no available endpoint (of {n}): unhealthy, ejected or circuit open"),
            ),
            Failed::Connect(m) => (StatusCode::SERVICE_UNAVAILABLE, format!("upstream connect failed: {m}")),
            Failed::Upstream(m) => (StatusCode::BAD_GATEWAY, format!("upstream failed: {m}")),
            Failed::Timeout(d) => (StatusCode::GATEWAY_TIMEOUT, format!("upstream timed out after {d:?}")),
        }
    }
}

/// How an endpoint of `route` is reached: through its agent when it is meshed.
pub(crate) fn dial_for(route: &Route, endpoint: SocketAddr) -> Dial {
    target_of(route, endpoint)
        .and_then(crate::mtls::meshed)
        .map(|(agent, id)| Dial::Meshed { agent, identity: id.clone() })
        .unwrap_or(Dial::Plain)
}

fn body_length(headers: &HeaderMap, body: &Incoming) -> BodyLength {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return BodyLength::Empty;
    }
    match headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Known(n),
        None => BodyLength::Unknown,
    }
}

/// The consistent-hash key of a request, from the source the policy names.
fn hash_key(source: &HashKeySource, headers: &HeaderMap, peer: SocketAddr) -> Option<u64> {
    match source {
        HashKeySource::Header(name) => headers.get(name.as_str()).map(|v| hash::hash_bytes(v.as_bytes())),
        HashKeySource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| hash::hash_bytes(v.as_bytes())),
        HashKeySource::SourceAddress => Some(hash::hash_ip(peer.ip())),
    }
}

fn authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
}

pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An answer from the agent itself. gRPC clients get a trailers-only response with
/// the matching gRPC status, since they read `grpc-status`, not the HTTP code.
pub(crate) fn error_response(status: StatusCode, message: &str, grpc: bool) -> Response<Body> {
    let mut resp = if grpc {
        let code = match status {
            StatusCode::FORBIDDEN => 7,         // PERMISSION_DENIED
            StatusCode::TOO_MANY_REQUESTS => 8, // RESOURCE_EXHAUSTED
            StatusCode::GATEWAY_TIMEOUT => 4,   // DEADLINE_EXCEEDED
            StatusCode::BAD_REQUEST => 13,      // INTERNAL
            _ => GRPC_UNAVAILABLE as u32,       // UNAVAILABLE
        };
        let mut resp = Response::new(empty());
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
        resp
    } else {
        let mut resp = Response::new(
            Full::new(Bytes::from(format!("{message}\n"))).map_err(|n| match n {}).boxed_unsync(),
        );
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        resp
    };
    resp.headers_mut().insert("x-mesh-error", HeaderValue::from_static("agent"));
    resp
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|n| match n {}).boxed_unsync()
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// After a 101, joins the client's and the upstream's upgraded connections. From
/// then on the connection is a byte relay (a WebSocket, say) with no request to
/// wait for, so it is closed (FIN both ways) when nothing moved for `idle`, the
/// downstream connection's idle limit, or as soon as the agent shuts down: a
/// client reconnects, as after any closed WebSocket, instead of holding the
/// draining agent until it is killed.
pub(crate) async fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Option<Duration>,
    shutdown: CancellationToken,
) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => return debug!(error = %e, "protocol upgrade failed"),
    };
    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
    let activity = crate::forward::idle::Activity::default();
    let relayed = {
        let mut marked = crate::forward::idle::Marked::new(&mut c, &activity);
        let relay = tokio::io::copy_bidirectional(&mut marked, &mut u);
        tokio::select! {
            ended = crate::forward::idle::watch(relay, &activity, idle) => ended,
            () = shutdown.cancelled() => {
                debug!("agent shutting down: closing an upgraded connection");
                None
            }
        }
    };
    match relayed {
        Some(Ok(_)) => {}
        Some(Err(e)) => debug!(error = %e, "upgraded connection ended with an error"),
        None => crate::forward::idle::close(&mut c, &mut u).await,
    }
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::Http1 => "http1",
            Version::Http2 => "http2",
        }
    }
}
