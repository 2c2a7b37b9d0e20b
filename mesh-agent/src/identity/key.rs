//! Workload keys and certificate signing requests.
//!
//! Each workload identity gets its own ECDSA P-256 key, made in this process;
//! only the CSR (public key + SPIFFE ID) leaves it. A new key is made for
//! every renewal, so a leaked key stops being useful at the next rotation.

use mesh_api::spiffe::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::error::IdentityError;

/// A private key held only in memory.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<WorkloadKey, IdentityError> {
        Ok(WorkloadKey { key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)? })
    }

    /// A PEM PKCS#10 request for `id`: the SPIFFE ID as the only SAN, an empty subject.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, IdentityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// The key in the form rustls loads.
    pub(crate) fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn csr_names_the_identity_with_a_p256_key_and_a_valid_signature() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let pem = WorkloadKey::generate().unwrap().csr_pem(&id).unwrap();
        let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        assert_eq!(block.label, "CERTIFICATE REQUEST");
        let (_, csr) = X509CertificationRequest::from_der(&block.contents).unwrap();
        csr.verify_signature().unwrap();
        let spki = &csr.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(spki.algorithm.parameters.as_ref().unwrap().as_oid().unwrap(), OID_EC_P256);
        let names: Vec<String> = csr
            .requested_extensions()
            .unwrap()
            .filter_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter())
            .map(|name| match name {
                GeneralName::URI(uri) => uri.to_string(),
                other => other.to_string(),
            })
            .collect();
        assert_eq!(names, ["spiffe://cluster.local/ns/shop/sa/cart"]);
    }

    #[test]
    fn every_key_is_new() {
        let a = WorkloadKey::generate().unwrap();
        let b = WorkloadKey::generate().unwrap();
        assert_ne!(a.key.public_key_raw(), b.key.public_key_raw());
    }
}
