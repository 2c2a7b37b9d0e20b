//! The plaintext end of the pipeline: connect to the target (an endpoint outside the
//! mesh, or the original destination itself), replay what sniffing read, and relay
//! both directions until both sides are done, one fails, or no byte moved for the
//! [`super::idle`] timeout. Then the connection is logged, counted and its endpoint
//! given a verdict. A direction that shows bulk moves on to `splice(2)`
//! ([`super::splice`]), the others keep a small userspace buffer.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tracing::info;

use super::{
    accept::Accepted,
    detect::{self, Ready, Sniffed},
    idle,
    route::{self, Target},
    splice::{self, Pipes},
};
use crate::{
    listener::ProxyContext,
    observe::{self, labels::MeshName, metrics::ConnectionMetrics},
    resilience::outcome::{FailureKind, Outcome as Verdict},
    sniff::Protocol,
};

/// Relay buffer per direction: starts at the minimum and grows for bulk transfers;
/// a read that fills the largest moves the direction to splice.
const RELAY_BUF_MIN: usize = 4 * 1024;
const RELAY_BUF_MAX: usize = 64 * 1024;

/// Connects to `target` while detection finishes, then relays `client` to it.
/// Returns whether the connection failed.
pub async fn plain(
    ctx: &ProxyContext,
    conn: &Accepted,
    mut client: TcpStream,
    target: Target,
    mut sniffed: Sniffed,
) -> bool {
    let service = target.service_name();
    let mut metrics = ConnectionMetrics::open(
        conn.direction,
        &ctx.source_workload(conn.direction),
        &MeshName::from_option(service.as_deref()),
        false,
    );
    let info = |endpoint: Option<SocketAddr>| ConnInfo { conn, service: service.as_deref(), endpoint };

    let connect = route::connect(ctx, target);
    let ready = detect::while_connecting(ctx, &mut client, &mut sniffed, conn.orig_dst.port(), connect).await;
    let ((mut upstream, endpoint, guard), protocol) = match ready {
        Ready::Connected(up, protocol) => (up, protocol),
        Ready::SniffFailed(e) => {
            log_close(ctx, &info(None), None, &Outcome::failed(conn.start, Side::Client, &e));
            metrics.fail(conn.start.elapsed());
            return true;
        }
        Ready::ConnectFailed(e, protocol) => {
            // The client saw its connect succeed; a reset is the closest we can get to
            // the refusal or timeout it would have seen without the mesh.
            reset(&client);
            log_close(ctx, &info(None), protocol.as_ref(), &Outcome::failed(conn.start, Side::Upstream, &e));
            metrics.fail(conn.start.elapsed());
            return true;
        }
    };
    ctx.stats.detected(&protocol);
    observe::metrics::record_sniff(&protocol);

    let outcome =
        relay(&mut client, &mut upstream, &sniffed.bytes, conn.start, ctx.tcp_idle_timeout, &ctx.splice)
            .await;
    if let Some(guard) = guard {
        guard.report(match &outcome.error {
            Some((Side::Upstream, _)) => Verdict::Failure(FailureKind::Reset),
            _ => Verdict::Success,
        });
    }
    log_close(ctx, &info(Some(endpoint)), Some(&protocol), &outcome);
    ctx.stats.bytes(outcome.client_to_upstream, outcome.upstream_to_client);
    metrics.add_sent(outcome.client_to_upstream);
    metrics.add_received(outcome.upstream_to_client);
    if outcome.error.is_some() {
        metrics.fail(outcome.duration);
    } else {
        metrics.close(outcome.duration);
    }
    outcome.error.is_some()
}

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

/// Identifies a connection in its log record.
struct ConnInfo<'a> {
    conn: &'a Accepted,
    service: Option<&'a str>,
    endpoint: Option<SocketAddr>,
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
    /// A connection that failed before relaying a byte.
    fn failed(start: Instant, side: Side, e: &dyn std::fmt::Display) -> Self {
        Self {
            client_to_upstream: 0,
            upstream_to_client: 0,
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
/// (then both sides are closed, see [`idle::close`]). After an error, the side that
/// did not fail is set to be reset when it is dropped. Bulk directions splice with
/// pipes from `pipes`.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    sniffed: &[u8],
    start: Instant,
    idle_timeout: Option<Duration>,
    pipes: &Pipes,
) -> Outcome {
    let mut up = 0u64;
    let mut down = 0u64;
    let activity = idle::Activity::default();
    let copied = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let activity = &activity;
        let c2u = async {
            if !sniffed.is_empty() {
                uw.write_all(sniffed).await.map_err(|e| (Side::Upstream, e))?;
                up += sniffed.len() as u64;
                activity.mark();
            }
            copy_half(&mut cr, &mut uw, &mut up, (Side::Client, Side::Upstream), activity, pipes).await
        };
        let u2c = copy_half(&mut ur, &mut cw, &mut down, (Side::Upstream, Side::Client), activity, pipes);
        idle::watch(async { tokio::try_join!(c2u, u2c) }, activity, idle_timeout).await
    };
    let (error, idle_timeout) = match copied {
        Some(Ok(((), ()))) => (None, false),
        Some(Err((side, e))) => {
            // Propagate an abort as an abort: the peer that did not fail gets a RST
            // rather than a clean FIN that would look like a complete response.
            match side {
                Side::Client => reset(upstream),
                Side::Upstream => reset(client),
            }
            (Some((side, e.to_string())), false)
        }
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
/// attributed to the side they came from; every move marks `activity`.
///
/// The buffer starts small and doubles while reads fill it (a bulk transfer), up to
/// [`RELAY_BUF_MAX`]; request/response traffic keeps a few KiB per direction, so
/// thousands of idle keep-alive connections stay cheap. A read that fills the
/// largest buffer moves the direction to [`splice::copy`] if `pipes` gives it a pipe
/// (asked once: without one, it keeps copying).
async fn copy_half(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counter: &mut u64,
    (from_side, to_side): (Side, Side),
    activity: &idle::Activity,
    pipes: &Pipes,
) -> Result<(), (Side, io::Error)> {
    let mut buf = vec![0u8; RELAY_BUF_MIN];
    let mut may_splice = true;
    let spliced = loop {
        let n = from.read(&mut buf).await.map_err(|e| (from_side, e))?;
        if n == 0 {
            break None;
        }
        activity.mark();
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            // Each partial write counts and marks: a slow reader is not idle.
            let written = to.write(rest).await.map_err(|e| (to_side, e))?;
            if written == 0 {
                return Err((to_side, io::ErrorKind::WriteZero.into()));
            }
            *counter += written as u64;
            activity.mark();
            rest = &rest[written..];
        }
        if n < buf.len() {
            continue;
        }
        if buf.len() < RELAY_BUF_MAX {
            buf.resize(buf.len() * 2, 0);
        } else if may_splice {
            may_splice = false;
            if let Some(pipe) = pipes.take() {
                break Some(pipe);
            }
        }
    };
    // A spliced direction's bytes stay in the kernel: the buffer goes now.
    drop(buf);
    if let Some(pipe) = spliced {
        splice::copy(from.as_ref(), to.as_ref(), pipe, counter, activity).await.map_err(|e| match e {
            splice::Error::Read(e) => (from_side, e),
            splice::Error::Write(e) => (to_side, e),
        })?;
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

fn log_close(ctx: &ProxyContext, info: &ConnInfo<'_>, protocol: Option<&Protocol>, o: &Outcome) {
    let ConnInfo { conn, service, endpoint } = info;
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
        direction = conn.direction.as_str(),
        src = %conn.peer,
        orig_dst = %conn.orig_dst,
        service,
        endpoint = endpoint.map(tracing::field::display),
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
        let mut r = crate::observe::access_log::AccessRecord::tcp(conn.direction, ctx.mode, conn.peer);
        r.destination_service = service.map(MeshName::known);
        r.source_workload = Some(ctx.source_workload(conn.direction));
        r.destination_endpoint = *endpoint;
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
mod tests;
