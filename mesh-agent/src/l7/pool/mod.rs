//! Upstream HTTP connections per endpoint: kept alive and reused, bounded, closed
//! when idle.
//!
//! HTTP/1.1 connections carry one request at a time, so an endpoint has a list of
//! them ([`h1`]). HTTP/2 connections multiplex, so requests share them, up to a
//! number of streams each, and another is dialed when every one is full
//! ([`self::h2`], [`streams`]): short of the bound on connections, a long poll or a
//! streaming gRPC call never makes another request wait for it to end.
//!
//! An endpoint outside the mesh gets plain TCP connections. A meshed endpoint
//! ([`Dial::Meshed`]) is reached through its node's agent over mutual TLS: requests
//! ride as HTTP/2 streams directly on connections per (peer agent, source
//! identity, destination identity), each naming its endpoint in
//! [`crate::tunnel::TARGET_HEADER`] and the workload's HTTP version in
//! [`crate::tunnel::PROTOCOL_HEADER`] (see [`crate::identity::ALPN_MESH_HTTP`]), so
//! HTTP/1.1 clients are multiplexed too ([`direct`]). Protocol upgrades (WebSocket),
//! and peers that do not offer direct HTTP (older agents), get HTTP inside a CONNECT
//! stream of the tunnel instead, in the client's own version ([`io`]).

mod direct;
mod h1;
mod h2;
mod io;
mod streams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;

use crate::identity::SpiffeId;
use crate::socket::SocketFactory;
use crate::tunnel::TunnelPool;
use crate::workload_identity::IdentitySlot;

#[cfg(test)]
pub(crate) use self::h2::MAX_H2_PER_ENDPOINT;
pub(crate) use direct::{
    DIRECT_CONNECTION_WINDOW, DIRECT_MAX_FRAME_SIZE, DIRECT_MAX_STREAMS, DIRECT_STREAM_WINDOW,
    PEER_PENDING_RESETS,
};
#[cfg(test)]
pub(crate) use h1::MAX_H1_PER_ENDPOINT;
pub use io::UpstreamIo;

use direct::DirectMap;
use streams::Conns;
pub use streams::UpstreamBody;

/// Errors of bodies the proxy forwards.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The HTTP version spoken to the upstream (the client's, so gRPC stays HTTP/2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// How an endpoint is reached.
#[derive(Debug, Clone)]
pub enum Dial {
    /// Plain TCP: the endpoint is outside the mesh (or local, on the inbound side).
    Plain,
    /// Through the tunnel to the endpoint's agent, which must prove `identity`.
    /// The identity is shared with the route table, which parsed it once.
    Meshed { agent: SocketAddr, identity: Arc<SpiffeId> },
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; the request never left (always safe to retry).
    #[error("connect {endpoint}: {message}")]
    Connect { endpoint: SocketAddr, message: String },
    /// The connection failed while the request was in flight.
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

/// Upstream connections of one agent, shared by all client connections.
pub struct UpstreamPool {
    sockets: SocketFactory,
    tunnels: TunnelPool,
    identity: IdentitySlot,
    idle_timeout: Duration,
    h1: Mutex<HashMap<SocketAddr, Vec<h1::Idle>>>,
    /// Per endpoint, one permit per open HTTP/1 connection ([`h1::MAX_H1_PER_ENDPOINT`]);
    /// each connection's task holds its permit until the connection ends.
    h1_open: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Semaphore>>>,
    /// Per endpoint, at most [`self::h2::MAX_H2_PER_ENDPOINT`] multiplexed connections.
    h2: Mutex<HashMap<SocketAddr, Conns>>,
    /// Per peer agent and identity pair, at most [`direct::MAX_DIRECT_PER_KEY`].
    direct: Mutex<DirectMap>,
    /// Requests one HTTP/2 or direct connection carries at once.
    streams_per_connection: usize,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool").field("idle_timeout", &self.idle_timeout).finish_non_exhaustive()
    }
}

impl UpstreamPool {
    pub fn new(
        sockets: SocketFactory,
        tunnels: TunnelPool,
        identity: IdentitySlot,
        idle_timeout: Duration,
    ) -> Self {
        UpstreamPool {
            sockets,
            tunnels,
            identity,
            idle_timeout,
            h1: Mutex::new(HashMap::new()),
            h1_open: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
            direct: Mutex::new(HashMap::new()),
            streams_per_connection: streams::STREAMS_PER_CONNECTION,
        }
    }

    /// The same pool with at most `n` requests at once on one HTTP/2 or direct
    /// connection (default [`streams::STREAMS_PER_CONNECTION`]) before it dials
    /// another; for tests, which show the spreading with a few requests.
    pub fn with_streams_per_connection(mut self, n: usize) -> Self {
        self.streams_per_connection = n.max(1);
        self
    }

    /// Sends `req` to `endpoint`, on a pooled connection when one is free.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        version: Version,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        self.send_with_idle(endpoint, dial, version, connect_timeout, None, req).await
    }

    /// [`UpstreamPool::send`], keeping the connection at most `idle` unused
    /// afterwards (a service's `timeouts.idle`) instead of the pool's default.
    pub async fn send_with_idle(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        version: Version,
        connect_timeout: Duration,
        idle: Option<Duration>,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let idle = idle.unwrap_or(self.idle_timeout);
        if let Dial::Meshed { agent, identity } = dial
            && !super::headers::is_upgrade(req.headers())
        {
            return self.send_direct(endpoint, *agent, identity, version, connect_timeout, idle, req).await;
        }
        self.send_version(endpoint, dial, version, connect_timeout, idle, req).await
    }

    async fn send_version(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        version: Version,
        connect_timeout: Duration,
        idle: Duration,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match version {
            Version::Http1 => self.send_h1(endpoint, dial, connect_timeout, idle, req).await,
            Version::Http2 => self.send_h2(endpoint, dial, connect_timeout, idle, req).await,
        }
    }

    /// The byte stream to `endpoint` for a connection speaking `version`: TCP, or a
    /// CONNECT stream of the tunnel to a meshed endpoint's agent.
    async fn connect(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        version: Version,
        timeout: Duration,
    ) -> Result<UpstreamIo, SendError> {
        let fail = |message: String| SendError::Connect { endpoint, message };
        match dial {
            Dial::Plain => self
                .sockets
                .connect(endpoint, timeout)
                .await
                .map(UpstreamIo::Tcp)
                .map_err(|e| fail(e.to_string())),
            Dial::Meshed { agent, identity } => {
                let Some(ident) = self.identity.wait(timeout).await else {
                    return Err(fail(
                        "no workload certificate yet: meshed traffic is never sent in plaintext".into(),
                    ));
                };
                let source = ident.workload.id().clone();
                let mut headers = http::HeaderMap::new();
                headers
                    .insert(crate::tunnel::PROTOCOL_HEADER, http::HeaderValue::from_static(version.name()));
                let open = self.tunnels.open(*agent, &source, identity, endpoint, headers);
                match tokio::time::timeout(timeout, open).await {
                    Ok(Ok(stream)) => Ok(UpstreamIo::Tunnel(Box::new(stream))),
                    Ok(Err(e)) => Err(fail(format!("tunnel to {agent} ({identity}): {e}"))),
                    Err(_) => Err(fail(format!("tunnel to {agent}: timed out after {timeout:?}"))),
                }
            }
        }
    }

    /// Closes connections idle longer than their idle timeout (run periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.sweep_h1(now);
        self.sweep_h2(now);
        self.sweep_direct(now);
    }

    /// Open connections in the pool (HTTP/1, HTTP/2 and direct to peer agents), for
    /// tests and metrics.
    pub fn connection_count(&self) -> usize {
        self.h1_count() + self.h2_count() + self.direct_count()
    }

    /// Sweeps every `period` until `shutdown`.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        period: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => match pool.upgrade() {
                        Some(p) => p.sweep(),
                        None => break,
                    },
                }
            }
        })
    }
}
