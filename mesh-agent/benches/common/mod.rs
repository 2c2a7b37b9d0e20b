//! What the benchmarks share: a throwaway CA issuing hour-long workload
//! certificates, as the control plane's CA would.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_agent::identity::{SpiffeId, WorkloadCert, WorkloadIdentity, WorkloadKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A throwaway CA issuing hour-long workload certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub root: CertificateDer<'static>,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap().der().clone();
        Ca { issuer: Issuer::new(params, key), root }
    }

    /// An identity holding a certificate for `id`, valid from a minute ago for an hour.
    pub fn identity(&self, id: &SpiffeId) -> Arc<WorkloadIdentity> {
        let key = WorkloadKey::generate().unwrap();
        let csr = CertificateSigningRequestParams::from_pem(&key.csr_pem(id).unwrap()).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(3600)).into();
        let pem = params.signed_by(&csr.public_key, &self.issuer).unwrap().pem();
        let chain = vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
        let identity = WorkloadIdentity::new(id.clone());
        identity.install(WorkloadCert::new(chain, &key).unwrap()).unwrap();
        identity
    }
}
