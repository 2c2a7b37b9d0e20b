//! Protocol detection on an accepted connection, in two moments:
//!
//! - [`early`], before any upstream exists: a client of HTTP sends at once, so a
//!   short grace decides most connections to a service without opening an upstream
//!   the L7 proxy would not use;
//! - [`while_connecting`], when the grace ran out (or was skipped): sniffing goes on
//!   while the upstream connect runs, and a server that speaks first ends the wait.
//!
//! Opaque ports ([`crate::listener::ProxyContext::opaque_ports`]) are never sniffed.

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::route::Connected;
use crate::{
    balance::service::ServiceState,
    listener::ProxyContext,
    sniff::{self, OpaqueReason, Protocol, SniffError},
};

/// First read buffer for sniffing; grows only for large ClientHellos.
pub const SNIFF_BUF: usize = 2 * 1024;

/// How long a connection to a service may stay silent before the upstream connect
/// starts alongside sniffing (see [`early`]).
pub const SERVER_FIRST_GRACE: Duration = Duration::from_millis(20);

/// What the client sent so far, and what it was found to be.
#[derive(Debug)]
pub struct Sniffed {
    /// Every byte read from the client, to be replayed upstream first.
    pub bytes: BytesMut,
    /// `None` while undecided.
    pub protocol: Option<Protocol>,
}

impl Sniffed {
    pub fn new() -> Self {
        Sniffed { bytes: BytesMut::with_capacity(SNIFF_BUF), protocol: None }
    }
}

impl Default for Sniffed {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a connection to `state`'s service at `orig_dst` is sniffed at all: not
/// when the service declares it opaque (`tcp`, `tls`) or the port is configured
/// opaque.
pub fn wanted(ctx: &ProxyContext, state: &ServiceState, orig_dst: std::net::SocketAddr) -> bool {
    let declared_opaque = matches!(state.route.protocol, "tcp" | "tls");
    !declared_opaque && !ctx.opaque_ports.contains(&orig_dst.port())
}

/// Sniffs for up to [`SERVER_FIRST_GRACE`] before any upstream is opened; what was
/// read and found stays in `sniffed`. `Ok` with `sniffed.protocol` still `None` means
/// the client stayed silent (a server-first protocol costs this grace once).
pub async fn early(
    ctx: &ProxyContext,
    client: &mut TcpStream,
    sniffed: &mut Sniffed,
) -> Result<(), SniffError> {
    let sniff = sniff::sniff(client, &mut sniffed.bytes, ctx.detect_timeout);
    match tokio::time::timeout(SERVER_FIRST_GRACE, sniff).await {
        Ok(Ok(protocol)) => {
            sniffed.protocol = Some(protocol);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        // The sniff is cancel-safe: whatever the client sent so far stays in the buffer.
        Err(_) => Ok(()),
    }
}

/// Where a connection stands once the protocol is known and upstream is connected,
/// or why it never got there.
pub enum Ready {
    Connected(Connected, Protocol),
    SniffFailed(SniffError),
    ConnectFailed(io::Error, Option<Protocol>),
}

/// Waits for `connect`, finishing detection alongside unless `sniffed` already
/// decided or the port is opaque.
pub async fn while_connecting(
    ctx: &ProxyContext,
    client: &mut TcpStream,
    sniffed: &mut Sniffed,
    port: u16,
    connect: impl Future<Output = io::Result<Connected>>,
) -> Ready {
    let known = match sniffed.protocol.take() {
        Some(p) => Some(p),
        None if ctx.opaque_ports.contains(&port) => Some(Protocol::Opaque(OpaqueReason::OpaquePort)),
        None => None,
    };
    match known {
        Some(protocol) => match connect.await {
            Ok(up) => Ready::Connected(up, protocol),
            Err(e) => Ready::ConnectFailed(e, Some(protocol)),
        },
        None => sniff_while_connecting(client, &mut sniffed.bytes, ctx.detect_timeout, connect).await,
    }
}

/// Sniffs the client's first bytes while connecting upstream, so the upstream
/// handshake overlaps the wait for the client, and a server that speaks first (SMTP,
/// MySQL, ...) ends the wait at once instead of after the detection timeout.
async fn sniff_while_connecting(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    timeout: Duration,
    connect: impl Future<Output = io::Result<Connected>>,
) -> Ready {
    let sniff = sniff::sniff(client, buf, timeout);
    tokio::pin!(sniff);
    tokio::pin!(connect);
    let upstream = tokio::select! {
        // A decision already made needs no upstream event to be acted on.
        biased;
        sniffed = &mut sniff => {
            return match sniffed {
                Ok(protocol) => match connect.await {
                    Ok(up) => Ready::Connected(up, protocol),
                    Err(e) => Ready::ConnectFailed(e, Some(protocol)),
                },
                Err(e) => Ready::SniffFailed(e),
            };
        }
        connected = &mut connect => match connected {
            Ok(up) => up,
            Err(e) => return Ready::ConnectFailed(e, None),
        },
    };
    tokio::select! {
        biased;
        sniffed = &mut sniff => match sniffed {
            Ok(protocol) => Ready::Connected(upstream, protocol),
            Err(e) => Ready::SniffFailed(e),
        },
        // Readable means the server sent bytes (or closed): either way it went first.
        // The sniff is cancel-safe: whatever the client sent so far stays in `buf`.
        _ = upstream.0.readable() => Ready::Connected(upstream, Protocol::Opaque(OpaqueReason::ServerFirst)),
    }
}
