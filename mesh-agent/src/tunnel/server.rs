//! The receiving side of the tunnel: terminate mTLS, learn who the peer is, and
//! for each CONNECT stream check policy, connect to the target and relay.
//!
//! Policy, the upstream connect and the TLS identity to present are the caller's
//! (closures), so this module knows nothing of snapshots or workloads, and tests
//! drive it with plain functions.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::io::TunnelStream;
use super::{REASON_HEADER, h2_settings};
use crate::identity::{ALPN_MESH_HTTP, SpiffeId, peer_identity_of_stream};

/// The server configuration to present on a connection accepted at the given local
/// address (the identity of the workloads behind it); `None` closes the connection.
pub type ServerTls = Arc<dyn Fn(SocketAddr) -> Option<Arc<ServerConfig>> + Send + Sync>;

/// Whether the peer (its proven SPIFFE ID) may reach the target; `Err` carries the
/// reason for the log.
pub type Authorize = Arc<dyn Fn(&SpiffeId, SocketAddr) -> Result<(), String> + Send + Sync>;

/// Connects to an authorized target (the agent passes a marked-socket connect).
pub type ConnectTarget =
    Arc<dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync>;

/// An admitted stream, for a [`Relay`].
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// The identity the peer agent proved.
    pub peer_id: SpiffeId,
    /// The peer agent's address.
    pub peer_addr: SocketAddr,
    /// The target the stream asked for (already connected).
    pub target: SocketAddr,
    /// The CONNECT request's headers (e.g. [`super::PROTOCOL_HEADER`]).
    pub headers: http::HeaderMap,
}

/// Moves bytes between an admitted stream and its connected target; returns the
/// bytes (peer to target, target to peer). The default copies both ways; the agent
/// passes one that proxies HTTP per request.
pub type Relay = Arc<
    dyn Fn(
            StreamInfo,
            TunnelStream,
            TcpStream,
        ) -> Pin<Box<dyn Future<Output = (u64, u64, Option<String>)> + Send>>
        + Send
        + Sync,
>;

/// Serves one connection whose client chose [`crate::identity::ALPN_MESH_HTTP`]:
/// HTTP requests carried directly, each naming its target. Gets the peer's proven
/// identity and address, the TLS stream, and the server's shutdown token (on which
/// it must close gracefully).
pub type HttpServe = Arc<
    dyn Fn(
            SpiffeId,
            SocketAddr,
            tokio_rustls::server::TlsStream<TcpStream>,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Called once per CONNECT stream that named a target, when it ends.
pub type OnClose = Arc<dyn Fn(TunnelRecord) + Send + Sync>;

/// What happened to one tunnel stream, for the access log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRecord {
    /// The identity the peer agent proved (its source workload's).
    pub peer_id: SpiffeId,
    /// The peer agent's address.
    pub peer_addr: SocketAddr,
    /// The target the stream asked for.
    pub target: SocketAddr,
    /// The status answered: 200 relayed, 403 denied, 502/503 target failed.
    pub status: u16,
    /// Bytes from the peer to the target.
    pub bytes_in: u64,
    /// Bytes from the target to the peer.
    pub bytes_out: u64,
    /// From the CONNECT's arrival to the end of the relay.
    pub duration: Duration,
    /// Why the stream failed or was refused, if it did.
    pub error: Option<String>,
}

/// Buffer per relay direction; bounds a stream's memory on this side.
const RELAY_BUFFER: usize = 64 * 1024;

/// Accepts tunnel connections from peer agents and serves their CONNECT streams.
pub struct TunnelServer {
    tls: ServerTls,
    authorize: Authorize,
    connect: ConnectTarget,
    on_close: Option<OnClose>,
    relay: Option<Relay>,
    http: Option<HttpServe>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TunnelServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelServer")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TunnelServer {
    /// A server presenting `tls`'s configuration, admitting streams `authorize`
    /// allows, reaching targets through `connect`. TLS and HTTP/2 handshakes must
    /// finish within 10 s (see [`TunnelServer::with_handshake_timeout`]).
    pub fn new(tls: ServerTls, authorize: Authorize, connect: ConnectTarget) -> TunnelServer {
        TunnelServer {
            tls,
            authorize,
            connect,
            on_close: None,
            relay: None,
            http: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// A [`ServerTls`] presenting the same configuration on every connection.
    pub fn fixed_tls(config: Arc<ServerConfig>) -> ServerTls {
        Arc::new(move |_| Some(config.clone()))
    }

    /// Reports every finished stream to `on_close`.
    pub fn with_on_close(mut self, on_close: OnClose) -> TunnelServer {
        self.on_close = Some(on_close);
        self
    }

    /// Relays admitted streams with `relay` instead of copying bytes.
    pub fn with_relay(mut self, relay: Relay) -> TunnelServer {
        self.relay = Some(relay);
        self
    }

    /// Serves connections that negotiate [`crate::identity::ALPN_MESH_HTTP`] with
    /// `http`. Without it such connections are closed (the server configuration
    /// should then not offer that protocol).
    pub fn with_http(mut self, http: HttpServe) -> TunnelServer {
        self.http = Some(http);
        self
    }

    /// Closes connections whose TLS + HTTP/2 handshake takes longer than `timeout`,
    /// so idle or slow clients cannot hold sockets open.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> TunnelServer {
        self.handshake_timeout = timeout;
        self
    }

    /// Serves `listener` until `shutdown` is cancelled; then stops accepting, sends
    /// GOAWAY on every connection and returns once their streams have finished.
    /// Bound the drain by dropping the future (it aborts what is left).
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let server = Arc::new(self);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        // Small TLS records (request heads, window updates) must not
                        // wait for the peer's delayed ACK.
                        let _ = tcp.set_nodelay(true);
                        connections.spawn(server.clone().serve_connection(tcp, peer, shutdown.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: pause instead of spinning.
                        warn!(error = %e, "tunnel listener accept failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        info!(connections = connections.len(), "tunnel server draining");
        while connections.join_next().await.is_some() {}
    }

    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(e) => return debug!(peer = %peer_addr, error = %e, "tunnel connection gone before TLS"),
        };
        let Some(config) = (self.tls)(local) else {
            return warn!(peer = %peer_addr, local = %local, "no tunnel identity for this address; closing");
        };
        let deadline = Instant::now() + self.handshake_timeout;
        let accepted = tokio::time::timeout_at(deadline, async {
            let tls = TlsAcceptor::from(config).accept(tcp).await.map_err(|e| format!("TLS: {e}"))?;
            let peer_id = peer_identity_of_stream(&tls).map_err(|e| format!("peer identity: {e}"))?;
            Ok::<_, String>((peer_id, tls))
        });
        let (peer_id, tls) = match accepted.await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(e)) => return debug!(peer = %peer_addr, error = %e, "tunnel handshake failed"),
            Err(_) => return debug!(peer = %peer_addr, "tunnel handshake timed out"),
        };
        if tls.get_ref().1.alpn_protocol() == Some(ALPN_MESH_HTTP) {
            let Some(http) = &self.http else {
                return warn!(peer = %peer_addr, "direct HTTP negotiated but not served; closing");
            };
            debug!(peer = %peer_addr, peer_id = %peer_id, "direct HTTP connection accepted");
            return http(peer_id, peer_addr, tls, shutdown).await;
        }
        let mut conn = match tokio::time::timeout_at(deadline, h2_settings::server().handshake(tls)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return debug!(peer = %peer_addr, error = %e, "tunnel handshake failed: HTTP/2"),
            Err(_) => return debug!(peer = %peer_addr, "tunnel handshake timed out"),
        };
        debug!(peer = %peer_addr, peer_id = %peer_id, "tunnel connection accepted");
        let mut streams = JoinSet::new();
        let mut draining = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    conn.graceful_shutdown();
                    draining = true;
                }
                request = conn.accept() => match request {
                    Some(Ok((request, respond))) => {
                        let stream = self.clone().serve_stream(peer_id.clone(), peer_addr, request, respond);
                        streams.spawn(stream);
                    }
                    Some(Err(e)) => {
                        debug!(peer = %peer_addr, error = %e, "tunnel connection failed");
                        break;
                    }
                    None => break,
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        while streams.join_next().await.is_some() {}
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer_id: SpiffeId,
        peer_addr: SocketAddr,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let start = Instant::now();
        if request.method() != Method::CONNECT {
            return refuse(&mut respond, StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served");
        }
        let Some(target) = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return refuse(&mut respond, StatusCode::BAD_REQUEST, "authority is not ip:port");
        };
        let record = |status: StatusCode, bytes_in, bytes_out, error: Option<String>| TunnelRecord {
            peer_id: peer_id.clone(),
            peer_addr,
            target,
            status: status.as_u16(),
            bytes_in,
            bytes_out,
            duration: start.elapsed(),
            error,
        };
        if let Err(reason) = (self.authorize)(&peer_id, target) {
            warn!(peer_id = %peer_id, peer = %peer_addr, target = %target, reason = %reason, "tunnel denied");
            refuse(&mut respond, StatusCode::FORBIDDEN, "denied by policy");
            return self.closed(record(StatusCode::FORBIDDEN, 0, 0, Some(reason)));
        }
        let mut upstream = match (self.connect)(target).await {
            Ok(upstream) => upstream,
            Err(e) => {
                let status = match e.kind() {
                    io::ErrorKind::ConnectionRefused => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                let reason = format!("connect {target}: {e}");
                refuse(&mut respond, status, &reason);
                return self.closed(record(status, 0, 0, Some(reason)));
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => return self.closed(record(StatusCode::OK, 0, 0, Some(format!("HTTP/2: {e}")))),
        };
        let (parts, body) = request.into_parts();
        let headers = parts.headers;
        let mut tunnel = TunnelStream::new(send, body);
        if let Some(relay) = &self.relay {
            let info = StreamInfo { peer_id: peer_id.clone(), peer_addr, target, headers: headers.clone() };
            let (bytes_in, bytes_out, error) = relay(info, tunnel, upstream).await;
            return self.closed(record(StatusCode::OK, bytes_in, bytes_out, error));
        }
        let relayed =
            tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut upstream, RELAY_BUFFER, RELAY_BUFFER)
                .await;
        let error = match relayed {
            Ok(_) => None,
            Err(e) => {
                // An EOF would tell the peer it saw everything; a reset says it did not.
                tunnel.reset();
                Some(e.to_string())
            }
        };
        self.closed(record(StatusCode::OK, tunnel.bytes_received(), tunnel.bytes_sent(), error));
    }

    fn closed(&self, record: TunnelRecord) {
        debug!(
            peer_id = %record.peer_id,
            target = %record.target,
            status = record.status,
            bytes_in = record.bytes_in,
            bytes_out = record.bytes_out,
            error = record.error.as_deref(),
            "tunnel stream closed"
        );
        if let Some(on_close) = &self.on_close {
            on_close(record);
        }
    }
}

/// Answers a stream with `status` and no body; `reason` goes in [`REASON_HEADER`].
fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(reason) {
        response.headers_mut().insert(REASON_HEADER, value);
    }
    // Fails only if the peer already reset the stream: nobody is left to tell.
    let _ = respond.send_response(response, true);
}
