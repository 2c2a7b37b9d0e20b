//! Who may obtain which identity: an agent may only ask for identities of the
//! workloads it hosts, as the registry says: endpoints on its node carrying that
//! identity, or workloads placed on its node (pods, the file's `workloads:`)
//! running as it. Read from the current snapshot, so a workload moving nodes moves
//! its right to an identity with it.

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
        current.places(node, namespace, service_account)
            || current
                .snapshot
                .services
                .iter()
                .flat_map(|s| &s.endpoints)
                .any(|e| e.node == node && e.identity == wanted)
    }
}

#[cfg(test)]
mod tests {
    use mesh_api as api;

    use super::*;
    use crate::snapshot::Placements;

    fn versioned(services: Vec<api::Service>, workloads: Vec<api::Workload>) -> Arc<Versioned> {
        let mut placements = Placements::new();
        for w in workloads {
            placements.entry(w.node.clone()).or_default().push(w);
        }
        Arc::new(Versioned {
            version: 1,
            snapshot: Arc::new(api::Snapshot {
                services,
                trust_domain: "cluster.local".into(),
                ..Default::default()
            }),
            response: api::DiscoveryResponse::default(),
            placements: Arc::new(placements),
            source_errors: Vec::new(),
            ready: true,
        })
    }

    #[test]
    fn a_node_is_granted_the_identities_of_its_endpoints_and_of_its_workloads_only() {
        let endpoint = api::Endpoint {
            address: "10.1.0.5".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
            node: "node-a".into(),
            ..Default::default()
        };
        let service = api::Service {
            name: "cart".into(),
            namespace: "shop".into(),
            endpoints: vec![endpoint],
            ..Default::default()
        };
        let batch = api::Workload {
            namespace: "jobs".into(),
            name: "batch-1".into(),
            service_account: "batch".into(),
            node: "node-b".into(),
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(versioned(vec![service], vec![batch]));
        let authz = RegistryAuthorizer::new(rx);
        assert!(authz.may_request("node-a", "shop", "cart"), "an endpoint on node-a");
        assert!(authz.may_request("node-b", "jobs", "batch"), "a workload placed on node-b");
        assert!(!authz.may_request("node-b", "shop", "cart"), "node-b hosts no cart");
        assert!(!authz.may_request("node-a", "jobs", "batch"), "node-a hosts no batch");
        assert!(!authz.may_request("node-b", "jobs", "other"));
        assert!(!authz.may_request("node-b", "shop", "batch"), "same account name, another namespace");
    }
}
