//! The mesh's certificate authority.
//!
//! [`Ca`] holds the signing key — a self-signed root, or an intermediate under
//! a root the operator keeps — persisted through a [`CaStore`] so the trust
//! root survives restarts. It signs PKCS#10 requests whose key never left the
//! agent, for exactly the SPIFFE ID the requester was authorized for.
//! [`CertificatesService`] exposes it over gRPC after authenticating the node
//! ([`NodeAuthenticator`]) and authorizing the identity ([`IdentityAuthorizer`]).

mod auth;
mod authority;
mod csr;
mod error;
mod service;
mod store;

pub use auth::{
    AuthError, AuthFuture, IdentityAuthorizer, NodeAuthenticator, StaticAuthorizer, TokenFileAuthenticator,
};
pub use authority::{
    BACKDATE, Ca, CaConfig, CaMode, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_MAX_TTL, DEFAULT_ROOT_VALIDITY,
    DEFAULT_TTL, IssuedCertificate,
};
pub use csr::MAX_CSR_PEM_LEN;
pub use error::{CaError, SignError};
pub use mesh_api::spiffe::SpiffeId;
pub use service::{CertificatesService, SignCounts};
pub use store::{CERT_FILE, CaKeyMaterial, CaStore, FileStore, KEY_FILE, StoreError, StoreFuture};

#[cfg(test)]
mod tests;
