//! Upstream HTTP connections per endpoint: kept alive and reused, bounded, closed
//! when idle.
//!
//! HTTP/1.1 connections carry one request at a time, so an endpoint has a list of
//! them; a sender goes back into the list as soon as its response headers arrive and
//! is taken again once hyper says it is ready (the previous response fully read).
//! HTTP/2 connections multiplex, so an endpoint has one, shared by every request.
//!
//! A connection is plain TCP to an endpoint outside the mesh, or a CONNECT stream
//! through the mutual-TLS tunnel to the endpoint's agent ([`Dial::Meshed`]); hyper
//! sees the same byte stream either way.

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
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::identity::SpiffeId;
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
    Meshed { agent: SocketAddr, identity: SpiffeId },
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

/// HTTP/1 connections kept per endpoint, busy or idle.
const MAX_H1_PER_ENDPOINT: usize = 256;

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

/// Upstream connections of one agent, shared by all client connections.
pub struct UpstreamPool {
    sockets: SocketFactory,
    tunnels: TunnelPool,
    identity: IdentitySlot,
    idle_timeout: Duration,
    h1: Mutex<HashMap<SocketAddr, Vec<Idle<http1::SendRequest<Body>>>>>,
    h2: Mutex<HashMap<SocketAddr, Idle<http2::SendRequest<Body>>>>,
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
            h2: Mutex::new(HashMap::new()),
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
        let io = self.connect(endpoint, dial, Version::Http1, connect_timeout).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect { endpoint, message: e.to_string() })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(endpoint = %endpoint, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        let resp = sender.send_request(req).await?;
        self.checkin_h1(endpoint, sender, idle);
        Ok(resp)
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
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let pooled = {
            let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
            match pool.get_mut(&endpoint) {
                Some(i) if !i.sender.is_closed() && i.sender.is_ready() => {
                    i.since = Instant::now();
                    i.idle_timeout = idle_timeout;
                    Some(i.sender.clone())
                }
                Some(_) => {
                    pool.remove(&endpoint);
                    None
                }
                None => None,
            }
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => {
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
                let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
                pool.insert(endpoint, Idle { sender: sender.clone(), since: Instant::now(), idle_timeout });
                sender
            }
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // The shared connection went away before the stream opened.
                Some(unsent) => {
                    self.h2.lock().unwrap_or_else(|e| e.into_inner()).remove(&endpoint);
                    let io = self.connect(endpoint, dial, Version::Http2, connect_timeout).await?;
                    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| SendError::Connect { endpoint, message: e.to_string() })?;
                    tokio::spawn(conn);
                    Ok(sender.send_request(unsent).await?)
                }
                None => Err(SendError::Request(e.into_error())),
            },
        }
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
                let Some(ident) = self.identity.get() else {
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
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, i| !i.sender.is_closed() && i.fresh(now));
    }

    /// Open connections in the pool (HTTP/1 and HTTP/2), for tests and metrics.
    pub fn connection_count(&self) -> usize {
        let h1: usize = self.h1.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum();
        h1 + self.h2.lock().unwrap_or_else(|e| e.into_inner()).len()
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
