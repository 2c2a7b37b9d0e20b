//! The sending side of the tunnel: a pool of mTLS + HTTP/2 connections to peer
//! agents, each carrying many CONNECT streams.
//!
//! A connection belongs to one (peer agent, source identity, expected destination
//! identity): the client certificate it presented and the server identity it checked
//! are properties of the whole connection, so streams of another workload pair must
//! not ride on it. Within that key a connection carries up to
//! [`STREAMS_PER_CONNECTION`] streams at once, and the pool dials another when every
//! connection is that full: long-lived streams (a database session, a WebSocket)
//! never wait for one another to end, and a busy peer's load spreads over several
//! connections (h2 serialises each connection's frames on one task).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use super::io::TunnelStream;
use super::{REASON_HEADER, TunnelError, h2_settings};
use crate::identity::{ALPN_H2, CertManager, IdentityError, SpiffeId, identity_error_of};
use crate::socket::SocketFactory;

/// Where the pool gets the client TLS configuration for a (source, expected
/// destination) pair: normally the [`CertManager`] holding the source workload's
/// certificate; tests and benches pass a closure.
pub trait ClientTls: Send + Sync {
    /// A configuration presenting `source`'s certificate and accepting only a server
    /// proving `expected`.
    fn client_config(
        &self,
        source: &SpiffeId,
        expected: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError>;
}

impl ClientTls for CertManager {
    fn client_config(
        &self,
        source: &SpiffeId,
        expected: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        self.tls().client_config(self.identity(source)?, expected.clone())
    }
}

impl<F> ClientTls for F
where
    F: Fn(&SpiffeId, &SpiffeId) -> Result<Arc<ClientConfig>, IdentityError> + Send + Sync,
{
    fn client_config(
        &self,
        source: &SpiffeId,
        expected: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        self(source, expected)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    peer: SocketAddr,
    source: SpiffeId,
    expected: SpiffeId,
}

/// Streams one pooled connection carries at once before the pool dials another
/// (ztunnel's client uses 100; the receiving agent accepts up to
/// `h2_settings::MAX_CONCURRENT_STREAMS`).
pub const STREAMS_PER_CONNECTION: usize = 100;

/// One pooled connection: a handle for new streams, a flag its driver task sets
/// when the connection ends, and how many of its streams are open.
#[derive(Clone)]
struct Connection {
    id: u64,
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
}

impl Connection {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// A place for one more stream, if fewer than `limit` are open.
    fn lease(&self, limit: usize) -> Option<StreamLease> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| StreamLease(self.streams.clone()))
    }
}

/// One open stream's place on its connection, given back when the stream (which
/// holds it) is dropped.
#[derive(Debug)]
pub(crate) struct StreamLease(Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections of one key, and a lock held while dialing so that concurrent
/// opens wait for one dial instead of each making a connection.
#[derive(Default)]
struct Slot {
    dialing: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Connection>>,
}

impl Slot {
    /// An open connection with room for a stream, and the stream's lease on it.
    fn with_room(&self, limit: usize) -> Option<(Connection, StreamLease)> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(Connection::is_open);
        connections.iter().find_map(|c| c.lease(limit).map(|lease| (c.clone(), lease)))
    }

    fn open_count(&self) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.iter().filter(|c| c.is_open()).count()
    }
}

/// How often an idle or busy tunnel connection is pinged, and how long the peer
/// has to answer before the connection is dropped as dead: a peer node that
/// vanished (power loss, partition) sends no FIN, and without pings its connection
/// would stay pooled, taking new streams that never get an answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A federated trust domain's east-west gateways, in the order to try them (the
/// agent reads them from the current snapshot); empty when it has none.
pub type Gateways = Arc<dyn Fn(&str) -> Vec<SocketAddr> + Send + Sync>;

struct Shared {
    tls: Arc<dyn ClientTls>,
    gateways: Option<Gateways>,
    sockets: SocketFactory,
    connect_timeout: Duration,
    keepalive: (Duration, Duration),
    streams_per_connection: usize,
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    next_id: AtomicU64,
}

/// Opens tunnel streams to peer agents, reusing one connection per (peer agent,
/// source identity, destination identity). Cheap to clone; clones share the pool.
/// Connections close when the pool and all their streams are dropped, or when the
/// peer closes them (a later open dials again).
#[derive(Clone)]
pub struct TunnelPool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TunnelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelPool").field("connections", &self.connection_count()).finish_non_exhaustive()
    }
}

impl TunnelPool {
    /// A pool making TLS configurations with `tls`, dialing marked sockets from
    /// `sockets`, giving up on a dial (TCP, TLS and HTTP/2 handshakes each) after
    /// `connect_timeout`.
    pub fn new(tls: Arc<dyn ClientTls>, sockets: SocketFactory, connect_timeout: Duration) -> TunnelPool {
        TunnelPool {
            shared: Arc::new(Shared {
                tls,
                gateways: None,
                sockets,
                connect_timeout,
                keepalive: (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
                streams_per_connection: STREAMS_PER_CONNECTION,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// How many live connections the pool holds (for metrics and tests).
    /// The same pool pinging each connection every `interval` and dropping one
    /// whose peer does not answer within `timeout` (defaults: [`KEEPALIVE_INTERVAL`],
    /// [`KEEPALIVE_TIMEOUT`]). Call before the pool is cloned or used.
    pub fn with_keepalive(mut self, interval: Duration, timeout: Duration) -> TunnelPool {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.keepalive = (interval, timeout);
        }
        self
    }

    /// The same pool with at most `n` streams per connection (default
    /// [`STREAMS_PER_CONNECTION`]). Call before the pool is cloned or used.
    pub fn with_streams_per_connection(mut self, n: usize) -> TunnelPool {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.streams_per_connection = n.max(1);
        }
        self
    }

    /// The same pool dialing a destination of another trust domain through that
    /// domain's gateways, as `gateways` lists them. Call before the pool is cloned
    /// or used.
    pub fn with_gateways(mut self, gateways: Gateways) -> TunnelPool {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.gateways = Some(gateways);
        }
        self
    }

    pub fn connection_count(&self) -> usize {
        let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.values().map(|slot| slot.open_count()).sum()
    }

    /// Opens a stream through the agent at `peer_agent` to `target` (the address the
    /// peer agent connects to), as `source`, accepting only a peer agent that proves
    /// `expected_dest`. `extra_headers` ride on the CONNECT request (e.g. trace
    /// context). Reuses a pooled connection when one is open.
    pub async fn open(
        &self,
        peer_agent: SocketAddr,
        source: &SpiffeId,
        expected_dest: &SpiffeId,
        target: SocketAddr,
        extra_headers: HeaderMap,
    ) -> Result<TunnelStream, TunnelError> {
        let key = PoolKey { peer: peer_agent, source: source.clone(), expected: expected_dest.clone() };
        let slot = {
            let mut slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(key.clone()).or_default().clone()
        };
        let (connection, lease, reused) = self.connection(&key, &slot).await?;
        match send_connect(connection.send.clone(), target, &extra_headers).await {
            // A pooled connection may have been closed by the peer (GOAWAY, idle
            // timeout) since it was last used; the CONNECT never reached a target,
            // so one retry on a fresh connection is safe.
            Err(TunnelError::H2(e)) if reused && retryable(&e) => {
                debug!(peer = %peer_agent, error = %e, "pooled tunnel connection is gone; dialing again");
                connection.closed.store(true, Ordering::Release);
                drop(lease);
                let (connection, lease, _) = self.connection(&key, &slot).await?;
                send_connect(connection.send, target, &extra_headers).await.map(|s| s.with_lease(lease))
            }
            other => other.map(|s| s.with_lease(lease)),
        }
    }

    /// An open connection of `key` with room for a stream, dialing one if every
    /// connection is full or gone; says whether it was reused.
    async fn connection(
        &self,
        key: &PoolKey,
        slot: &Arc<Slot>,
    ) -> Result<(Connection, StreamLease, bool), TunnelError> {
        let limit = self.shared.streams_per_connection;
        if let Some((connection, lease)) = slot.with_room(limit) {
            return Ok((connection, lease, true));
        }
        let _dialing = slot.dialing.lock().await;
        if let Some((connection, lease)) = slot.with_room(limit) {
            return Ok((connection, lease, true));
        }
        match self.dial(key, slot).await {
            Ok(connection) => {
                let lease = connection.lease(limit).ok_or_else(|| {
                    TunnelError::Request("a new tunnel connection had no room for a stream".into())
                })?;
                slot.connections.lock().unwrap_or_else(|e| e.into_inner()).push(connection.clone());
                Ok((connection, lease, false))
            }
            Err(e) => {
                // Leave no empty slot behind for a peer that cannot be reached.
                let mut slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
                if slot.open_count() == 0 && slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                    slots.remove(key);
                }
                Err(e)
            }
        }
    }

    /// A mutual-TLS connection to the agent at `peer`, presenting `source`'s
    /// certificate, accepting only a server that proves `expected`, offering the
    /// ALPN protocols `alpn` (most preferred first; the server's choice wins). The TCP
    /// connect and the TLS handshake each get the pool's connect timeout. This is the
    /// dial under the pool's own connections, and the one direct HTTP uses
    /// ([`crate::l7::pool`]).
    pub async fn connect_tls(
        &self,
        peer: SocketAddr,
        source: &SpiffeId,
        expected: &SpiffeId,
        alpn: &[&[u8]],
    ) -> Result<TlsStream<TcpStream>, TunnelError> {
        let shared = &self.shared;
        let mut config =
            shared.tls.client_config(source, expected).map_err(|source| TunnelError::Config { source })?;
        if config.alpn_protocols.iter().map(Vec::as_slice).ne(alpn.iter().copied()) {
            let mut custom = (*config).clone();
            custom.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            config = Arc::new(custom);
        }
        let (tcp, name) = if expected.trust_domain() == source.trust_domain() {
            let tcp = shared
                .sockets
                .connect(peer, shared.connect_timeout)
                .await
                .map_err(|source| TunnelError::Connect { peer, source })?;
            (tcp, ServerName::IpAddress(peer.ip().into()))
        } else {
            // Another cluster's agent: through its gateway, naming the agent in SNI
            // (the gateway forwards the TLS bytes unopened).
            let tcp = self.dial_gateway(peer, expected.trust_domain()).await?;
            let sni = crate::gateway::sni::encode(peer, expected.trust_domain());
            let name = ServerName::try_from(sni).map_err(|e| TunnelError::Tls {
                peer,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            })?;
            let mut custom = (*config).clone();
            custom.enable_sni = true;
            config = Arc::new(custom);
            (tcp, name)
        };
        match tokio::time::timeout(shared.connect_timeout, TlsConnector::from(config).connect(name, tcp))
            .await
        {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(source)) if identity_error_of(&source).is_some() => {
                Err(TunnelError::IdentityMismatch { peer, expected: expected.clone(), source })
            }
            Ok(Err(source)) => Err(TunnelError::Tls { peer, source }),
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out");
                Err(TunnelError::Tls { peer, source })
            }
        }
    }

    /// A TCP connection to the first gateway of `trust_domain` that answers.
    async fn dial_gateway(&self, peer: SocketAddr, trust_domain: &str) -> Result<TcpStream, TunnelError> {
        let shared = &self.shared;
        let gateways = shared.gateways.as_ref().map(|g| g(trust_domain)).unwrap_or_default();
        let mut last = None;
        for gateway in gateways {
            match shared.sockets.connect(gateway, shared.connect_timeout).await {
                Ok(tcp) => return Ok(tcp),
                Err(source) => {
                    debug!(%gateway, %peer, error = %source, "east-west gateway unreachable; trying the next");
                    last = Some(TunnelError::Connect { peer: gateway, source });
                }
            }
        }
        Err(last.unwrap_or_else(|| TunnelError::NoGateway { peer, trust_domain: trust_domain.to_owned() }))
    }

    async fn dial(&self, key: &PoolKey, slot: &Arc<Slot>) -> Result<Connection, TunnelError> {
        let shared = &self.shared;
        let peer = key.peer;
        let tls = self.connect_tls(peer, &key.source, &key.expected, &[ALPN_H2]).await?;
        let handshake = h2_settings::client().handshake::<_, Bytes>(tls);
        let (send, mut driver) = match tokio::time::timeout(shared.connect_timeout, handshake).await {
            Ok(result) => result.map_err(TunnelError::H2)?,
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP/2 handshake timed out");
                return Err(TunnelError::Connect { peer, source });
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        // The task holds the pool and slot weakly: the slot holds the connection's
        // handle, and the connection must end when the pool is dropped.
        let (weak, task_key, slot, flag) =
            (Arc::downgrade(shared), key.clone(), Arc::downgrade(slot), closed.clone());
        let ping = driver.ping_pong();
        let (interval, timeout) = shared.keepalive;
        tokio::spawn(async move {
            tokio::select! {
                ended = driver => if let Err(e) = ended {
                    debug!(peer = %task_key.peer, error = %e, "tunnel connection ended");
                },
                why = keepalive(ping, interval, timeout) => {
                    // Dropping the driver closes the connection; its streams fail.
                    warn!(peer = %task_key.peer, reason = %why, "tunnel peer is not answering; closing the connection");
                }
            }
            flag.store(true, Ordering::Release);
            if let (Some(shared), Some(slot)) = (weak.upgrade(), slot.upgrade()) {
                forget(&shared, &task_key, &slot, id);
            }
        });
        debug!(peer = %peer, source = %key.source, dest = %key.expected, "tunnel connection established");
        Ok(Connection { id, send, closed, streams: Arc::new(AtomicUsize::new(0)) })
    }
}

/// Pings the peer every `interval` until one goes unanswered for `timeout`; returns
/// why. Never returns when the connection offers no ping handle.
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("ping failed: {e}"),
            Err(_) => return format!("no answer to a ping within {timeout:?}"),
        }
    }
}

/// Drops connection `id` from `slot`, and the slot from the pool if it is now empty,
/// so peers that went away leave nothing behind.
fn forget(shared: &Shared, key: &PoolKey, slot: &Arc<Slot>, id: u64) {
    let mut slots = shared.slots.lock().unwrap_or_else(|e| e.into_inner());
    let mut connections = slot.connections.lock().unwrap_or_else(|e| e.into_inner());
    connections.retain(|c| c.id != id);
    if connections.is_empty() && slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
        slots.remove(key);
    }
}

/// Whether a CONNECT that failed with `err` on a reused connection failed because the
/// connection was no longer usable (rather than the stream being refused by choice).
fn retryable(err: &h2::Error) -> bool {
    match err.reason() {
        _ if err.is_io() || err.is_go_away() => true,
        Some(reason) => reason == h2::Reason::REFUSED_STREAM,
        None => true,
    }
}

/// Sends CONNECT `target` on `send` (waiting for a free stream slot) and waits for
/// the answer.
async fn send_connect(
    send: SendRequest<Bytes>,
    target: SocketAddr,
    extra_headers: &HeaderMap,
) -> Result<TunnelStream, TunnelError> {
    let mut send = send.ready().await.map_err(TunnelError::H2)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| TunnelError::Request(e.to_string()))?;
    request.headers_mut().extend(extra_headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (response, stream) = send.send_request(request, false).map_err(TunnelError::H2)?;
    let response = response.await.map_err(TunnelError::H2)?;
    let status = response.status();
    if status != StatusCode::OK {
        let reason = response
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
            .to_owned();
        return Err(TunnelError::Refused { status: status.as_u16(), reason });
    }
    Ok(TunnelStream::new(stream, response.into_body()))
}
