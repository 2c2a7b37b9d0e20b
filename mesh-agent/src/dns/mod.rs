//! DNS for the workloads the agent serves: names in the registry resolve to their
//! service's VIPs, so a workload can call `catalog.shop.svc.cluster.local` and its
//! connection is routed like one to the VIP; every other name is the node's
//! resolver's business and is forwarded to it unchanged.
//!
//! Interception sends a workload's queries (UDP and TCP to port 53, whatever the
//! address) to the agent's DNS listener on loopback in the workload's own network
//! namespace (`--dns-port`, 15053): eBPF mode rewrites them in `cgroup/sendmsg4|6`
//! and `connect4|6` (and the source of the reply in `recvmsg4|6`, so the resolver
//! library accepts it), iptables mode REDIRECTs them. The agent's own queries to the
//! node's resolver are recognised as the agent's (cgroup, or mark with cgroup/owner)
//! and never intercepted, as for its TCP.
//!
//! Bounded by construction: answers from the registry are computed inline (no
//! allocation beyond the reply, no queue but the socket's receive buffer); forwarded
//! queries take one of `--dns-max-forwards` slots shared by the whole agent and are
//! held to `--dns-forward-rate` per source address; TCP connections are limited in
//! number and idle time. What does not fit is dropped and counted in
//! `mesh_dns_dropped_total{reason}`.

pub mod answer;
pub mod forward;
pub mod limit;
pub mod resolv;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::Domain;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::{
    answer::{Decision, Transport},
    limit::SourceLimiter,
};
use crate::{
    discovery::RouteStore,
    observe::limits::{Limit, hit},
    socket::SocketFactory,
};

/// The agent's DNS listener port (on 127.0.0.1 and [::1] of each workload's
/// namespace) unless configured otherwise.
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Queries answered or forwarded, by `answer`: `registry`, `forwarded`, `formerr`,
/// `servfail`.
pub const DNS_QUERIES_TOTAL: &str = "mesh_dns_queries_total";
/// Queries dropped without an answer, by `reason`: `forward_rate` (the source's
/// budget), `forwards` (every forwarding slot busy), `malformed` (not even a header),
/// `tcp_connections`, `send` (the reply could not be sent at once).
pub const DNS_DROPPED_TOTAL: &str = "mesh_dns_dropped_total";

/// How long a DNS-over-TCP connection may stay without a query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Errors of the DNS listeners and forwarder.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no upstream resolver (none in --dns-upstream nor in /etc/resolv.conf)")]
    NoUpstream,
    #[error("upstream resolver {upstream}: {source}")]
    Upstream { upstream: SocketAddr, source: io::Error },
    #[error("upstream resolver {upstream} did not answer within {timeout:?}")]
    Timeout { upstream: SocketAddr, timeout: Duration },
    #[error("binding the DNS listener {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// The DNS settings of a running agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The listener port in each workload's namespace.
    pub port: u16,
    /// The node's resolver(s), tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Forwarded queries under way at once, in the whole agent.
    pub max_forwards: usize,
    /// Forwarded queries per second per source address (bursts of twice as many).
    pub forward_rate: u32,
    /// How long one upstream may take to answer.
    pub timeout: Duration,
    /// DNS-over-TCP connections open at once, in the whole agent.
    pub max_tcp_connections: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            port: DEFAULT_DNS_PORT,
            upstreams: Vec::new(),
            max_forwards: 256,
            forward_rate: 500,
            timeout: Duration::from_secs(2),
            max_tcp_connections: 128,
        }
    }
}

fn queries(answer: &'static str) {
    metrics::counter!(DNS_QUERIES_TOTAL, "answer" => answer).increment(1);
}

fn dropped(reason: &'static str) {
    metrics::counter!(DNS_DROPPED_TOTAL, "reason" => reason).increment(1);
}

/// Registers help texts (with the other metrics' descriptions).
pub fn describe() {
    metrics::describe_counter!(
        DNS_QUERIES_TOTAL,
        metrics::Unit::Count,
        "DNS queries of workloads answered from the registry or forwarded to the node's resolver, by answer."
    );
    metrics::describe_counter!(
        DNS_DROPPED_TOTAL,
        metrics::Unit::Count,
        "DNS queries of workloads dropped without an answer, by reason."
    );
}

/// The DNS service the agent's workloads share: one per agent, with listeners in
/// every served namespace.
#[derive(Debug)]
pub struct Dns {
    settings: DnsSettings,
    routes: Arc<RouteStore>,
    /// The agent's own namespace and mark: where forwarded queries leave from.
    upstream_sockets: SocketFactory,
    forwards: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
    limiter: SourceLimiter,
}

/// A namespace's DNS listeners: UDP and TCP on 127.0.0.1 and (with IPv6) [::1].
#[derive(Debug)]
pub struct DnsListeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl DnsListeners {
    /// Where they listen.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let udp = self.udp.iter().filter_map(|s| s.local_addr().ok());
        let tcp = self.tcp.iter().filter_map(|s| s.local_addr().ok());
        let mut all: Vec<SocketAddr> = udp.chain(tcp).collect();
        all.sort();
        all.dedup();
        all
    }
}

impl Dns {
    pub fn new(settings: DnsSettings, routes: Arc<RouteStore>, upstream_sockets: SocketFactory) -> Arc<Self> {
        Arc::new(Self {
            forwards: Arc::new(Semaphore::new(settings.max_forwards.max(1))),
            tcp_connections: Arc::new(Semaphore::new(settings.max_tcp_connections.max(1))),
            limiter: SourceLimiter::new(
                settings.forward_rate,
                settings.forward_rate.saturating_mul(2),
                limit::MAX_SOURCES,
            ),
            settings,
            routes,
            upstream_sockets,
        })
    }

    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// Binds the listeners in the namespace of `sockets` (a pod's, or the node's).
    /// `SO_REUSEPORT`, as the TCP listeners: a new agent binds beside a draining one.
    pub fn bind(&self, sockets: &SocketFactory, ipv6: bool) -> Result<DnsListeners, DnsError> {
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.settings.port))];
        if ipv6 {
            addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, self.settings.port)));
        }
        let mut out = DnsListeners { udp: Vec::new(), tcp: Vec::new() };
        for addr in addrs {
            let bind = |source| DnsError::Bind { addr, source };
            let udp = sockets.udp(Domain::for_address(addr)).map_err(bind)?;
            if addr.is_ipv6() {
                udp.set_only_v6(true).map_err(bind)?;
            }
            udp.set_reuse_port(true).map_err(bind)?;
            udp.bind(&addr.into()).map_err(bind)?;
            out.udp.push(UdpSocket::from_std(udp.into()).map_err(bind)?);

            let tcp = sockets.socket(Domain::for_address(addr)).map_err(bind)?;
            if addr.is_ipv6() {
                tcp.set_only_v6(true).map_err(bind)?;
            }
            tcp.set_reuse_address(true).map_err(bind)?;
            tcp.set_reuse_port(true).map_err(bind)?;
            tcp.set_nonblocking(true).map_err(bind)?;
            tcp.bind(&addr.into()).map_err(bind)?;
            tcp.listen(128).map_err(bind)?;
            out.tcp.push(TcpListener::from_std(tcp.into()).map_err(bind)?);
        }
        Ok(out)
    }

    /// Serves `listeners` until `stop` is cancelled; queries under way then end too.
    pub fn spawn(self: &Arc<Self>, listeners: DnsListeners, stop: &CancellationToken) {
        for socket in listeners.udp {
            tokio::spawn(self.clone().serve_udp(Arc::new(socket), stop.clone()));
        }
        for listener in listeners.tcp {
            tokio::spawn(self.clone().serve_tcp(listener, stop.clone()));
        }
    }

    /// Whether a forward for `source` may start now: within its source's budget and
    /// a free slot. The slot is held until the answer is relayed.
    fn admit_forward(&self, source: SocketAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if !self.limiter.admit(source.ip(), Instant::now()) {
            dropped("forward_rate");
            hit(Limit::DnsForwardRate, format_args!("DNS queries to forward from {}", source.ip()));
            return None;
        }
        match self.forwards.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                dropped("forwards");
                hit(
                    Limit::DnsForwards,
                    format_args!(
                        "{} DNS forwards under way (--dns-max-forwards)",
                        self.settings.max_forwards
                    ),
                );
                None
            }
        }
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>, stop: CancellationToken) {
        let mut buf = vec![0u8; forward::MAX_MESSAGE];
        loop {
            let (n, source) = tokio::select! {
                () = stop.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    // ICMP errors of earlier replies surface here; the socket is fine.
                    Err(e) => { debug!(error = %e, "DNS receive"); continue; }
                },
            };
            let packet = &buf[..n];
            match answer::decide(packet, &self.routes.table(), Transport::Udp) {
                Decision::Reply(reply, outcome) => {
                    queries(outcome.as_str());
                    // Never wait on a full send buffer: the loop is the only reader.
                    if socket.try_send_to(&reply, source).is_err() {
                        dropped("send");
                    }
                }
                Decision::Drop => dropped("malformed"),
                Decision::Forward => {
                    let Some(permit) = self.admit_forward(source) else { continue };
                    let (me, socket, stop, query) =
                        (self.clone(), socket.clone(), stop.clone(), packet.to_vec());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let s = &me.settings;
                        let reply = tokio::select! {
                            () = stop.cancelled() => return,
                            r = forward::udp(&query, &s.upstreams, &me.upstream_sockets, s.timeout) => r,
                        };
                        let reply = match reply {
                            Ok(reply) => {
                                queries("forwarded");
                                reply
                            }
                            Err(e) => {
                                debug!(error = %e, "DNS forward failed");
                                queries("servfail");
                                match answer::servfail(&query) {
                                    Some(f) => f,
                                    None => return,
                                }
                            }
                        };
                        if socket.send_to(&reply, source).await.is_err() {
                            dropped("send");
                        }
                    });
                }
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, source) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(error = %e, "DNS accept");
                        // EMFILE and friends: let the condition pass.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.tcp_connections.clone().try_acquire_owned() else {
                dropped("tcp_connections");
                continue;
            };
            let (me, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = me.serve_tcp_connection(stream, source) => {}
                }
            });
        }
    }

    /// Queries of one TCP connection, one after the other, until it closes, goes
    /// idle or sends something that is not DNS.
    async fn serve_tcp_connection(&self, mut stream: TcpStream, source: SocketAddr) {
        loop {
            let query = match tokio::time::timeout(TCP_IDLE, forward::read_frame(&mut stream)).await {
                Ok(Ok(Some(q))) => q,
                _ => return,
            };
            let reply = match answer::decide(&query, &self.routes.table(), Transport::Tcp) {
                Decision::Reply(reply, outcome) => {
                    queries(outcome.as_str());
                    reply
                }
                Decision::Drop => {
                    dropped("malformed");
                    return;
                }
                Decision::Forward => {
                    let Some(_permit) = self.admit_forward(source) else { return };
                    let s = &self.settings;
                    match forward::tcp(&query, &s.upstreams, &self.upstream_sockets, s.timeout).await {
                        Ok(reply) => {
                            queries("forwarded");
                            reply
                        }
                        Err(e) => {
                            debug!(error = %e, "DNS forward over TCP failed");
                            queries("servfail");
                            match answer::servfail(&query) {
                                Some(f) => f,
                                None => return,
                            }
                        }
                    }
                }
            };
            if forward::write_frame(&mut stream, &reply).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
