//! Registry sources: where the control plane learns about services and endpoints,
//! and which workloads run on which node.
//!
//! Every source (the YAML file, Kubernetes) runs on its own and publishes its
//! complete current view through a [`tokio::sync::watch`] channel; the snapshot
//! builder merges the latest view of every source into one versioned snapshot.
//! A source that hits a bad update keeps its last good view published and
//! reports the error, so agents never lose routes because of a typo.

pub mod consul;
pub mod kubernetes;

use std::sync::Arc;

use mesh_api::{Service, Workload};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The complete view of one source at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceView {
    /// Services with their endpoints and policy, as the source sees them.
    pub services: Arc<Vec<Service>>,
    /// Workloads placed on nodes (pods; `workloads:` entries of the file), sorted by
    /// namespace then name.
    pub workloads: Arc<Vec<Workload>>,
    /// Whether the source has completed its first load (lists synced, file read).
    pub ready: bool,
    /// The last error the source hit (kept until a good update replaces it).
    pub last_error: Option<String>,
    /// Federated clusters' trust domains this source vouches for (a federation peer
    /// source publishes its peer's roots and gateways; every other source none).
    pub federated: Arc<Vec<mesh_api::FederatedDomain>>,
}

pub mod file;

/// A registry source. `run` publishes into `tx` until `shutdown` fires.
pub trait Source: Send + 'static {
    /// Short name for logs, errors and metrics ("file", "kubernetes").
    fn name(&self) -> &str;

    /// Watches the source and publishes every change of its complete view.
    fn run(
        self: Box<Self>,
        tx: watch::Sender<SourceView>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}
