//! The admin API, on two surfaces:
//!
//! - the TCP port (`--admin-addr`, loopback by default), read-only: liveness and
//!   readiness for probes, counters and the effective configuration for operators.
//!   Workloads sharing the node's network namespace reach it, so nothing served
//!   there changes the agent;
//! - the unix socket (`--admin-socket`, root only): the same reads, plus enrolment
//!   for whatever starts workloads (a CNI plugin, the demo, tests, `meshctl agent`),
//!   the log filter and a drain trigger;
//! - the scrape port (`--metrics-addr`, off unless set; the DaemonSet puts it on the
//!   node's IP): `/metrics`, `/ready` and `/live` only, for a cluster's Prometheus.
//!   It is reachable from other nodes, so it shows no configuration either.
//!
//! | method | path | TCP | socket | |
//! |---|---|---|---|---|
//! | GET | `/live` | yes | yes | 200 while the process serves |
//! | GET | `/ready` | yes | yes | 200 once interception is attached, listeners accept, the workload certificate is loaded (with an identity) and a discovery snapshot is applied (with a control plane); 503 naming what is missing otherwise |
//! | GET | `/metrics` | yes | yes | Prometheus text: connections, bytes, sniff results, discovery, certificates, limits |
//! | GET | `/stats` | yes | yes | connection counters and eBPF program counters (JSON) |
//! | GET | `/config_dump` | yes | yes | mode, settings, enrolled cgroups, discovery state and routes (JSON) |
//! | GET | `/logging` | yes | yes | the current log filter |
//! | POST | `/enroll?cgroup=PATH[&create=true]` | 404 | yes | start intercepting a cgroup |
//! | POST | `/unenroll?cgroup=PATH` | 404 | yes | stop intercepting it |
//! | POST | `/logging?level=FILTER` | 405 | yes | replace the log filter (EnvFilter syntax, e.g. `debug` or `info,mesh_agent::conn=debug`) |
//! | POST | `/quitquitquit` | 404 | yes | graceful shutdown, as SIGTERM |
//!
//! The route tables live in [`routes`]; [`router`] dispatches them.

pub mod router;
pub mod routes;
pub mod socket;

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Request, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use router::Router;
pub use socket::{AdminSocket, SocketError};

use crate::{agent::AgentState, observe::limits};

/// Reads (`None`) or replaces (`Some(filter)`) the process's log filter and returns
/// the filter in effect, or why the change was refused.
pub type LogFilterControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

static LOG_FILTER: OnceLock<LogFilterControl> = OnceLock::new();

/// Installs what `/logging` uses (the binary does, once its subscriber is built);
/// without it the endpoint answers 501.
pub fn set_log_filter_control(control: LogFilterControl) {
    let _ = LOG_FILTER.set(control);
}

/// Admin connections served at once per surface; more wait in the accept queue, so
/// a flood of idle connections cannot grow the agent's memory.
pub const MAX_CONNECTIONS: usize = 64;
/// A request head, and then its body, must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the read-only TCP endpoint and serves it until the agent shuts down.
pub async fn spawn_tcp(addr: SocketAddr, state: Arc<AgentState>) -> std::io::Result<SocketAddr> {
    spawn_tcp_routes(addr, state, routes::read_only())
}

/// Binds the scrape port (`--metrics-addr`) and serves it until the agent shuts down.
pub async fn spawn_scrape(addr: SocketAddr, state: Arc<AgentState>) -> std::io::Result<SocketAddr> {
    spawn_tcp_routes(addr, state, routes::scrape())
}

fn spawn_tcp_routes(
    addr: SocketAddr,
    state: Arc<AgentState>,
    router: Router<AgentState>,
) -> std::io::Result<SocketAddr> {
    // SO_REUSEPORT: a new agent binds the port beside a draining one during an upgrade.
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(128)?;
    let local = listener.local_addr()?;
    let shutdown = state.shutdown.clone();
    let router = Arc::new(router);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Some(permit) = acquire(&slots, &shutdown, limits::Limit::AdminConnections).await else {
                break;
            };
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => stream,
                    Err(e) => { debug!(error = %e, "admin accept failed"); continue; }
                },
            };
            let (router, state) = (router.clone(), state.clone());
            tokio::spawn(async move {
                serve(stream, router, state).await;
                drop(permit);
            });
        }
    });
    Ok(local)
}

/// Serves the privileged routes on `socket` until the agent shuts down; the socket
/// file goes when the task ends.
pub fn spawn_socket(socket: AdminSocket, state: Arc<AgentState>) -> tokio::task::JoinHandle<()> {
    let shutdown = state.shutdown.clone();
    let router = Arc::new(routes::privileged());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Some(permit) = acquire(&slots, &shutdown, limits::Limit::AdminConnections).await else {
                break;
            };
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                r = socket.accept() => match r {
                    Ok(stream) => stream,
                    Err(e) => { debug!(error = %e, "admin socket accept failed"); continue; }
                },
            };
            let (router, state) = (router.clone(), state.clone());
            tokio::spawn(async move {
                serve(stream, router, state).await;
                drop(permit);
            });
        }
        drop(socket);
    })
}

/// A connection slot, waiting (and counting the limit as hit) when all are taken;
/// `None` at shutdown.
async fn acquire(
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    limit: limits::Limit,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    limits::hit(limit, format_args!("{MAX_CONNECTIONS} admin connections open; the next waits"));
    tokio::select! {
        () = shutdown.cancelled() => None,
        permit = slots.clone().acquire_owned() => permit.ok(),
    }
}

/// Serves one HTTP/1 connection: bounded head (time and size) and body, then the
/// router.
async fn serve<I>(io: I, router: Arc<Router<AgentState>>, state: Arc<AgentState>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let (router, state) = (router.clone(), state.clone());
        async move {
            let (parts, body) = req.into_parts();
            let read =
                tokio::time::timeout(READ_TIMEOUT, Limited::new(body, router::MAX_BODY_BYTES).collect());
            let body: Bytes = match read.await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(e)) => {
                    let status = if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    return Ok::<_, std::convert::Infallible>(router::text(
                        status,
                        format!("request body: {e}\n"),
                    ));
                }
                Err(_) => return Ok(router::text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n")),
            };
            Ok(router.dispatch(state, Request::from_parts(parts, body)).await)
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), svc)
        .await;
    if let Err(e) = result {
        debug!(error = %e, "admin connection error");
    }
}
