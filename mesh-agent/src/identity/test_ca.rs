//! A small in-process CA for the identity tests: it can issue what the real CA
//! never would (expired certificates, other trust domains, wrong identities).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use super::*;

pub(crate) struct TestCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("test CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            root: cert.der().clone(),
            root_pem: cert.pem(),
        }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// A bundle of the trust domain `cluster.local` holding this CA's root.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        TrustBundle::new("cluster.local", vec![self.root()]).unwrap()
    }

    pub fn id(&self, sa: &str) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, "shop", sa).unwrap()
    }

    /// Signs `csr_pem`'s key for `uri`, valid over [not_before, not_after].
    pub fn issue(&self, csr_pem: &str, uri: &str, not_before: SystemTime, not_after: SystemTime) -> String {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.signed_by(&csr.public_key, &self.issuer).unwrap().pem()
    }

    /// An identity holding a certificate for `id` valid over [not_before, not_after].
    pub fn identity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Arc<WorkloadIdentity> {
        let key = WorkloadKey::generate().unwrap();
        let pem = self.issue(&key.csr_pem(id).unwrap(), &id.to_string(), not_before, not_after);
        let chain = trust::parse_pem_certs(&[pem]).unwrap();
        let identity = WorkloadIdentity::new(id.clone());
        identity.install(WorkloadCert::new(chain, &key).unwrap()).unwrap();
        identity
    }

    /// An identity valid from a minute ago for an hour.
    pub fn fresh(&self, id: &SpiffeId) -> Arc<WorkloadIdentity> {
        let now = SystemTime::now();
        self.identity(id, now - Duration::from_secs(60), now + Duration::from_secs(3600))
    }
}

/// A [`CertificateSigner`] over a [`TestCa`] that records when it was called and can be
/// told to fail or to certify the wrong identity.
pub(crate) struct TestSigner {
    pub ca: TestCa,
    pub clock: Arc<dyn Clock>,
    pub ttl: Duration,
    /// Wall times of every call.
    pub calls: watch::Sender<Vec<SystemTime>>,
    /// How many upcoming calls fail.
    pub failures: AtomicU32,
    /// How many upcoming calls certify another identity.
    pub wrong_identity: AtomicU32,
}

impl TestSigner {
    pub fn new(ca: TestCa, clock: Arc<dyn Clock>, ttl: Duration) -> Arc<TestSigner> {
        Arc::new(TestSigner {
            ca,
            clock,
            ttl,
            calls: watch::Sender::new(Vec::new()),
            failures: AtomicU32::new(0),
            wrong_identity: AtomicU32::new(0),
        })
    }

    /// Waits until the signer has been called `n` times; returns the call times.
    pub async fn wait_for_calls(&self, n: usize) -> Vec<SystemTime> {
        self.calls.subscribe().wait_for(|calls| calls.len() >= n).await.unwrap().clone()
    }

    fn take(counter: &AtomicU32) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

impl CertificateSigner for TestSigner {
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        Box::pin(async move {
            let now = self.clock.now();
            self.calls.send_modify(|calls| calls.push(now));
            if TestSigner::take(&self.failures) {
                return Err(SignerError("CA unavailable".into()));
            }
            let uri = if TestSigner::take(&self.wrong_identity) {
                self.ca.id("someone-else").to_string()
            } else {
                request.id.to_string()
            };
            let leaf = self.ca.issue(&request.csr_pem, &uri, now, now + self.ttl);
            Ok(SignedCertificate { chain_pem: vec![leaf], trust_bundle_pem: vec![self.ca.root_pem.clone()] })
        })
    }
}
