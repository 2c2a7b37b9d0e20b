//! Typed, tolerant views of the JSON the admin endpoints serve.
//!
//! Every field defaults when absent, so `meshctl` keeps working against an agent or
//! control plane one version older or newer; fields the admin endpoints may gain
//! later (authorization rules, breaker state, certificates) are read when present.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The control plane's `/config_dump`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ControlDump {
    pub version: u64,
    pub ready: bool,
    pub source_errors: Vec<SourceError>,
    pub snapshot: Option<SnapshotView>,
    pub connected_agents: usize,
}

impl ControlDump {
    /// The services of the current snapshot (none before the first one).
    pub fn services(&self) -> &[ServiceView] {
        self.snapshot.as_ref().map_or(&[], |s| &s.services)
    }
}

/// The control plane's `/federation`: `cluster` is `None` without `--federation`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct FederationView {
    pub cluster: Option<String>,
    pub trust_domain: Option<String>,
    pub gateways: Vec<String>,
    pub peers: Vec<FederatedPeerView>,
}

/// One federated cluster's link.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct FederatedPeerView {
    pub name: String,
    pub trust_domain: String,
    pub url: String,
    /// `ok`, `error` or `pending`.
    pub state: String,
    pub last_success_unix: Option<i64>,
    pub last_error: Option<String>,
    pub imported_services: usize,
    pub roots: usize,
    pub gateways: Vec<String>,
}

/// A registry source that failed (its last good state is still served).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SourceError {
    pub source: String,
    pub error: String,
}

/// The snapshot the control plane streams to agents.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SnapshotView {
    pub trust_domain: String,
    pub services: Vec<ServiceView>,
}

/// One service as the control plane knows it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ServiceView {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<String>,
    /// VIPs the control plane allocated for the hostnames (the service has no VIP).
    pub allocated_vips: Vec<String>,
    /// No VIP on purpose (clusterIP None): the node's resolver answers its names.
    pub headless: bool,
    pub hostnames: Vec<String>,
    pub ports: Vec<PortView>,
    pub load_balancer: String,
    pub endpoints: Vec<ControlEndpoint>,
    /// Allow rules; `None` when the control plane does not report them.
    pub authorization: Option<Vec<AuthorizationRule>>,
    /// HTTP routes, in order.
    pub routes: Vec<HttpRouteView>,
}

/// One of a service's HTTP routes (the control plane's `/config_dump`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct HttpRouteView {
    pub name: String,
    pub ports: Vec<u32>,
    /// Each match as its conditions (`path prefix /api`, `header x-canary = 1`).
    pub matches: Vec<Vec<String>>,
    pub backends: Vec<BackendView>,
    pub timeout_ms: u32,
    pub retry_attempts: Option<u32>,
    pub fault: Option<FaultView>,
    pub mirror: Option<MirrorView>,
}

/// A route backend: a service (empty: the route's own) and a label subset.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct BackendView {
    pub service: String,
    pub port: u32,
    pub subset: std::collections::BTreeMap<String, String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct FaultView {
    pub delay_ms: u32,
    pub delay_percent: f64,
    pub abort_http_status: u32,
    pub abort_grpc_status: u32,
    pub abort_percent: f64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct MirrorView {
    pub backend: Option<BackendView>,
    pub percent: f64,
}

impl ServiceView {
    /// `namespace/name`, the key agents use for routes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A service port.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct PortView {
    pub name: String,
    pub port: u32,
    pub target_port: u32,
    pub protocol: String,
}

/// An endpoint in the control plane's snapshot.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ControlEndpoint {
    pub address: String,
    pub port: u32,
    pub weight: u32,
    pub health: String,
    pub health_reason: String,
    pub zone: Option<String>,
    pub identity: String,
    pub node: String,
    pub agent_address: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl ControlEndpoint {
    /// `HEALTH_UNSPECIFIED` counts as healthy, as on the agents.
    pub fn healthy(&self) -> bool {
        self.health != "HEALTH_UNHEALTHY"
    }
}

/// An allow rule of a service's authorization policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AuthorizationRule {
    pub principals: Vec<String>,
    pub methods: Vec<String>,
    pub path_prefixes: Vec<String>,
}

/// The control plane's admin `/agents`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AgentsDump {
    pub current_version: u64,
    /// The control plane's release (absent from older ones).
    pub control_version: String,
    pub agents: Vec<AgentRecord>,
}

/// What the control plane knows about one agent (admin `/agents`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct AgentRecord {
    pub node: String,
    /// The release the agent reported (empty for older agents).
    pub version: String,
    pub agent_address: String,
    pub mode: String,
    pub connected: bool,
    pub sent_version: u64,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    /// Unix seconds.
    pub connected_at: i64,
    /// Unix seconds of the agent's last message.
    pub last_seen: i64,
    /// How many workloads the agent said it hosts (the control plane lists them).
    #[serde(deserialize_with = "count")]
    pub workloads: usize,
}

/// The length of a JSON array, or a number as is.
fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Count {
        Items(Vec<serde_json::Value>),
        Number(usize),
    }
    Ok(match Count::deserialize(d)? {
        Count::Items(v) => v.len(),
        Count::Number(n) => n,
    })
}

impl From<&mesh_api::AgentStatus> for AgentRecord {
    fn from(a: &mesh_api::AgentStatus) -> Self {
        Self {
            node: a.node.clone(),
            version: a.agent_version.clone(),
            agent_address: a.agent_address.clone(),
            mode: a.mode.clone(),
            connected: a.connected,
            sent_version: a.sent_version,
            acked_version: a.acked_version,
            nacked_version: a.nacked_version,
            nack_reason: a.nack_reason.clone(),
            connected_at: a.connected_at,
            last_seen: a.last_seen,
            workloads: a.workloads.len(),
        }
    }
}

/// An agent's `/config_dump` (the parts meshctl reads).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentDump {
    /// The agent's release (empty for older agents).
    pub version: String,
    pub mode: String,
    pub mode_reason: String,
    pub ready: bool,
    pub enrolled: Vec<String>,
    pub discovery: DiscoveryView,
    pub routes: Vec<RouteView>,
    /// Workload certificates; absent until the agent gets them from the CA.
    pub certificates: Option<Vec<CertificateView>>,
}

/// An agent's `/stats`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentStats {
    pub mode: String,
    pub discovery: DiscoveryView,
}

/// The agent's discovery client state.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct DiscoveryView {
    pub control_plane: Option<String>,
    pub connected: bool,
    pub applied_version: u64,
    pub staleness_seconds: f64,
    pub seconds_since_update: Option<f64>,
    pub services: usize,
    pub endpoints: usize,
}

/// A service port in an agent's routing table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RouteView {
    /// `namespace/name`.
    pub service: String,
    pub port: u16,
    pub protocol: String,
    pub endpoints: Vec<AgentEndpoint>,
    /// Allow rules, when the agent reports them.
    pub authorization: Option<Vec<AuthorizationRule>>,
}

/// An endpoint as the agent's data path sees it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AgentEndpoint {
    pub addr: String,
    pub healthy: bool,
    pub health_reason: String,
    pub weight: u32,
    pub identity: String,
    pub node: String,
    pub agent_address: Option<String>,
    pub zone: String,
    pub region: String,
    /// Circuit-breaker state ("closed", "open", "half-open"), when the agent reports it.
    pub breaker: Option<String>,
    /// Whether outlier detection ejected it, when the agent reports it.
    pub ejected: Option<bool>,
}

impl AgentEndpoint {
    /// Whether the balancer may pick it: healthy, weight above zero, not ejected, breaker not open.
    pub fn eligible(&self) -> Result<(), String> {
        if !self.healthy {
            return Err(if self.health_reason.is_empty() {
                "unhealthy".into()
            } else {
                format!("unhealthy: {}", self.health_reason)
            });
        }
        if self.weight == 0 {
            return Err("weight 0".into());
        }
        if self.ejected == Some(true) {
            return Err("ejected by outlier detection".into());
        }
        if self.breaker.as_deref() == Some("open") {
            return Err("circuit breaker open".into());
        }
        Ok(())
    }
}

/// A workload certificate an agent holds.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct CertificateView {
    pub identity: String,
    /// Unix seconds or an RFC 3339 timestamp.
    pub not_after: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_default_instead_of_failing() {
        let d: AgentDump = serde_json::from_str(r#"{"mode":"ebpf","routes":[{"service":"a/b"}]}"#).unwrap();
        assert_eq!(d.mode, "ebpf");
        assert_eq!(d.routes[0].service, "a/b");
        assert!(d.certificates.is_none());
        let c: ControlDump = serde_json::from_str(r#"{"version":3,"snapshot":null}"#).unwrap();
        assert!(c.services().is_empty());
    }

    #[test]
    fn eligibility_names_the_reason() {
        let ok = AgentEndpoint { healthy: true, weight: 1, ..Default::default() };
        assert!(ok.eligible().is_ok());
        let sick =
            AgentEndpoint { healthy: false, health_reason: "not ready".into(), weight: 1, ..ok.clone() };
        assert_eq!(sick.eligible().unwrap_err(), "unhealthy: not ready");
        assert_eq!(AgentEndpoint { weight: 0, ..ok.clone() }.eligible().unwrap_err(), "weight 0");
        let open = AgentEndpoint { breaker: Some("open".into()), ..ok };
        assert_eq!(open.eligible().unwrap_err(), "circuit breaker open");
    }
}
