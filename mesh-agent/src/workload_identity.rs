//! The node's workload identity at run time: fetch the CA's trust bundle, get the
//! certificate signed, keep it renewed. Until the first certificate arrives the
//! agent still intercepts and forwards; connections that need mTLS wait for it.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    discovery::client::Backoff,
    identity::{
        CertManager, RenewalConfig, SpiffeId, TokioClock, TrustBundle, WorkloadIdentity, signer::GrpcSigner,
    },
};

/// What the data path needs for mTLS once the identity is ready.
pub struct AgentIdentity {
    pub manager: CertManager,
    pub workload: Arc<WorkloadIdentity>,
}

/// Set once, when the first certificate is installed.
pub type IdentitySlot = Arc<OnceLock<AgentIdentity>>;

/// A certificate as `/config_dump` shows it.
#[derive(Serialize)]
pub struct CertificateDump {
    pub identity: String,
    /// Unix seconds.
    pub not_after: u64,
    pub expires_in_seconds: i64,
}

/// The installed certificate, if any.
pub fn dump(slot: &IdentitySlot) -> Vec<CertificateDump> {
    let Some(ident) = slot.get() else { return Vec::new() };
    let Some(cert) = ident.workload.current() else { return Vec::new() };
    let not_after = cert.not_after().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    vec![CertificateDump {
        identity: ident.workload.id().to_string(),
        not_after,
        expires_in_seconds: not_after as i64 - now as i64,
    }]
}

/// Obtains the identity's first certificate (retrying while the control plane is
/// away) and fills `slot`; the manager keeps renewing it afterwards.
pub async fn run(
    signer: GrpcSigner,
    namespace: String,
    service_account: String,
    renewal: RenewalConfig,
    slot: IdentitySlot,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let (trust_domain, roots) = loop {
        match signer.trust_bundle().await {
            Ok(b) => break b,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot fetch the CA trust bundle");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let result = (|| {
        let id = SpiffeId::new(&trust_domain, &namespace, &service_account).map_err(|e| e.to_string())?;
        let bundle = TrustBundle::from_pem(&trust_domain, &roots).map_err(|e| e.to_string())?;
        let manager =
            CertManager::new(Arc::new(signer.clone()), bundle, Arc::new(TokioClock::new()), renewal)
                .map_err(|e| e.to_string())?;
        let workload = manager.identity(&id).map_err(|e| e.to_string())?;
        Ok::<_, String>((manager, workload))
    })();
    let (manager, workload) = match result {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "workload identity cannot be set up; mTLS is unavailable");
            return;
        }
    };
    let cert = tokio::select! {
        () = shutdown.cancelled() => return,
        c = workload.ready() => c,
    };
    let expires_in = cert.not_after().duration_since(SystemTime::now()).unwrap_or_default();
    info!(identity = %workload.id(), expires_in_s = expires_in.as_secs(), "workload certificate issued");
    let bundle = manager.trust_bundle().clone();
    let _ = slot.set(AgentIdentity { manager, workload });
    refresh_trust_bundle(&signer, &bundle, &trust_domain, roots, shutdown).await;
}

/// How often the agent asks the CA for its roots between renewals, so a new root
/// (CA rotation) is trusted by every agent before any certificate is signed by it.
pub const TRUST_BUNDLE_REFRESH: Duration = Duration::from_secs(60);

/// Polls the CA's trust bundle until `shutdown`; a changed bundle replaces the
/// current one in place (new handshakes use it; established connections are kept).
async fn refresh_trust_bundle(
    signer: &GrpcSigner,
    bundle: &TrustBundle,
    trust_domain: &str,
    mut current: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(TRUST_BUNDLE_REFRESH) => {}
        }
        match signer.trust_bundle().await {
            Ok((domain, roots)) if domain != trust_domain => {
                warn!(expected = trust_domain, got = %domain, "CA reports another trust domain; bundle not changed");
                drop(roots);
            }
            Ok((_, roots)) if roots != current => match bundle.replace_pem(&roots) {
                Ok(()) => {
                    info!(roots = roots.len(), "trust bundle updated");
                    current = roots;
                }
                Err(e) => {
                    warn!(error = %e, "CA sent a trust bundle that cannot be used; keeping the current one")
                }
            },
            Ok(_) => {}
            Err(e) => warn!(error = %e, "trust bundle refresh failed; keeping the current one"),
        }
    }
}
