//! Direct HTTP between agents: a meshed endpoint's requests ride as HTTP/2 streams
//! on one mutual-TLS connection per (peer agent, source identity, destination
//! identity), each naming its endpoint in [`crate::tunnel::TARGET_HEADER`] and the
//! workload's HTTP version in [`crate::tunnel::PROTOCOL_HEADER`] (see
//! [`crate::identity::ALPN_MESH_HTTP`]), so HTTP/1.1 clients are multiplexed too. A
//! peer agent that does not offer direct HTTP (an older agent) is remembered for a
//! while and served through CONNECT streams of the tunnel instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::{Body, Dial, Idle, SendError, UpstreamPool, Version};
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
/// Requests one sending agent may have in flight at once on one direct connection;
/// more wait for a free stream.
pub(crate) const DIRECT_MAX_STREAMS: u32 = 1024;

/// Who is talking to whom over a direct connection: the client certificate and the
/// server identity checked belong to the whole connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

/// A peer agent's direct connection, or the note that it has none.
pub(super) enum Direct {
    Open(Idle<http2::SendRequest<Body>>),
    /// The peer chose the CONNECT tunnel at this time.
    Legacy(Instant),
}

impl UpstreamPool {
    /// Sends `req` to the meshed `endpoint` as a stream of the direct connection to
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
    ) -> Result<Response<Incoming>, SendError> {
        let Some(ident) = self.identity.wait(connect_timeout).await else {
            return Err(SendError::Connect {
                endpoint,
                message: "no workload certificate yet: meshed traffic is never sent in plaintext".into(),
            });
        };
        let key = MeshRef { agent, source: ident.workload.id(), expected };
        let Some(mut sender) = self.direct_sender(key, endpoint, connect_timeout, idle).await? else {
            // Boxed: rare, and would otherwise double this future's size.
            let dial = Dial::Meshed { agent, identity: expected.clone() };
            return Box::pin(self.send_version(endpoint, &dial, version, connect_timeout, idle, req)).await;
        };
        let req = to_direct(req, endpoint, version);
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // The connection went away (GOAWAY, peer restart) before the stream
                // opened: the request never left, so it goes out on a fresh one.
                Some(unsent) => {
                    debug!(agent = %agent, error = %e.error(), "direct connection gone; dialing again");
                    self.forget_direct(key, &sender);
                    match self.direct_sender(key, endpoint, connect_timeout, idle).await? {
                        Some(mut fresh) => fresh.send_request(unsent).await?,
                        None => {
                            return Err(SendError::Connect {
                                endpoint,
                                message: format!("peer agent {agent} stopped offering direct HTTP"),
                            });
                        }
                    }
                }
                None => return Err(SendError::Request(e.into_error())),
            },
        };
        from_direct(resp, endpoint, version)
    }

    /// The direct connection of `key`, dialing one if none is open; `None` when the
    /// peer agent answered without direct HTTP (recently).
    async fn direct_sender(
        &self,
        key: MeshRef<'_>,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        idle: Duration,
    ) -> Result<Option<http2::SendRequest<Body>>, SendError> {
        if let Some(found) = self.pooled_direct(key, idle) {
            return Ok(found);
        }
        let owned = key.owned();
        let lock = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            dialing.entry(owned.clone()).or_default().clone()
        };
        let _dialing = lock.lock().await;
        if let Some(found) = self.pooled_direct(key, idle) {
            return Ok(found);
        }
        let dialed =
            Box::pin(tokio::time::timeout(connect_timeout, self.dial_direct(&owned, endpoint))).await;
        let found = match dialed {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let message =
                    format!("direct connection to {}: timed out after {connect_timeout:?}", key.agent);
                return Err(SendError::Connect { endpoint, message });
            }
        };
        let entry = match &found {
            Some(sender) => {
                Direct::Open(Idle { sender: sender.clone(), since: Instant::now(), idle_timeout: idle })
            }
            None => Direct::Legacy(Instant::now()),
        };
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let list = direct.entry(key.agent).or_default();
        list.retain(|(k, _)| !key.is(k));
        list.push((owned, entry));
        Ok(found)
    }

    /// What the pool holds for `key`: `Some(Some(sender))` an open connection,
    /// `Some(None)` a peer known to want the tunnel, `None` nothing usable.
    fn pooled_direct(&self, key: MeshRef<'_>, idle: Duration) -> Option<Option<http2::SendRequest<Body>>> {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let list = direct.get_mut(&key.agent)?;
        let at = list.iter().position(|(k, _)| key.is(k))?;
        let now = Instant::now();
        match &mut list[at].1 {
            Direct::Open(i) if !i.sender.is_closed() && i.sender.is_ready() => {
                i.since = now;
                i.idle_timeout = idle;
                Some(Some(i.sender.clone()))
            }
            Direct::Legacy(since) if now.duration_since(*since) < LEGACY_RECHECK => Some(None),
            _ => {
                list.swap_remove(at);
                None
            }
        }
    }

    /// Drops `key`'s connection if it is still `sender`'s.
    fn forget_direct(&self, key: MeshRef<'_>, sender: &http2::SendRequest<Body>) {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = direct.get_mut(&key.agent) else { return };
        list.retain(|(k, d)| {
            !(key.is(k)
                && matches!(d, Direct::Open(i) if i.sender.is_closed() || !i.sender.is_ready() || sender.is_closed()))
        });
    }

    /// Dials `key`'s agent offering direct HTTP and the tunnel; `None` if it chose
    /// the tunnel.
    async fn dial_direct(
        &self,
        key: &MeshKey,
        endpoint: SocketAddr,
    ) -> Result<Option<http2::SendRequest<Body>>, SendError> {
        let agent = key.agent;
        let fail = |message: String| SendError::Connect { endpoint, message };
        let tls = self
            .tunnels
            .connect_tls(agent, &key.source, &key.expected, &[ALPN_MESH_HTTP, ALPN_H2])
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

    /// Drops direct connections closed or idle too long, peers' tunnel-only notes
    /// due for a recheck, and dial locks no longer needed (part of
    /// [`UpstreamPool::sweep`]).
    pub(super) fn sweep_direct(&self, now: Instant) {
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct.retain(|_, list| {
            list.retain(|(_, d)| match d {
                Direct::Open(i) => !i.sender.is_closed() && i.fresh(now),
                Direct::Legacy(since) => now.duration_since(*since) < LEGACY_RECHECK,
            });
            !list.is_empty()
        });
        let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
        // A lock nobody holds or waits on, for a key with no connection: done with.
        let pooled = |key: &MeshKey| direct.get(&key.agent).is_some_and(|l| l.iter().any(|(k, _)| k == key));
        dialing.retain(|key, lock| pooled(key) || Arc::strong_count(lock) > 1);
    }

    /// Open direct HTTP connections to peer agents.
    pub fn direct_count(&self) -> usize {
        let direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        direct
            .values()
            .flatten()
            .filter(|(_, d)| matches!(d, Direct::Open(i) if !i.sender.is_closed()))
            .count()
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
    mut resp: Response<Incoming>,
    endpoint: SocketAddr,
    version: Version,
) -> Result<Response<Incoming>, SendError> {
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
