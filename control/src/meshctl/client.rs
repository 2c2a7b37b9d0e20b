//! Where meshctl's data comes from: the control plane's gRPC `Agents` call and the
//! admin endpoints of the control plane and the agents.

use std::time::Duration;

use hyper::StatusCode;
use mesh_api::{AgentsRequest, discovery_client::DiscoveryClient};

use super::{
    error::{MeshctlError, Target, connect_reason},
    http::BaseUrl,
    views::{AgentDump, AgentRecord, AgentStats, ControlDump},
};

/// The agent queried when none is named: the one on this node, at its default admin address.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:15000";

/// The components meshctl talks to.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Control plane gRPC (`http://host:15010`).
    pub control_plane: String,
    pub control_admin: BaseUrl,
    pub agents: Vec<BaseUrl>,
    /// False when `agents` is only [`DEFAULT_AGENT`] because none was named; then an
    /// absent agent is a note rather than a failure in `status`.
    pub agents_named: bool,
    /// Per call.
    pub timeout: Duration,
}

impl Targets {
    /// Checks the URLs; with no agents named, uses [`DEFAULT_AGENT`].
    pub fn new(
        control_plane: &str,
        control_admin: &str,
        agents: &[String],
        timeout: Duration,
    ) -> Result<Self, MeshctlError> {
        // Checked like the admin URLs, so a typo fails before any call.
        BaseUrl::parse("--control-plane", control_plane)?;
        let control_admin = BaseUrl::parse("--control-admin", control_admin)?;
        let agents_named = !agents.is_empty();
        let agents = if agents_named {
            agents.iter().map(|a| BaseUrl::parse("--agent", a)).collect::<Result<_, _>>()?
        } else {
            vec![BaseUrl::parse("--agent", DEFAULT_AGENT)?]
        };
        Ok(Self {
            control_plane: control_plane.trim_end_matches('/').to_owned(),
            control_admin,
            agents,
            agents_named,
            timeout,
        })
    }

    /// Every agent the control plane has seen, and its newest version (`Discovery.Agents`).
    pub async fn control_agents(&self) -> Result<(u64, Vec<AgentRecord>), MeshctlError> {
        let unreachable = |reason: String| MeshctlError::Unreachable {
            target: Target::ControlPlane,
            url: self.control_plane.clone(),
            reason,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(self.control_plane.clone())
            .map_err(|e| MeshctlError::BadUrl {
                flag: "--control-plane",
                value: self.control_plane.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let channel = endpoint.connect().await.map_err(|e| unreachable(connect_reason(&e)))?;
        let response = DiscoveryClient::new(channel).agents(AgentsRequest {}).await.map_err(|status| {
            if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::DeadlineExceeded {
                unreachable(status.message().to_owned())
            } else {
                MeshctlError::Status {
                    target: Target::ControlPlane,
                    url: self.control_plane.clone(),
                    path: "Discovery.Agents".into(),
                    status: format!("{:?}", status.code()),
                    body: status.message().to_owned(),
                }
            }
        })?;
        let r = response.into_inner();
        Ok((r.current_version, r.agents.iter().map(AgentRecord::from).collect()))
    }

    /// The control plane's `/config_dump`.
    pub async fn control_dump(&self) -> Result<ControlDump, MeshctlError> {
        self.control_admin.get_json(Target::ControlAdmin, "/config_dump", self.timeout).await
    }

    /// The control plane's `/config_dump` as sent.
    pub async fn control_dump_raw(&self) -> Result<serde_json::Value, MeshctlError> {
        self.control_admin.get_json(Target::ControlAdmin, "/config_dump", self.timeout).await
    }

    /// An agent's `/config_dump`.
    pub async fn agent_dump(&self, agent: &BaseUrl) -> Result<AgentDump, MeshctlError> {
        agent.get_json(Target::Agent, "/config_dump", self.timeout).await
    }

    /// An agent's `/config_dump` as sent.
    pub async fn agent_dump_raw(&self, agent: &BaseUrl) -> Result<serde_json::Value, MeshctlError> {
        agent.get_json(Target::Agent, "/config_dump", self.timeout).await
    }

    /// The workloads an agent serves (`/workloads`).
    pub async fn agent_workloads(
        &self,
        agent: &BaseUrl,
    ) -> Result<Vec<super::workloads::WorkloadView>, MeshctlError> {
        agent.get_json(Target::Agent, super::workloads::PATH, self.timeout).await
    }

    /// An agent's `/stats` and whether `/ready` says it is ready.
    pub async fn agent_stats(&self, agent: &BaseUrl) -> Result<(AgentStats, bool), MeshctlError> {
        let stats = agent.get_json(Target::Agent, "/stats", self.timeout).await?;
        let (status, _) = agent.get(Target::Agent, "/ready", self.timeout).await?;
        Ok((stats, status == StatusCode::OK))
    }
}
