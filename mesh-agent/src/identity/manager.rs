//! Keeping every hosted workload's certificate fresh.
//!
//! [`CertManager`] runs one renewal task per identity: make a key and a CSR,
//! have the [`CertificateSigner`] (the CA over gRPC in the agent) sign it,
//! check the answer, install it, sleep until a fraction of its lifetime has
//! passed, repeat. Failures are retried with exponential backoff and jitter
//! while the current certificate stays in use.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_api::spiffe::SpiffeId;
use rustls::pki_types::UnixTime;
use rustls::server::ParsedCertificate;
use tokio_util::sync::CancellationToken;

use super::cert::{WorkloadCert, WorkloadIdentity};
use super::clock::Clock;
use super::error::IdentityError;
use super::key::WorkloadKey;
use super::tls::TlsConfigs;
use super::trust::{self, TrustBundle};
use super::verify::algorithms;

/// What the manager asks the CA for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRequest {
    /// The identity to certify.
    pub id: SpiffeId,
    /// PEM PKCS#10 request carrying the new public key and `id`.
    pub csr_pem: String,
    /// Requested lifetime; `None` lets the CA choose.
    pub ttl: Option<Duration>,
}

/// What the CA answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCertificate {
    /// PEM certificates, leaf first, then intermediates.
    pub chain_pem: Vec<String>,
    /// PEM roots; when not empty they replace the trust bundle.
    pub trust_bundle_pem: Vec<String>,
}

/// A failed signing attempt (transport error, refusal ...), retried by the manager.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SignerError(pub Box<dyn std::error::Error + Send + Sync>);

/// The future a [`CertificateSigner`] returns.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<SignedCertificate, SignerError>> + Send + 'a>>;

/// Gets a CSR signed. The agent's implementation calls `Certificates.Sign`; tests use an
/// in-process CA.
pub trait CertificateSigner: Send + Sync + 'static {
    /// Signs `request`.
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_>;
}

/// When to renew and how to retry.
#[derive(Debug, Clone)]
pub struct RenewalConfig {
    /// Renew when this fraction of the certificate's lifetime has passed (0 < f <= 1).
    pub renew_fraction: f64,
    /// Lifetime to request; `None` takes the CA's default.
    pub ttl: Option<Duration>,
    /// First retry delay after a failure (also the shortest time between renewals).
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for RenewalConfig {
    fn default() -> RenewalConfig {
        RenewalConfig {
            renew_fraction: 0.8,
            ttl: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(120),
        }
    }
}

impl RenewalConfig {
    fn validate(&self) -> Result<(), IdentityError> {
        if !(self.renew_fraction > 0.0 && self.renew_fraction <= 1.0) {
            return Err(IdentityError::Config(format!(
                "renew_fraction must be in (0, 1], not {}",
                self.renew_fraction
            )));
        }
        if self.initial_backoff.is_zero() || self.initial_backoff > self.max_backoff {
            return Err(IdentityError::Config(format!(
                "initial_backoff {:?} must be above zero and at most max_backoff {:?}",
                self.initial_backoff, self.max_backoff
            )));
        }
        Ok(())
    }

    /// The delay before retry number `failures + 1`: doubling from `initial_backoff` up
    /// to `max_backoff`, then a random point in its upper half so that agents that failed
    /// together do not retry together.
    fn backoff(&self, failures: u32) -> Duration {
        let doubled = self.initial_backoff.saturating_mul(1u32 << failures.min(20));
        let ceiling = doubled.min(self.max_backoff);
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }
}

/// What every renewal task shares.
struct Shared {
    signer: Arc<dyn CertificateSigner>,
    bundle: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    config: RenewalConfig,
}

struct Managed {
    identity: Arc<WorkloadIdentity>,
    stop: CancellationToken,
}

/// The certificates of the workloads this node hosts. Dropping it stops all renewals.
pub struct CertManager {
    shared: Arc<Shared>,
    tls: TlsConfigs,
    managed: Mutex<HashMap<SpiffeId, Managed>>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").field("identities", &self.identities()).finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager signing through `signer`, verifying against (and updating) `bundle`,
    /// timing with `clock`.
    pub fn new(
        signer: Arc<dyn CertificateSigner>,
        bundle: Arc<TrustBundle>,
        clock: Arc<dyn Clock>,
        config: RenewalConfig,
    ) -> Result<CertManager, IdentityError> {
        config.validate()?;
        let tls = TlsConfigs::new(bundle.clone(), clock.clone());
        Ok(CertManager {
            shared: Arc::new(Shared { signer, bundle, clock, config }),
            tls,
            managed: Mutex::new(HashMap::new()),
        })
    }

    /// The handle of `id`, starting its renewal task on first use (call within a tokio
    /// runtime). The certificate arrives asynchronously: await
    /// [`WorkloadIdentity::ready`] before the first handshake.
    pub fn identity(&self, id: &SpiffeId) -> Result<Arc<WorkloadIdentity>, IdentityError> {
        if id.trust_domain() != self.shared.bundle.trust_domain() {
            return Err(IdentityError::ForeignTrustDomain {
                found: id.to_string(),
                trust_domain: self.shared.bundle.trust_domain().to_owned(),
            });
        }
        let mut managed = self.managed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = managed.get(id) {
            return Ok(existing.identity.clone());
        }
        let identity = WorkloadIdentity::new(id.clone());
        let stop = CancellationToken::new();
        tokio::spawn(renew(self.shared.clone(), identity.clone(), stop.clone()));
        managed.insert(id.clone(), Managed { identity: identity.clone(), stop });
        Ok(identity)
    }

    /// Stops renewing `id` (its workload left the node). Connections and handles keep
    /// the last certificate until it expires. Returns whether `id` was managed.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        let removed = self.managed.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        removed.map(|m| m.stop.cancel()).is_some()
    }

    /// The identities being renewed.
    pub fn identities(&self) -> Vec<SpiffeId> {
        self.managed.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// The trust bundle (updated from the CA's answers).
    pub fn trust_bundle(&self) -> &Arc<TrustBundle> {
        &self.shared.bundle
    }

    /// TLS configurations over this manager's bundle and clock.
    pub fn tls(&self) -> &TlsConfigs {
        &self.tls
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for managed in self.managed.get_mut().unwrap_or_else(|e| e.into_inner()).values() {
            managed.stop.cancel();
        }
    }
}

/// The renewal task of one identity.
async fn renew(shared: Arc<Shared>, identity: Arc<WorkloadIdentity>, stop: CancellationToken) {
    let config = &shared.config;
    let mut failures = 0u32;
    loop {
        let result = issue(&shared, identity.id()).await.and_then(|cert| {
            let renew_at = cert.renewal_time(config.renew_fraction);
            let not_after = cert.not_after();
            identity.install(cert)?;
            Ok((renew_at, not_after))
        });
        let wait = match result {
            Ok((renew_at, not_after)) => {
                failures = 0;
                tracing::info!(identity = %identity.id(), ?not_after, ?renew_at, "installed certificate");
                // A floor keeps a CA that issues very short certificates from being hammered.
                renew_at.duration_since(shared.clock.now()).unwrap_or_default().max(config.initial_backoff)
            }
            Err(error) => {
                let delay = config.backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(
                    identity = %identity.id(), %error, retry_in = ?delay, failures,
                    "certificate request failed; the current certificate stays in use"
                );
                delay
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = shared.clock.sleep(wait) => {}
        }
    }
}

/// One issuance: new key, CSR, signature, and checks of the answer.
async fn issue(shared: &Shared, id: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
    let key = WorkloadKey::generate()?;
    let csr_pem = key.csr_pem(id)?;
    let request = CertificateRequest { id: id.clone(), csr_pem, ttl: shared.config.ttl };
    let signed = shared.signer.sign(request).await?;

    let chain = trust::parse_pem_certs(&signed.chain_pem)?;
    let cert = WorkloadCert::new(chain, &key)?;
    if cert.id() != id {
        return Err(IdentityError::BadIssuance(format!("certificate is for {}, not {id}", cert.id())));
    }
    // The chain must verify against the roots that come with it (or the current ones),
    // or peers would refuse it; a new bundle is installed only with a good certificate.
    let new_roots = if signed.trust_bundle_pem.is_empty() {
        None
    } else {
        Some(Arc::new(trust::snapshot(trust::parse_pem_certs(&signed.trust_bundle_pem)?)?))
    };
    let roots = new_roots.clone().unwrap_or_else(|| shared.bundle.snapshot());
    let leaf = ParsedCertificate::try_from(&cert.chain()[0])?;
    let now = UnixTime::since_unix_epoch(
        shared.clock.now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default(),
    );
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &roots.roots,
        &cert.chain()[1..],
        now,
        algorithms().all,
    )
    .map_err(|e| {
        IdentityError::BadIssuance(format!("chain does not verify against the trust bundle: {e}"))
    })?;
    if let Some(roots) = new_roots
        && roots.ders != shared.bundle.roots()
    {
        tracing::info!(roots = roots.ders.len(), "trust bundle updated by the CA");
        shared.bundle.install(roots);
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_in_the_upper_half() {
        let config = RenewalConfig {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            ..RenewalConfig::default()
        };
        for (failures, ceiling) in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (40, 60)] {
            let ceiling = Duration::from_secs(ceiling);
            for _ in 0..50 {
                let delay = config.backoff(failures);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{failures}: {delay:?} outside {ceiling:?}"
                );
            }
        }
    }

    #[test]
    fn refuses_meaningless_settings() {
        for config in [
            RenewalConfig { renew_fraction: 0.0, ..RenewalConfig::default() },
            RenewalConfig { renew_fraction: 1.5, ..RenewalConfig::default() },
            RenewalConfig { renew_fraction: f64::NAN, ..RenewalConfig::default() },
            RenewalConfig { initial_backoff: Duration::ZERO, ..RenewalConfig::default() },
            RenewalConfig {
                initial_backoff: Duration::from_secs(10),
                max_backoff: Duration::from_secs(1),
                ..RenewalConfig::default()
            },
        ] {
            assert!(config.validate().is_err(), "{config:?}");
        }
        RenewalConfig::default().validate().unwrap();
    }
}
