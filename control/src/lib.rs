//! The mesh control plane: registry sources merged into versioned snapshots,
//! the discovery stream to agents, and the CA.

pub mod ca;
pub mod registry;
