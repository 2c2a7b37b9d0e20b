//! A workload's current certificate, swapped atomically on renewal.
//!
//! [`WorkloadIdentity`] is what TLS configurations hold: each handshake reads
//! the certificate current at that moment (one atomic load), so a renewal
//! reaches new connections at once while established ones keep the session
//! they negotiated.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use mesh_api::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::error::IdentityError;
use super::key::WorkloadKey;
use super::spiffe::spiffe_id_from_cert;

/// A certificate chain with its private key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCert {
    /// Pairs `chain` (leaf first, then intermediates) with `key`, checking that the leaf
    /// certifies that key and carries a SPIFFE ID.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &WorkloadKey,
    ) -> Result<WorkloadCert, IdentityError> {
        let leaf =
            chain.first().ok_or_else(|| IdentityError::BadIssuance("empty certificate chain".into()))?;
        let id = spiffe_id_from_cert(leaf)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let to_time = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        let not_before = to_time(parsed.validity().not_before.timestamp());
        let not_after = to_time(parsed.validity().not_after.timestamp());
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider.key_provider.load_private_key(key.private_key_der())?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified
            .keys_match()
            .map_err(|_| IdentityError::BadIssuance("the certificate is for another key".into()))?;
        Ok(WorkloadCert { id, certified: Arc::new(certified), not_before, not_after })
    }

    /// The identity the certificate proves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When `fraction` (0..=1) of the validity period has passed.
    pub fn renewal_time(&self, fraction: f64) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + lifetime.mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// One workload identity and its current certificate (none until first issued).
#[derive(Debug)]
pub struct WorkloadIdentity {
    id: SpiffeId,
    current: ArcSwapOption<WorkloadCert>,
    /// Counts installs, so callers can wait for the first or the next certificate.
    generation: watch::Sender<u64>,
}

impl WorkloadIdentity {
    /// An identity without a certificate yet.
    pub fn new(id: SpiffeId) -> Arc<WorkloadIdentity> {
        Arc::new(WorkloadIdentity { id, current: ArcSwapOption::empty(), generation: watch::Sender::new(0) })
    }

    /// The identity.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate new handshakes use, if one was issued.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.load_full()
    }

    /// Makes `cert` the one new handshakes present. Refuses a certificate for another
    /// identity.
    pub fn install(&self, cert: WorkloadCert) -> Result<(), IdentityError> {
        if cert.id != self.id {
            return Err(IdentityError::BadIssuance(format!(
                "certificate is for {}, not {}",
                cert.id, self.id
            )));
        }
        self.current.store(Some(Arc::new(cert)));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Waits until a certificate is installed and returns it.
    pub async fn ready(&self) -> Arc<WorkloadCert> {
        let mut updates = self.generation.subscribe();
        loop {
            if let Some(cert) = self.current() {
                return cert;
            }
            // The sender lives in `self`, so this cannot fail while we are borrowed.
            let _ = updates.changed().await;
        }
    }

    /// A receiver that wakes on every install (the value counts installs).
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|cert| cert.certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for WorkloadIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for WorkloadIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified_key()
    }
}
