//! One intercepted connection, from accept to close: recover the original
//! destination, sniff the protocol while connecting upstream with the agent's mark,
//! replay the sniffed bytes and relay both directions until both sides are done (or
//! no byte moved for the [`idle`] timeout).

pub mod idle;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{info, warn};

use crate::{
    balance::{
        PickGuard,
        service::{ServiceState, target_of},
    },
    intercept::ActiveMode,
    listener::{Direction, ProxyContext},
    observe::{self, labels::MeshName, metrics::ConnectionMetrics},
    resilience::outcome::{FailureKind, Outcome as Verdict},
    sniff::{self, OpaqueReason, Protocol, SniffError},
};

/// Relay buffer per direction: starts at the minimum and grows for bulk transfers.
const RELAY_BUF_MIN: usize = 4 * 1024;
const RELAY_BUF_MAX: usize = 64 * 1024;
/// First read buffer for sniffing; grows only for large ClientHellos.
const SNIFF_BUF: usize = 2 * 1024;

/// Which side ended the relay with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// Handles one accepted connection; never panics on anything the peers send.
pub async fn handle(ctx: Arc<ProxyContext>, direction: Direction, mut client: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    ctx.stats.opened(direction);
    let lookup = match direction {
        Direction::Outbound => &ctx.lookup,
        Direction::Inbound => &ctx.inbound_lookup,
    };
    let orig_dst = match lookup.orig_dst(&client) {
        Ok(dst) => dst,
        Err(e) => {
            warn!(
                direction = direction.as_str(),
                src = %peer,
                error = %e,
                "no original destination for connection (connected to the agent port directly, \
                 or interception state lost); closing"
            );
            reset(&client);
            ctx.stats.closed(direction, true);
            return;
        }
    };
    if ctx.is_own_listener(orig_dst) {
        warn!(direction = direction.as_str(), src = %peer, orig_dst = %orig_dst,
            "original destination is the agent itself; refusing to loop");
        reset(&client);
        ctx.stats.closed(direction, true);
        return;
    }
    // The eBPF redirect gave the workload's socket a loopback source; report the one
    // it would have had (as iptables mode does).
    let peer = if ctx.mode == ActiveMode::Ebpf && direction == Direction::Outbound {
        crate::source_addr::unredirected(peer, orig_dst)
    } else {
        peer
    };

    let table = ctx.routes.table();
    let state = match table.by_addr(orig_dst) {
        None => None,
        Some(route) => ctx.services.state(&table, route),
    };
    drop(table);
    let mut sniffed = BytesMut::with_capacity(SNIFF_BUF);
    let mut early_protocol = None;
    if let Some(state) = &state {
        let declared_opaque = matches!(state.route.protocol, "tcp" | "tls");
        if !declared_opaque && !ctx.opaque_ports.contains(&orig_dst.port()) {
            // Clients of HTTP send at once; give them a moment before connecting so an
            // HTTP connection never opens an upstream it would not use. A server-first
            // protocol costs this grace once, then sniffing overlaps the connect.
            let sniff = sniff::sniff(&mut client, &mut sniffed, ctx.detect_timeout);
            match tokio::time::timeout(SERVER_FIRST_GRACE, sniff).await {
                Ok(Ok(protocol)) => {
                    if let Some(version) = crate::l7::version_of(&protocol) {
                        ctx.stats.detected(&protocol);
                        observe::metrics::record_sniff(&protocol);
                        let l7 = crate::l7::outbound::Outbound::new(
                            ctx.clone(),
                            peer,
                            orig_dst,
                            version,
                            &state.route.service,
                        );
                        let io = crate::l7::io::Prefixed::new(sniffed.freeze(), client);
                        let result = l7.serve(io).await;
                        if let Err(e) = &result {
                            info!(target: "mesh_agent::conn", direction = direction.as_str(), src = %peer,
                                service = %state.route.service, error = %e, "HTTP connection ended with an error");
                        }
                        ctx.stats.closed(direction, result.is_err());
                        return;
                    }
                    early_protocol = Some(protocol);
                }
                Ok(Err(e)) => {
                    info!(target: "mesh_agent::conn", direction = direction.as_str(), src = %peer,
                        service = %state.route.service, error = %e, "connection closed before its protocol was known");
                    ctx.stats.closed(direction, true);
                    return;
                }
                Err(_) => {}
            }
        }
    }

    let route = match &state {
        None => Target { service: None, first: orig_dst, guard: None, state: None },
        Some(state) => {
            // Ring hash / Maglev on a TCP service can only key on the client address.
            let hash_key = match state.hash_key_source() {
                Some(crate::balance::HashKeySource::SourceAddress) => {
                    Some(crate::balance::hash::hash_ip(peer.ip()))
                }
                _ => None,
            };
            let Some(guard) = state.pick(hash_key, ctx.locality.as_ref()) else {
                warn!(direction = direction.as_str(), src = %peer, orig_dst = %orig_dst, service = %state.route.service,
                    endpoints = state.route.endpoints.len(), "service has no available endpoint; refusing the connection");
                reset(&client);
                ctx.stats.closed(direction, true);
                return;
            };
            if let Some((agent, dest_id)) =
                target_of(&state.route, guard.addr()).and_then(crate::mtls::meshed)
            {
                let metrics = ConnectionMetrics::open(
                    direction,
                    &MeshName::unknown(),
                    &MeshName::known(&state.route.service),
                );
                let endpoint = guard.addr();
                let result = crate::mtls::forward(
                    &ctx,
                    client,
                    crate::mtls::Meshed {
                        peer,
                        orig_dst,
                        service: &state.route.service,
                        endpoint,
                        agent,
                        dest_id,
                    },
                    sniffed,
                    early_protocol,
                    start,
                )
                .await;
                match result {
                    Ok((up, down, _)) => {
                        guard.report(Verdict::Success);
                        ctx.stats.closed(direction, false);
                        ctx.stats.bytes(up, down);
                        metrics.add_sent(up);
                        metrics.add_received(down);
                        metrics.close(start.elapsed());
                    }
                    Err(e) => {
                        warn!(target: "mesh_agent::conn", mode = ctx.mode.as_str(), direction = direction.as_str(),
                            src = %peer, orig_dst = %orig_dst, service = %state.route.service, endpoint = %endpoint,
                            tunnel = %agent, error = %e, "connection closed");
                        guard.report(Verdict::Failure(FailureKind::Reset));
                        ctx.stats.closed(direction, true);
                        metrics.fail(start.elapsed());
                    }
                }
                return;
            }
            Target {
                service: Some(state.route.service.clone()),
                first: guard.addr(),
                guard: Some(guard),
                state: Some(state.clone()),
            }
        }
    };
    let service = route.service.clone();
    let metrics =
        ConnectionMetrics::open(direction, &MeshName::unknown(), &MeshName::from_option(service.as_deref()));

    let connect = connect_target(&ctx, route);
    let early = if let Some(protocol) = early_protocol {
        match connect.await {
            Ok(up) => Early::Ready(up, protocol),
            Err(e) => Early::ConnectFailed(e, Some(protocol)),
        }
    } else if ctx.opaque_ports.contains(&orig_dst.port()) {
        match connect.await {
            Ok(up) => Early::Ready(up, Protocol::Opaque(OpaqueReason::OpaquePort)),
            Err(e) => Early::ConnectFailed(e, Some(Protocol::Opaque(OpaqueReason::OpaquePort))),
        }
    } else {
        sniff_while_connecting(&mut client, &mut sniffed, ctx.detect_timeout, connect).await
    };
    let info =
        |endpoint: Option<SocketAddr>| ConnInfo { peer, orig_dst, service: service.as_deref(), endpoint };
    let ((mut upstream, endpoint, guard), protocol) = match early {
        Early::Ready(up, protocol) => (up, protocol),
        Early::SniffFailed(e) => {
            log_close(&ctx, direction, &info(None), None, &Outcome::failed(0, 0, start, Side::Client, &e));
            ctx.stats.closed(direction, true);
            metrics.fail(start.elapsed());
            return;
        }
        Early::ConnectFailed(e, protocol) => {
            // The client saw its connect succeed; a reset is the closest we can get to
            // the refusal or timeout it would have seen without the mesh.
            reset(&client);
            log_close(
                &ctx,
                direction,
                &info(None),
                protocol.as_ref(),
                &Outcome::failed(0, 0, start, Side::Upstream, &e),
            );
            ctx.stats.closed(direction, true);
            metrics.fail(start.elapsed());
            return;
        }
    };
    ctx.stats.detected(&protocol);
    observe::metrics::record_sniff(&protocol);

    let outcome = relay(&mut client, &mut upstream, &sniffed, start, ctx.tcp_idle_timeout).await;
    if let Some((side, _)) = &outcome.error {
        // Propagate an abort as an abort: the peer that did not fail gets a RST rather
        // than a clean FIN that would look like a complete response.
        match side {
            Side::Client => reset(&upstream),
            Side::Upstream => reset(&client),
        }
    }
    if let Some(guard) = guard {
        guard.report(match &outcome.error {
            Some((Side::Upstream, _)) => Verdict::Failure(FailureKind::Reset),
            _ => Verdict::Success,
        });
    }
    log_close(&ctx, direction, &info(Some(endpoint)), Some(&protocol), &outcome);
    ctx.stats.closed(direction, outcome.error.is_some());
    ctx.stats.bytes(outcome.client_to_upstream, outcome.upstream_to_client);
    metrics.add_sent(outcome.client_to_upstream);
    metrics.add_received(outcome.upstream_to_client);
    if outcome.error.is_some() {
        metrics.fail(outcome.duration);
    } else {
        metrics.close(outcome.duration);
    }
}

/// Where an intercepted connection is sent.
struct Target {
    /// `namespace/name` when the destination is a known service.
    service: Option<Arc<str>>,
    /// The first address to try.
    first: SocketAddr,
    /// The balancer's claim on `first`, for a service.
    guard: Option<PickGuard>,
    /// The service, for failing over to another endpoint.
    state: Option<Arc<ServiceState>>,
}

/// An upstream connection, the endpoint it reached and the balancer's claim on it.
type Connected = (TcpStream, SocketAddr, Option<PickGuard>);

/// Connects to the target; when a service endpoint refuses or times out, reports it
/// to the endpoint's breaker and outlier detection and tries up to
/// [`FAILOVER_ATTEMPTS`] other endpoints the balancer offers (a connection that never
/// reached a server is always safe to retry).
async fn connect_target(ctx: &ProxyContext, target: Target) -> io::Result<Connected> {
    let Target { first, mut guard, state, .. } = target;
    let mut addr = first;
    let timeout = state.as_ref().and_then(|s| s.policy.connect_timeout).unwrap_or(ctx.connect_timeout);
    let mut attempt = 0;
    loop {
        match ctx.sockets.connect(addr, timeout).await {
            Ok(s) => return Ok((s, addr, guard)),
            Err(e) => {
                if let Some(g) = guard.take() {
                    g.report(Verdict::Failure(FailureKind::ConnectFailure));
                }
                let next = match &state {
                    Some(state) if attempt < FAILOVER_ATTEMPTS => state.pick(None, ctx.locality.as_ref()),
                    _ => None,
                };
                match next {
                    Some(g) => {
                        attempt += 1;
                        warn!(endpoint = %addr, error = %e, next = %g.addr(), "endpoint connect failed; trying another");
                        addr = g.addr();
                        guard = Some(g);
                    }
                    None => return Err(io::Error::new(e.kind(), format!("{addr}: {e}"))),
                }
            }
        }
    }
}

/// Other endpoints tried after a failed connect.
const FAILOVER_ATTEMPTS: usize = 2;

/// How long a connection to a service may stay silent before the upstream connect
/// starts alongside sniffing (see [`handle`]).
const SERVER_FIRST_GRACE: Duration = Duration::from_millis(20);

/// Identifies a connection in its log record.
struct ConnInfo<'a> {
    peer: SocketAddr,
    orig_dst: SocketAddr,
    service: Option<&'a str>,
    endpoint: Option<SocketAddr>,
}

/// Where a connection stands once the protocol is known and upstream is connected,
/// or why it never got there.
enum Early {
    Ready(Connected, Protocol),
    SniffFailed(SniffError),
    ConnectFailed(io::Error, Option<Protocol>),
}

/// Sniffs the client's first bytes while connecting upstream, so the upstream
/// handshake overlaps the wait for the client, and a server that speaks first (SMTP,
/// MySQL, ...) ends the wait at once instead of after the detection timeout.
async fn sniff_while_connecting(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    timeout: Duration,
    connect: impl Future<Output = io::Result<Connected>>,
) -> Early {
    let sniff = sniff::sniff(client, buf, timeout);
    tokio::pin!(sniff);
    tokio::pin!(connect);
    let upstream = tokio::select! {
        // A decision already made needs no upstream event to be acted on.
        biased;
        sniffed = &mut sniff => {
            return match sniffed {
                Ok(protocol) => match connect.await {
                    Ok(up) => Early::Ready(up, protocol),
                    Err(e) => Early::ConnectFailed(e, Some(protocol)),
                },
                Err(e) => Early::SniffFailed(e),
            };
        }
        connected = &mut connect => match connected {
            Ok(up) => up,
            Err(e) => return Early::ConnectFailed(e, None),
        },
    };
    tokio::select! {
        biased;
        sniffed = &mut sniff => match sniffed {
            Ok(protocol) => Early::Ready(upstream, protocol),
            Err(e) => Early::SniffFailed(e),
        },
        // Readable means the server sent bytes (or closed): either way it went first.
        // The sniff is cancel-safe: whatever the client sent so far stays in `buf`.
        _ = upstream.0.readable() => Early::Ready(upstream, Protocol::Opaque(OpaqueReason::ServerFirst)),
    }
}

/// How a connection ended.
struct Outcome {
    client_to_upstream: u64,
    upstream_to_client: u64,
    duration: Duration,
    error: Option<(Side, String)>,
    /// The relay was closed for moving no byte for the idle timeout: no one's fault.
    idle_timeout: bool,
}

impl Outcome {
    fn failed(up: u64, down: u64, start: Instant, side: Side, e: &dyn std::fmt::Display) -> Self {
        Self {
            client_to_upstream: up,
            upstream_to_client: down,
            duration: start.elapsed(),
            error: Some((side, e.to_string())),
            idle_timeout: false,
        }
    }

    /// What the log line and the access record give as the error, if any.
    fn error(&self) -> Option<(Option<Side>, &str)> {
        match &self.error {
            Some((side, e)) => Some((Some(*side), e)),
            None if self.idle_timeout => Some((None, idle::ERROR)),
            None => None,
        }
    }
}

/// Relays bytes both ways. Each direction ends at EOF by shutting down the write side
/// of the other socket (half-close is preserved); the relay ends when both directions
/// have, at the first error, or when no byte moved either way for `idle_timeout`
/// (then both sides are closed, see [`idle::close`]).
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    sniffed: &[u8],
    start: Instant,
    idle_timeout: Option<Duration>,
) -> Outcome {
    let mut up = 0u64;
    let mut down = 0u64;
    let activity = idle::Activity::default();
    let copied = {
        // Every byte relayed goes through the client's halves.
        let (cr, cw) = client.split();
        let (mut cr, mut cw) = (idle::Marked::new(cr, &activity), idle::Marked::new(cw, &activity));
        let (mut ur, mut uw) = upstream.split();
        let c2u = async {
            if !sniffed.is_empty() {
                uw.write_all(sniffed).await.map_err(|e| (Side::Upstream, e))?;
                up += sniffed.len() as u64;
            }
            copy_half(&mut cr, &mut uw, &mut up, (Side::Client, Side::Upstream)).await
        };
        let u2c = copy_half(&mut ur, &mut cw, &mut down, (Side::Upstream, Side::Client));
        idle::watch(async { tokio::try_join!(c2u, u2c) }, &activity, idle_timeout).await
    };
    let (error, idle_timeout) = match copied {
        Some(Ok(((), ()))) => (None, false),
        Some(Err((side, e))) => (Some((side, e.to_string())), false),
        None => {
            idle::close(client, upstream).await;
            (None, true)
        }
    };
    Outcome {
        client_to_upstream: up,
        upstream_to_client: down,
        duration: start.elapsed(),
        error,
        idle_timeout,
    }
}

/// Copies `from` to `to` until EOF, then shuts `to` down for writing. Errors are
/// attributed to the side they came from.
///
/// The buffer starts small and doubles while reads fill it (a bulk transfer), up to
/// [`RELAY_BUF_MAX`]; request/response traffic keeps a few KiB per direction, so
/// thousands of idle keep-alive connections stay cheap.
async fn copy_half(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    counter: &mut u64,
    (from_side, to_side): (Side, Side),
) -> Result<(), (Side, io::Error)> {
    let mut buf = vec![0u8; RELAY_BUF_MIN];
    loop {
        let n = from.read(&mut buf).await.map_err(|e| (from_side, e))?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.map_err(|e| (to_side, e))?;
        *counter += n as u64;
        if n == buf.len() && buf.len() < RELAY_BUF_MAX {
            buf.resize(buf.len() * 2, 0);
        }
    }
    match to.shutdown().await {
        Ok(()) => Ok(()),
        // The other side already went away; nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err((to_side, e)),
    }
}

/// Closes with RST instead of FIN.
pub(crate) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn log_close(
    ctx: &ProxyContext,
    direction: Direction,
    conn: &ConnInfo<'_>,
    protocol: Option<&Protocol>,
    o: &Outcome,
) {
    let (sni, alpn) = match protocol {
        Some(Protocol::Tls(t)) => (t.sni.as_deref(), (!t.alpn.is_empty()).then(|| t.alpn.join(","))),
        _ => (None, None),
    };
    let opaque_reason = match protocol {
        Some(Protocol::Opaque(r)) => Some(r.as_str()),
        _ => None,
    };
    let (error_side, error) = match o.error() {
        Some((side, e)) => (side.map(Side::as_str), Some(e)),
        None => (None, None),
    };
    info!(
        target: "mesh_agent::conn",
        mode = ctx.mode.as_str(),
        direction = direction.as_str(),
        src = %conn.peer,
        orig_dst = %conn.orig_dst,
        service = conn.service,
        endpoint = conn.endpoint.map(tracing::field::display),
        protocol = protocol.map(|p| p.name()).unwrap_or("unknown"),
        opaque_reason,
        sni,
        alpn,
        bytes_sent = o.client_to_upstream,
        bytes_received = o.upstream_to_client,
        duration_ms = o.duration.as_secs_f64() * 1000.0,
        error_side,
        error,
        "connection closed"
    );
    if ctx.records.wants_tcp() {
        let mut r = crate::observe::access_log::AccessRecord::tcp(direction, ctx.mode, conn.peer);
        r.destination_service = conn.service.map(MeshName::known);
        r.destination_endpoint = conn.endpoint;
        r.original_destination = Some(conn.orig_dst);
        r.protocol = protocol.map(Protocol::name);
        r.duration = Some(o.duration);
        r.bytes_sent = o.client_to_upstream;
        r.bytes_received = o.upstream_to_client;
        r.error = o.error().map(|(side, e)| match side {
            Some(side) => format!("{}: {e}", side.as_str()),
            None => e.to_owned(),
        });
        ctx.log_access(r);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;
    use crate::observe::{Records, access_log::AccessLog};

    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn an_opaque_relay_lives_while_bytes_move_and_ends_after_the_idle_timeout() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let (out, log) = tokio::io::duplex(64 * 1024);
        let (access_log, _writer) = AccessLog::with_writer(out, 16);
        let tunnels = crate::mtls::pool(Default::default(), crate::socket::SocketFactory::new(0), IDLE);
        let ctx = Arc::new(ProxyContext {
            mode: crate::intercept::ActiveMode::Ebpf,
            sockets: crate::socket::SocketFactory::new(0),
            lookup: Box::new(crate::orig_dst::Fixed(server_addr)),
            inbound_lookup: Box::new(crate::orig_dst::Fixed(server_addr)),
            workload: None,
            detect_timeout: Duration::from_secs(1),
            // Far beyond anything the test waits for.
            connect_timeout: IDLE * 100,
            // The relay starts at once, without sniffing.
            opaque_ports: HashSet::from([server_addr.port()]),
            own_addrs: Vec::new(),
            stats: Default::default(),
            routes: Arc::new(crate::discovery::RouteStore::new(false)),
            identity: Default::default(),
            tunnels: tunnels.clone(),
            services: Default::default(),
            upstreams: Arc::new(crate::l7::pool::UpstreamPool::new(
                crate::socket::SocketFactory::new(0),
                tunnels,
                Default::default(),
                IDLE,
            )),
            records: Records { access_log: Some(access_log), spans: None },
            locality: None,
            downstream: Default::default(),
            tcp_idle_timeout: Some(IDLE),
            shutdown: Default::default(),
        });
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        let c = ctx.clone();
        let handler = tokio::spawn(async move {
            let (tcp, peer) = agent.accept().await.unwrap();
            handle(c, Direction::Outbound, tcp, peer).await;
        });
        let mut client = TcpStream::connect(agent_addr).await.unwrap();
        let (mut upstream, _) = server.accept().await.unwrap();

        // A byte every half timeout, each way in turn, for five timeouts.
        for i in 0..10u8 {
            tokio::time::sleep(IDLE / 2).await;
            let (from, to) =
                if i % 2 == 0 { (&mut client, &mut upstream) } else { (&mut upstream, &mut client) };
            from.write_all(&[i]).await.unwrap();
            assert_eq!(to.read_u8().await.unwrap(), i, "cut after {i} pauses");
        }
        // Then silence: both sides are closed (FIN) between the timeout and a quarter more.
        let last = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        for end in [&mut client, &mut upstream] {
            let read = tokio::time::timeout(IDLE * 2, end.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        }
        let waited = last.elapsed();
        assert!(waited >= IDLE && waited <= IDLE + IDLE / 4, "closed after {waited:?}");
        drop((client, upstream));
        handler.await.unwrap();

        let line = BufReader::new(log).lines().next_line().await.unwrap().expect("a record");
        let record: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["kind"], "tcp", "{record}");
        assert_eq!(record["error"], idle::ERROR, "{record}");
        assert_eq!((record["bytes_sent"].as_u64(), record["bytes_received"].as_u64()), (Some(5), Some(5)));
        let stats = ctx.stats.snapshot();
        assert_eq!((stats.active, stats.failed), (0, 0), "an idle close is no failure");
    }
}
