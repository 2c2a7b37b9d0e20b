//! Workload identity and agent-to-agent mTLS.
//!
//! Every workload this node hosts gets a SPIFFE identity
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) and a short-lived certificate
//! from the control plane's CA. The pieces, in the order a connection meets them:
//!
//! - [`WorkloadKey`]: a P-256 key made here and kept in memory; only its CSR leaves.
//! - [`CertManager`]: gets each identity's certificate through a [`CertificateSigner`],
//!   renews it at a fraction of its lifetime, retries with backoff.
//! - [`WorkloadIdentity`]: the identity's current certificate, swapped atomically.
//! - [`TrustBundle`]: the roots peers must chain to, swappable at run time.
//! - [`TrustAnchor`]: the root given out of band; the control plane's certificate
//!   and every new trust bundle must chain to it (no trust on first use).
//! - [`TlsConfigs`]: TLS 1.3 client/server configurations that check SPIFFE IDs,
//!   not DNS names; [`peer_identity`] reads the peer's ID after the handshake.
//! - [`Clock`]: time, injectable so tests run renewals under paused tokio time.

pub mod anchor;
mod cert;
mod clock;
mod error;
mod key;
mod manager;
pub mod signer;
mod spiffe;
mod tls;
mod trust;
mod verified;
mod verify;

pub use anchor::{AnchorError, TrustAnchor};
pub use cert::{WorkloadCert, WorkloadIdentity};
pub use clock::{Clock, TokioClock};
pub use error::IdentityError;
pub use key::WorkloadKey;
pub use manager::{
    CertManager, CertificateRequest, CertificateSigner, RenewalConfig, SignFuture, SignedCertificate,
    SignerError,
};
pub use mesh_api::spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
pub use spiffe::{
    identity_error_of, peer_identity, peer_identity_of_stream, server_identity_of_stream, spiffe_id_from_cert,
};
pub use tls::{ALPN_H2, ALPN_MESH_HTTP, TlsConfigs};
pub use trust::TrustBundle;

#[cfg(test)]
pub(crate) mod test_ca;
#[cfg(test)]
mod tests;
