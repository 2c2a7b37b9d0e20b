//! The mesh's certificate authority.
//!
//! [`Ca`] holds the signing key — a self-signed root, or an intermediate under
//! a root the operator keeps — persisted through a [`CaStore`] (a directory,
//! or a Kubernetes Secret in a cluster) so the trust root survives restarts.
//! It signs PKCS#10 requests whose key never left the agent, for exactly the
//! SPIFFE ID the requester was authorized for.
//! [`CertificatesService`] exposes it over gRPC after authenticating the node
//! ([`NodeAuthenticator`]: bootstrap tokens, or service-account tokens through
//! a Kubernetes TokenReview) and authorizing the identity ([`IdentityAuthorizer`]).
//! The CA also issues the control plane's own serving certificate ([`serving`]),
//! rotates its root with a cross-signature agents can check ([`rotation`]), and
//! publishes its roots for agents to anchor on ([`publish`]).

mod auth;
mod authority;
mod csr;
mod error;
pub mod publish;
pub mod rotation;
mod sealed;
mod secret_store;
mod service;
pub mod serving;
mod store;
mod token_review;

pub use auth::{
    AuthError, AuthFuture, FirstOf, IdentityAuthorizer, NodeAuthenticator, StaticAuthorizer,
    TokenFileAuthenticator, authenticate_request,
};
pub(crate) use auth::{bearer_token, constant_time_eq};
pub use authority::{
    BACKDATE, Ca, CaConfig, CaMode, DEFAULT_INTERMEDIATE_VALIDITY, DEFAULT_MAX_TTL, DEFAULT_ROOT_VALIDITY,
    DEFAULT_TTL, IssuedCertificate,
};
pub use csr::MAX_CSR_PEM_LEN;
pub use error::{CaError, SignError};
pub use mesh_api::spiffe::SpiffeId;
pub use sealed::{SealError, SealedStore, Sealer, SealingKey};
pub use secret_store::SecretStore;
pub use service::{CertificatesService, SignCounts};
pub use store::{
    CERT_FILE, CROSS_SIGNED_FILE, CaKeyMaterial, CaStore, FileStore, KEY_FILE, PREVIOUS_ROOTS_FILE,
    StoreError, StoreFuture,
};
pub use token_review::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL, NODE_NAME_EXTRA, TokenReviewAuthenticator, TokenReviewConfig,
};

#[cfg(test)]
mod kube_tests;
#[cfg(test)]
mod tests;
