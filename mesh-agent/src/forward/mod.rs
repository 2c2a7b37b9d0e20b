//! One intercepted connection, from accept to close, as a pipeline of small steps
//! (in the manner of linkerd2-proxy's stacks), each asking only for what it needs:
//!
//! 1. [`accept`]: original destination, loop guard, the client's real address:
//!    [`Accepted`], the one parameter that says which connection a step serves;
//! 2. [`route`]: the service the original destination names (a VIP, or a meshed
//!    endpoint's own address, then exactly that endpoint; else the destination is
//!    passed through to itself) and the endpoint its balancer picks;
//! 3. [`detect`]: the protocol, sniffed without consuming a byte;
//! 4. then one of: HTTP to the L7 proxy ([`crate::l7::outbound`]), a meshed endpoint
//!    through the mTLS tunnel ([`crate::mtls::forward`]), or a plaintext relay
//!    ([`relay`]), which ends both ways (or after the [`idle`] timeout) and moves
//!    bulk directions to `splice(2)` ([`splice`]).
//!
//! Connections taken by inbound capture (the inbound listener) are for a workload of
//! this node instead: after step 1 they go to [`crate::inbound::plain`].
//!
//! [`handle`] is that pipeline; each step logs its own failures, and `handle` counts
//! the connection once, when it ends.

pub mod accept;
pub mod detect;
pub mod idle;
pub mod relay;
pub mod route;
pub mod splice;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{info, warn};

pub use accept::Accepted;
use detect::Sniffed;
pub(crate) use relay::reset;
use route::{Destination, Target};

use crate::{
    balance::PickGuard,
    listener::{Direction, ProxyContext},
    observe::{self, labels::MeshName, metrics::ConnectionMetrics},
    resilience::outcome::{FailureKind, Outcome as Verdict},
};

/// Handles one accepted connection; never panics on anything the peers send.
pub async fn handle(ctx: Arc<ProxyContext>, direction: Direction, client: TcpStream, peer: SocketAddr) {
    ctx.stats.opened(direction);
    let conn = match accept::accept(&ctx, direction, &client, peer) {
        Ok(conn) => conn,
        Err(_) => {
            reset(&client);
            ctx.stats.closed(direction, true);
            return;
        }
    };
    let failed = if direction == Direction::Inbound {
        crate::inbound::plain::serve(&ctx, client, &conn).await
    } else {
        match route::destination(&ctx, conn.orig_dst) {
            Some(dest) => to_service(&ctx, &conn, client, dest).await,
            None => {
                relay::plain(&ctx, &conn, client, Target::passthrough(conn.orig_dst), Sniffed::new()).await
            }
        }
    };
    ctx.stats.closed(direction, failed);
}

/// A connection to a service (or one of its meshed endpoints by address): detect
/// (HTTP goes to the L7 proxy), pick an endpoint, then tunnel to a meshed one or
/// relay to a plain one. Returns whether it failed.
async fn to_service(
    ctx: &Arc<ProxyContext>,
    conn: &Accepted,
    mut client: TcpStream,
    dest: Destination,
) -> bool {
    let state = &dest.state;
    let mut sniffed = Sniffed::new();
    if detect::wanted(ctx, state, conn.orig_dst) {
        // Clients of HTTP send at once; give them a moment before connecting so an
        // HTTP connection never opens an upstream it would not use. A server-first
        // protocol costs this grace once, then sniffing overlaps the connect.
        if let Err(e) = detect::early(ctx, &mut client, &mut sniffed).await {
            info!(target: "mesh_agent::conn", direction = conn.direction.as_str(), src = %conn.peer,
                service = %state.route.service, error = %e, "connection closed before its protocol was known");
            return true;
        }
        if let Some(version) = sniffed.protocol.as_ref().and_then(crate::l7::version_of) {
            return http(ctx, conn, client, &dest, version, sniffed).await;
        }
    }
    let Some(guard) = route::pick(ctx, &dest, conn.peer) else {
        warn!(direction = conn.direction.as_str(), src = %conn.peer, orig_dst = %conn.orig_dst,
            service = %state.route.service, endpoints = state.route.endpoints.len(),
            pinned = dest.pinned.map(tracing::field::display),
            "service has no available endpoint; refusing the connection");
        reset(&client);
        return true;
    };
    if let Some((agent, dest_id)) =
        crate::balance::service::target_of(&state.route, guard.addr()).and_then(crate::mtls::meshed)
    {
        let meshed =
            crate::mtls::Meshed { service: &state.route.service, endpoint: guard.addr(), agent, dest_id };
        return tunnel(ctx, conn, client, meshed, guard, sniffed).await;
    }
    relay::plain(ctx, conn, client, Target::endpoint(guard, state.clone()), sniffed).await
}

/// The L7 step: the connection's requests are served one by one, each balanced,
/// retried and timed on its own ([`crate::l7::outbound`]).
async fn http(
    ctx: &Arc<ProxyContext>,
    conn: &Accepted,
    client: TcpStream,
    dest: &Destination,
    version: crate::l7::pool::Version,
    sniffed: Sniffed,
) -> bool {
    if let Some(protocol) = &sniffed.protocol {
        ctx.stats.detected(protocol);
        observe::metrics::record_sniff(protocol);
    }
    let state = &dest.state;
    let l7 = crate::l7::outbound::Outbound::new(ctx.clone(), conn, version, &state.route.service)
        .pinned(dest.pinned);
    let io = crate::l7::io::Prefixed::new(sniffed.bytes.freeze(), client);
    let result = l7.serve(io).await;
    if let Err(e) = &result {
        info!(target: "mesh_agent::conn", direction = conn.direction.as_str(), src = %conn.peer,
            service = %state.route.service, error = %e, "HTTP connection ended with an error");
    }
    result.is_err()
}

/// The meshed step: the connection travels to the endpoint's agent through the
/// mTLS tunnel; the endpoint's verdict and the connection's metrics follow.
async fn tunnel(
    ctx: &ProxyContext,
    conn: &Accepted,
    client: TcpStream,
    meshed: crate::mtls::Meshed<'_>,
    guard: PickGuard,
    sniffed: Sniffed,
) -> bool {
    let mut metrics = ConnectionMetrics::open(
        conn.direction,
        &ctx.source_workload(conn.direction),
        &MeshName::known(meshed.service),
        true,
    );
    let (service, endpoint, agent) = (meshed.service, meshed.endpoint, meshed.agent);
    match crate::mtls::forward(ctx, conn, client, meshed, sniffed).await {
        Ok((up, down, _)) => {
            guard.report(Verdict::Success);
            ctx.stats.bytes(up, down);
            metrics.add_sent(up);
            metrics.add_received(down);
            metrics.close(conn.start.elapsed());
            false
        }
        Err(e) => {
            warn!(target: "mesh_agent::conn", mode = ctx.mode.as_str(), direction = conn.direction.as_str(),
                src = %conn.peer, orig_dst = %conn.orig_dst, service, endpoint = %endpoint,
                tunnel = %agent, error = %e, "connection closed");
            guard.report(Verdict::Failure(FailureKind::Reset));
            metrics.fail(conn.start.elapsed());
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
            workload: crate::observe::labels::MeshName::unknown(),
            detect_timeout: Duration::from_secs(1),
            // Far beyond anything the test waits for.
            connect_timeout: IDLE * 100,
            // The relay starts at once, without sniffing.
            opaque_ports: HashSet::from([server_addr.port()]),
            own_addrs: Vec::new(),
            stats: Default::default(),
            routes: Arc::new(crate::discovery::RouteStore::new(false)),
            node: String::new(),
            identity: Default::default(),
            tunnels: tunnels.clone(),
            services: Default::default(),
            rate_limits: Default::default(),
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
            splice: splice::Pipes::new(2),
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
