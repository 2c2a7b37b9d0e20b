//! `meshctl agent ...`: requests that change a node's agent, sent over its admin
//! unix socket (`mesh-agent --admin-socket`), which only root (the agent's user)
//! may open. The agent's TCP admin port answers none of them.

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use clap::Subcommand;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;

use super::error::{MeshctlError, Target, connect_reason, io_reason};

/// The agent's default admin socket (`mesh-agent --admin-socket`).
pub const DEFAULT_SOCKET: &str = "/run/mesh/agent.sock";

/// What to ask the agent.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// Start intercepting a workload cgroup (a path under the cgroup2 mount, or relative
    /// to its root).
    Enroll {
        cgroup: String,
        /// Create the cgroup if it does not exist (the agent removes it when it stops).
        #[arg(long)]
        create: bool,
    },
    /// Stop intercepting a workload cgroup.
    Unenroll { cgroup: String },
    /// Show the agent's log filter, or replace it (EnvFilter syntax: `debug`,
    /// `info,mesh_agent::conn=debug`).
    LogLevel { filter: Option<String> },
    /// Drain and stop the agent, as SIGTERM does.
    Quit,
}

impl AgentCommand {
    /// The admin request this command makes.
    pub fn request(&self) -> (Method, String) {
        let query = |pairs: &[(&str, &str)]| {
            let mut q = form_urlencoded::Serializer::new(String::new());
            for (k, v) in pairs {
                q.append_pair(k, v);
            }
            q.finish()
        };
        match self {
            AgentCommand::Enroll { cgroup, create: false } => {
                (Method::POST, format!("/enroll?{}", query(&[("cgroup", cgroup)])))
            }
            AgentCommand::Enroll { cgroup, create: true } => {
                (Method::POST, format!("/enroll?{}", query(&[("cgroup", cgroup), ("create", "true")])))
            }
            AgentCommand::Unenroll { cgroup } => {
                (Method::POST, format!("/unenroll?{}", query(&[("cgroup", cgroup)])))
            }
            AgentCommand::LogLevel { filter: None } => (Method::GET, "/logging".into()),
            AgentCommand::LogLevel { filter: Some(f) } => {
                (Method::POST, format!("/logging?{}", query(&[("level", f)])))
            }
            AgentCommand::Quit => (Method::POST, "/quitquitquit".into()),
        }
    }
}

/// The agent's answer to one request.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub socket: String,
    pub request: String,
    pub status: u16,
    /// The agent's JSON answer, or its text.
    pub answer: serde_json::Value,
}

/// Sends `command` to the agent at `socket` within `timeout`; a non-2xx answer is an
/// error carrying the agent's reason.
pub async fn send(
    socket: &PathBuf,
    command: &AgentCommand,
    timeout: Duration,
) -> Result<Answer, MeshctlError> {
    let url = socket.display().to_string();
    let (method, path) = command.request();
    let unreachable =
        |reason: String| MeshctlError::Unreachable { target: Target::AgentSocket, url: url.clone(), reason };
    let exchange = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| unreachable(io_reason(&e)))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(connect_reason(&e)))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(header::HOST, "mesh-agent")
            .header(header::USER_AGENT, concat!("meshctl/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| MeshctlError::Usage(format!("bad request {path:?}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| unreachable(connect_reason(&e)))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| unreachable(connect_reason(&e)))?.to_bytes();
        Ok::<_, MeshctlError>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(unreachable(format!("no answer within {}", humantime::format_duration(timeout))));
        }
    };
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let request = format!("{method} {path}");
    if !status.is_success() {
        return Err(MeshctlError::Status {
            target: Target::AgentSocket,
            url,
            path: request,
            status: status.to_string(),
            body: text,
        });
    }
    let answer = serde_json::from_slice(&body).unwrap_or(serde_json::Value::String(text));
    Ok(Answer { socket: url, request, status: status.as_u16(), answer })
}

/// The answer for people: what the agent said, in a line.
pub fn render(a: &Answer) -> String {
    match &a.answer {
        serde_json::Value::String(s) => format!("{s}\n"),
        v if v.get("enrolled").is_some() => format!(
            "{} {}\n",
            if v["enrolled"] == true { "enrolled" } else { "unenrolled" },
            v["cgroup"].as_str().unwrap_or_default()
        ),
        v => format!("{v}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_the_socket_routes_with_encoded_queries() {
        let enroll = AgentCommand::Enroll { cgroup: "/mesh/web app".into(), create: true };
        assert_eq!(enroll.request(), (Method::POST, "/enroll?cgroup=%2Fmesh%2Fweb+app&create=true".into()));
        let unenroll = AgentCommand::Unenroll { cgroup: "mesh/web".into() };
        assert_eq!(unenroll.request(), (Method::POST, "/unenroll?cgroup=mesh%2Fweb".into()));
        assert_eq!(AgentCommand::LogLevel { filter: None }.request(), (Method::GET, "/logging".into()));
        let set = AgentCommand::LogLevel { filter: Some("info,mesh_agent=debug".into()) };
        assert_eq!(set.request(), (Method::POST, "/logging?level=info%2Cmesh_agent%3Ddebug".into()));
        assert_eq!(AgentCommand::Quit.request(), (Method::POST, "/quitquitquit".into()));
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_with_a_hint() {
        let path = std::env::temp_dir().join(format!("meshctl-no-agent-{}.sock", std::process::id()));
        let e = send(&path, &AgentCommand::Quit, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("--agent-socket"), "{msg}");
    }
}
