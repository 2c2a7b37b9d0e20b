//! The mesh control plane: registry sources merged into versioned snapshots,
//! the discovery stream to agents, and the CA.
//!
//! Data flow: each [`registry::Source`] publishes its complete view ->
//! [`snapshot::SnapshotBuilder`] merges them into one versioned snapshot (giving
//! services with hostnames and no VIP one from [`dns_vips`]) ->
//! [`discovery::DiscoveryService`] streams it to every authenticated agent (over
//! [`tls`], with a certificate from the [`ca`]) and records their ACKs/NACKs ->
//! [`admin`] shows it all. With [`federation`], peer clusters' exported services
//! arrive as one more source each, and ours are served to them.

pub mod admin;
pub mod agent_book;
pub mod ca;
pub mod dashboard;
pub mod discovery;
pub mod dns_vips;
pub mod federation;
pub mod health;
pub mod identity;
pub mod json;
pub mod meshctl;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod tls;
