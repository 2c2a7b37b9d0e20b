//! Reading a workload's SPIFFE ID from its certificate.

use mesh_api::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::error::IdentityError;

/// The SPIFFE ID in `cert`'s URI SAN. Exactly one URI SAN is required (other SAN
/// types are allowed and ignored), as the X509-SVID specification demands.
pub fn spiffe_id_from_cert(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = parsed.subject_alternative_name().map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok(uri.parse()?),
        other => Err(IdentityError::UriSanCount(other.len())),
    }
}

/// The SPIFFE ID the peer of `conn` proved in its handshake (a client's on a server
/// connection, the server's on a client connection).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<SpiffeId, IdentityError> {
    let leaf =
        conn.peer_certificates().and_then(|certs| certs.first()).ok_or(IdentityError::NoPeerCertificate)?;
    spiffe_id_from_cert(leaf)
}

/// The identity check that failed a handshake, if that is why `err` (from a tokio-rustls
/// connect or accept) happened; `None` for other failures (bad chain, I/O ...). Lets
/// the data path log and count identity mismatches apart from other TLS errors.
pub fn identity_error_of(err: &std::io::Error) -> Option<&IdentityError> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<IdentityError>()
        }
        _ => None,
    }
}

/// [`peer_identity`] of an accepted tokio-rustls stream.
pub fn peer_identity_of_stream<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> Result<SpiffeId, IdentityError> {
    peer_identity(stream.get_ref().1)
}

/// [`peer_identity`] of a connected tokio-rustls stream.
pub fn server_identity_of_stream<IO>(
    stream: &tokio_rustls::client::TlsStream<IO>,
) -> Result<SpiffeId, IdentityError> {
    peer_identity(stream.get_ref().1)
}
