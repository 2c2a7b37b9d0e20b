//! The admin endpoint (loopback by default): liveness and readiness for probes,
//! counters and the effective configuration for operators, enrolment for whatever
//! starts workloads (a CNI-like hook, the demo, tests), and a drain trigger.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/live` | 200 while the process serves |
//! | GET | `/ready` | 200 once interception is attached, listeners accept, the workload certificate is loaded (with an identity) and a discovery snapshot is applied (with a control plane); 503 naming what is missing otherwise |
//! | GET | `/metrics` | Prometheus text: connections, bytes, sniff results, discovery, certificates |
//! | GET | `/stats` | connection counters and eBPF program counters (JSON) |
//! | GET | `/config_dump` | mode, settings, enrolled cgroups, discovery state and routes (JSON) |
//! | POST | `/enroll?cgroup=PATH[&create=true]` | start intercepting a cgroup |
//! | POST | `/unenroll?cgroup=PATH` | stop intercepting it |
//! | GET | `/logging` | the current log filter |
//! | POST | `/logging?level=FILTER` | replace the log filter (EnvFilter syntax, e.g. `debug` or `info,mesh_agent::conn=debug`) |
//! | POST | `/quitquitquit` | graceful shutdown, as SIGTERM |

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::agent::AgentState;

type Body = Full<Bytes>;

/// Reads (`None`) or replaces (`Some(filter)`) the process's log filter and returns
/// the filter in effect, or why the change was refused.
pub type LogFilterControl = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

static LOG_FILTER: OnceLock<LogFilterControl> = OnceLock::new();

/// Installs what `/logging` uses (the binary does, once its subscriber is built);
/// without it the endpoint answers 501.
pub fn set_log_filter_control(control: LogFilterControl) {
    let _ = LOG_FILTER.set(control);
}

/// Binds the admin endpoint and serves it until the agent shuts down.
pub async fn spawn(addr: SocketAddr, state: Arc<AgentState>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = state.shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => { debug!(error = %e, "admin accept failed"); continue; }
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "admin connection error");
                }
            });
        }
    });
    Ok(local)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("serialising: {e}\n")),
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn route(state: &Arc<AgentState>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let missing = state.not_ready();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {}\n", missing.join(", ")),
                )
            }
        }
        (&Method::GET, "/stats") => {
            let state2 = state.clone();
            let ebpf = tokio::task::spawn_blocking(move || state2.ebpf_stats()).await.ok().flatten();
            json_response(
                StatusCode::OK,
                &json!({
                    "mode": state.mode,
                    "connections": state.proxy.stats.snapshot(),
                    "ebpf": ebpf,
                    "discovery": state.discovery_status(),
                }),
            )
        }
        (&Method::GET, "/metrics") => {
            state.refresh_gauges();
            let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(crate::observe::metrics::CONTENT_TYPE),
            );
            resp
        }
        (&Method::GET, "/config_dump") => json_response(StatusCode::OK, &state.config_dump()),
        (&Method::POST, path @ ("/enroll" | "/unenroll")) => {
            let Some(cgroup) = query_param(&req, "cgroup") else {
                return text(StatusCode::BAD_REQUEST, "missing query parameter `cgroup`\n");
            };
            let create = query_param(&req, "create").is_some_and(|v| v == "true" || v == "1");
            let enroll = path == "/enroll";
            let state2 = state.clone();
            let result = tokio::task::spawn_blocking(move || {
                if enroll { state2.enroll(&cgroup, create) } else { state2.unenroll(&cgroup) }
            })
            .await;
            match result {
                Ok(Ok(cg)) => json_response(
                    StatusCode::OK,
                    &json!({ "cgroup": cg.relative(), "path": cg.absolute(), "enrolled": enroll }),
                ),
                Ok(Err(e)) => {
                    warn!(error = %e, "{path} failed");
                    text(StatusCode::BAD_REQUEST, format!("{e}\n"))
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (method @ (&Method::GET | &Method::POST), "/logging") => {
            let Some(control) = LOG_FILTER.get() else {
                return text(StatusCode::NOT_IMPLEMENTED, "log filter is not reloadable in this process\n");
            };
            let level = if method == Method::POST {
                match query_param(&req, "level") {
                    Some(l) => Some(l),
                    None => return text(StatusCode::BAD_REQUEST, "missing query parameter `level`\n"),
                }
            } else {
                None
            };
            match control(level.as_deref()) {
                Ok(current) => {
                    if level.is_some() {
                        tracing::info!(filter = %current, "log filter changed");
                    }
                    text(StatusCode::OK, format!("{current}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (&Method::POST, "/quitquitquit") => {
            state.shutdown.cancel();
            text(StatusCode::OK, "draining\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; see /live /ready /stats /metrics /config_dump /enroll /unenroll /logging /quitquitquit\n",
        ),
    }
}
