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
