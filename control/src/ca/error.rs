//! The CA's errors: why it could not start, and why it refused to sign.

use super::store::StoreError;

/// Why the CA could not open (load or create) its signing key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The configured trust domain is not a valid SPIFFE trust domain.
    #[error("trust domain: {0}")]
    TrustDomain(#[from] mesh_api::spiffe::SpiffeIdError),
    /// The configured lifetimes make no sense (zero, or default above maximum).
    #[error("certificate lifetimes: {0}")]
    Lifetimes(String),
    /// Loading or saving through the store failed.
    #[error("CA store: {0}")]
    Store(#[from] StoreError),
    /// The user-supplied root for intermediate mode could not be read.
    #[error("reading {path}: {source}")]
    ReadRoot {
        /// The root certificate or key file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A stored or supplied certificate or key is not usable.
    #[error("{what}: {reason}")]
    BadMaterial {
        /// Which material ("stored CA certificate", "root key" ...).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored CA was made for another trust domain; using it would issue identities
    /// under a root that agents of this domain were not told about.
    #[error("the stored CA belongs to trust domain {stored:?}, but {configured:?} is configured")]
    TrustDomainMismatch {
        /// The trust domain in the stored CA certificate.
        stored: String,
        /// The configured trust domain.
        configured: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating CA material: {0}")]
    Generate(#[from] rcgen::Error),
    /// The root cannot be rotated as asked.
    #[error("root rotation: {0}")]
    Rotation(String),
}

/// Why the CA refused to sign a request. Nothing is signed when any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The PEM is larger than the CA accepts.
    #[error("CSR is {len} bytes, more than the {max} accepted")]
    TooLarge {
        /// Size of the submitted PEM.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input is not one PEM `CERTIFICATE REQUEST` block.
    #[error("not a PEM certificate request: {0}")]
    MalformedPem(String),
    /// The PEM holds something that is not a PKCS#10 request.
    #[error("malformed PKCS#10 request: {0}")]
    MalformedCsr(String),
    /// The request's signature does not verify with its own key: either it was altered or
    /// the requester does not hold the private key.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// The key is not ECDSA P-256, the only kind the mesh issues for.
    #[error("CSR key is {0}; only ECDSA P-256 is accepted")]
    UnsupportedKey(String),
    /// The identity belongs to another trust domain than the CA's.
    #[error("identity {requested} is outside trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The identity asked for.
        requested: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The CSR's subject alternative names are not exactly the expected SPIFFE ID.
    #[error("CSR names {found:?}, but exactly [{expected}] is required")]
    IdentityMismatch {
        /// The SPIFFE ID the request was authorized for.
        expected: String,
        /// Every SAN the CSR carries.
        found: Vec<String>,
    },
    /// Building or signing the certificate failed (a CA-side fault).
    #[error("issuing certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

impl SignError {
    /// The gRPC status code a caller gets: the request is malformed (`InvalidArgument`),
    /// asks for an identity it may not have (`PermissionDenied`), or the CA failed
    /// (`Internal`).
    pub fn code(&self) -> tonic::Code {
        match self {
            SignError::TooLarge { .. }
            | SignError::MalformedPem(_)
            | SignError::MalformedCsr(_)
            | SignError::BadSignature
            | SignError::UnsupportedKey(_) => tonic::Code::InvalidArgument,
            SignError::ForeignTrustDomain { .. } | SignError::IdentityMismatch { .. } => {
                tonic::Code::PermissionDenied
            }
            SignError::Issue(_) => tonic::Code::Internal,
        }
    }
}

impl From<SignError> for tonic::Status {
    fn from(err: SignError) -> tonic::Status {
        tonic::Status::new(err.code(), err.to_string())
    }
}
