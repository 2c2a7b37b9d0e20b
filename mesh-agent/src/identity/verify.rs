//! Certificate verifiers that check SPIFFE identities instead of DNS names.
//!
//! Both check the chain against the current [`TrustBundle`] (validity at the
//! handshake's time, the usage, the path to a root; a chain that has led to a root
//! of the current roots before is not walked again, see [`super::verified`]). The client side then
//! requires the server to be exactly the identity the connection was meant
//! for; the server side requires the client to be in the local trust domain or a
//! federated one (checked against that domain's roots only) and leaves the
//! who-may-call decision to authorization policy, which admits another trust
//! domain's callers only by name.

use std::sync::{Arc, LazyLock};

use mesh_api::spiffe::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use super::error::IdentityError;
use super::spiffe::spiffe_id_from_cert;
use super::trust::TrustBundle;
use super::verified::VerifiedChains;

/// The ring provider's signature algorithms, looked up once.
pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
        LazyLock::new(|| rustls::crypto::ring::default_provider().signature_verification_algorithms);
    *ALGORITHMS
}

/// Turns an identity mismatch into the rustls error that aborts the handshake.
fn reject(err: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    // The configurations offer TLS 1.3 only; reaching this is a configuration bug.
    Err(rustls::Error::General("TLS 1.2 is not used between agents".into()))
}

/// Verifies the server of an outgoing connection: chained to the bundle and exactly
/// `expected`. The server name is ignored.
#[derive(Debug)]
pub(crate) struct ServerIdentityVerifier {
    pub bundle: Arc<TrustBundle>,
    pub expected: SpiffeId,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The roots of the trust domain the connection is meant for: a federated
        // cluster's server is checked against that cluster's roots alone.
        let snapshot = self.bundle.snapshot_for(self.expected.trust_domain()).ok_or_else(|| {
            reject(IdentityError::ForeignTrustDomain {
                found: self.expected.to_string(),
                trust_domain: self.bundle.trust_domain().to_owned(),
            })
        })?;
        let key = VerifiedChains::key(end_entity, intermediates);
        if !snapshot.server_verified.contains(&key, now) {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &snapshot.roots,
                intermediates,
                now,
                algorithms().all,
            )?;
            snapshot.server_verified.insert(key, end_entity, intermediates);
        }
        let found = spiffe_id_from_cert(end_entity).map_err(reject)?;
        if found != self.expected {
            return Err(reject(IdentityError::UnexpectedPeer {
                expected: self.expected.to_string(),
                found: found.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies the client of an incoming connection: a certificate is required, with a
/// SPIFFE ID of the local trust domain or a federated one, chained to the roots of
/// that trust domain.
#[derive(Debug)]
pub(crate) struct ClientIdentityVerifier {
    pub bundle: Arc<TrustBundle>,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the bundle can change at any time, and every client of the mesh has
    /// exactly one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The ID is read before the chain is checked only to pick the roots; nothing
        // is believed until the chain to that domain's roots verifies.
        let claimed = spiffe_id_from_cert(end_entity).map_err(reject)?;
        let snapshot = self.bundle.snapshot_for(claimed.trust_domain()).ok_or_else(|| {
            reject(IdentityError::ForeignTrustDomain {
                found: claimed.to_string(),
                trust_domain: self.bundle.trust_domain().to_owned(),
            })
        })?;
        let key = VerifiedChains::key(end_entity, intermediates);
        if !snapshot.client_verified.contains(&key, now) {
            snapshot.client_chain.verify_client_cert(end_entity, intermediates, now)?;
            snapshot.client_verified.insert(key, end_entity, intermediates);
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
