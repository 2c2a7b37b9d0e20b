//! Who may obtain which identity: an agent may only ask for identities of the
//! workloads it hosts, as the registry says (endpoints on its node carrying that
//! identity). Read from the current snapshot, so a workload moving nodes moves its
//! right to an identity with it.

use std::sync::Arc;

use mesh_api::spiffe::SpiffeId;
use tokio::sync::watch;

use crate::{ca::IdentityAuthorizer, snapshot::Versioned};

/// Grants identities from the registry's endpoints.
pub struct RegistryAuthorizer {
    snapshots: watch::Receiver<Arc<Versioned>>,
}

impl RegistryAuthorizer {
    pub fn new(snapshots: watch::Receiver<Arc<Versioned>>) -> Self {
        Self { snapshots }
    }
}

impl IdentityAuthorizer for RegistryAuthorizer {
    fn may_request(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let current = self.snapshots.borrow().clone();
        let td = &current.snapshot.trust_domain;
        let Ok(wanted) = SpiffeId::new(td, namespace, service_account) else { return false };
        let wanted = wanted.to_string();
        current
            .snapshot
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .any(|e| e.node == node && e.identity == wanted)
    }
}
