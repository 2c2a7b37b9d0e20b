//! HTTP-aware proxying (HTTP/1.1, HTTP/2, gRPC): what the agent does with a
//! connection once sniffing found HTTP and the destination is a mesh service.
//!
//! - [`outbound`]: per-request balancing, retries, timeouts, rate limits, trace
//!   context, metrics and access log on the client's side;
//! - [`inbound`]: per-request authorization and `x-forwarded-*` on the receiving
//!   agent, in front of the local workload;
//! - [`pool`]: kept-alive upstream connections, plain or through the tunnel;
//! - [`body`], [`headers`], [`io`]: the pieces they share.
//!
//! TLS and opaque traffic stay per-connection ([`crate::forward`]).

pub mod body;
pub mod headers;
pub mod inbound;
pub mod io;
pub mod outbound;
pub mod pool;

/// Largest request head (HTTP/1 buffer, HTTP/2 header list) accepted from a client;
/// bigger ones get 431 (HTTP/1) or a stream reset (HTTP/2), never unbounded memory.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves one client connection (or tunnel stream) with hyper in `version`, with
/// the header bounds above; HTTP/1 keeps upgrades (WebSocket) possible.
pub async fn serve_http<I, S>(io: I, version: pool::Version, service: S) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = pool::Body> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = hyper_util::rt::TokioIo::new(io);
    match version {
        pool::Version::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
        pool::Version::Http2 => {
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .serve_connection(io, service)
                .await
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
