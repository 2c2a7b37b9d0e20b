//! The agent-to-agent tunnel, in the manner of Istio's HBONE: mutual TLS carrying
//! HTTP/2, one `CONNECT <ip:port>` stream per proxied connection, many streams
//! sharing one connection between two agents.
//!
//! - [`TunnelPool`] (client side, outbound): opens a [`TunnelStream`] to a target
//!   behind a peer agent, dialing or reusing the mTLS + h2 connection.
//! - [`TunnelServer`] (server side, inbound): terminates mTLS, reads the client's
//!   SPIFFE ID, authorizes it for the requested target, connects, and relays.
//! - [`TunnelStream`]: one stream as `AsyncRead + AsyncWrite`, on either side.
//!
//! Proxied HTTP can skip the CONNECT layer: a connection negotiating
//! [`crate::identity::ALPN_MESH_HTTP`] carries the requests themselves as HTTP/2
//! streams, each naming its target in [`TARGET_HEADER`] ([`TunnelServer::with_http`]
//! on this side, [`crate::l7::pool`] on the sending side).
//!
//! The server answers a CONNECT with 200 (relaying), 400 (the authority is not an
//! `ip:port`), 403 (policy denied the peer), 405 (not CONNECT), 502 (the target
//! refused the connection) or 503 (the target could not be reached); non-200 answers
//! carry a short reason in the [`REASON_HEADER`] header.

mod client;
pub mod handshake;
mod io;
mod server;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

use crate::identity::{IdentityError, SpiffeId, identity_error_of};

pub use client::{ClientTls, Gateways, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, TunnelPool};
pub use handshake::{HandshakeRuntime, TunnelIo};
pub use io::TunnelStream;
pub use server::{
    Authorize, ConnectTarget, HttpServe, OnClose, Relay, ServerTls, StreamInfo, TunnelRecord, TunnelServer,
};

/// CONNECT header saying the stream carries HTTP (`http1` or `http2`) from the
/// sending agent's L7 proxy; without it the stream is opaque bytes. On a direct
/// HTTP connection, the request header saying which version the workload is spoken
/// to in (the client's).
pub const PROTOCOL_HEADER: &str = "x-mesh-protocol";

/// Request header of a direct HTTP connection naming the request's target (the
/// `ip:port` a CONNECT would name).
pub const TARGET_HEADER: &str = "x-mesh-target";

/// Response header in which the server says why it refused a CONNECT.
pub const REASON_HEADER: &str = "mesh-tunnel-reason";

/// Why a tunnel stream could not be opened. Says which stage failed, so callers can
/// tell a peer that is down (retry elsewhere) from one that is not who it should be
/// (alarm) from a refusal by policy (give up).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No TLS configuration for the source identity (e.g. no certificate yet).
    #[error("no TLS configuration: {source}")]
    Config {
        /// What the identity layer said.
        source: IdentityError,
    },
    /// The TCP connection to the peer agent failed or timed out.
    #[error("connect to peer agent {peer}: {source}")]
    Connect {
        /// The peer agent's address.
        peer: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The peer agent proved an identity other than the expected destination's:
    /// misrouting or impersonation, never retried against the same peer.
    #[error("peer agent {peer} is not {expected}: {source}")]
    IdentityMismatch {
        /// The peer agent's address.
        peer: SocketAddr,
        /// The identity the destination should have proved.
        expected: SpiffeId,
        /// The handshake error; [`TunnelError::identity_error`] reads its details.
        source: std::io::Error,
    },
    /// The TLS handshake failed for another reason (untrusted chain, timeout, I/O).
    #[error("TLS with peer agent {peer}: {source}")]
    Tls {
        /// The peer agent's address.
        peer: SocketAddr,
        /// The handshake error.
        source: std::io::Error,
    },
    /// The HTTP/2 connection or stream failed (including a server that refused our
    /// client certificate after the TLS handshake, which TLS 1.3 reports only here).
    #[error("HTTP/2: {0}")]
    H2(#[source] h2::Error),
    /// The CONNECT request could not be built.
    #[error("bad CONNECT request: {0}")]
    Request(String),
    /// The destination is in a federated trust domain whose cluster has no gateway in
    /// the snapshot, so its agents cannot be reached.
    #[error("no east-west gateway for trust domain {trust_domain:?}: {peer} cannot be reached")]
    NoGateway {
        /// The destination agent's address.
        peer: SocketAddr,
        /// The destination's trust domain.
        trust_domain: String,
    },
    /// The peer agent answered the CONNECT with a status other than 200.
    #[error("peer agent refused the tunnel: {status} {reason}")]
    Refused {
        /// The HTTP status: 403 denied by policy, 502/503 the target failed.
        status: u16,
        /// The server's reason, or the status's standard phrase.
        reason: String,
    },
}

impl TunnelError {
    /// The identity check that failed, for [`TunnelError::IdentityMismatch`].
    pub fn identity_error(&self) -> Option<&IdentityError> {
        match self {
            TunnelError::IdentityMismatch { source, .. } => identity_error_of(source),
            _ => None,
        }
    }

    /// Whether the peer agent's policy denied the source identity (status 403).
    pub fn is_denied(&self) -> bool {
        matches!(self, TunnelError::Refused { status: 403, .. })
    }
}

/// HTTP/2 settings both sides use. The default 64 KiB windows would cap a stream at
/// 64 KiB per round trip; larger windows let one stream fill a fast link while the
/// connection window still bounds what all streams together may have in flight.
mod h2_settings {
    const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    /// Largest DATA frame a peer may send. With h2's 16 KiB, every full frame plus
    /// its 9-byte header spilled into a second TLS record, and a bulk stream cost a
    /// frame per 16 KiB: 256 KiB (the largest relay read) took the 1 MiB load
    /// through the `tcp` port from 0.73x to 1.01x of ztunnel's (bench peers).
    const MAX_FRAME_SIZE: u32 = 256 * 1024;
    /// Streams one client may have open at once on one connection.
    pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
    /// Largest header list (a CONNECT's head) a peer may send; h2's default is 16 MiB.
    pub const MAX_HEADER_LIST_SIZE: u32 = crate::l7::MAX_HEADER_BYTES as u32;

    pub fn client() -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .enable_push(false);
        builder
    }

    pub fn server() -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            // As on direct connections (`l7::pool::PEER_PENDING_RESETS`): a peer
            // agent resets the streams of workloads that gave up on them.
            .max_pending_accept_reset_streams(MAX_CONCURRENT_STREAMS as usize)
            .max_header_list_size(MAX_HEADER_LIST_SIZE);
        builder
    }
}
