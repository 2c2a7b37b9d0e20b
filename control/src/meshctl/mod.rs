//! `meshctl`: the operator's view of a running mesh.
//!
//! Reads the control plane's gRPC `Discovery.Agents` call and the admin endpoints of
//! the control plane (`/config_dump`) and of the agents (`/stats`, `/ready`,
//! `/config_dump`, `/workloads`); it changes nothing there. `meshctl dashboard`
//! prints the URL of the control plane's live service graph. `meshctl agent ...` is the
//! exception: it sends the requests that change a node's agent (enrol, log level,
//! drain) over the agent's root-only admin socket ([`agent_socket`]); `meshctl install
//! --apply` is the other: it applies the install manifests to the kubeconfig's
//! cluster ([`apply`]). Each command gathers a serialisable
//! report ([`status::StatusReport`], [`explain::Explanation`], ...) and renders it
//! as aligned text or JSON, so rendering is tested from fixture JSON without a mesh.

pub mod agent_socket;
pub mod apply;
pub mod certs;
pub mod check;
pub mod cli;
pub mod client;
pub mod dashboard;
pub mod error;
pub mod explain;
pub mod http;
pub mod install;
pub mod kubeconfig;
pub mod precheck;
pub mod routes;
pub mod services;
pub mod status;
pub mod table;
pub mod version;
pub mod views;
pub mod workloads;

#[cfg(test)]
mod fixtures;

pub use cli::{Cli, Output, Rendered, run};
pub use error::MeshctlError;
