//! TLS on the control plane's gRPC listener.
//!
//! Agents send their node credential on every call and take routing data and trust
//! roots from the answers, so the channel must be private and the control plane
//! must be who it claims: the listener serves TLS 1.3 with a certificate the mesh
//! CA issues for the names and addresses agents dial ([`names`]), and agents verify
//! it against the CA's root given to them out of band (`--control-plane-ca`). The
//! key is made here and never stored; the certificate is renewed at two thirds of
//! its life and swapped under the listener without a restart ([`ServingCert`]).
//! Connections are accepted and their handshakes bounded here ([`accept`]), then
//! handed to tonic, whose own TLS features would add another crypto provider.

pub mod accept;
pub mod names;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::KeyPair;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::ca::Ca;
use crate::ca::serving::ServingNames;

/// The ALPN protocol gRPC runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// The shortest wait between two renewals, so a CA issuing very short certificates (or
/// failing) is not asked in a loop.
const MIN_RENEWAL_WAIT: Duration = Duration::from_secs(1);

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no name or address to issue the serving certificate for; pass --tls-san")]
    NoNames,
    #[error("generating the serving key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("issuing the serving certificate: {0}")]
    Issue(#[from] crate::ca::SignError),
    #[error("loading the serving certificate: {0}")]
    Load(String),
}

/// The certificate the listener presents, swapped whole on renewal: handshakes take
/// whichever is current; established connections keep theirs.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    not_before: ArcSwap<SystemTime>,
    not_after: ArcSwap<SystemTime>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCert {
    /// A certificate for `names` from `ca`, valid for `ttl`.
    pub fn issue(ca: &Ca, names: &ServingNames, ttl: Duration) -> Result<Arc<ServingCert>, TlsError> {
        let (key, not_before, not_after) = certified(ca, names, ttl)?;
        Ok(Arc::new(ServingCert {
            current: ArcSwap::from_pointee(key),
            not_before: ArcSwap::from_pointee(not_before),
            not_after: ArcSwap::from_pointee(not_after),
        }))
    }

    /// When the current certificate stops being valid.
    pub fn not_after(&self) -> SystemTime {
        **self.not_after.load()
    }

    /// The current chain (leaf first), DER.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// Replaces the certificate with a new one (new key) for `names`.
    pub fn renew(&self, ca: &Ca, names: &ServingNames, ttl: Duration) -> Result<(), TlsError> {
        let (key, not_before, not_after) = certified(ca, names, ttl)?;
        self.current.store(Arc::new(key));
        self.not_before.store(Arc::new(not_before));
        self.not_after.store(Arc::new(not_after));
        Ok(())
    }

    /// Renews at two thirds of each certificate's life until `shutdown`; a failed
    /// renewal is retried (the current certificate stays in use meanwhile).
    pub async fn keep_renewed(
        self: Arc<Self>,
        ca: Arc<Ca>,
        names: ServingNames,
        ttl: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            let wait = renewal_wait(**self.not_before.load(), self.not_after(), SystemTime::now());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew(&ca, &names, ttl) {
                Ok(()) => {
                    crate::metrics::serving_cert_renewal(true);
                    tracing::info!(not_after = ?self.not_after(), "renewed the TLS serving certificate");
                }
                Err(e) => {
                    crate::metrics::serving_cert_renewal(false);
                    tracing::error!(error = %e, not_after = ?self.not_after(),
                        "cannot renew the TLS serving certificate; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(MIN_RENEWAL_WAIT * 10) => {}
                    }
                }
            }
        }
    }
}

/// How long to wait at `now` before renewing a certificate valid over
/// [`not_before`, `not_after`]: until two thirds of its life have passed (at least
/// [`MIN_RENEWAL_WAIT`]).
pub fn renewal_wait(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = not_before + life * 2 / 3;
    renew_at.duration_since(now).unwrap_or_default().max(MIN_RENEWAL_WAIT)
}

/// A new key and its certificate for `names`, as rustls serves them.
fn certified(
    ca: &Ca,
    names: &ServingNames,
    ttl: Duration,
) -> Result<(CertifiedKey, SystemTime, SystemTime), TlsError> {
    if names.is_empty() {
        return Err(TlsError::NoNames);
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issued = ca.issue_serving(&key, names, ttl, SystemTime::now())?;
    let mut chain = Vec::with_capacity(issued.chain_pem.len());
    for pem in &issued.chain_pem {
        chain
            .push(CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Load(e.to_string()))?);
    }
    let der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Load(e.to_string()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Load(e.to_string()))?;
    Ok((CertifiedKey::new(chain, signing), issued.not_before, issued.not_after))
}

/// The listener's TLS configuration: TLS 1.3 only, h2, certificates from `cert`. No
/// client certificate: agents authenticate with their node credential, which the
/// channel now keeps private.
pub fn server_config(cert: Arc<ServingCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Load(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_two_thirds_of_the_life_never_in_a_loop() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(renewal_wait(t0, t0 + day, t0), day * 2 / 3);
        assert_eq!(renewal_wait(t0, t0 + day, t0 + day / 3), day / 3);
        assert_eq!(
            renewal_wait(t0, t0 + day, t0 + day),
            MIN_RENEWAL_WAIT,
            "overdue: at once, but not in a loop"
        );
        assert_eq!(renewal_wait(t0, t0, t0), MIN_RENEWAL_WAIT);
    }

    #[tokio::test]
    async fn a_renewed_certificate_replaces_the_served_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::Ca::open(crate::ca::CaConfig::default(), &crate::ca::FileStore::new(dir.path()))
            .await
            .unwrap();
        let names = ServingNames { dns: vec!["mesh-control".into()], ips: vec![] };
        assert!(matches!(ServingCert::issue(&ca, &ServingNames::default(), day()), Err(TlsError::NoNames)));
        let cert = ServingCert::issue(&ca, &names, day()).unwrap();
        let first = cert.chain();
        cert.renew(&ca, &names, day()).unwrap();
        assert_ne!(cert.chain(), first);
        assert!(server_config(cert).is_ok());
    }

    fn day() -> Duration {
        Duration::from_secs(24 * 3600)
    }
}
