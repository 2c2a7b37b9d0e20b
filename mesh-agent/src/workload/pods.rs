//! The agent's side of the CNI contract: a pod the plugin announces becomes a served
//! workload ([`crate::agent::AgentState::add_workload`]) with the identity the control
//! plane gives it.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use tracing::{info, warn};

use super::{
    Placement, Source, Workload, WorkloadKey,
    cni::{CniError, PodAnnounce, PodServed, PodSink, code},
    identify,
};
use crate::agent::{AgentState, EnrollError};

/// How long an ADD waits for the control plane to list a new pod before refusing it
/// as unknown (the runtime retries a failed ADD).
pub const IDENTITY_PATIENCE: Duration = Duration::from_secs(10);

/// Serves the pods the CNI plugin hands the agent.
#[derive(Clone)]
pub struct AgentPods {
    /// Weak: the state holds the CNI front that holds this.
    state: Weak<AgentState>,
    patience: Duration,
}

impl std::fmt::Debug for AgentPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPods").field("patience", &self.patience).finish_non_exhaustive()
    }
}

impl AgentPods {
    pub fn new(state: &Arc<AgentState>, patience: Duration) -> Self {
        Self { state: Arc::downgrade(state), patience }
    }

    fn state(&self) -> Result<Arc<AgentState>, CniError> {
        self.state
            .upgrade()
            .ok_or_else(|| CniError::new(code::TRY_AGAIN_LATER, "the node agent is shutting down"))
    }

    fn workload(pod: &PodAnnounce, account: Option<super::ServiceAccount>) -> Workload {
        let (namespace, name) = match &pod.pod {
            Some(p) => (p.namespace.clone(), p.name.clone()),
            None => (String::new(), pod.container_id.clone()),
        };
        Workload {
            key: WorkloadKey(pod.container_id.clone()),
            name,
            namespace,
            service_account: account,
            placement: Placement::Pod {
                netns: pod.netns.clone().into(),
                container_id: pod.container_id.clone(),
            },
            addresses: pod.ips.clone(),
            labels: Default::default(),
            source: Source::Cni,
        }
    }

    fn serve(state: &AgentState, pod: &PodAnnounce, workload: Workload) -> Result<PodServed, CniError> {
        let account = workload.service_account.clone();
        match state.add_workload(workload) {
            Ok(listening) => Ok(PodServed {
                identity: account.map(|a| state.spiffe_id(&a)),
                detail: format!("{} mode; listeners {listening:?}", state.mode),
            }),
            Err(EnrollError::ShuttingDown) => {
                Err(CniError::new(code::TRY_AGAIN_LATER, "the node agent is shutting down"))
            }
            Err(e) => Err(CniError::new(code::AGENT_FAILED, format!("serving {}: {e}", pod.describe()))),
        }
    }
}

impl PodSink for AgentPods {
    async fn add(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        let state = self.state()?;
        let account = if state.node.identities.is_some() {
            let found = identify::wait_for_account(&state.node.routes, lookup(&state, pod), self.patience)
                .await
                .map_err(|e| CniError::new(code::INVALID_CONFIG, e))?;
            match found {
                Some(a) => Some(a),
                None => return Err(CniError::pod_unknown(pod)),
            }
        } else {
            None
        };
        Self::serve(&state, pod, Self::workload(pod, account))
    }

    /// After a restart the snapshot may not be in yet: the pod is served (and
    /// intercepted) at once, and its identity follows when the control plane lists it.
    async fn restore(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        let state = self.state()?;
        let known = identify::account_now(&state.node.routes, lookup(&state, pod)).ok().flatten();
        let served = Self::serve(&state, pod, Self::workload(pod, known.clone()))?;
        if known.is_none() && state.node.identities.is_some() {
            let (weak, pod) = (self.state.clone(), pod.clone());
            tokio::spawn(async move {
                let Some(state) = weak.upgrade() else { return };
                let routes = state.node.routes.clone();
                loop {
                    match identify::wait_for_account(&routes, lookup(&state, &pod), Duration::from_secs(3600))
                        .await
                    {
                        Ok(Some(account)) => {
                            info!(pod = %pod.describe(), identity = %account, "restored pod's identity now known");
                            state.set_identity(&WorkloadKey(pod.container_id.clone()), &account);
                            return;
                        }
                        Ok(None) if !state.shutdown.is_cancelled() => continue,
                        Ok(None) => return,
                        Err(e) => {
                            warn!(pod = %pod.describe(), error = %e, "restored pod's identity is ambiguous");
                            return;
                        }
                    }
                }
            });
        }
        Ok(served)
    }

    async fn remove(&self, pod: &PodAnnounce) -> Result<(), CniError> {
        self.state()?
            .remove_workload(&WorkloadKey(pod.container_id.clone()))
            .map(|_| ())
            .map_err(|e| CniError::new(code::AGENT_FAILED, format!("removing {}: {e}", pod.describe())))
    }

    async fn check(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        let state = self.state()?;
        match state.served_identity(&WorkloadKey(pod.container_id.clone())) {
            Some(identity) => Ok(PodServed { identity, detail: format!("{} mode", state.mode) }),
            None => Err(CniError::new(code::NOT_SERVED, format!("{} is not served", pod.describe()))),
        }
    }
}

/// What the snapshot is searched for: the pod's name from the runtime, its addresses.
fn lookup<'a>(state: &'a AgentState, pod: &'a PodAnnounce) -> identify::PodLookup<'a> {
    identify::PodLookup {
        node: &state.node.name,
        pod: pod.pod.as_ref().map(|p| (p.namespace.as_str(), p.name.as_str())),
        addresses: &pod.ips,
    }
}
