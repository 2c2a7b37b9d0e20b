//! HTTP/2 upstream connections to endpoints: multiplexed, so requests share them,
//! at most [`MAX_H2_PER_ENDPOINT`] per endpoint, dialed one at a time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::h1::H1_WAIT_STEP_MAX;
use super::{Body, Dial, Idle, SendError, UpstreamPool, Version};

/// HTTP/2 connections open to one endpoint at once. Requests share the first with a
/// free stream; another is opened only when every open one is at the endpoint's
/// stream limit, and past this bound a request waits for a free stream.
pub(crate) const MAX_H2_PER_ENDPOINT: usize = 8;

/// The HTTP/2 connections of one endpoint.
#[derive(Default)]
pub(super) struct H2Conns {
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

    pub(super) async fn send_h2(
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

    /// Drops HTTP/2 connections closed or idle too long (part of [`UpstreamPool::sweep`]).
    pub(super) fn sweep_h2(&self, now: Instant) {
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        h2.retain(|_, conns| {
            conns.open.retain(|i| !i.sender.is_closed() && i.fresh(now));
            !conns.open.is_empty() || conns.dialing > 0
        });
    }

    /// Open HTTP/2 connections to endpoints.
    pub(super) fn h2_count(&self) -> usize {
        self.h2.lock().unwrap_or_else(|e| e.into_inner()).values().map(|c| c.open.len()).sum()
    }
}
