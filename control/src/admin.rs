//! The control plane's admin endpoint (loopback by default).
//!
//! | path | |
//! |---|---|
//! | `/live` | 200 while the process serves |
//! | `/ready` | 200 once every registry source finished its first load |
//! | `/metrics` | Prometheus text: agents, versions, pushes, ACK/NACK, certificates |
//! | `/agents` | per-agent sent/applied/refused versions (JSON) |
//! | `/config_dump` | the current snapshot, each node's workloads and source errors (JSON) |
//! | `/federation` | this cluster's name and gateways, and each federated peer's link (JSON) |
//! | `/dashboard`, `/dashboard/graph.json`, `/dashboard/service.json?name=` | the live service graph (see [`crate::dashboard`]) |

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{discovery::AgentBook, snapshot::Versioned};

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    pub snapshots: watch::Receiver<Arc<Versioned>>,
    pub agents: AgentBook,
    /// The agents' edge reports, for the dashboard.
    pub board: crate::dashboard::Board,
    /// Federated peers' links (`None` without `--federation`).
    pub federation: Option<Arc<crate::federation::Board>>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Binds the admin endpoint and serves it until `shutdown`.
pub async fn spawn(
    addr: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => { tracing::debug!(error = %e, "admin accept failed"); continue; }
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let current = state.snapshots.borrow().clone();
    match req.uri().path() {
        "/live" => respond(StatusCode::OK, "text/plain", "live\n"),
        "/ready" if current.ready => respond(StatusCode::OK, "text/plain", "ready\n"),
        "/ready" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "registry not loaded yet\n"),
        "/metrics" => {
            crate::metrics::set_agents_connected(state.agents.connected());
            crate::metrics::set_snapshot_version(current.version);
            let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
            respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
        }
        "/agents" => {
            let agents: Vec<_> = state.agents.list().iter().map(crate::json::agent).collect();
            let body = json!({ "current_version": current.version, "control_version": env!("CARGO_PKG_VERSION"), "agents": agents });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        "/config_dump" => {
            let errors: Vec<_> =
                current.source_errors.iter().map(|(s, e)| json!({"source": s, "error": e})).collect();
            let snapshot = crate::json::snapshot(&current.snapshot);
            let placements: serde_json::Map<String, serde_json::Value> = current
                .placements
                .iter()
                .map(|(node, ws)| (node.clone(), ws.iter().map(crate::json::workload).collect()))
                .collect();
            let body = json!({
                "version": current.version,
                "ready": current.ready,
                "source_errors": errors,
                "snapshot": snapshot,
                "placements": placements,
                "connected_agents": state.agents.connected(),
            });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        "/dashboard" => respond(StatusCode::OK, "text/html; charset=utf-8", crate::dashboard::PAGE),
        "/dashboard/graph.json" => {
            let graph =
                crate::dashboard::graph::graph(&state.board, &current.snapshot, crate::dashboard::now_ms());
            respond(StatusCode::OK, "application/json", graph.to_string())
        }
        "/dashboard/service.json" => {
            let name = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "name"))
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let now = crate::dashboard::now_ms();
            match crate::dashboard::graph::service(&state.board, &current.snapshot, &name, now) {
                Some(body) => respond(StatusCode::OK, "application/json", body.to_string()),
                None => respond(StatusCode::NOT_FOUND, "text/plain", format!("no service {name:?}\n")),
            }
        }
        "/federation" => respond(
            StatusCode::OK,
            "application/json",
            federation_json(state.federation.as_deref()).to_string(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /live /ready /agents /config_dump /federation /dashboard\n",
        ),
    }
}

/// `/federation`: the board as it stands; without `--federation`, no cluster and no
/// peers.
pub fn federation_json(board: Option<&crate::federation::Board>) -> serde_json::Value {
    match board {
        Some(board) => serde_json::to_value(board.snapshot()).unwrap_or_default(),
        None => json!({"cluster": null, "trust_domain": null, "gateways": [], "peers": []}),
    }
}
