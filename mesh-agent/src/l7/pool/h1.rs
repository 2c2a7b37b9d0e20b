//! HTTP/1.1 upstream connections: one request at a time each, so an endpoint has a
//! list of them, bounded by [`MAX_H1_PER_ENDPOINT`]. A sender goes back into the list
//! as soon as its response headers arrive and is taken again once hyper says it is
//! ready (the previous response fully read). Connections the tunnel server opened
//! to a local workload can be adopted ([`UpstreamPool::adopt_h1`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{Body, Dial, SendError, UpstreamBody, UpstreamIo, UpstreamPool, Version};

/// HTTP/1 connections open to one endpoint at once, busy or idle. A request that
/// finds them all busy waits (within its connect timeout) for one to come free or to
/// close: without the bound, requests a client resets while their upstream
/// connection still works (an HTTP/2 rapid reset, bodies cut short) would leave
/// connections behind faster than they close.
pub(crate) const MAX_H1_PER_ENDPOINT: usize = 256;

/// Longest pause between looks for a freed HTTP/1 connection while at the bound.
pub(super) const H1_WAIT_STEP_MAX: Duration = Duration::from_millis(50);

/// A pooled connection's sender, and since when it has gone unused.
pub(super) struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
    /// Closed after this long unused (the service's `timeouts.idle`, else the pool's).
    idle_timeout: Duration,
}

impl Idle {
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

impl UpstreamPool {
    pub(super) async fn send_h1(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
        idle: Duration,
        mut req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
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
                        return Ok(resp.map(UpstreamBody::plain));
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
            return Ok(resp.map(UpstreamBody::plain));
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

    /// Drops HTTP/1 connections closed or idle too long, and the permits of
    /// endpoints with none open (part of [`UpstreamPool::sweep`]).
    pub(super) fn sweep_h1(&self, now: Instant) {
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
    }

    /// Pooled HTTP/1 connections (idle ones: busy ones are out of the pool).
    pub(super) fn h1_count(&self) -> usize {
        self.h1.lock().unwrap_or_else(|e| e.into_inner()).values().map(Vec::len).sum()
    }
}
