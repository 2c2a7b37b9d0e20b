//! HTTP/2 upstream connections to endpoints: multiplexed, so requests share them,
//! a bounded number of streams each ([`super::streams`]), at most
//! [`MAX_H2_PER_ENDPOINT`] connections per endpoint, dialed one at a time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::streams::{Checkout, Conns, Patience, Stream, UpstreamBody};
use super::{Body, Dial, SendError, UpstreamPool, Version};

/// HTTP/2 connections open to one endpoint at once, so that a burst of requests
/// cannot open connections without end (at 100 streams each, 800 requests are in
/// flight before one waits). Requests share one while it has room
/// ([`UpstreamPool::with_streams_per_connection`]); another is dialed when every
/// open one is full. Past this bound a request waits, within its connect timeout,
/// for a stream to end, and then fails as a connect failure (counted as
/// `upstream_connections` in the limits).
pub(crate) const MAX_H2_PER_ENDPOINT: usize = 8;

/// A dial slot of one endpoint, reserved by [`Conns::checkout`]; given back if the
/// dial fails or the request is dropped meanwhile.
struct H2Reserved<'a> {
    pool: &'a UpstreamPool,
    endpoint: SocketAddr,
    filled: bool,
}

impl H2Reserved<'_> {
    fn fill(mut self, sender: http2::SendRequest<Body>, idle: Duration) -> Stream {
        let mut pool = self.pool.h2.lock().unwrap_or_else(|e| e.into_inner());
        self.filled = true;
        pool.entry(self.endpoint).or_default().filled(sender, idle)
    }
}

impl Drop for H2Reserved<'_> {
    fn drop(&mut self) {
        if !self.filled {
            let mut pool = self.pool.h2.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(conns) = pool.get_mut(&self.endpoint) {
                conns.abandoned();
            }
        }
    }
}

impl UpstreamPool {
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

    /// Sends `req` on a stream of one of `endpoint`'s HTTP/2 connections, dialing
    /// another when every one is full.
    pub(super) async fn send_h2(
        &self,
        endpoint: SocketAddr,
        dial: &Dial,
        connect_timeout: Duration,
        idle_timeout: Duration,
        mut req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut patience = Patience::new(connect_timeout);
        // A connection that closes between the look and the send hands the request
        // back; a few such races in a row mean the endpoint keeps dropping us.
        let mut handed_back = 0;
        loop {
            let checkout = {
                let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
                let conns = pool.entry(endpoint).or_default();
                conns.checkout(Instant::now(), idle_timeout, self.streams_per_connection, MAX_H2_PER_ENDPOINT)
            };
            let Stream { mut sender, lease } = match checkout {
                Checkout::Ready(stream) => stream,
                Checkout::Dial => {
                    let reserved = H2Reserved { pool: self, endpoint, filled: false };
                    let sender = Box::pin(self.new_h2(endpoint, dial, connect_timeout)).await?;
                    reserved.fill(sender, idle_timeout)
                }
                Checkout::Full { room, at_bound } => {
                    if at_bound && patience.first_at_bound() {
                        crate::observe::limits::hit(
                            crate::observe::limits::Limit::UpstreamConnections,
                            format_args!(
                                "{MAX_H2_PER_ENDPOINT} HTTP/2 connections to {endpoint} have no free stream; a request waits"
                            ),
                        );
                    }
                    if !patience.wait(room).await {
                        return Err(SendError::Connect {
                            endpoint,
                            message: format!("no HTTP/2 stream to it came free within {connect_timeout:?}"),
                        });
                    }
                    continue;
                }
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| UpstreamBody::leased(body, lease))),
                Err(mut e) => match e.take_message() {
                    // The connection went away before the stream opened.
                    Some(unsent) if handed_back < 3 => {
                        handed_back += 1;
                        req = unsent;
                        let mut pool = self.h2.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(conns) = pool.get_mut(&endpoint) {
                            conns.forget(&lease);
                        }
                    }
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// Drops HTTP/2 connections closed or idle too long (part of [`UpstreamPool::sweep`]).
    pub(super) fn sweep_h2(&self, now: Instant) {
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, conns| conns.sweep(now));
    }

    /// Open HTTP/2 connections to endpoints.
    pub(super) fn h2_count(&self) -> usize {
        self.h2.lock().unwrap_or_else(|e| e.into_inner()).values().map(Conns::open_count).sum()
    }
}
