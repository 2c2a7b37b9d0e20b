//! The agent's admin routes and the two tables they are served from: [`read_only`]
//! on the TCP port (anything on the node, workloads included, can reach it) and
//! [`privileged`] on the root-only unix socket, which adds every route that changes
//! the agent's state. New state-changing routes go into [`privileged`] only.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use tracing::{info, warn};

use super::{
    LOG_FILTER,
    router::{Body, Router, json, query_param, text},
};
use crate::agent::AgentState;

/// Said in the TCP port's 404 and 405 answers.
const ON_THE_SOCKET: &str = "; requests that change the agent (enroll, unenroll, quitquitquit, POST /logging) are served only on its \
     admin socket (--admin-socket; `meshctl agent ...`)";

/// What the TCP port serves: reads only.
pub fn read_only() -> Router<AgentState> {
    Router::new()
        .route(Method::GET, "/live", |_, _| async { text(StatusCode::OK, "live\n") })
        .route(Method::GET, "/ready", |s, _| async move { ready(&s) })
        .route(Method::GET, "/stats", |s, _| stats(s))
        .route(Method::GET, "/metrics", |s, _| async move { metrics(&s) })
        .route(Method::GET, "/config_dump", |s, _| async move { json(StatusCode::OK, &s.config_dump()) })
        .route(Method::GET, "/logging", |_, _| async { logging(None) })
        .route(Method::GET, "/workloads", |s, _| async move { json(StatusCode::OK, &s.workloads()) })
        .note(ON_THE_SOCKET)
}

/// What the scrape port serves: metrics and health, nothing that shows configuration
/// (it listens on the node's IP, so other nodes reach it).
pub fn scrape() -> Router<AgentState> {
    Router::new()
        .route(Method::GET, "/live", |_, _| async { text(StatusCode::OK, "live\n") })
        .route(Method::GET, "/ready", |s, _| async move { ready(&s) })
        .route(Method::GET, "/metrics", |s, _| async move { metrics(&s) })
        .note("; this port (--metrics-addr) serves only /metrics, /ready and /live; the rest is on --admin-addr")
}

/// What the unix socket serves: every read, and the requests that change state.
pub fn privileged() -> Router<AgentState> {
    read_only()
        .note("")
        .route(Method::POST, "/enroll", |s, req| enrollment(s, req, true))
        .route(Method::POST, "/unenroll", |s, req| enrollment(s, req, false))
        .route(Method::POST, "/logging", |_, req| async move {
            match query_param(&req, "level") {
                Some(level) => logging(Some(&level)),
                None => text(StatusCode::BAD_REQUEST, "missing query parameter `level`\n"),
            }
        })
        .route(Method::POST, crate::workload::cni::ADD_PATH, cni)
        .route(Method::POST, crate::workload::cni::DEL_PATH, cni)
        .route(Method::POST, crate::workload::cni::CHECK_PATH, cni)
        .route(Method::POST, "/quitquitquit", |s, _| async move {
            info!("drain requested on the admin socket");
            s.shutdown.cancel();
            text(StatusCode::OK, "draining\n")
        })
}

fn ready(state: &AgentState) -> Response<Body> {
    let missing = state.not_ready();
    if missing.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: waiting for {}\n", missing.join(", ")))
    }
}

async fn stats(state: Arc<AgentState>) -> Response<Body> {
    let for_ebpf = state.clone();
    let ebpf = tokio::task::spawn_blocking(move || for_ebpf.ebpf_stats()).await.ok().flatten();
    json(
        StatusCode::OK,
        &json!({
            "mode": state.mode,
            "connections": state.proxy.stats.snapshot(),
            "ebpf": ebpf,
            "discovery": state.discovery_status(),
        }),
    )
}

fn metrics(state: &AgentState) -> Response<Body> {
    state.refresh_gauges();
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(crate::observe::metrics::CONTENT_TYPE),
    );
    resp
}

/// Reads the log filter (`None`) or replaces it.
fn logging(level: Option<&str>) -> Response<Body> {
    let Some(control) = LOG_FILTER.get() else {
        return text(StatusCode::NOT_IMPLEMENTED, "log filter is not reloadable in this process\n");
    };
    match control(level) {
        Ok(current) => {
            if level.is_some() {
                info!(filter = %current, "log filter changed");
            }
            text(StatusCode::OK, format!("{current}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

async fn enrollment(state: Arc<AgentState>, req: Request<Bytes>, enroll: bool) -> Response<Body> {
    let Some(cgroup) = query_param(&req, "cgroup") else {
        return text(StatusCode::BAD_REQUEST, "missing query parameter `cgroup`\n");
    };
    let create = query_param(&req, "create").is_some_and(|v| v == "true" || v == "1");
    let path = req.uri().path().to_owned();
    let for_call = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        if enroll { for_call.enroll(&cgroup, create) } else { for_call.unenroll(&cgroup) }
    })
    .await;
    match result {
        Ok(Ok(cg)) => {
            info!(cgroup = %cg, enrolled = enroll, "{path} on the admin socket");
            json(
                StatusCode::OK,
                &json!({ "cgroup": cg.relative(), "path": cg.absolute(), "enrolled": enroll }),
            )
        }
        Ok(Err(e)) => {
            warn!(error = %e, "{path} failed");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// A CNI plugin's request (`mesh-cni` over the socket).
async fn cni(state: Arc<AgentState>, req: Request<Bytes>) -> Response<Body> {
    match state.cni.get() {
        Some(pods) => crate::workload::cni_http::handle(pods, req.map(Body::new)).await,
        None => text(StatusCode::SERVICE_UNAVAILABLE, "the agent is starting\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_table_holds_no_route_that_changes_state() {
        let tcp = read_only();
        let socket = privileged();
        for (method, path) in [
            (Method::POST, "/enroll"),
            (Method::POST, "/unenroll"),
            (Method::POST, "/logging"),
            (Method::POST, "/quitquitquit"),
        ] {
            assert!(!tcp.serves(&method, path), "{method} {path} is served on the TCP port");
            assert!(socket.serves(&method, path), "{method} {path} is not served on the socket");
        }
        for (method, path) in tcp.routes() {
            assert_eq!(method, Method::GET, "{method} {path} on the TCP port: only reads belong there");
        }
        for path in ["/live", "/ready", "/stats", "/metrics", "/config_dump", "/logging"] {
            assert!(tcp.serves(&Method::GET, path) && socket.serves(&Method::GET, path), "GET {path}");
        }
    }

    #[test]
    fn the_scrape_port_serves_metrics_and_health_only() {
        let scrape = scrape();
        let mut served: Vec<_> = scrape.routes().map(|(m, p)| format!("{m} {p}")).collect();
        served.sort();
        assert_eq!(served, ["GET /live", "GET /metrics", "GET /ready"]);
    }
}
