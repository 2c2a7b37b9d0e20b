//! The mesh's CNI plugin, `mesh-cni`, chained after the pod network's plugins: on
//! each pod event the container runtime runs it once, and it hands the pod to the
//! node agent over the agent's root-only unix socket ([`plugin`]). The same binary
//! installs itself on a node ([`install`]).
//!
//! [`contract`] is what the plugin and the agent say to each other; the agent
//! compiles it too (`mesh_agent::workload::cni`). The crate is small on purpose: a
//! plugin runs as root on every node, so it links serde and httparse, no runtime.

pub mod client;
pub mod contract;
pub mod env;
pub mod install;
pub mod plugin;
pub mod spec;
