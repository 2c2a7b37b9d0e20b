//! Upstream HTTP connections per endpoint: kept alive and reused, bounded, closed
//! when idle.
//!
//! HTTP/1.1 connections carry one request at a time, so an endpoint has a list of
//! them; a sender goes back into the list as soon as its response headers arrive and
//! is taken again once hyper says it is ready (the previous response fully read).
//! HTTP/2 connections multiplex, so an endpoint has one, shared by every request.
//!
//! An endpoint outside the mesh gets plain TCP connections. A meshed endpoint
//! ([`Dial::Meshed`]) is reached through its node's agent over mutual TLS: requests
//! ride as HTTP/2 streams directly on one connection per (peer agent, source
//! identity, destination identity), each naming its endpoint in
//! [`crate::tunnel::TARGET_HEADER`] and the workload's HTTP version in
//! [`crate::tunnel::PROTOCOL_HEADER`] (see [`crate::identity::ALPN_MESH_HTTP`]), so
//! HTTP/1.1 clients are multiplexed too. Protocol upgrades (WebSocket), and peers
//! that do not offer direct HTTP (older agents), get HTTP inside a CONNECT stream of
//! the tunnel instead, in the client's own version.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::identity::{ALPN_H2, ALPN_MESH_HTTP, SpiffeId};
use crate::socket::SocketFactory;
use crate::tunnel::{TunnelPool, TunnelStream};
use crate::workload_identity::IdentitySlot;

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

/// HTTP/1 connections open to one endpoint at once, busy or idle. A request that
/// finds them all busy waits (within its connect timeout) for one to come free or to
/// close: without the bound, requests a client resets while their upstream
/// connection still works (an HTTP/2 rapid reset, bodies cut short) would leave
/// connections behind faster than they close.
pub(crate) const MAX_H1_PER_ENDPOINT: usize = 256;

/// HTTP/2 connections open to one endpoint at once. Requests share the first with a
/// free stream; another is opened only when every open one is at the endpoint's
/// stream limit, and past this bound a request waits for a free stream.
pub(crate) const MAX_H2_PER_ENDPOINT: usize = 8;

/// Longest pause between looks for a freed HTTP/1 connection while at the bound.
const H1_WAIT_STEP_MAX: Duration = Duration::from_millis(50);

/// How long a peer agent that answered without direct HTTP is served through
/// CONNECT streams before it is asked again (it may have been upgraded).
const LEGACY_RECHECK: Duration = Duration::from_secs(60);

/// Flow-control windows of direct HTTP connections, as the tunnel's: one stream can
/// fill a fast link, all of them together stay bounded.
pub(crate) const DIRECT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const DIRECT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame on a direct connection, as the tunnel's
/// (`tunnel::h2_settings`): fewer frames, and no 9-byte frame header spilling into a
/// TLS record of its own after every full 16 KiB frame.
pub(crate) const DIRECT_MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Requests one sending agent may have in flight at once on one direct connection;
/// more wait for a free stream.
pub(crate) const DIRECT_MAX_STREAMS: u32 = 1024;

/// The HTTP/2 connections of one endpoint.
#[derive(Default)]
struct H2Conns {
    open: Vec<Idle<http2::SendRequest<Body>>>,
    /// Slots taken by dials under way.
    dialing: usize,
}

/// What [`UpstreamPool::checkout_h2`] found.
enum H2Checkout<'a> {
    Ready(http2::SendRequest<Body>),
    Dial(H2Reserved<'a>),
    /// No stream free and no dial to make now: a connection to wait on for a free
    /// stream (`None` while the first one is being dialed), and whether the bound
    /// is what stops another dial.
    Full {
        busy: Option<http2::SendRequest<Body>>,
        at_bound: bool,
    },
}

/// A slot reserved for a dial; given back if the dial fails or is abandoned.
struct H2Reserved<'a> {
    pool: &'a UpstreamPool,
    endpoint: SocketAddr,
    filled: bool,
}

impl H2Reserved<'_> {
    fn fill(mut self, conn: Idle<http2::SendRequest<Body>>) {
        let mut pool = self.pool.h2.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.entry(self.endpoint).or_default();
        conns.dialing -= 1;
        conns.open.push(conn);
        self.filled = true;
    }
}

impl Drop for H2Reserved<'_> {
    fn drop(&mut self) {
        if !self.filled {
            let mut pool = self.pool.h2.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(conns) = pool.get_mut(&self.endpoint) {
                conns.dialing -= 1;
            }
        }
    }
}

/// Who is talking to whom over a direct connection: the client certificate and the
/// server identity checked belong to the whole connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MeshKey {
    agent: SocketAddr,
    source: SpiffeId,
    expected: SpiffeId,
}

/// A [`MeshKey`] borrowed, for the per-request lookup: no identity is cloned or
/// hashed per request (a `SpiffeId` is three strings).
#[derive(Clone, Copy)]
struct MeshRef<'a> {
    agent: SocketAddr,
    source: &'a SpiffeId,
    expected: &'a SpiffeId,
}

impl MeshRef<'_> {
    fn is(&self, key: &MeshKey) -> bool {
        key.agent == self.agent && key.source == *self.source && key.expected == *self.expected
    }

    fn owned(&self) -> MeshKey {
        MeshKey { agent: self.agent, source: self.source.clone(), expected: self.expected.clone() }
    }
}

/// A peer agent's direct connection, or the note that it has none.
enum Direct {
    Open(Idle<http2::SendRequest<Body>>),
    /// The peer chose the CONNECT tunnel at this time.
    Legacy(Instant),
}

struct Idle<S> {
    sender: S,
    since: Instant,
    /// Closed after this long unused (the service's `timeouts.idle`, else the pool's).
    idle_timeout: Duration,
}

impl<S> Idle<S> {
    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.since) < self.idle_timeout
    }
}

/// An HTTP/1 client connection over `io`; its task holds `permit` until it ends.
async fn h1_over(
    endpoint: SocketAddr,
    io: UpstreamIo,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<http1::SendRequest<Body>, SendError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect { endpoint, message: e.to_string() })?;
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.with_upgrades().await {
            debug!(endpoint = %endpoint, error = %e, "upstream HTTP/1 connection ended");
        }
    });
    Ok(sender)
}

/// Upstream connections of one agent, shared by all client connections.
pub struct UpstreamPool {
    sockets: SocketFactory,
    tunnels: TunnelPool,
    identity: IdentitySlot,
    idle_timeout: Duration,
    h1: Mutex<HashMap<SocketAddr, Vec<Idle<http1::SendRequest<Body>>>>>,
    /// Per endpoint, one permit per open HTTP/1 connection ([`MAX_H1_PER_ENDPOINT`]);
    /// each connection's task holds its permit until the connection ends.
    h1_open: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Semaphore>>>,
    /// Per endpoint, at most [`MAX_H2_PER_ENDPOINT`] multiplexed connections.
    h2: Mutex<HashMap<SocketAddr, H2Conns>>,
    /// Per peer agent (almost always one identity pair each).
    direct: Mutex<HashMap<SocketAddr, Vec<(MeshKey, Direct)>>>,
    /// Held while dialing a key, so that concurrent requests wait for one dial.
    dialing: Mutex<HashMap<MeshKey, Arc<tokio::sync::Mutex<()>>>>,
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
            dialing: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `endpoint`, on a pooled connection when one is free.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        version: Version,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
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
    ) -> Result<Response<Incoming>, SendError> {
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
    ) -> Result<Response<Incoming>, SendError> {
        match version {
            Version::Http1 => self.send_h1(endpoint, dial, connect_timeout, idle, req).await,
            Version::Http2 => self.send_h2(endpoint, dial, connect_timeout, idle, req).await,
        }
    }

    async fn send_h1(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
        idle: Duration,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut step = Duration::from_millis(1);
        let mut counted = false;
        loop {
            // A pooled connection the server closed while idle fails before the request
            // is written; hyper hands the request back and it goes to the next one.
            while let Some(mut sender) = self.checkout_h1(endpoint) {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.checkin_h1(endpoint, sender, idle);
                        return Ok(resp);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => {
                            debug!(endpoint = %endpoint, error = %e.error(), "pooled connection unusable; trying another");
                            req = unsent;
                        }
                        None => return Err(SendError::Request(e.into_error())),
                    },
                }
            }
            let open = self.h1_open(endpoint);
            let permit = match open.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if !counted {
                        counted = true;
                        crate::observe::limits::hit(
                            crate::observe::limits::Limit::UpstreamConnections,
                            format_args!(
                                "{MAX_H1_PER_ENDPOINT} HTTP/1 connections to {endpoint} are open; a request waits"
                            ),
                        );
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(SendError::Connect {
                            endpoint,
                            message: format!(
                                "all {MAX_H1_PER_ENDPOINT} HTTP/1 connections to it stayed busy for {connect_timeout:?}"
                            ),
                        });
                    }
                    // A connection that closes frees a permit at once; one that turns
                    // ready in the pool is seen at the next look, backing off.
                    let wake = (tokio::time::Instant::now() + step).min(deadline);
                    step = (step * 2).min(H1_WAIT_STEP_MAX);
                    match tokio::time::timeout_at(wake, open.acquire_owned()).await {
                        Ok(Ok(permit)) => permit,
                        _ => continue,
                    }
                }
            };
            // Dialing is boxed: its futures (TCP, TLS, handshakes) are large and rare,
            // and would otherwise grow every request's future (moved on each spawn).
            let mut sender = Box::pin(self.new_h1(endpoint, dial, connect_timeout, permit)).await?;
            let resp = sender.send_request(req).await?;
            self.checkin_h1(endpoint, sender, idle);
            return Ok(resp);
        }
    }

    /// The permits of `endpoint`'s HTTP/1 connections.
    fn h1_open(&self, endpoint: SocketAddr) -> Arc<tokio::sync::Semaphore> {
        let mut open = self.h1_open.lock().unwrap_or_else(|e| e.into_inner());
        open.entry(endpoint)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_H1_PER_ENDPOINT)))
            .clone()
    }

    /// A new HTTP/1 connection; its task holds `permit` until the connection ends.
    async fn new_h1(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<http1::SendRequest<Body>, SendError> {
        let io = self.connect(endpoint, dial, Version::Http1, connect_timeout).await?;
        h1_over(endpoint, io, permit).await
    }

    /// Takes `tcp`, a connection to the local workload `endpoint` opened for another
    /// reason (the tunnel server connects before it answers a CONNECT, and the stream
    /// then turned out to carry HTTP/1), as a pooled HTTP/1 connection: the stream's
    /// first request uses it instead of connecting again. Hands it back when the pool
    /// has an idle connection to `endpoint` already (adopting every one would fill
    /// the pool with connections nobody uses) or no room for another.
    pub async fn adopt_h1(
        &self,
        endpoint: SocketAddr,
        tcp: tokio::net::TcpStream,
    ) -> Option<tokio::net::TcpStream> {
        if self.has_idle_h1(endpoint) {
            return Some(tcp);
        }
        let Ok(permit) = self.h1_open(endpoint).try_acquire_owned() else { return Some(tcp) };
        let Ok(mut sender) = h1_over(endpoint, UpstreamIo::Tcp(tcp), permit).await else { return None };
        // Ready once its task ran: a checkout looks only at ready connections.
        if sender.ready().await.is_ok() {
            self.checkin_h1(endpoint, sender, self.idle_timeout);
        }
        None
    }

    /// Whether a pooled HTTP/1 connection to `endpoint` is free for a request now.
    fn has_idle_h1(&self, endpoint: SocketAddr) -> bool {
        let pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        pool.get(&endpoint).is_some_and(|list| {
            list.iter().any(|i| !i.sender.is_closed() && i.fresh(now) && i.sender.is_ready())
        })
    }

    async fn new_h2(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        let io = self.connect(endpoint, dial, Version::Http2, connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect { endpoint, message: e.to_string() })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(endpoint = %endpoint, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    fn checkout_h1(&self, endpoint: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = pool.get_mut(&endpoint)?;
        let now = Instant::now();
        list.retain(|i| !i.sender.is_closed() && i.fresh(now));
        let at = list.iter().position(|i| i.sender.is_ready())?;
        Some(list.swap_remove(at).sender)
    }

    fn checkin_h1(&self, endpoint: SocketAddr, sender: http1::SendRequest<Body>, idle_timeout: Duration) {
        let mut pool = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = pool.entry(endpoint).or_default();
        if list.len() < MAX_H1_PER_ENDPOINT {
            list.push(Idle { sender, since: Instant::now(), idle_timeout });
        }
    }

    async fn send_h2(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
        idle_timeout: Duration,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut counted = false;
        let mut step = Duration::from_millis(1);
        // A connection that closes between the look and the send hands the request
        // back; a few such races in a row mean the endpoint keeps dropping us.
        let mut handed_back = 0;
        loop {
            let mut sender = match self.checkout_h2(endpoint, idle_timeout) {
                H2Checkout::Ready(sender) => sender,
                H2Checkout::Dial(reserved) => {
                    let sender = Box::pin(self.new_h2(endpoint, dial, connect_timeout)).await?;
                    reserved.fill(Idle { sender: sender.clone(), since: Instant::now(), idle_timeout });
                    sender
                }
                H2Checkout::Full { busy, at_bound } => {
                    if !counted && at_bound {
                        counted = true;
                        crate::observe::limits::hit(
                            crate::observe::limits::Limit::UpstreamConnections,
                            format_args!(
                                "{MAX_H2_PER_ENDPOINT} HTTP/2 connections to {endpoint} have no free stream; a request waits"
                            ),
                        );
                    }
                    // A dial under way may bring a connection with free streams: look
                    // again shortly rather than wait on a busy one to the deadline.
                    let wake = (tokio::time::Instant::now() + step).min(deadline);
                    step = (step * 2).min(H1_WAIT_STEP_MAX);
                    let waited = match busy {
                        Some(mut busy) => {
                            tokio::time::timeout_at(wake, busy.ready()).await.map(|r| r.map(|()| busy))
                        }
                        None => tokio::time::timeout_at(wake, std::future::pending()).await,
                    };
                    match waited {
                        Ok(Ok(sender)) => sender,
                        _ if tokio::time::Instant::now() >= deadline => {
                            return Err(SendError::Connect {
                                endpoint,
                                message: format!(
                                    "no HTTP/2 stream to it came free within {connect_timeout:?}"
                                ),
                            });
                        }
                        // Closed meanwhile, or dials still under way: look again.
                        _ => continue,
                    }
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // The connection went away before the stream opened.
                    Some(unsent) if handed_back < 3 => {
                        handed_back += 1;
                        req = unsent;
                    }
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// A pooled HTTP/2 connection of `endpoint` with a free stream; else a reserved
    /// slot to dial one into, while fewer than [`MAX_H2_PER_ENDPOINT`] are open and
    /// no dial is under way; else one to wait on (the least recently used).
    fn checkout_h2(&self, endpoint: SocketAddr, idle_timeout: Duration) -> H2Checkout<'_> {
        let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.entry(endpoint).or_default();
        let now = Instant::now();
        conns.open.retain(|i| !i.sender.is_closed() && i.fresh(now));
        if let Some(i) = conns.open.iter_mut().find(|i| i.sender.is_ready()) {
            i.since = now;
            i.idle_timeout = idle_timeout;
            return H2Checkout::Ready(i.sender.clone());
        }
        // One dial at a time: requests arriving together share the first connection
        // rather than each opening one; another is dialed only once the open ones
        // are out of streams.
        if conns.dialing == 0 && conns.open.len() < MAX_H2_PER_ENDPOINT {
            conns.dialing += 1;
            return H2Checkout::Dial(H2Reserved { pool: self, endpoint, filled: false });
        }
        let busy = conns.open.iter_mut().min_by_key(|i| i.since).map(|i| {
            i.since = now;
            i.sender.clone()
        });
        H2Checkout::Full { busy, at_bound: conns.open.len() >= MAX_H2_PER_ENDPOINT }
    }

    /// Sends `req` to the meshed `endpoint` as a stream of the direct connection to
    /// its agent, or, if that agent does not speak direct HTTP, through the tunnel.
    #[allow(clippy::too_many_arguments)]
    async fn send_direct(
        &self,
        endpoint: SocketAddr,
        agent: SocketAddr,
        expected: &Arc<SpiffeId>,
        version: Version,
        connect_timeout: Duration,
        idle: Duration,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let Some(ident) = self.identity.wait(connect_timeout).await else {
            return Err(SendError::Connect {
                endpoint,
                message: "no workload certificate yet: meshed traffic is never sent in plaintext".into(),
            });
        };
        let key = MeshRef { agent, source: ident.workload.id(), expected };
        let Some(mut sender) = self.direct_sender(key, endpoint, connect_timeout, idle).await? else {
            // Boxed: rare, and would otherwise double this future's size.
            let dial = Dial::Meshed { agent, identity: expected.clone() };
            return Box::pin(self.send_version(endpoint, &dial, version, connect_timeout, idle, req)).await;
        };
        let req = to_direct(req, endpoint, version);
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // The connection went away (GOAWAY, peer restart) before the stream
                // opened: the request never left, so it goes out on a fresh one.
                Some(unsent) => {
                    debug!(agent = %agent, error = %e.error(), "direct connection gone; dialing again");
                    self.forget_direct(key, &sender);
                    match self.direct_sender(key, endpoint, connect_timeout, idle).await? {
                        Some(mut fresh) => fresh.send_request(unsent).await?,
                        None => {
                            return Err(SendError::Connect {
                                endpoint,
                                message: format!("peer agent {agent} stopped offering direct HTTP"),
                            });
                        }
                    }
                }
                None => return Err(SendError::Request(e.into_error())),
            },
        };
        from_direct(resp, endpoint, version)
    }

    /// The direct connection of `key`, dialing one if none is open; `None` when the
    /// peer agent answered without direct HTTP (recently).
    async fn direct_sender(
        &self,
        key: MeshRef<'_>,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        idle: Duration,
    ) -> Result<Option<http2::SendRequest<Body>>, SendError> {
        if let Some(found) = self.pooled_direct(key, idle) {
            return Ok(found);
        }
        let owned = key.owned();
        let lock = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            dialing.entry(owned.clone()).or_default().clone()
        };
        let _dialing = lock.lock().await;
        if let Some(found) = self.pooled_direct(key, idle) {
            return Ok(found);
        }
        let dialed =
            Box::pin(tokio::time::timeout(connect_timeout, self.dial_direct(&owned, endpoint))).await;
        let found = match dialed {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let message =
                    format!("direct connection to {}: timed out after {connect_timeout:?}", key.agent);
                return Err(SendError::Connect { endpoint, message });
            }
        };
        let entry = match &found {
            Some(sender) => {
                Direct::Open(Idle { sender: sender.clone(), since: Instant::now(), idle_timeout: idle })
            }
            None => Direct::Legacy(Instant::now()),
        };
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let list = direct.entry(key.agent).or_default();
        list.retain(|(k, _)| !key.is(k));
        list.push((owned, entry));
        Ok(found)
    }

    /// What the pool holds for `key`: `Some(Some(sender))` an open connection,
    /// `Some(None)` a peer known to want the tunnel, `None` nothing usable.
    fn pooled_direct(&self, key: MeshRef<'_>, idle: Duration) -> Option<Option<http2::SendRequest<Body>>> {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let list = direct.get_mut(&key.agent)?;
        let at = list.iter().position(|(k, _)| key.is(k))?;
        let now = Instant::now();
        match &mut list[at].1 {
            Direct::Open(i) if !i.sender.is_closed() && i.sender.is_ready() => {
                i.since = now;
                i.idle_timeout = idle;
                Some(Some(i.sender.clone()))
            }
            Direct::Legacy(since) if now.duration_since(*since) < LEGACY_RECHECK => Some(None),
            _ => {
                list.swap_remove(at);
                None
            }
        }
    }

    /// Drops `key`'s connection if it is still `sender`'s.
    fn forget_direct(&self, key: MeshRef<'_>, sender: &http2::SendRequest<Body>) {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = direct.get_mut(&key.agent) else { return };
        list.retain(|(k, d)| {
            !(key.is(k)
                && matches!(d, Direct::Open(i) if i.sender.is_closed() || !i.sender.is_ready() || sender.is_closed()))
        });
    }

    /// Dials `key`'s agent offering direct HTTP and the tunnel; `None` if it chose
    /// the tunnel.
    async fn dial_direct(
        &self,
        key: &MeshKey,
        endpoint: SocketAddr,
    ) -> Result<Option<http2::SendRequest<Body>>, SendError> {
        let agent = key.agent;
        let fail = |message: String| SendError::Connect { endpoint, message };
        let tls = self
            .tunnels
            .connect_tls(agent, &key.source, &key.expected, &[ALPN_MESH_HTTP, ALPN_H2])
            .await
            .map_err(|e| fail(format!("direct connection to {agent} ({}): {e}", key.expected)))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_MESH_HTTP) {
            debug!(agent = %agent, "peer agent does not offer direct HTTP; using the tunnel");
            return Ok(None);
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(DIRECT_STREAM_WINDOW)
            .initial_connection_window_size(DIRECT_CONNECTION_WINDOW)
            .max_frame_size(DIRECT_MAX_FRAME_SIZE)
            .keep_alive_interval(crate::tunnel::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::tunnel::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .max_header_list_size(super::MAX_HEADER_BYTES as u32)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(format!("direct connection to {agent}: HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(agent = %agent, error = %e, "direct HTTP connection ended");
            }
        });
        debug!(agent = %agent, source = %key.source, dest = %key.expected, "direct HTTP connection established");
        Ok(Some(sender))
    }

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
        let mut h1 = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        h1.retain(|_, list| {
            list.retain(|i| !i.sender.is_closed() && i.fresh(now));
            !list.is_empty()
        });
        drop(h1);
        // An endpoint with no connection open and nobody waiting.
        let mut h1_open = self.h1_open.lock().unwrap_or_else(|e| e.into_inner());
        h1_open
            .retain(|_, open| Arc::strong_count(open) > 1 || open.available_permits() < MAX_H1_PER_ENDPOINT);
        drop(h1_open);
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, conns| {
            conns.open.retain(|i| !i.sender.is_closed() && i.fresh(now));
            !conns.open.is_empty() || conns.dialing > 0
        });
        drop(h2);
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct.retain(|_, list| {
            list.retain(|(_, d)| match d {
                Direct::Open(i) => !i.sender.is_closed() && i.fresh(now),
                Direct::Legacy(since) => now.duration_since(*since) < LEGACY_RECHECK,
            });
            !list.is_empty()
        });
        let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
        // A lock nobody holds or waits on, for a key with no connection: done with.
        let pooled = |key: &MeshKey| direct.get(&key.agent).is_some_and(|l| l.iter().any(|(k, _)| k == key));
        dialing.retain(|key, lock| pooled(key) || Arc::strong_count(lock) > 1);
    }

    /// Open connections in the pool (HTTP/1, HTTP/2 and direct to peer agents), for
    /// tests and metrics.
    pub fn connection_count(&self) -> usize {
        let h1: usize = self.h1.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum();
        let h2: usize =
            self.h2.lock().unwrap_or_else(|e| e.into_inner()).values().map(|c| c.open.len()).sum();
        h1 + h2 + self.direct_count()
    }

    /// Open direct HTTP connections to peer agents.
    pub fn direct_count(&self) -> usize {
        let direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct
            .values()
            .flatten()
            .filter(|(_, d)| matches!(d, Direct::Open(i) if !i.sender.is_closed()))
            .count()
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

/// `req` as a stream of a direct connection: HTTP/2 needs a scheme and an
/// authority (an HTTP/1 request's comes from its `Host`, else the endpoint), and the
/// headers name the endpoint and the version the workload is spoken to in. The
/// client's `Host` header rides along unchanged, so the receiving agent hands the
/// workload the request as the client sent it.
fn to_direct(req: Request<Body>, endpoint: SocketAddr, version: Version) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
        let authority = parts
            .uri
            .authority()
            .cloned()
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok()?.parse().ok())
            .or_else(|| endpoint.to_string().parse().ok());
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = authority;
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
    parts.version = http::Version::HTTP_2;
    parts.headers.insert(crate::tunnel::TARGET_HEADER, crate::discovery::table::addr_header(endpoint));
    parts.headers.insert(crate::tunnel::PROTOCOL_HEADER, http::HeaderValue::from_static(version.name()));
    Request::from_parts(parts, body)
}

/// The response of a direct stream as the client's version expects it. The peer
/// agent marks a request it refused before it reached the workload (no such target
/// here, policy, the workload unreachable) with [`crate::tunnel::REASON_HEADER`]:
/// that is a failure to connect, safe to try on another endpoint.
fn from_direct(
    mut resp: Response<Incoming>,
    endpoint: SocketAddr,
    version: Version,
) -> Result<Response<Incoming>, SendError> {
    if let Some(reason) = resp.headers().get(crate::tunnel::REASON_HEADER) {
        let reason = String::from_utf8_lossy(reason.as_bytes());
        let message = format!("peer agent refused: {} {reason}", resp.status().as_u16());
        return Err(SendError::Connect { endpoint, message });
    }
    if version == Version::Http1 {
        *resp.version_mut() = http::Version::HTTP_11;
    }
    Ok(resp)
}

/// The byte stream under an upstream HTTP connection.
#[derive(Debug)]
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(Box<TunnelStream>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
