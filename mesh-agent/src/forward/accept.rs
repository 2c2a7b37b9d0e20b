//! The first step of every intercepted connection: what it is, before anything is
//! read from it. The listener hands over a socket and its peer; this step recovers
//! the original destination, refuses a connection that would loop back into the
//! agent, and fixes up the peer address eBPF redirection made up. What comes out,
//! [`Accepted`], is the one parameter later steps take to know which connection
//! they serve.

use std::{net::SocketAddr, time::Instant};

use tokio::net::TcpStream;
use tracing::warn;

use crate::{
    intercept::ActiveMode,
    listener::{Direction, ProxyContext},
};

/// An accepted connection as every later step sees it: who called, where it was
/// going, when, and through which listener.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The client: for outbound connections the workload's own address (as it would
    /// have been without eBPF redirection, see [`crate::source_addr`]).
    pub peer: SocketAddr,
    /// Where the client was connecting before interception took the connection.
    pub orig_dst: SocketAddr,
    /// When the connection was accepted (for durations in logs and metrics).
    pub start: Instant,
    /// Which listener took it.
    pub direction: Direction,
}

/// Why a connection is refused before anything is read from it.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Connected to the agent port directly, or interception state was lost.
    #[error("no original destination: {0}")]
    NoOriginalDestination(std::io::Error),
    /// The original destination is one of the agent's own listeners.
    #[error("original destination {0} is the agent itself")]
    Loop(SocketAddr),
}

/// Recovers `client`'s original destination and refuses loops. Logs the refusal;
/// the caller resets the connection.
pub fn accept(
    ctx: &ProxyContext,
    direction: Direction,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<Accepted, AcceptError> {
    let start = Instant::now();
    let lookup = match direction {
        Direction::Outbound => &ctx.lookup,
        Direction::Inbound => &ctx.inbound_lookup,
    };
    let orig_dst = match lookup.orig_dst(client) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(
                direction = direction.as_str(),
                src = %peer,
                error = %e,
                "no original destination for connection (connected to the agent port directly, \
                 or interception state lost); closing"
            );
            return Err(AcceptError::NoOriginalDestination(e));
        }
    };
    if ctx.is_own_listener(orig_dst) {
        warn!(direction = direction.as_str(), src = %peer, orig_dst = %orig_dst,
            "original destination is the agent itself; refusing to loop");
        return Err(AcceptError::Loop(orig_dst));
    }
    // The eBPF redirect gave the workload's socket a loopback source; report the one
    // it would have had (as iptables mode does).
    let peer = if ctx.mode == ActiveMode::Ebpf && direction == Direction::Outbound {
        crate::source_addr::unredirected(peer, orig_dst)
    } else {
        peer
    };
    Ok(Accepted { peer, orig_dst, start, direction })
}
