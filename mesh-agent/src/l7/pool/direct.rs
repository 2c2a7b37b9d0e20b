//! Direct HTTP between agents: a meshed endpoint's requests ride as HTTP/2 streams
//! on mutual-TLS connections per (peer agent, source identity, destination
//! identity), a bounded number of streams on each ([`super::streams`]). Each
//! request names its endpoint in [`crate::tunnel::TARGET_HEADER`] and the workload's
//! HTTP version in [`crate::tunnel::PROTOCOL_HEADER`] (see
//! [`crate::identity::ALPN_MESH_HTTP`]), so HTTP/1.1 clients are multiplexed too. A
//! peer agent that does not offer direct HTTP (an older agent) is remembered for a
//! while and served through CONNECT streams of the tunnel instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::streams::{Checkout, Conns, Patience, Stream, UpstreamBody};
use super::{Body, Dial, SendError, UpstreamPool, Version};
use crate::identity::{ALPN_H2, ALPN_MESH_HTTP, SpiffeId};

/// How long a peer agent that answered without direct HTTP is served through
/// CONNECT streams before it is asked again (it may have been upgraded).
const LEGACY_RECHECK: Duration = Duration::from_secs(60);

/// Flow-control windows of direct HTTP connections, as the tunnel's: one stream can
/// fill a fast link, all of them together stay bounded.
pub(crate) const DIRECT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const DIRECT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame on a direct connection, as the tunnel's
/// (`tunnel::h2_settings`): fewer frames, and no 9-byte frame header spilling into a
/// TLS record of its own after every full 16 KiB frame.
pub(crate) const DIRECT_MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Requests a receiving agent lets one direct connection carry at once (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`); more would wait inside h2 for a stream to
/// end. A sending agent moves on to another connection well before, at
/// [`super::streams::STREAMS_PER_CONNECTION`]; this bounds a sender that does not.
pub(crate) const DIRECT_MAX_STREAMS: u32 = 1024;

/// Streams a peer agent may reset before the receiving agent has taken them up,
/// before the connection is closed (`ENHANCE_YOUR_CALM`). h2's default, 20, guards
/// a server from one client's rapid resets; a peer agent's connection carries
/// many workloads' requests, and a workload that abandons its requests (truncated
/// bodies, cancelled calls) makes its agent reset each stream. With 20, a
/// receiving agent that was slow to take streams up closed the connection, failing
/// every other workload's requests on it (seen in the truncated-bodies flood of
/// `tests/floods.rs` on a busy machine). Workloads' own rapid resets are bounded by
/// the sending agent, on their connections to it; this stays bounded too.
pub(crate) const PEER_PENDING_RESETS: usize = DIRECT_MAX_STREAMS as usize;

/// Direct connections open at once to one peer agent for one identity pair. At 100
/// streams each, 1,600 requests are in flight before one waits: more than the single
/// connection that used to carry them all ([`DIRECT_MAX_STREAMS`]), and few enough
/// that one sender cannot pile connections on a peer. Past it a request waits,
/// within its connect timeout, for a stream to end, and then fails as a connect
/// failure (counted as `upstream_connections` in the limits).
pub(crate) const MAX_DIRECT_PER_KEY: usize = 16;

/// The direct connections of each peer agent (almost always one identity pair each).
pub(super) type DirectMap = HashMap<SocketAddr, Vec<(MeshKey, Direct)>>;

/// Who is talking to whom over a direct connection: the client certificate and the
/// server identity checked belong to the whole connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MeshKey {
    agent: SocketAddr,
    source: SpiffeId,
    expected: SpiffeId,
}

/// A [`MeshKey`] borrowed, for the per-request lookup: no identity is cloned or
/// hashed per request (a `SpiffeId` is three strings).
#[derive(Clone, Copy)]
struct MeshRef<'a> {
    agent: SocketAddr,
    source: &'a SpiffeId,
    expected: &'a SpiffeId,
}

impl MeshRef<'_> {
    fn is(&self, key: &MeshKey) -> bool {
        key.agent == self.agent && key.source == *self.source && key.expected == *self.expected
    }

    fn owned(&self) -> MeshKey {
        MeshKey { agent: self.agent, source: self.source.clone(), expected: self.expected.clone() }
    }
}

/// A peer agent's direct connections for one identity pair, or the note that it
/// has none.
#[derive(Default)]
pub(super) struct Direct {
    conns: Conns,
    /// When the peer last chose the CONNECT tunnel over direct HTTP.
    legacy: Option<Instant>,
}

/// The entry of `key`, made if there is none.
fn entry<'m>(map: &'m mut DirectMap, key: MeshRef<'_>) -> &'m mut Direct {
    let list = map.entry(key.agent).or_default();
    let at = match list.iter().position(|(k, _)| key.is(k)) {
        Some(at) => at,
        None => {
            list.push((key.owned(), Direct::default()));
            list.len() - 1
        }
    };
    &mut list[at].1
}

/// The entry of `key`, if there is one.
fn existing<'m>(map: &'m mut DirectMap, key: MeshRef<'_>) -> Option<&'m mut Direct> {
    map.get_mut(&key.agent)?.iter_mut().find(|(k, _)| key.is(k)).map(|(_, d)| d)
}

/// A dial slot of one key, reserved by [`Conns::checkout`]; given back if the dial
/// fails or the request is dropped meanwhile.
struct DirectReserved<'a> {
    pool: &'a UpstreamPool,
    key: MeshRef<'a>,
    done: bool,
}

impl DirectReserved<'_> {
    fn fill(mut self, sender: http2::SendRequest<Body>, idle: Duration) -> Stream {
        self.done = true;
        let mut direct = self.pool.direct.lock().unwrap_or_else(|e| e.into_inner());
        entry(&mut direct, self.key).conns.filled(sender, idle)
    }

    /// The peer chose the tunnel: noted, and waiting requests go there too.
    fn legacy(mut self) {
        self.done = true;
        let mut direct = self.pool.direct.lock().unwrap_or_else(|e| e.into_inner());
        let found = entry(&mut direct, self.key);
        found.legacy = Some(Instant::now());
        found.conns.abandoned();
    }
}

impl Drop for DirectReserved<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut direct = self.pool.direct.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = existing(&mut direct, self.key) {
                found.conns.abandoned();
            }
        }
    }
}

/// A request on its way to a peer agent: as the client sent it until it first goes
/// out on a direct connection (the tunnel needs it so), then in direct form.
enum Outgoing {
    Client(Request<Body>),
    Direct(Request<Body>),
}

impl UpstreamPool {
    /// Sends `req` to the meshed `endpoint` as a stream of a direct connection to
    /// its agent, or, if that agent does not speak direct HTTP, through the tunnel.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_direct(
        &self,
        endpoint: SocketAddr,
        agent: SocketAddr,
        expected: &Arc<SpiffeId>,
        version: Version,
        connect_timeout: Duration,
        idle: Duration,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let Some(ident) = self.identity.wait(connect_timeout).await else {
            return Err(SendError::Connect {
                endpoint,
                message: "no workload certificate yet: meshed traffic is never sent in plaintext".into(),
            });
        };
        let key = MeshRef { agent, source: ident.workload.id(), expected };
        let mut patience = Patience::new(connect_timeout);
        let mut outgoing = Outgoing::Client(req);
        // A connection that goes away (GOAWAY, peer restart) before the stream opens
        // hands the request back: it never left, so it goes out on another.
        let mut handed_back = 0;
        loop {
            let checkout = {
                let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
                let found = entry(&mut direct, key);
                let now = Instant::now();
                match found.legacy {
                    Some(since) if now.duration_since(since) < LEGACY_RECHECK => None,
                    _ => {
                        // Asked again after a while: the peer may have been upgraded.
                        found.legacy = None;
                        Some(found.conns.checkout(now, idle, self.streams_per_connection, MAX_DIRECT_PER_KEY))
                    }
                }
            };
            let Stream { mut sender, lease } = match checkout {
                None => {
                    let Outgoing::Client(req) = outgoing else {
                        let message = format!("peer agent {agent} stopped offering direct HTTP");
                        return Err(SendError::Connect { endpoint, message });
                    };
                    // Boxed: rare, and would otherwise double this future's size.
                    let dial = Dial::Meshed { agent, identity: expected.clone() };
                    return Box::pin(self.send_version(endpoint, &dial, version, connect_timeout, idle, req))
                        .await;
                }
                Some(Checkout::Ready(stream)) => stream,
                Some(Checkout::Dial) => {
                    let reserved = DirectReserved { pool: self, key, done: false };
                    let dialed =
                        Box::pin(tokio::time::timeout(connect_timeout, self.dial_direct(key, endpoint)))
                            .await;
                    match dialed {
                        Ok(Ok(Some(sender))) => reserved.fill(sender, idle),
                        Ok(Ok(None)) => {
                            reserved.legacy();
                            continue;
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            let message =
                                format!("direct connection to {agent}: timed out after {connect_timeout:?}");
                            return Err(SendError::Connect { endpoint, message });
                        }
                    }
                }
                Some(Checkout::Full { room, at_bound }) => {
                    if at_bound && patience.first_at_bound() {
                        crate::observe::limits::hit(
                            crate::observe::limits::Limit::UpstreamConnections,
                            format_args!(
                                "{MAX_DIRECT_PER_KEY} direct connections to peer agent {agent} have no free stream; a request waits"
                            ),
                        );
                    }
                    if !patience.wait(room).await {
                        let message = format!(
                            "no stream on the direct connections to peer agent {agent} came free within {connect_timeout:?}"
                        );
                        return Err(SendError::Connect { endpoint, message });
                    }
                    continue;
                }
            };
            let req = match outgoing {
                Outgoing::Client(req) => to_direct(req, endpoint, version),
                Outgoing::Direct(req) => req,
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return from_direct(
                        resp.map(|body| UpstreamBody::leased(body, lease)),
                        endpoint,
                        version,
                    );
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if handed_back < 3 => {
                        debug!(agent = %agent, error = %e.error(), "direct connection gone; trying another");
                        handed_back += 1;
                        outgoing = Outgoing::Direct(unsent);
                        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(found) = existing(&mut direct, key) {
                            found.conns.forget(&lease);
                        }
                    }
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// Dials `key`'s agent offering direct HTTP and the tunnel; `None` if it chose
    /// the tunnel.
    async fn dial_direct(
        &self,
        key: MeshRef<'_>,
        endpoint: SocketAddr,
    ) -> Result<Option<http2::SendRequest<Body>>, SendError> {
        let agent = key.agent;
        let fail = |message: String| SendError::Connect { endpoint, message };
        let tls = self
            .tunnels
            .connect_tls(agent, key.source, key.expected, &[ALPN_MESH_HTTP, ALPN_H2])
            .await
            .map_err(|e| fail(format!("direct connection to {agent} ({}): {e}", key.expected)))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_MESH_HTTP) {
            debug!(agent = %agent, "peer agent does not offer direct HTTP; using the tunnel");
            return Ok(None);
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(DIRECT_STREAM_WINDOW)
            .initial_connection_window_size(DIRECT_CONNECTION_WINDOW)
            .max_frame_size(DIRECT_MAX_FRAME_SIZE)
            .keep_alive_interval(crate::tunnel::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(crate::tunnel::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .max_header_list_size(crate::l7::MAX_HEADER_BYTES as u32)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(format!("direct connection to {agent}: HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(agent = %agent, error = %e, "direct HTTP connection ended");
            }
        });
        debug!(agent = %agent, source = %key.source, dest = %key.expected, "direct HTTP connection established");
        Ok(Some(sender))
    }

    /// Drops direct connections closed or idle too long, and peers' tunnel-only
    /// notes due for a recheck (part of [`UpstreamPool::sweep`]).
    pub(super) fn sweep_direct(&self, now: Instant) {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct.retain(|_, list| {
            list.retain_mut(|(_, d)| {
                d.legacy = d.legacy.filter(|since| now.duration_since(*since) < LEGACY_RECHECK);
                let open = d.conns.sweep(now);
                open || d.legacy.is_some()
            });
            !list.is_empty()
        });
    }

    /// Open direct HTTP connections to peer agents.
    pub fn direct_count(&self) -> usize {
        let direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct.values().flatten().map(|(_, d)| d.conns.open_count()).sum()
    }
}

/// `req` as a stream of a direct connection: HTTP/2 needs a scheme and an
/// authority (an HTTP/1 request's comes from its `Host`, else the endpoint), and the
/// headers name the endpoint and the version the workload is spoken to in. The
/// client's `Host` header rides along unchanged, so the receiving agent hands the
/// workload the request as the client sent it.
fn to_direct(req: Request<Body>, endpoint: SocketAddr, version: Version) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
        let authority = parts
            .uri
            .authority()
            .cloned()
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok()?.parse().ok())
            .or_else(|| endpoint.to_string().parse().ok());
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = authority;
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
    parts.version = http::Version::HTTP_2;
    parts.headers.insert(crate::tunnel::TARGET_HEADER, crate::discovery::table::addr_header(endpoint));
    parts.headers.insert(crate::tunnel::PROTOCOL_HEADER, http::HeaderValue::from_static(version.name()));
    Request::from_parts(parts, body)
}

/// The response of a direct stream as the client's version expects it. The peer
/// agent marks a request it refused before it reached the workload (no such target
/// here, policy, the workload unreachable) with [`crate::tunnel::REASON_HEADER`]:
/// that is a failure to connect, safe to try on another endpoint.
fn from_direct(
    mut resp: Response<UpstreamBody>,
    endpoint: SocketAddr,
    version: Version,
) -> Result<Response<UpstreamBody>, SendError> {
    if let Some(reason) = resp.headers().get(crate::tunnel::REASON_HEADER) {
        let reason = String::from_utf8_lossy(reason.as_bytes());
        let message = format!("peer agent refused: {} {reason}", resp.status().as_u16());
        return Err(SendError::Connect { endpoint, message });
    }
    if version == Version::Http1 {
        *resp.version_mut() = http::Version::HTTP_11;
    }
    Ok(resp)
}
