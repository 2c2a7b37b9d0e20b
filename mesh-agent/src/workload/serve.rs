//! Serving one workload: its listeners, its data-path context and its identity.
//!
//! Every workload gets its own [`ProxyContext`]: the identity its connections carry
//! both ways, the socket factory its upstream connections are dialled from, and its
//! own pools of upstream and tunnel connections (a connection's TLS identity and
//! source address belong to one workload). What the workloads share (routes,
//! balancers, records, counters) is shared through [`Node`].
//!
//! A pod's listeners are opened inside its network namespace: outbound on loopback
//! (where the eBPF connect programs and iptables' OUTPUT REDIRECT send its
//! connections), inbound on every address (where `sk_lookup` or PREROUTING REDIRECT
//! hand connections for its ports), and the mTLS tunnel port peers' agents dial. Its
//! upstream connections are dialled from inside the pod's namespace too, so they carry
//! the pod's own source address, as ztunnel's in-pod mode does; and the agent reaches
//! the pod's application over the pod's loopback, which inbound capture leaves alone.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use super::{Workload, netns::NetnsHandle};
use crate::{
    discovery::RouteStore,
    intercept::ActiveMode,
    l7::pool::UpstreamPool,
    listener::{self, Direction, ProxyContext, Stats},
    observe::Records,
    orig_dst::{LocalAddr, OrigDstLookup, SocketOption},
    socket::SocketFactory,
    workload_identity::{Identities, IdentityLease, IdentitySlot},
};

/// What every workload's data path shares: one per agent.
pub struct Node {
    pub name: String,
    pub mode: ActiveMode,
    pub ipv6: bool,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub sockets: SocketFactory,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub opaque_ports: HashSet<u16>,
    pub stats: Arc<Stats>,
    pub routes: Arc<RouteStore>,
    pub services: Arc<crate::balance::service::Services>,
    /// Services' rate limits at this node's workloads, for every workload's inbound.
    pub rate_limits: Arc<crate::inbound::rate_limit::DestinationLimits>,
    pub records: Records,
    pub locality: Option<crate::balance::Locality>,
    pub downstream: crate::l7::DownstreamTimeouts,
    pub tcp_idle_timeout: Option<Duration>,
    /// Pipes for the plaintext relay's bulk directions, shared by every workload.
    pub splice: crate::forward::splice::Pipes,
    pub upstream_idle_timeout: Duration,
    /// Cancelled when the agent shuts down.
    pub shutdown: CancellationToken,
    /// Cancelled when the agent stops accepting (before draining).
    pub stop_accepting: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The CA client, when the agent has one (`--control-plane` and a token).
    pub identities: Option<Arc<Identities>>,
    /// Connections per source and in total, over every workload's listeners.
    pub limits: Arc<crate::limits::ConnectionLimits>,
    /// Bounds on the tunnel listeners' TLS handshakes, shared by every workload's.
    pub handshakes: crate::mtls::Handshakes,
    /// The DNS every workload's namespace gets a listener of (`None`: `--dns-port 0`).
    pub dns: Option<Arc<crate::dns::Dns>>,
}

impl Node {
    /// A data-path context for a workload dialling through `sockets` as `slot`.
    pub fn context(
        &self,
        workload: crate::observe::labels::MeshName,
        sockets: SocketFactory,
        slot: IdentitySlot,
        own_addrs: Vec<SocketAddr>,
    ) -> Arc<ProxyContext> {
        let tunnels = crate::mtls::pool(slot.clone(), sockets.clone(), self.connect_timeout)
            .with_gateways(crate::mtls::gateways(self.routes.clone()));
        let upstreams = Arc::new(UpstreamPool::new(
            sockets.clone(),
            tunnels.clone(),
            slot.clone(),
            self.upstream_idle_timeout,
        ));
        let inbound_lookup: Box<dyn OrigDstLookup> = match self.mode {
            ActiveMode::Ebpf => Box::new(LocalAddr),
            ActiveMode::Iptables => Box::new(SocketOption),
        };
        Arc::new(ProxyContext {
            mode: self.mode,
            sockets,
            lookup: Box::new(SocketOption),
            inbound_lookup,
            workload,
            detect_timeout: self.detect_timeout,
            connect_timeout: self.connect_timeout,
            opaque_ports: self.opaque_ports.clone(),
            own_addrs,
            stats: self.stats.clone(),
            routes: self.routes.clone(),
            node: self.name.clone(),
            identity: slot,
            tunnels,
            services: self.services.clone(),
            rate_limits: self.rate_limits.clone(),
            upstreams,
            records: self.records.clone(),
            locality: self.locality.clone(),
            downstream: self.downstream,
            tcp_idle_timeout: self.tcp_idle_timeout,
            splice: self.splice.clone(),
            shutdown: self.shutdown.clone(),
        })
    }

    /// Accepts on `listeners` into `ctx` until the workload or the agent stops.
    pub fn spawn_listeners(
        &self,
        listeners: Vec<TcpListener>,
        direction: Direction,
        ctx: &Arc<ProxyContext>,
        stop: &CancellationToken,
    ) {
        for l in listeners {
            let stop = stop.clone();
            let all = self.stop_accepting.clone();
            let either = CancellationToken::new();
            let guard = either.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = all.cancelled() => {}
                }
                guard.cancel();
            });
            tokio::spawn(listener::serve(
                l,
                direction,
                ctx.clone(),
                self.limits.clone(),
                either,
                self.tracker.clone(),
            ));
        }
    }

    /// Serves peers' tunnels on `listeners` as the workload behind `ctx`: its identity
    /// is the one presented, connections to its application are dialled through its
    /// socket factory.
    pub fn spawn_tunnel(
        &self,
        listeners: Vec<TcpListener>,
        ctx: &Arc<ProxyContext>,
        stop: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        listeners
            .into_iter()
            .map(|l| {
                let inbound = crate::mtls::Inbound {
                    slot: ctx.identity.clone(),
                    routes: self.routes.clone(),
                    node: self.name.clone(),
                    sockets: ctx.sockets.clone(),
                    connect_timeout: self.connect_timeout,
                    detect_timeout: self.detect_timeout,
                    mode: self.mode,
                    upstreams: ctx.upstreams.clone(),
                    records: self.records.clone(),
                    downstream: self.downstream,
                    rate_limits: self.rate_limits.clone(),
                    tcp_idle_timeout: self.tcp_idle_timeout,
                };
                // The tunnel server sends GOAWAY and drains on this token.
                let token = self.shutdown.child_token();
                let stop = stop.clone();
                let t = token.clone();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    t.cancel();
                });
                crate::mtls::serve_inbound(l, inbound, self.limits.clone(), self.handshakes.clone(), token)
            })
            .collect()
    }
}

/// A workload being served.
pub struct Served {
    pub workload: Workload,
    pub ctx: Arc<ProxyContext>,
    /// Where its listeners are.
    pub listening: Vec<SocketAddr>,
    pub netns: Option<Arc<NetnsHandle>>,
    stop: CancellationToken,
    tunnels: Vec<tokio::task::JoinHandle<()>>,
    lease: std::sync::Mutex<Option<IdentityLease>>,
}

impl Served {
    /// A workload served through `ctx` on `listening`, stopped by `stop`.
    pub fn new(
        workload: Workload,
        ctx: Arc<ProxyContext>,
        listening: Vec<SocketAddr>,
        stop: CancellationToken,
    ) -> Self {
        Self { workload, ctx, listening, netns: None, stop, tunnels: Vec::new(), lease: Default::default() }
    }

    /// It lives in `netns`, a network namespace of its own.
    pub fn in_netns(mut self, netns: Arc<NetnsHandle>) -> Self {
        self.netns = Some(netns);
        self
    }

    /// Its tunnel servers, drained with the agent.
    pub fn with_tunnels(mut self, tunnels: Vec<tokio::task::JoinHandle<()>>) -> Self {
        self.tunnels = tunnels;
        self
    }

    /// Its hold on its identity.
    pub fn with_lease(self, lease: Option<IdentityLease>) -> Self {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
        self
    }

    /// Gives the workload an identity it did not have (a restored pod whose identity
    /// the control plane listed late). No-op when it already holds one.
    pub fn lease_identity(&mut self, identities: &Arc<Identities>, account: &super::ServiceAccount) {
        let mut lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease.is_none() {
            *lease = Some(identities.lease(account, self.ctx.identity.clone()));
            self.workload.service_account = Some(account.clone());
        }
    }

    /// Stops accepting for this workload; its open connections run to their end.
    pub fn stop(&self) {
        self.stop.cancel();
        info!(workload = %self.workload.key, "workload listeners closed");
    }

    /// The tunnel servers, for the agent's drain.
    pub fn take_tunnels(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut self.tunnels)
    }
}
