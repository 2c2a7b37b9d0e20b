//! Workloads: the unit the agent serves.
//!
//! A workload is what interception, identity, metrics, policy and `meshctl` speak of:
//! an identity (namespace and service account), where its processes run (a cgroup of
//! the node's network namespace, or a network namespace of its own: a pod), its
//! addresses, name and labels. The agent holds a set of them
//! ([`crate::agent::AgentState`]), added and removed at run time without touching the
//! others' traffic, from static flags (`--workload CGROUP=NS/SA`, `--cgroup` with
//! `--identity`) or from the `mesh-cni` plugin ([`cni`], over the agent's unix socket
//! through [`cni_http`], served by [`pods`]), and kept across restarts in [`store`].
//!
//! [`serve`] opens a workload's listeners and builds its data-path context;
//! [`netns`] makes sockets inside a pod's network namespace; [`identify`] finds the
//! identity the control plane gives a pod.

pub mod cni;
pub mod cni_http;
pub mod identify;
pub mod netns;
pub mod pods;
pub mod serve;
pub mod store;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use serde::Serialize;

/// Where a workload came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Flags of `mesh-agent run`.
    Static,
    /// The CNI plugin, when the container runtime set the pod up.
    Cni,
}

/// A stable name for a workload within one agent: its cgroup for a static workload,
/// its container id for a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkloadKey(pub String);

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a workload runs as.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServiceAccount {
    /// `NAMESPACE/NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(Self { namespace: ns.to_owned(), name: sa.to_owned() })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/SERVICE_ACCOUNT")),
        }
    }
}

/// Where a workload's processes live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Placement {
    /// Cgroups of the node's own network namespace; connections land on the
    /// workload's own outbound listener port there.
    Host { cgroups: Vec<String> },
    /// A network namespace of its own (a pod), where the agent opens its listeners.
    Pod { netns: PathBuf, container_id: String },
}

/// A workload as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub key: WorkloadKey,
    /// Pod name, or the static workload's cgroup.
    pub name: String,
    /// Kubernetes namespace of the pod (the identity's namespace for static ones).
    pub namespace: String,
    /// Who it runs as; `None` when it has no identity (plain interception).
    pub service_account: Option<ServiceAccount>,
    pub placement: Placement,
    pub addresses: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub source: Source,
}

impl Workload {
    /// Whether it lives in a network namespace of its own.
    pub fn is_pod(&self) -> bool {
        matches!(self.placement, Placement::Pod { .. })
    }
}
