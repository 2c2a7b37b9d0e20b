//! Where meshctl's data comes from: the admin endpoints of the control plane and
//! of the agents. meshctl holds no node credential and needs none: the control
//! plane's gRPC API answers each agent about itself only, while its admin endpoint
//! (loopback by default; a port-forward in a cluster) is the operator's view.

use std::time::Duration;

use hyper::StatusCode;

use super::{
    error::{MeshctlError, Target},
    http::BaseUrl,
    views::{AgentDump, AgentRecord, AgentStats, AgentsDump, ControlDump, FederationView},
};

/// The agent queried when none is named: the one on this node, at its default admin address.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:15000";

/// The components meshctl talks to.
#[derive(Debug, Clone)]
pub struct Targets {
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
    pub fn new(control_admin: &str, agents: &[String], timeout: Duration) -> Result<Self, MeshctlError> {
        let control_admin = BaseUrl::parse("--control-admin", control_admin)?;
        let agents_named = !agents.is_empty();
        let agents = if agents_named {
            agents.iter().map(|a| BaseUrl::parse("--agent", a)).collect::<Result<_, _>>()?
        } else {
            vec![BaseUrl::parse("--agent", DEFAULT_AGENT)?]
        };
        Ok(Self { control_admin, agents, agents_named, timeout })
    }

    /// Every agent the control plane has seen, and its newest version (admin `/agents`).
    pub async fn control_agents(&self) -> Result<(u64, Vec<AgentRecord>), MeshctlError> {
        let dump: AgentsDump =
            self.control_admin.get_json(Target::ControlAdmin, "/agents", self.timeout).await?;
        Ok((dump.current_version, dump.agents))
    }

    /// The control plane's `/agents` whole (its own release included).
    pub async fn agents_dump(&self) -> Result<AgentsDump, MeshctlError> {
        self.control_admin.get_json(Target::ControlAdmin, "/agents", self.timeout).await
    }

    /// The control plane's `/config_dump`.
    pub async fn control_dump(&self) -> Result<ControlDump, MeshctlError> {
        self.control_admin.get_json(Target::ControlAdmin, "/config_dump", self.timeout).await
    }

    /// The control plane's `/federation`; `None` from a control plane that predates
    /// it (404).
    pub async fn control_federation(&self) -> Result<Option<FederationView>, MeshctlError> {
        match self.control_admin.get_json(Target::ControlAdmin, "/federation", self.timeout).await {
            Ok(view) => Ok(Some(view)),
            Err(MeshctlError::Status { status, .. }) if status.starts_with("404") => Ok(None),
            Err(e) => Err(e),
        }
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
