//! Multi-cluster federation, the control plane's side (`mesh-control
//! --federation FILE`).
//!
//! Two clusters, each with its own control plane and trust domain, offer each
//! other chosen services (`export: true` in the registry file, `mesh.dev/export:
//! "true"` on a Kubernetes Service). Each side serves `Federation.Exports` on its
//! gRPC listener ([`exports`]) and runs one registry source per peer
//! ([`source`]) that calls the peer's ([`client`]) and turns the answer into
//! services of this cluster ([`import`]) and the peer's `FederatedDomain` (its
//! roots and east-west gateways), which the snapshot carries to agents. The file
//! is read once at start ([`config`]); each link's state is on the admin endpoint's
//! `/federation` ([`status`]).
//!
//! Trust between the two control planes: the caller verifies the peer's serving
//! certificate against the peer's roots (a bundle file at first, then what the peer
//! sends) and authenticates with the link's shared token; nothing else crosses.

pub mod client;
pub mod config;
pub mod exports;
pub mod import;
pub mod roots;
pub mod source;
pub mod status;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use config::{ConfigError, FederationConfig, PeerConfig};
pub use status::{Board, FederationStatus};

use crate::registry::Source;

/// Services one answer carries at most (more are left out, and reported).
pub const MAX_SERVICES: usize = 1000;
/// Endpoints one answer carries at most, over all its services.
pub const MAX_ENDPOINTS: usize = 10_000;
/// The largest answer: what a discovery message of [`MAX_ENDPOINTS`] may take.
pub const MAX_RESPONSE_BYTES: usize =
    mesh_api::limits::SNAPSHOT_BASE_BYTES + MAX_ENDPOINTS * mesh_api::limits::SNAPSHOT_BYTES_PER_ENDPOINT;

/// A configured federation: the file and the board its sources report to.
#[derive(Debug, Clone)]
pub struct Federation {
    pub config: Arc<FederationConfig>,
    pub board: Arc<Board>,
}

impl Federation {
    pub fn new(config: FederationConfig) -> Federation {
        let board = Board::new(&config);
        Federation { config: Arc::new(config), board }
    }

    /// One import source per peer.
    pub fn sources(&self) -> Vec<Box<dyn Source>> {
        self.config
            .peers
            .iter()
            .map(|p| {
                Box::new(source::PeerSource::new(&self.config, p, self.board.clone())) as Box<dyn Source>
            })
            .collect()
    }
}
