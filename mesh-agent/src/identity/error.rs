//! Errors of the identity module.

use mesh_api::spiffe::SpiffeIdError;

/// Why an identity operation failed: a certificate is unusable, a peer is not who it
/// should be, or the CA's answer does not fit the request.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The certificate could not be parsed.
    #[error("unparsable certificate: {0}")]
    BadCertificate(String),
    /// The certificate has no URI SAN, or more than one (an X509-SVID has exactly one).
    #[error("certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    UriSanCount(usize),
    /// The URI SAN is not a workload SPIFFE ID.
    #[error("certificate URI SAN: {0}")]
    NotSpiffe(#[from] SpiffeIdError),
    /// The peer proved an identity other than the one the connection was meant for.
    #[error("peer is {found}, expected {expected}")]
    UnexpectedPeer {
        /// The identity the caller asked for.
        expected: String,
        /// The identity the peer's certificate carries.
        found: String,
    },
    /// The peer's identity is in another trust domain.
    #[error("peer {found} is outside trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The peer's identity.
        found: String,
        /// The local trust domain.
        trust_domain: String,
    },
    /// The connection has no peer certificate (no handshake yet, or no client auth).
    #[error("no peer certificate")]
    NoPeerCertificate,
    /// A trust bundle must hold at least one root, or nothing would verify.
    #[error("trust bundle has no usable root certificate")]
    EmptyTrustBundle,
    /// PEM input could not be decoded.
    #[error("PEM: {0}")]
    Pem(String),
    /// The issued certificate does not fit the request (wrong identity, wrong key, or
    /// not chained to the trust bundle).
    #[error("issued certificate rejected: {0}")]
    BadIssuance(String),
    /// The CA (through the [`super::CertificateSigner`]) did not issue.
    #[error("certificate request: {0}")]
    Signer(#[from] super::manager::SignerError),
    /// A configuration value is out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// Key or CSR generation failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    /// rustls refused a certificate, key or configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}
