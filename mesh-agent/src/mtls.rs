//! Meshed traffic between agents: an outbound connection whose endpoint sits
//! behind another agent travels through the mutual-TLS tunnel ([`crate::tunnel`]),
//! carrying the source workload's identity; the receiving agent checks the peer's
//! identity against the destination service's authorization rules before
//! connecting to its local workload.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncWriteExt, copy_bidirectional},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    discovery::{RouteStore, table::EndpointTarget},
    identity::{IdentityError, SpiffeId},
    listener::{Direction, ProxyContext},
    sniff::{self, OpaqueReason, Protocol},
    socket::SocketFactory,
    tunnel::{ClientTls, TunnelPool, TunnelRecord, TunnelServer},
    workload_identity::IdentitySlot,
};

/// A pool whose TLS comes from the node identity once it is issued.
pub fn pool(slot: IdentitySlot, sockets: SocketFactory, connect_timeout: Duration) -> TunnelPool {
    let tls = move |source: &SpiffeId, expected: &SpiffeId| match slot.get() {
        Some(ident) => ident.manager.client_config(source, expected),
        None => Err(IdentityError::Config("no workload certificate yet".into())),
    };
    TunnelPool::new(Arc::new(tls), sockets, connect_timeout)
}

/// Whether an endpoint is reached through its node's agent (meshed), and how.
pub fn meshed(endpoint: &EndpointTarget) -> Option<(SocketAddr, &str)> {
    match (endpoint.agent_address, endpoint.identity.as_str()) {
        (Some(agent), id) if !id.is_empty() => Some((agent, id)),
        _ => None,
    }
}

/// Carries an intercepted connection to a meshed endpoint through the tunnel.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    ctx: &ProxyContext,
    mut client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    service: &str,
    endpoint: SocketAddr,
    agent: SocketAddr,
    dest_id: &str,
    start: Instant,
) -> Result<(u64, u64, String), String> {
    let Some(ident) = ctx.identity.get() else {
        crate::forward::reset(&client);
        return Err("no workload certificate yet: meshed traffic is never sent in plaintext".into());
    };
    let source = ident.workload.id().clone();
    let expected: SpiffeId = dest_id.parse().map_err(|e| format!("endpoint identity {dest_id:?}: {e}"))?;
    let mut sniffed = BytesMut::with_capacity(2048);
    let open = ctx.tunnels.open(agent, &source, &expected, endpoint, http::HeaderMap::new());
    // Through the tunnel the server cannot speak first until the stream is open, so
    // detection here only classifies; opaque ports skip it.
    let (protocol, opened) = if ctx.opaque_ports.contains(&orig_dst.port()) {
        (Ok(Protocol::Opaque(OpaqueReason::OpaquePort)), open.await)
    } else {
        tokio::join!(sniff::sniff(&mut client, &mut sniffed, ctx.detect_timeout), open)
    };
    let protocol = match protocol {
        Ok(p) => p,
        Err(e) => return Err(format!("client: {e}")),
    };
    let mut tunnel = match opened {
        Ok(t) => t,
        Err(e) => {
            crate::forward::reset(&client);
            return Err(format!("tunnel to {agent} ({expected}): {e}"));
        }
    };
    ctx.stats.detected(&protocol);
    crate::observe::metrics::record_sniff(&protocol);
    let relay = async {
        if !sniffed.is_empty() {
            tunnel.write_all(&sniffed).await?;
        }
        copy_bidirectional(&mut client, &mut tunnel).await
    };
    let (up, down) = match relay.await {
        Ok((up, down)) => (up + sniffed.len() as u64, down),
        Err(e) => {
            tunnel.reset();
            crate::forward::reset(&client);
            return Err(format!("relay: {e}"));
        }
    };
    info!(
        target: "mesh_agent::conn",
        mode = ctx.mode.as_str(),
        direction = Direction::Outbound.as_str(),
        src = %peer,
        orig_dst = %orig_dst,
        service,
        endpoint = %endpoint,
        tunnel = %agent,
        source_identity = %source,
        destination_identity = %expected,
        protocol = protocol.name(),
        bytes_sent = up,
        bytes_received = down,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "connection closed"
    );
    Ok((up, down, protocol.name().to_owned()))
}

/// What the inbound tunnel side needs.
pub struct Inbound {
    pub slot: IdentitySlot,
    pub routes: Arc<RouteStore>,
    /// This node's name: only endpoints registered on it are reachable.
    pub node: String,
    pub sockets: SocketFactory,
    pub connect_timeout: Duration,
    pub mode: &'static str,
}

/// Serves peers' tunnels on `listener` until `shutdown`: TLS with this node's
/// workload certificate, authorization from the destination service's rules, and
/// only targets that are workloads on this node.
pub fn serve_inbound(
    listener: TcpListener,
    inbound: Inbound,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let Inbound { slot, routes, node, sockets, connect_timeout, mode } = inbound;
    let tls_slot = slot.clone();
    let tls = Arc::new(move |_local: SocketAddr| {
        let ident = tls_slot.get()?;
        ident.manager.tls().server_config(ident.workload.clone()).ok()
    });
    let authorize =
        Arc::new(move |peer: &SpiffeId, target: SocketAddr| authorize(&routes, &node, peer, target));
    let connect = Arc::new(move |target: SocketAddr| {
        Box::pin(async move { sockets.connect(target, connect_timeout).await })
            as std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
    });
    let on_close = Arc::new(move |r: TunnelRecord| {
        info!(
            target: "mesh_agent::conn",
            mode,
            direction = Direction::Inbound.as_str(),
            src = %r.peer_addr,
            orig_dst = %r.target,
            peer_identity = %r.peer_id,
            status = r.status,
            bytes_sent = r.bytes_in,
            bytes_received = r.bytes_out,
            duration_ms = r.duration.as_secs_f64() * 1000.0,
            error = r.error.as_deref(),
            "connection closed"
        );
    });
    let server = TunnelServer::new(tls, authorize, connect).with_on_close(on_close);
    tokio::spawn(server.serve(listener, shutdown))
}

/// The receiving side's decision for one CONNECT.
fn authorize(routes: &RouteStore, node: &str, peer: &SpiffeId, target: SocketAddr) -> Result<(), String> {
    let table = routes.table();
    for route in table.routes() {
        let Some(ep) = route.endpoints.iter().find(|e| e.addr == target) else { continue };
        if ep.node != node {
            continue;
        }
        let rules = route.policy.as_ref().map(|p| p.authorization.as_slice()).unwrap_or_default();
        let peer_s = peer.to_string();
        // TCP-level decision: a rule restricted to HTTP methods or paths cannot be
        // checked here, so it does not grant a raw connection.
        let allowed = rules.is_empty()
            || rules.iter().any(|r| {
                r.methods.is_empty()
                    && r.path_prefixes.is_empty()
                    && (r.principals.is_empty() || r.principals.iter().any(|p| p == "*" || *p == peer_s))
            });
        if allowed {
            return Ok(());
        }
        warn!(peer = %peer, target = %target, service = %route.service, "denied by authorization policy");
        return Err(format!("{peer} is not allowed to reach {}", route.service));
    }
    Err(format!("{target} is not a workload on node {node}"))
}
