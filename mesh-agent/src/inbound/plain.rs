//! Plaintext inbound: a connection from outside the mesh (no mutual TLS) to a
//! workload port of this node, taken by inbound capture (iptables' inbound
//! REDIRECT; per-pod listeners and eBPF `sk_lookup` call [`handle`] too, with the
//! accepted socket's local address as the original destination).
//!
//! - The destination must be a workload port of this node (an endpoint the snapshot
//!   lists with this node): anything else is refused.
//! - Under `mtls: strict` (of any service selecting the workload port) it is refused:
//!   reset, a log line, and `mesh_inbound_refused_total{reason="strict"}`.
//! - Under `permissive` the caller is the principal `unauthenticated`, which only
//!   rules without `principals` match ([`crate::authz`]). HTTP is served per request
//!   ([`crate::l7::inbound`]: method and path authorized, identity headers the client
//!   sent removed, none set since no certificate was shown; a request no rule allows
//!   gets a 403); anything else is decided once per connection and relayed as
//!   bytes, or refused (`reason="denied"`).
//!
//! Without a control plane there are no workloads or policy to check: the connection
//! is passed through to its destination, as everything else is then.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::first_bytes::{self, First};
use crate::{
    authz::{MtlsMode, Principal, UNAUTHENTICATED, decide},
    forward::{Accepted, detect::Sniffed, route::Target},
    l7::inbound::{Caller, Inbound, Shared},
    listener::{Direction, ProxyContext},
    observe::{labels::MeshName, metrics},
};

/// Serves one plaintext connection accepted for a local workload: `peer` is the
/// client, `orig_dst` the workload port it connected to. Counts it in the agent's
/// connection statistics.
pub async fn handle(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr, orig_dst: SocketAddr) {
    ctx.stats.opened(Direction::Inbound);
    let conn = Accepted { peer, orig_dst, start: Instant::now(), direction: Direction::Inbound };
    let failed = serve(&ctx, stream, &conn).await;
    ctx.stats.closed(Direction::Inbound, failed);
}

/// [`handle`] for a connection already accepted and counted; returns whether it
/// failed (or was refused).
pub async fn serve(ctx: &Arc<ProxyContext>, mut client: TcpStream, conn: &Accepted) -> bool {
    if !ctx.routes.is_enabled() {
        let target = Target::passthrough(conn.orig_dst);
        return crate::forward::relay::plain(ctx, conn, client, target, Sniffed::new()).await;
    }
    let decision = match decide(&ctx.routes, &ctx.node, Principal::Unauthenticated, conn.orig_dst) {
        Ok(d) => d,
        Err(reason) => return refuse(&client, conn, None, "not_a_workload", &reason),
    };
    let service = MeshName::known(&decision.service);
    if decision.mtls == MtlsMode::Strict {
        return refuse(&client, conn, Some(&service), "strict", "mtls strict: plaintext is refused");
    }
    // A workload connection only when raw TCP may be relayed: to see a server-first
    // protocol speak, and to relay to.
    let mut workload = None;
    if decision.tcp_allowed {
        match ctx.sockets.connect(conn.orig_dst, ctx.connect_timeout).await {
            Ok(w) => workload = Some(w),
            Err(e) => {
                warn!(target: "mesh_agent::conn", direction = "inbound", src = %conn.peer, orig_dst = %conn.orig_dst,
                    error = %e, "plaintext inbound: workload unreachable");
                crate::forward::reset(&client);
                return true;
            }
        }
    }
    // HTTP is served even when no request can be allowed, so the client gets a 403
    // saying why; a caller nothing admits is not waited for longer than detection.
    let wait = if decision.admits() { ctx.tcp_idle_timeout } else { Some(ctx.detect_timeout) };
    let first = first_bytes::detect(&mut client, workload.as_ref(), ctx.detect_timeout, wait).await;
    match (first, workload) {
        (Ok(First::Http(version, bytes)), _) => {
            let caller = Caller { identity: None, addr: conn.peer, via_peer_proxy: false };
            let l7 = Inbound::new(
                Arc::new(shared(ctx)),
                caller,
                conn.orig_dst,
                decision,
                version,
                ctx.shutdown.clone(),
            );
            let result = l7.serve(crate::l7::io::Prefixed::new(bytes.freeze(), client)).await;
            if let Err(e) = &result {
                info!(target: "mesh_agent::conn", direction = "inbound", src = %conn.peer, orig_dst = %conn.orig_dst,
                    error = %e, "plaintext HTTP connection ended with an error");
            }
            result.is_err()
        }
        (Ok(First::Opaque(bytes, protocol)), Some(mut workload)) => {
            let relayed = super::relay(&mut client, &mut workload, &bytes, ctx.tcp_idle_timeout).await;
            if let Some(super::RelayEnd::Failed(_)) = &relayed.error {
                crate::forward::reset(&client);
            }
            let error = relayed.error.as_ref().map(super::RelayEnd::message);
            info!(target: "mesh_agent::conn", mode = ctx.mode.as_str(), direction = "inbound", src = %conn.peer,
                orig_dst = %conn.orig_dst, service = %decision.service, peer_identity = UNAUTHENTICATED,
                protocol = protocol.name(), bytes_sent = relayed.to_workload, bytes_received = relayed.from_workload,
                duration_ms = conn.start.elapsed().as_secs_f64() * 1000.0, error = error.as_deref(),
                "connection closed");
            ctx.stats.bytes(relayed.to_workload, relayed.from_workload);
            if ctx.records.wants_tcp() {
                super::stream::record_tcp(
                    (&ctx.records, ctx.mode),
                    conn.peer,
                    UNAUTHENTICATED,
                    &decision,
                    conn.orig_dst,
                    &protocol,
                    conn.start,
                )
                .emit(&relayed, error.clone());
            }
            matches!(relayed.error, Some(super::RelayEnd::Failed(_)))
        }
        (Ok(First::Opaque(..)), None) => refuse(
            &client,
            conn,
            Some(&service),
            "denied",
            "no rule allows raw TCP from unauthenticated callers",
        ),
        (Ok(First::Undecided(_)), workload) => {
            if let Some(w) = &workload {
                crate::forward::reset(w);
            }
            refuse(
                &client,
                conn,
                Some(&service),
                "undecided",
                "stalled in what could be an HTTP request line",
            )
        }
        (Ok(First::Idle), Some(mut workload)) => {
            crate::forward::idle::close(&mut client, &mut workload).await;
            false
        }
        (Ok(First::Idle), None) => refuse(
            &client,
            conn,
            Some(&service),
            "denied",
            "silent, and no rule admits unauthenticated callers",
        ),
        (Err(e), _) => {
            info!(target: "mesh_agent::conn", direction = "inbound", src = %conn.peer, orig_dst = %conn.orig_dst,
                error = %e, "plaintext connection failed before its protocol was known");
            true
        }
    }
}

/// The receiving side's HTTP settings, from the agent's.
fn shared(ctx: &ProxyContext) -> Shared {
    Shared {
        routes: ctx.routes.clone(),
        node: ctx.node.clone(),
        upstreams: ctx.upstreams.clone(),
        connect_timeout: ctx.connect_timeout,
        mode: ctx.mode,
        records: ctx.records.clone(),
        downstream: ctx.downstream,
        identity: ctx.identity.clone(),
        rate_limits: ctx.rate_limits.clone(),
    }
}

/// Refuses with a reset, a log line and a count; returns `true` (failed).
fn refuse(
    client: &TcpStream,
    conn: &Accepted,
    service: Option<&MeshName>,
    reason: &'static str,
    why: &str,
) -> bool {
    warn!(target: "mesh_agent::conn", direction = "inbound", src = %conn.peer, orig_dst = %conn.orig_dst,
        service = service.map(tracing::field::display), reason, why, "plaintext inbound connection refused");
    metrics::inbound_refused(service.unwrap_or(&MeshName::unknown()), reason);
    crate::forward::reset(client);
    true
}
