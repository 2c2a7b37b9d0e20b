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

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    authz::{Principal, decide},
    discovery::{RouteStore, table::EndpointTarget},
    forward::{Accepted, detect::Sniffed, idle},
    identity::{IdentityError, SpiffeId},
    intercept::ActiveMode,
    l7::pool::UpstreamPool,
    listener::{Direction, ProxyContext},
    observe::{Records, access_log::AccessRecord, labels::MeshName},
    sniff::{self, OpaqueReason, Protocol},
    socket::SocketFactory,
    tunnel::{ClientTls, HttpServe, Relay, StreamInfo, TunnelPool, TunnelRecord, TunnelServer, TunnelStream},
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

/// Where a federated trust domain's agents are reached: its cluster's gateways in
/// the current snapshot.
pub fn gateways(routes: Arc<RouteStore>) -> crate::tunnel::Gateways {
    Arc::new(move |trust_domain: &str| {
        let table = routes.table();
        table
            .federated
            .iter()
            .filter(|f| f.trust_domain == trust_domain)
            .flat_map(|f| f.gateways.clone())
            .collect()
    })
}

/// Keeps `bundle`'s federated trust domains equal to the snapshot's, until
/// `shutdown`: a cluster joining or leaving the federation, or rotating its root,
/// reaches the next handshake.
pub async fn follow_federation(
    routes: Arc<RouteStore>,
    bundle: Arc<crate::identity::TrustBundle>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut versions = routes.subscribe();
    versions.mark_changed();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = versions.changed() => if changed.is_err() { return },
        }
        let table = routes.table();
        let domains: Vec<(&str, &[String])> =
            table.federated.iter().map(|f| (f.trust_domain.as_str(), f.roots_pem.as_slice())).collect();
        for problem in bundle.set_federated(domains) {
            warn!(version = table.version, %problem, "federated trust domain not trusted");
        }
        let trusted = bundle.federated_domains();
        if !trusted.is_empty() {
            tracing::debug!(version = table.version, ?trusted, "federated trust domains");
        }
    }
}

/// Whether an endpoint is reached through its node's agent (meshed), and how.
/// The identity was parsed when the route table was built (a malformed one refused
/// the snapshot), so a meshed endpoint always has one to check.
pub fn meshed(endpoint: &EndpointTarget) -> Option<(SocketAddr, &Arc<SpiffeId>)> {
    match (endpoint.agent_address, endpoint.spiffe_id.as_ref()) {
        (Some(agent), Some(id)) => Some((agent, id)),
        _ => None,
    }
}

/// A connection's meshed destination.
pub struct Meshed<'a> {
    pub service: &'a str,
    pub endpoint: SocketAddr,
    /// The endpoint's node agent.
    pub agent: SocketAddr,
    /// The identity the endpoint must prove.
    pub dest_id: &'a SpiffeId,
}

/// Carries an intercepted connection to a meshed endpoint through the tunnel.
/// `sniffed` holds what the client already sent and what sniffing found, when it
/// ran before; otherwise sniffing overlaps the tunnel open.
pub async fn forward(
    ctx: &ProxyContext,
    conn: &Accepted,
    mut client: TcpStream,
    meshed: Meshed<'_>,
    sniffed: Sniffed,
) -> Result<(u64, u64, String), String> {
    let Accepted { peer, orig_dst, start, .. } = *conn;
    let Meshed { service, endpoint, agent, dest_id } = meshed;
    let Sniffed { bytes: mut sniffed, protocol } = sniffed;
    let Some(ident) = ctx.identity.wait(ctx.connect_timeout).await else {
        crate::forward::reset(&client);
        return Err("no workload certificate yet: meshed traffic is never sent in plaintext".into());
    };
    let source = ident.workload.id().clone();
    let expected = dest_id;
    let open = ctx.tunnels.open(agent, &source, expected, endpoint, http::HeaderMap::new());
    // Through the tunnel the server cannot speak first until the stream is open, so
    // detection here only classifies; opaque ports skip it.
    let (protocol, opened) = match protocol {
        Some(p) => (Ok(p), open.await),
        None if ctx.opaque_ports.contains(&orig_dst.port()) => {
            (Ok(Protocol::Opaque(OpaqueReason::OpaquePort)), open.await)
        }
        None => tokio::join!(sniff::sniff(&mut client, &mut sniffed, ctx.detect_timeout), open),
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
    let activity = idle::Activity::default();
    let relay = async {
        if !sniffed.is_empty() {
            tunnel.write_all(&sniffed).await?;
        }
        // Every byte relayed goes through the client's socket.
        crate::copy::bidirectional(&mut idle::Marked::new(&mut client, &activity), &mut tunnel).await
    };
    let (up, down, idle_timeout) = match idle::watch(relay, &activity, ctx.tcp_idle_timeout).await {
        Some(Ok((up, down))) => (up + sniffed.len() as u64, down, false),
        Some(Err(e)) => {
            tunnel.reset();
            crate::forward::reset(&client);
            return Err(format!("relay: {e}"));
        }
        None => {
            idle::close(&mut client, &mut tunnel).await;
            (tunnel.bytes_sent(), tunnel.bytes_received(), true)
        }
    };
    let error = idle_timeout.then_some(idle::ERROR);
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
        error,
        "connection closed"
    );
    if ctx.records.wants_tcp() {
        let mut r = AccessRecord::tcp(Direction::Outbound, ctx.mode, peer);
        r.source_identity = Some(MeshName::known(&source.to_string()));
        r.source_workload = Some(ctx.workload.clone());
        r.destination_service = Some(MeshName::known(service));
        r.destination_endpoint = Some(endpoint);
        r.destination_identity = Some(MeshName::known(&expected.to_string()));
        r.original_destination = Some(orig_dst);
        r.protocol = Some(protocol.name());
        r.duration = Some(start.elapsed());
        r.bytes_sent = up;
        r.bytes_received = down;
        r.error = error.map(str::to_owned);
        ctx.log_access(r);
    }
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
    /// How long a stream's client that started sending may take to show what it
    /// sends (`--detect-timeout`).
    pub detect_timeout: Duration,
    pub mode: ActiveMode,
    /// HTTP streams' requests go to local workloads through this pool.
    pub upstreams: Arc<UpstreamPool>,
    /// Where request and connection records go (access log, span export).
    pub records: Records,
    /// Time limits of HTTP streams' connections (`--downstream-idle-timeout`).
    pub downstream: crate::l7::DownstreamTimeouts,
    /// Services' rate limits for this node's workloads (the agent's one set).
    pub rate_limits: Arc<crate::inbound::rate_limit::DestinationLimits>,
    /// Idle timeout of streams relayed as bytes (`--tcp-idle-timeout`); this side
    /// waits twice as long, see [`serve_inbound`].
    pub tcp_idle_timeout: Option<Duration>,
}

/// How the tunnel port admits TLS handshakes.
#[derive(Clone)]
pub struct Handshakes {
    pub limits: crate::limits::HandshakeLimits,
    /// Deadline of a connection's TLS and HTTP/2 handshakes.
    pub timeout: Duration,
    /// Where handshakes run; `None`: on the caller's worker.
    pub runtime: Option<Arc<crate::tunnel::HandshakeRuntime>>,
}

/// Serves peers' tunnels on `listener` until `shutdown`: TLS with this node's
/// workload certificate, authorization from the rules of every service selecting
/// the target ([`crate::authz`]), and only targets that are workloads on this node.
/// Direct HTTP connections ([`crate::identity::ALPN_MESH_HTTP`]) are proxied per
/// request ([`crate::l7::inbound`]); CONNECT streams are served by
/// [`crate::inbound::stream`] (per request when they carry HTTP, as bytes
/// otherwise). At `shutdown` the server stops accepting and sends GOAWAY, and HTTP
/// streams' connections close gracefully.
///
/// A byte relay ends after twice the idle timeout without a byte: the sending agent,
/// which sees the same bytes, normally ends it first and cleanly, and decides for
/// the endpoint's health; this side's timer is the backstop for a sending agent
/// that vanished. Were this side first, the sending agent could see its stream
/// reset and count it against the endpoint.
pub fn serve_inbound(
    listener: TcpListener,
    inbound: Inbound,
    limits: Arc<crate::limits::ConnectionLimits>,
    handshakes: Handshakes,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let Inbound {
        slot,
        routes,
        node,
        sockets,
        connect_timeout,
        detect_timeout,
        mode,
        upstreams,
        records,
        downstream,
        rate_limits,
        tcp_idle_timeout,
    } = inbound;
    let tls_slot = slot.clone();
    let tls = Arc::new(move |_local: SocketAddr| {
        let ident = tls_slot.get()?;
        ident.manager.tls().server_config(ident.workload.clone()).ok()
    });
    let auth_routes = routes.clone();
    let auth_node = node.clone();
    let authorize = Arc::new(move |peer: &SpiffeId, target: SocketAddr| {
        let principal = peer.to_string();
        let decision = decide(&auth_routes, &auth_node, Principal::Authenticated(&principal), target)?;
        if decision.admits() {
            Ok(())
        } else {
            warn!(peer = %peer, target = %target, services = %decision.services(), "denied by authorization policy");
            crate::observe::metrics::authorization_denied(
                &MeshName::known(&decision.service),
                &principal,
                "connection",
            );
            Err(format!("{peer} is not allowed to reach {}", decision.service))
        }
    });
    let connect = Arc::new(move |target: SocketAddr| {
        let sockets = sockets.clone();
        Box::pin(async move { sockets.connect(target, connect_timeout).await })
            as std::pin::Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>
    });
    let shared = Arc::new(crate::l7::inbound::Shared {
        routes,
        node,
        upstreams,
        connect_timeout,
        mode,
        records,
        downstream,
        identity: slot,
        rate_limits,
    });
    let direct = shared.clone();
    let http: HttpServe = Arc::new(move |peer_id, peer_addr, tls, shutdown| {
        let direct = direct.clone();
        Box::pin(async move {
            let start = Instant::now();
            let ended = direct.serve_direct(peer_id.clone(), peer_addr, tls, shutdown).await;
            tracing::debug!(peer = %peer_addr, peer_identity = %peer_id,
                duration_ms = start.elapsed().as_secs_f64() * 1000.0,
                error = ended.err().map(|e| e.to_string()), "direct HTTP connection closed");
        })
    });
    let streams = Arc::new(crate::inbound::stream::Streams {
        shared,
        detect_timeout,
        relay_idle_timeout: tcp_idle_timeout.map(|t| t.saturating_mul(2)),
        shutdown: shutdown.clone(),
    });
    let relay: Relay = Arc::new(move |info: StreamInfo, tunnel: TunnelStream, upstream: TcpStream| {
        let streams = streams.clone();
        Box::pin(async move { crate::inbound::stream::serve(&streams, info, tunnel, upstream).await })
            as std::pin::Pin<Box<dyn Future<Output = (u64, u64, Option<String>)> + Send>>
    });
    let mode_name = mode.as_str();
    let on_close = Arc::new(move |r: TunnelRecord| {
        info!(
            target: "mesh_agent::conn",
            mode = mode_name,
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
    let mut server = TunnelServer::new(tls, authorize, connect)
        .with_on_close(on_close)
        .with_relay(relay)
        .with_http(http)
        .with_limits(limits)
        .with_handshake_limits(handshakes.limits)
        .with_handshake_timeout(handshakes.timeout);
    if let Some(runtime) = handshakes.runtime {
        server = server.with_handshake_runtime(runtime);
    }
    tokio::spawn(server.serve(listener, shutdown))
}
