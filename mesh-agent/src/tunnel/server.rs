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

use super::handshake::{HandshakeRuntime, TunnelIo};
use super::io::TunnelStream;
use super::{REASON_HEADER, h2_settings};
use crate::identity::{ALPN_MESH_HTTP, SpiffeId, peer_identity_of_stream};
use crate::limits::{ConnectionLimits, ConnectionPermit, HandshakeLimits, SourcePermit};
use crate::observe::limits::{self as limit_metrics, Limit};

/// Admitted connections waiting for the serving side to take them; the acceptor
/// waits (and the kernel's backlog holds further connections) when it is full.
const ACCEPT_QUEUE: usize = 64;

/// A connection the acceptor let in, with its places under the caps.
struct Admitted {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
    source: SourcePermit,
}

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
            tokio_rustls::server::TlsStream<TunnelIo>,
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
    /// The status answered: 200 relayed, 403 denied, 502/503 target failed; 499
    /// when the peer reset the stream before it was answered.
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

/// The status a [`TunnelRecord`] carries for a stream the peer reset before it was
/// answered (nothing was sent; as nginx's 499, "client closed request").
pub const RESET_BY_PEER: u16 = 499;

/// Default deadline of a connection's TLS and HTTP/2 handshakes
/// (`--tunnel-handshake-timeout`): far above a handshake between agents, short
/// enough that idle connections cannot hold handshake slots for long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts tunnel connections from peer agents and serves their CONNECT streams.
pub struct TunnelServer {
    tls: ServerTls,
    authorize: Authorize,
    connect: ConnectTarget,
    on_close: Option<OnClose>,
    relay: Option<Relay>,
    http: Option<HttpServe>,
    handshake_timeout: Duration,
    limits: Arc<ConnectionLimits>,
    handshakes: HandshakeLimits,
    handshake_runtime: Option<Arc<HandshakeRuntime>>,
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
    /// finish within [`DEFAULT_HANDSHAKE_TIMEOUT`] (see
    /// [`TunnelServer::with_handshake_timeout`]), at most [`HandshakeLimits::default`]
    /// at once, on the caller's runtime; connections are not limited otherwise.
    pub fn new(tls: ServerTls, authorize: Authorize, connect: ConnectTarget) -> TunnelServer {
        TunnelServer {
            tls,
            authorize,
            connect,
            on_close: None,
            relay: None,
            http: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            limits: ConnectionLimits::unlimited(),
            handshakes: HandshakeLimits::default(),
            handshake_runtime: None,
        }
    }

    /// Counts this port's connections in `limits` (shared with the agent's other
    /// listeners); one over them is reset at once.
    pub fn with_limits(mut self, limits: Arc<ConnectionLimits>) -> TunnelServer {
        self.limits = limits;
        self
    }

    /// Bounds the TLS handshakes under way (per peer address and in all).
    pub fn with_handshake_limits(mut self, handshakes: HandshakeLimits) -> TunnelServer {
        self.handshakes = handshakes;
        self
    }

    /// Runs TLS handshakes on `runtime`'s threads instead of the caller's, so their
    /// CPU does not delay established connections.
    pub fn with_handshake_runtime(mut self, runtime: Arc<HandshakeRuntime>) -> TunnelServer {
        self.handshake_runtime = Some(runtime);
        self
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
    ///
    /// With a handshake runtime, connections are accepted (and floods refused) on
    /// it too, so a flood of connections to the tunnel port never reaches the data
    /// path's worker: only admitted ones come over, through a short queue.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let server = Arc::new(self);
        let (admitted_tx, mut admitted) = tokio::sync::mpsc::channel::<Admitted>(ACCEPT_QUEUE);
        let listener = match listener.into_std() {
            Ok(listener) => listener,
            Err(e) => return warn!(error = %e, "tunnel listener unusable; not serving"),
        };
        let acceptor = server.clone().accept(listener, admitted_tx, shutdown.clone());
        let on_handshake_runtime = match &server.handshake_runtime {
            Some(runtime) => runtime.spawn_acceptor(acceptor),
            None => {
                tokio::spawn(acceptor);
                true
            }
        };
        if !on_handshake_runtime {
            return warn!("tunnel listener could not move to the handshake runtime; not serving");
        }
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                next = admitted.recv() => match next {
                    Some(a) => match TcpStream::from_std(a.tcp) {
                        Ok(tcp) => {
                            let conn = server.clone().serve_connection(tcp, a.peer, a.permit, a.source, shutdown.clone());
                            connections.spawn(conn);
                        }
                        Err(e) => debug!(peer = %a.peer, error = %e, "tunnel connection lost between runtimes"),
                    },
                    None => break,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(admitted);
        info!(connections = connections.len(), "tunnel server draining");
        while connections.join_next().await.is_some() {}
    }

    /// Accepts connections until `shutdown` (then drops the listener, closing the
    /// port), refusing those over the connection or handshake caps at once and
    /// passing the others on.
    async fn accept(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        admitted: tokio::sync::mpsc::Sender<Admitted>,
        shutdown: CancellationToken,
    ) {
        // Registered with the reactor of the runtime this runs on.
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => return warn!(error = %e, "tunnel listener unusable; not serving"),
        };
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = admitted.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: pause instead of spinning.
                    warn!(error = %e, "tunnel listener accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            };
            let Some(permit) = self.limits.admit(peer.ip(), "tunnel listener") else {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            };
            // Over its address's handshake cap: reset here, before a task or a TLS
            // configuration is spent on it (a flood from one address is mostly such
            // connections).
            let Some(source) = self.handshakes.admit_source(peer.ip()) else {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            };
            // Small TLS records (request heads, window updates) must not wait for the
            // peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let Ok(tcp) = tcp.into_std() else { continue };
            if admitted.send(Admitted { tcp, peer, permit, source }).await.is_err() {
                break;
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        permit: ConnectionPermit,
        source: SourcePermit,
        shutdown: CancellationToken,
    ) {
        let _permit = permit;
        let local = match tcp.local_addr() {
            Ok(local) => local,
            Err(e) => return debug!(peer = %peer_addr, error = %e, "tunnel connection gone before TLS"),
        };
        let Some(config) = (self.tls)(local) else {
            return warn!(peer = %peer_addr, local = %local, "no tunnel identity for this address; closing");
        };
        let deadline = Instant::now() + self.handshake_timeout;
        let (peer_id, tls) = match self.tls_handshake(tcp, peer_addr, source, config, deadline).await {
            Ok(accepted) => accepted,
            Err(e) => return debug!(peer = %peer_addr, error = %e, "tunnel handshake failed"),
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
            Err(_) => {
                let timeout = self.handshake_timeout;
                limit_metrics::hit(
                    Limit::TunnelHandshakeTimeout,
                    format_args!(
                        "tunnel port: {peer_addr} sent no HTTP/2 preface within {timeout:?}; closed"
                    ),
                );
                return;
            }
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
                    Some(Ok((request, mut respond))) => {
                        // Streams the peer reset no longer count against h2's limit, but
                        // their tasks may still be connecting: bound the tasks too.
                        if streams.len() >= h2_settings::MAX_CONCURRENT_STREAMS as usize {
                            limit_metrics::hit(
                                Limit::TunnelStreams,
                                format_args!("tunnel connection from {peer_addr} ({peer_id}) has {} streams in progress; refused one", streams.len()),
                            );
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
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

    /// The TLS handshake of a connection from `peer_addr` (admitted by its
    /// address's cap: `source`), within the total cap and `deadline`, on the
    /// handshake runtime when there is one: the peer's proven identity and the TLS
    /// stream, ready for this runtime.
    async fn tls_handshake(
        &self,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        source: SourcePermit,
        config: Arc<ServerConfig>,
        deadline: Instant,
    ) -> Result<(SpiffeId, tokio_rustls::server::TlsStream<TunnelIo>), String> {
        let timed_out = |what: &str| {
            let timeout = self.handshake_timeout;
            limit_metrics::hit(
                Limit::TunnelHandshakeTimeout,
                format_args!("tunnel port: {peer_addr} {what} within {timeout:?}; closed"),
            );
            format!("{what} within {timeout:?}")
        };
        let Ok(admitted) = tokio::time::timeout_at(deadline, self.handshakes.slot(source)).await else {
            return Err(timed_out("found no handshake slot"));
        };
        let Some(_slot) = admitted else {
            return Err("handshake slots closed".into());
        };
        metrics::gauge!(limit_metrics::TUNNEL_HANDSHAKES_IN_PROGRESS)
            .set(self.handshakes.in_progress() as f64);
        let handshake = move |io: TunnelIo| async move {
            let accept = TlsAcceptor::from(config).accept(io);
            let tls = match tokio::time::timeout_at(deadline, accept).await {
                Ok(tls) => tls?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
            };
            let peer_id =
                peer_identity_of_stream(&tls).map_err(|e| io::Error::other(format!("peer identity: {e}")))?;
            Ok((peer_id, tls))
        };
        let result = match &self.handshake_runtime {
            Some(runtime) => runtime.run(tcp, handshake).await,
            None => handshake(TunnelIo::new(tcp)).await,
        };
        metrics::gauge!(limit_metrics::TUNNEL_HANDSHAKES_IN_PROGRESS)
            .set(self.handshakes.in_progress().saturating_sub(1) as f64);
        result.map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => timed_out("did not finish the TLS handshake"),
            _ => format!("TLS: {e}"),
        })
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
        // A stream the peer resets while its target is being reached ends at once
        // (a flood of opened-and-reset streams must not leave connects behind).
        let connected = tokio::select! {
            connected = (self.connect)(target) => connected,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
                let status = StatusCode::from_u16(RESET_BY_PEER).unwrap_or(StatusCode::BAD_REQUEST);
                return self.closed(record(status, 0, 0, Some("reset by the peer before the target answered".into())));
            }
        };
        let mut upstream = match connected {
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
        let relayed = crate::copy::bidirectional(&mut tunnel, &mut upstream).await;
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
