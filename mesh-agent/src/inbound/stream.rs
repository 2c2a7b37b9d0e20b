//! One CONNECT stream a peer agent opened to a workload of this node, after the
//! tunnel server admitted it (the peer proved its identity, the target is a workload
//! port here, and the rules let the peer reach it at all).
//!
//! A stream the sending agent marked HTTP ([`crate::tunnel::PROTOCOL_HEADER`]) is
//! served per request by [`crate::l7::inbound`]. Any other stream is not taken at its
//! word: its first bytes decide ([`super::first_bytes`]), so HTTP sent by a client
//! that spoke too late for the sending side's detection (or by a peer that is no
//! agent) is still served per request, authorized, its identity headers replaced.
//! Only what is not HTTP is relayed as bytes, and only when the rules allow raw TCP.

use std::{net::SocketAddr, sync::Arc, time::Duration, time::Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::first_bytes::{self, First};
use crate::{
    authz::{Decision, Principal, decide},
    intercept::ActiveMode,
    l7::{
        inbound::{Caller, Inbound, Shared},
        pool::Version,
    },
    listener::Direction,
    observe::{Records, access_log::AccessRecord, labels::MeshName},
    sniff::Protocol,
    tunnel::{StreamInfo, TunnelStream},
};

/// What serving streams needs (one per agent).
pub struct Streams {
    pub shared: Arc<Shared>,
    /// How long a client that started sending may take to show what it sends.
    pub detect_timeout: Duration,
    /// Idle timeout of streams relayed as bytes; also bounds the wait for a silent
    /// stream's first byte.
    pub relay_idle_timeout: Option<Duration>,
    /// Cancelled when the agent shuts down.
    pub shutdown: CancellationToken,
}

/// Bytes in, bytes out and the error a stream ended with, for the tunnel's record.
pub type Ended = (u64, u64, Option<String>);

/// Serves one admitted stream to its target (`workload`, already connected).
pub async fn serve(
    streams: &Streams,
    info: StreamInfo,
    mut tunnel: TunnelStream,
    workload: TcpStream,
) -> Ended {
    let shared = &streams.shared;
    let peer = info.peer_id.to_string();
    let decision = match decide(&shared.routes, &shared.node, Principal::Authenticated(&peer), info.target) {
        Ok(d) => d,
        Err(e) => {
            tunnel.reset();
            return (0, 0, Some(e));
        }
    };
    let marked = match info.headers.get(crate::tunnel::PROTOCOL_HEADER).map(|v| v.as_bytes()) {
        Some(b"http1") => Some(Version::Http1),
        Some(b"http2") => Some(Version::Http2),
        _ => None,
    };
    if let Some(version) = marked {
        // Requests go through the pool, which takes the connection made to admit the
        // stream.
        adopt(streams, info.target, version, workload).await;
        return http(streams, &info, decision, version, bytes::Bytes::new(), tunnel, true).await;
    }
    let start = Instant::now();
    // The workload speaking first means a server-first protocol, relayed as bytes: worth
    // watching for only when raw TCP may be relayed at all.
    let watch = decision.tcp_allowed.then_some(&workload);
    let first =
        first_bytes::detect(&mut tunnel, watch, streams.detect_timeout, streams.relay_idle_timeout).await;
    match first {
        Ok(First::Http(version, bytes)) => {
            debug!(peer_identity = %peer, target = %info.target, "HTTP in a stream sent as bytes: served per request");
            adopt(streams, info.target, version, workload).await;
            http(streams, &info, decision, version, bytes.freeze(), tunnel, false).await
        }
        Ok(First::Opaque(bytes, protocol)) => {
            if !decision.tcp_allowed {
                warn!(peer = %info.peer_id, target = %info.target, services = %decision.services(),
                    "denied by authorization policy: its rules allow only HTTP requests");
                crate::observe::metrics::authorization_denied(
                    &crate::observe::labels::MeshName::known(&decision.service),
                    &peer,
                    "connection",
                );
                tunnel.reset();
                return (0, 0, Some("only HTTP requests are allowed by policy".into()));
            }
            tcp(streams, &info, &decision, (tunnel, workload), &bytes, protocol, start).await
        }
        Ok(First::Undecided(bytes)) => {
            warn!(peer_identity = %peer, target = %info.target, bytes = bytes.len(),
                "stream stalled in what could be an HTTP request line; refused");
            tunnel.reset();
            crate::forward::reset(&workload);
            (bytes.len() as u64, 0, Some("undecided protocol".into()))
        }
        Ok(First::Idle) => {
            let (mut tunnel, mut workload) = (tunnel, workload);
            crate::forward::idle::close(&mut tunnel, &mut workload).await;
            (0, 0, Some(crate::forward::idle::ERROR.to_owned()))
        }
        Err(e) => {
            tunnel.reset();
            (0, 0, Some(format!("reading the stream: {e}")))
        }
    }
}

/// Hands the connection made to admit a stream that carries HTTP to the upstream
/// pool, so its first request does not connect again. One the pool does not take
/// (an idle pooled connection will serve the request, or the stream speaks HTTP/2,
/// whose upstreams are multiplexed) is closed with a reset: it never carried a byte,
/// and a normal close would leave this side in TIME_WAIT. At thousands of streams a
/// second those filled the ephemeral ports, and every `connect()` then spent
/// milliseconds in the kernel searching for a free one (a p99 of 25 ms under
/// `Connection: close` through a `tcp` port, bench peers).
async fn adopt(streams: &Streams, target: SocketAddr, version: Version, workload: TcpStream) {
    let unused = match version {
        Version::Http1 => streams.shared.upstreams.adopt_h1(target, workload).await,
        Version::Http2 => Some(workload),
    };
    if let Some(workload) = unused {
        crate::forward::reset(&workload);
    }
}

/// Serves the stream's requests (`prefix`: what detection already read).
async fn http(
    streams: &Streams,
    info: &StreamInfo,
    decision: Decision,
    version: Version,
    prefix: bytes::Bytes,
    tunnel: TunnelStream,
    via_peer_proxy: bool,
) -> Ended {
    let caller = Caller { identity: Some(info.peer_id.clone()), addr: info.peer_addr, via_peer_proxy };
    let l7 = Inbound::new(
        streams.shared.clone(),
        caller,
        info.target,
        decision,
        version,
        streams.shutdown.clone(),
    );
    let counted = super::Counted::new(tunnel);
    let (read, written) = (counted.read.clone(), counted.written.clone());
    let result = l7.serve(crate::l7::io::Prefixed::new(prefix, counted)).await;
    let bytes =
        (read.load(std::sync::atomic::Ordering::Relaxed), written.load(std::sync::atomic::Ordering::Relaxed));
    (bytes.0, bytes.1, result.err().map(|e| format!("HTTP: {e}")))
}

/// Relays a stream that is not HTTP to its workload.
async fn tcp(
    streams: &Streams,
    info: &StreamInfo,
    decision: &Decision,
    (mut tunnel, mut workload): (TunnelStream, TcpStream),
    prefix: &[u8],
    protocol: Protocol,
    start: Instant,
) -> Ended {
    let relayed = super::relay(&mut tunnel, &mut workload, prefix, streams.relay_idle_timeout).await;
    if let Some(super::RelayEnd::Failed(_)) = &relayed.error {
        tunnel.reset();
    }
    let error = relayed.error.as_ref().map(super::RelayEnd::message);
    let shared = &streams.shared;
    if shared.records.wants_tcp() {
        let principal = info.peer_id.to_string();
        record_tcp(
            (&shared.records, shared.mode),
            info.peer_addr,
            &principal,
            decision,
            info.target,
            &protocol,
            start,
        )
        .emit(&relayed, error.clone());
    }
    (relayed.to_workload, relayed.from_workload, error)
}

/// A TCP access record of the receiving side, filled in when the relay ends.
pub(super) struct TcpRecord<'a> {
    records: &'a Records,
    record: AccessRecord,
    start: Instant,
}

pub(super) fn record_tcp<'a>(
    (records, mode): (&'a Records, ActiveMode),
    peer_addr: SocketAddr,
    principal: &str,
    decision: &Decision,
    target: SocketAddr,
    protocol: &Protocol,
    start: Instant,
) -> TcpRecord<'a> {
    let mut r = AccessRecord::tcp(Direction::Inbound, mode, peer_addr);
    r.source_identity = Some(MeshName::known(principal));
    r.destination_service = Some(MeshName::known(&decision.service));
    r.destination_endpoint = Some(target);
    r.protocol = Some(match protocol {
        Protocol::Tls(_) => "tls",
        _ => "tcp",
    });
    TcpRecord { records, record: r, start }
}

impl TcpRecord<'_> {
    pub(super) fn emit(mut self, relayed: &super::Relayed, error: Option<String>) {
        self.record.duration = Some(self.start.elapsed());
        self.record.bytes_sent = relayed.to_workload;
        self.record.bytes_received = relayed.from_workload;
        self.record.error = error;
        self.records.emit(self.record);
    }
}
