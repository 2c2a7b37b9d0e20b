//! The agent's transparent listeners and what every connection handler shares.
//!
//! Outbound: `127.0.0.1:<outbound>` and `[::1]:<outbound>`, where both the eBPF
//! connect programs and iptables' OUTPUT REDIRECT send workload connections.
//! Inbound: `0.0.0.0:<inbound>` and `[::]:<inbound>`, where iptables' PREROUTING
//! REDIRECT or the eBPF `sk_lookup` program hands connections arriving for a
//! workload's ports. A pod's listeners are opened inside its network namespace.
//!
//! Every listener is bound with `SO_REUSEPORT`, so a new agent can open the same
//! listeners beside a draining one and take new connections with none refused.

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;
use socket2::Domain;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    discovery::RouteStore, forward, intercept::ActiveMode, intercept::iptables::outbound_ports,
    limits::ConnectionLimits, orig_dst::OrigDstLookup, sniff::Protocol, socket::SocketFactory,
};

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Everything a connection handler needs, shared by all connections.
pub struct ProxyContext {
    pub mode: ActiveMode,
    pub sockets: SocketFactory,
    pub lookup: Box<dyn OrigDstLookup>,
    /// How the inbound listener learns a connection's destination: `SO_ORIGINAL_DST`
    /// after iptables' REDIRECT, the socket's own local address after `sk_lookup`.
    pub inbound_lookup: Box<dyn OrigDstLookup>,
    /// The served workload, `namespace/name` (a pod's name, or a host workload's
    /// service account), as metrics and records name the source; unknown for the
    /// node's default workload without an identity.
    pub workload: crate::observe::labels::MeshName,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub opaque_ports: HashSet<u16>,
    /// The agent's own listener addresses: a connection whose original destination is
    /// one of these would loop.
    pub own_addrs: Vec<SocketAddr>,
    pub stats: Arc<Stats>,
    /// Service routing from the control plane's snapshots.
    pub routes: Arc<RouteStore>,
    /// This node's name as the control plane knows it: the workloads whose
    /// endpoints name it are this agent's to protect.
    pub node: String,
    /// The node's workload identity, once its first certificate is issued.
    pub identity: crate::workload_identity::IdentitySlot,
    /// Tunnels to peer agents (mTLS + HTTP/2 CONNECT), shared by all connections.
    pub tunnels: crate::tunnel::TunnelPool,
    /// Per-service balancers, breakers, budgets and the calling side's rate limits
    /// (for endpoints outside the mesh).
    pub services: Arc<crate::balance::service::Services>,
    /// Services' rate limits for this node's workloads, enforced on receipt (one set
    /// per agent, shared by every workload's context).
    pub rate_limits: Arc<crate::inbound::rate_limit::DestinationLimits>,
    /// Kept-alive upstream HTTP connections of the L7 proxy.
    pub upstreams: Arc<crate::l7::pool::UpstreamPool>,
    /// Where request and connection records go (access log, span export).
    pub records: crate::observe::Records,
    /// Where this node runs, for locality-aware balancing (`--region`, `--zone`).
    pub locality: Option<crate::balance::Locality>,
    /// Time limits of the client connections the L7 proxy serves.
    pub downstream: crate::l7::DownstreamTimeouts,
    /// Opaque and TLS relays that move no byte either way this long are closed
    /// (`--tcp-idle-timeout`); `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// Pipes for the plaintext relay's bulk directions (`--splice`), one budget for
    /// the whole agent.
    pub splice: crate::forward::splice::Pipes,
    /// Cancelled when the agent shuts down: served HTTP connections then close
    /// gracefully instead of waiting out the drain.
    pub shutdown: CancellationToken,
}

impl ProxyContext {
    /// The source workload of a connection in `direction`: this context's workload for
    /// what it sends; unknown for what it receives (the caller is known by identity).
    pub fn source_workload(&self, direction: Direction) -> crate::observe::labels::MeshName {
        match direction {
            Direction::Outbound => self.workload.clone(),
            Direction::Inbound => crate::observe::labels::MeshName::unknown(),
        }
    }

    /// Queues an access-log record (dropped and counted if the log is behind).
    pub fn log_access(&self, record: crate::observe::access_log::AccessRecord) {
        self.records.emit(record);
    }

    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.own_addrs.iter().any(|own| {
            own.port() == dst.port()
                && (own.ip() == dst.ip() || own.ip().is_unspecified() || dst.ip().is_loopback())
        })
    }
}

/// Connection counters, read by the admin endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    outbound_total: AtomicU64,
    inbound_total: AtomicU64,
    active: AtomicU64,
    failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    tls: AtomicU64,
    http1: AtomicU64,
    http2: AtomicU64,
    opaque: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub outbound_total: u64,
    pub inbound_total: u64,
    pub active: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub tls: u64,
    pub http1: u64,
    pub http2: u64,
    pub opaque: u64,
}

impl Stats {
    pub(crate) fn opened(&self, d: Direction) {
        match d {
            Direction::Outbound => &self.outbound_total,
            Direction::Inbound => &self.inbound_total,
        }
        .fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
    }

    pub(crate) fn closed(&self, _d: Direction, failed: bool) {
        self.active.fetch_sub(1, Relaxed);
        if failed {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn detected(&self, p: &Protocol) {
        match p {
            Protocol::Tls(_) => &self.tls,
            Protocol::Http1(_) => &self.http1,
            Protocol::Http2 => &self.http2,
            Protocol::Opaque(_) => &self.opaque,
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn bytes(&self, sent: u64, received: u64) {
        self.bytes_sent.fetch_add(sent, Relaxed);
        self.bytes_received.fetch_add(received, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            outbound_total: self.outbound_total.load(Relaxed),
            inbound_total: self.inbound_total.load(Relaxed),
            active: self.active.load(Relaxed),
            failed: self.failed.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            tls: self.tls.load(Relaxed),
            http1: self.http1.load(Relaxed),
            http2: self.http2.load(Relaxed),
            opaque: self.opaque.load(Relaxed),
        }
    }
}

/// Binds the outbound listeners (loopback, both families; IPv6 only if `ipv6`) in the
/// namespace of `sockets`: on `port` and the ports after it that iptables mode's
/// `REDIRECT` may choose ([`outbound_ports`]), so a connection NAT moves to the next
/// port of the range is accepted like the others. Port 0 takes one free port for
/// IPv4 and the same for IPv6 (a `--workload`'s own listener, redirected to alone).
pub fn bind_outbound(sockets: &SocketFactory, port: u16, ipv6: bool) -> io::Result<Vec<TcpListener>> {
    let v4 = bind(sockets, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let first = v4.local_addr()?.port();
    let ports = if port == 0 { first..=first } else { outbound_ports(port) };
    let mut listeners = vec![v4];
    for p in ports {
        if p != first {
            listeners.push(bind(sockets, SocketAddr::from((Ipv4Addr::LOCALHOST, p)))?);
        }
        if ipv6 {
            listeners.push(bind(sockets, SocketAddr::from((Ipv6Addr::LOCALHOST, p)))?);
        }
    }
    Ok(listeners)
}

/// Binds listeners on every address (both families; IPv6 only if `ipv6`) in the
/// namespace of `sockets`: the inbound and tunnel listeners.
pub fn bind_any(sockets: &SocketFactory, port: u16, ipv6: bool) -> io::Result<Vec<TcpListener>> {
    let mut addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
    if ipv6 {
        addrs.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    }
    addrs.into_iter().map(|a| bind(sockets, a)).collect()
}

fn bind(sockets: &SocketFactory, addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = sockets.socket(Domain::for_address(addr))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // A new agent binds beside a draining one during an upgrade.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `shutdown`, spawning each connection on `tracker` so shutdown can
/// wait for them to drain. A connection over `limits` (per source address, or in
/// total) is reset at once.
pub async fn serve(
    listener: TcpListener,
    direction: Direction,
    ctx: Arc<ProxyContext>,
    limits: Arc<ConnectionLimits>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let local = listener.local_addr().ok();
    let what = format!("{} listener", direction.as_str());
    loop {
        let accepted = tokio::select! {
            // Shutdown first: once draining, connections still queued here move to
            // another agent's listener of the same port when this one closes
            // (`tcp_migrate_req`), rather than being taken up by the leaving agent.
            biased;
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(permit) = limits.admit(peer.ip(), &what) else {
                    forward::reset(&stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                // Built inside the task: a future bound outside would take its room twice.
                tracker.spawn(async move {
                    forward::handle(ctx, direction, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) if is_transient_accept_error(&e) => {
                debug!(error = %e, "transient accept error");
            }
            Err(e) => {
                // Out of file descriptors or memory: back off briefly instead of spinning.
                warn!(listener = ?local, error = %e, "accept failed; retrying in 100ms");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    debug!(listener = ?local, "listener closed");
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orig_dst::Fixed;

    fn ctx(own: Vec<SocketAddr>) -> ProxyContext {
        ProxyContext {
            mode: ActiveMode::Ebpf,
            sockets: SocketFactory::new(0),
            lookup: Box::new(Fixed(SocketAddr::from(([127, 0, 0, 1], 1)))),
            inbound_lookup: Box::new(Fixed(SocketAddr::from(([127, 0, 0, 1], 1)))),
            workload: crate::observe::labels::MeshName::unknown(),
            detect_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            opaque_ports: HashSet::new(),
            own_addrs: own,
            stats: Default::default(),
            routes: Arc::new(RouteStore::new(false)),
            node: String::new(),
            identity: Default::default(),
            tunnels: crate::mtls::pool(Default::default(), SocketFactory::new(0), Duration::from_secs(1)),
            services: Default::default(),
            rate_limits: Default::default(),
            upstreams: Arc::new(crate::l7::pool::UpstreamPool::new(
                SocketFactory::new(0),
                crate::mtls::pool(Default::default(), SocketFactory::new(0), Duration::from_secs(1)),
                Default::default(),
                Duration::from_secs(90),
            )),
            records: Default::default(),
            locality: None,
            downstream: Default::default(),
            tcp_idle_timeout: Some(crate::forward::idle::DEFAULT),
            splice: Default::default(),
            shutdown: CancellationToken::new(),
        }
    }

    #[test]
    fn loop_guard_matches_own_listeners() {
        let c = ctx(vec!["127.0.0.1:15001".parse().unwrap(), "0.0.0.0:15006".parse().unwrap()]);
        assert!(c.is_own_listener("127.0.0.1:15001".parse().unwrap()));
        assert!(c.is_own_listener("[::1]:15001".parse().unwrap()));
        assert!(c.is_own_listener("10.0.0.5:15006".parse().unwrap()));
        assert!(!c.is_own_listener("10.0.0.5:15001".parse().unwrap()));
        assert!(!c.is_own_listener("10.0.0.5:80".parse().unwrap()));
    }
}
