//! The control-plane API shared by `mesh-control` and `mesh-agent`.
//!
//! The `.proto` files under `proto/` are the contract; this crate only exposes the
//! generated messages and the tonic clients/servers so both sides compile against
//! the same definitions.

#![allow(clippy::all, missing_docs)]

/// `mesh.v1`: discovery and certificate services.
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

pub use v1::*;

pub mod edges;
pub mod limits;
pub mod routes;
pub mod spiffe;
