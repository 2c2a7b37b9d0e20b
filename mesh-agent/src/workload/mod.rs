//! Workloads the agent serves. Pods arrive from the `mesh-cni` plugin ([`cni`], over
//! the agent's unix socket through [`cni_http`]) and are kept across restarts in
//! [`store`].

pub mod cni;
pub mod cni_http;
pub mod store;
