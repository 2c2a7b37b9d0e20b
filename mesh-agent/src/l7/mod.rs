//! HTTP-aware proxying (HTTP/1.1, HTTP/2, gRPC): what the agent does with a
//! connection once sniffing found HTTP and the destination is a mesh service.
//!
//! - [`outbound`]: per-request balancing, retries, timeouts, rate limits, trace
//!   context, metrics and access log on the client's side;
//! - [`inbound`]: per-request authorization and `x-forwarded-*` on the receiving
//!   agent, in front of the local workload;
//! - [`pool`]: kept-alive upstream connections, plain or through the tunnel;
//! - [`downstream`]: time limits on the connections both serve;
//! - [`body`], [`headers`], [`io`]: the pieces they share.
//!
//! TLS and opaque traffic stay per-connection ([`crate::forward`]).

pub mod body;
pub mod deadline;
pub mod downstream;
pub mod headers;
pub mod inbound;
pub mod io;
pub mod mirror;
pub mod outbound;
pub mod pool;

pub use downstream::{DownstreamTimeouts, ServeError};

use downstream::Watched;
use tokio_util::sync::CancellationToken;

/// Largest request head (HTTP/1 buffer, HTTP/2 header list) accepted from a client;
/// bigger ones get 431 (HTTP/1) or a stream reset (HTTP/2), never unbounded memory.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Who is on the other end of a served connection: HTTP/2 settings differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A workload, or a peer's CONNECT stream: hyper's defaults.
    Client,
    /// A peer agent's direct HTTP connection: the tunnel's larger flow-control
    /// windows and stream limit, since one connection carries everything a peer
    /// node sends to this one.
    PeerAgent,
}

/// Serves one connection (client, CONNECT stream or peer agent, see [`Served`])
/// with hyper in `version`, with the header bounds above and the time limits of
/// [`downstream`]; HTTP/1 keeps upgrades (WebSocket) possible. A connection closed
/// for being idle ends `Ok`.
///
/// When `shutdown` is cancelled the connection is closed gracefully: HTTP/1 at once
/// if no request is under way, else once its response is written (with
/// `Connection: close`); HTTP/2 with a GOAWAY, its open streams still served. Either
/// ends `Ok` unless the connection fails before that.
pub async fn serve_http<I, S>(
    io: I,
    version: pool::Version,
    service: S,
    timeouts: &DownstreamTimeouts,
    shutdown: &CancellationToken,
    served: Served,
) -> Result<(), ServeError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<pool::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = downstream::Activity::new();
    let service = downstream::Tracked { inner: service, activity: activity.clone() };
    match version {
        pool::Version::Http1 => {
            let io = downstream::HeadTimer::new(io, activity.clone(), timeouts.header);
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_HEADER_BYTES)
                // Heads are timed by `HeadTimer`, from their first byte (see `downstream`).
                .header_read_timeout(None)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            match downstream::watch(conn.as_mut(), &activity, timeouts.idle, shutdown).await {
                Watched::Ended(result) => Ok(result?),
                // No request has been in flight for the idle timeout, so dropping the
                // connection loses none.
                Watched::Idle => Ok(()),
                Watched::Shutdown => {
                    // Keep-alive off: hyper closes a connection that sits between
                    // requests at once, and one with a request under way after its
                    // response. A connection that has not sent a byte yet would wait for
                    // its first request: it has none to lose.
                    conn.as_mut().graceful_shutdown();
                    if activity.untouched() {
                        return Ok(());
                    }
                    Ok(conn.await?)
                }
            }
        }
        pool::Version::Http2 => {
            let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(timeouts.keepalive_interval)
                .keep_alive_timeout(timeouts.keepalive_timeout)
                .max_header_list_size(MAX_HEADER_BYTES as u32);
            if served == Served::PeerAgent {
                builder
                    .initial_stream_window_size(pool::DIRECT_STREAM_WINDOW)
                    .initial_connection_window_size(pool::DIRECT_CONNECTION_WINDOW)
                    .max_frame_size(pool::DIRECT_MAX_FRAME_SIZE)
                    .max_concurrent_streams(pool::DIRECT_MAX_STREAMS)
                    .max_pending_accept_reset_streams(pool::PEER_PENDING_RESETS);
            }
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let reason = match downstream::watch(conn.as_mut(), &activity, timeouts.idle, shutdown).await {
                Watched::Ended(result) => return Ok(result?),
                Watched::Idle => "idle",
                Watched::Shutdown => "shutdown",
            };
            // GOAWAY: streams already open (and one the client opened meanwhile) are
            // still served. The client may close as soon as it reads it, so a failed
            // write after that is no fault.
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, reason, "HTTP/2 connection ended with an error after GOAWAY");
            }
            Ok(())
        }
    }
}

/// Which HTTP version a sniffed protocol is served with, if it is HTTP at all.
pub fn version_of(protocol: &crate::sniff::Protocol) -> Option<pool::Version> {
    match protocol {
        crate::sniff::Protocol::Http1(_) => Some(pool::Version::Http1),
        crate::sniff::Protocol::Http2 => Some(pool::Version::Http2),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod direct_tests;

#[cfg(test)]
mod pool_tests;

#[cfg(test)]
mod route_tests;
