//! Routing an accepted connection: which service its original destination names,
//! which endpoint of it the balancer picks, and the upstream connect with failover
//! to other endpoints. A destination that is no service is passed through to itself.

use std::{io, net::SocketAddr, sync::Arc};

use tracing::warn;

use crate::{
    balance::{HashKeySource, PickGuard, hash, service::ServiceState},
    listener::ProxyContext,
    resilience::outcome::{FailureKind, Outcome as Verdict},
};

/// Other endpoints tried after a failed connect.
const FAILOVER_ATTEMPTS: usize = 2;

/// Where the mesh sends a connection.
pub struct Destination {
    /// The service (its balancer, breakers and policy).
    pub state: Arc<ServiceState>,
    /// The client dialled this endpoint of the service by its own address (a pod
    /// or host IP and target port): exactly it is used, never another.
    pub pinned: Option<SocketAddr>,
}

/// What an original destination names: a service's VIP, or a meshed endpoint's own
/// address (which, as ztunnel does for pod IPs, goes through mutual TLS to that
/// endpoint's agent like its service, never out in plaintext); `None` for anything
/// else, which is passed through.
pub fn destination(ctx: &ProxyContext, orig_dst: SocketAddr) -> Option<Destination> {
    let table = ctx.routes.table();
    if let Some(route) = table.by_addr(orig_dst) {
        return ctx.services.state(&table, route).map(|state| Destination { state, pinned: None });
    }
    let (route, endpoint) = table.meshed_endpoint(orig_dst)?;
    let pinned = Some(endpoint.addr);
    ctx.services.state(&table, route).map(|state| Destination { state, pinned })
}

/// The endpoint for a connection from `peer`: the pinned one, or the one the
/// balancer picks; `None` when it is not available (all unhealthy, ejected or
/// circuit open).
pub fn pick(ctx: &ProxyContext, dest: &Destination, peer: SocketAddr) -> Option<PickGuard> {
    let state = &dest.state;
    if let Some(addr) = dest.pinned {
        return state.claim(addr);
    }
    // Ring hash / Maglev on a TCP service can only key on the client address.
    let hash_key = match state.hash_key_source() {
        Some(HashKeySource::SourceAddress) => Some(hash::hash_ip(peer.ip())),
        _ => None,
    };
    state.pick(hash_key, ctx.locality.as_ref())
}

/// Where a connection relayed in plaintext is sent.
pub struct Target {
    /// The first address to try.
    first: SocketAddr,
    /// The balancer's claim on `first`, and the service for failing over to another
    /// endpoint; `None` for a destination passed through to itself.
    service: Option<(PickGuard, Arc<ServiceState>)>,
}

impl Target {
    /// The original destination itself (no service claims it).
    pub fn passthrough(orig_dst: SocketAddr) -> Self {
        Target { first: orig_dst, service: None }
    }

    /// The endpoint `guard` holds, of `state`.
    pub fn endpoint(guard: PickGuard, state: Arc<ServiceState>) -> Self {
        Target { first: guard.addr(), service: Some((guard, state)) }
    }

    /// `namespace/name` when the target is a service's endpoint.
    pub fn service_name(&self) -> Option<Arc<str>> {
        self.service.as_ref().map(|(_, state)| state.route.service.clone())
    }
}

/// An upstream connection, the endpoint it reached and the balancer's claim on it.
pub type Connected = (tokio::net::TcpStream, SocketAddr, Option<PickGuard>);

/// Connects to the target; when a service endpoint refuses or times out, reports it
/// to the endpoint's breaker and outlier detection and tries up to
/// [`FAILOVER_ATTEMPTS`] other endpoints the balancer offers (a connection that never
/// reached a server is always safe to retry).
pub async fn connect(ctx: &ProxyContext, target: Target) -> io::Result<Connected> {
    let Target { first, service } = target;
    let (mut guard, state) = match service {
        Some((guard, state)) => (Some(guard), Some(state)),
        None => (None, None),
    };
    let mut addr = first;
    let timeout = state.as_ref().and_then(|s| s.policy.connect_timeout).unwrap_or(ctx.connect_timeout);
    let mut attempt = 0;
    loop {
        match ctx.sockets.connect(addr, timeout).await {
            Ok(s) => return Ok((s, addr, guard)),
            Err(e) => {
                if let Some(g) = guard.take() {
                    g.report(Verdict::Failure(FailureKind::ConnectFailure));
                }
                let next = match &state {
                    Some(state) if attempt < FAILOVER_ATTEMPTS => state.pick(None, ctx.locality.as_ref()),
                    _ => None,
                };
                match next {
                    Some(g) => {
                        attempt += 1;
                        warn!(endpoint = %addr, error = %e, next = %g.addr(), "endpoint connect failed; trying another");
                        addr = g.addr();
                        guard = Some(g);
                    }
                    None => return Err(io::Error::new(e.kind(), format!("{addr}: {e}"))),
                }
            }
        }
    }
}
