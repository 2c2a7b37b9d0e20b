//! Workload identities at run time: fetch the CA's trust bundle once, then keep one
//! certificate per identity in use on the node, requested when a workload with that
//! identity arrives (the key never leaves the agent), renewed at a fraction of its
//! life, and dropped when the last workload holding it goes. Until a workload's first
//! certificate arrives the agent still intercepts its connections; those that need
//! mTLS wait for it (meshed traffic is never sent in plaintext).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    discovery::client::Backoff,
    identity::{
        CertManager, RenewalConfig, SpiffeId, TokioClock, TrustBundle, WorkloadIdentity, signer::GrpcSigner,
    },
    workload::ServiceAccount,
};

/// What the data path needs for one workload's mTLS once its certificate is issued.
pub struct AgentIdentity {
    pub manager: Arc<CertManager>,
    pub workload: Arc<WorkloadIdentity>,
}

/// A workload's identity: set once, when its first certificate is installed. A
/// connection that needs it while its certificate is on the way waits for it (a pod's
/// first connections follow its CNI ADD at once) instead of failing.
#[derive(Clone, Default)]
pub struct IdentitySlot(Arc<SlotInner>);

#[derive(Default)]
struct SlotInner {
    identity: OnceLock<AgentIdentity>,
    /// A lease is fetching the certificate: waiting makes sense.
    pending: std::sync::atomic::AtomicBool,
    installed: tokio::sync::Notify,
}

impl IdentitySlot {
    /// The identity, if its certificate is installed.
    pub fn get(&self) -> Option<&AgentIdentity> {
        self.0.identity.get()
    }

    /// Installs the identity (once; a second one is handed back).
    pub fn set(&self, identity: AgentIdentity) -> Result<(), AgentIdentity> {
        self.0.identity.set(identity)?;
        self.0.installed.notify_waiters();
        Ok(())
    }

    /// The identity, waiting up to `patience` for a certificate a lease is fetching;
    /// `None` at once when no lease is (the workload has no identity).
    pub async fn wait(&self, patience: Duration) -> Option<&AgentIdentity> {
        if let Some(identity) = self.get() {
            return Some(identity);
        }
        if !self.0.pending.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let _ = tokio::time::timeout(patience, async {
            loop {
                // Registered before the check, so an install in between still wakes it.
                let installed = self.0.installed.notified();
                let mut installed = std::pin::pin!(installed);
                installed.as_mut().enable();
                let given_up = !self.0.pending.load(std::sync::atomic::Ordering::Acquire);
                if self.get().is_some() || given_up {
                    return;
                }
                installed.await;
            }
        })
        .await;
        self.get()
    }

    fn expect(&self) {
        self.0.pending.store(true, std::sync::atomic::Ordering::Release);
    }

    /// No certificate is coming (the identity cannot be set up): waiters stop waiting.
    fn give_up(&self) {
        self.0.pending.store(false, std::sync::atomic::Ordering::Release);
        self.0.installed.notify_waiters();
    }
}

/// A certificate as `/config_dump` shows it.
#[derive(Serialize)]
pub struct CertificateDump {
    pub identity: String,
    /// Unix seconds.
    pub not_after: u64,
    pub expires_in_seconds: i64,
}

/// The installed certificate of a slot, if any.
pub fn dump(slot: &IdentitySlot) -> Option<CertificateDump> {
    let ident = slot.get()?;
    let cert = ident.workload.current()?;
    let not_after = cert.not_after().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Some(CertificateDump {
        identity: ident.workload.id().to_string(),
        not_after,
        expires_in_seconds: not_after as i64 - now as i64,
    })
}

/// The node's identities: one certificate manager over the CA's trust bundle, and a
/// count of the workloads holding each identity.
pub struct Identities {
    manager: watch::Receiver<Option<Arc<CertManager>>>,
    trust_domain: watch::Receiver<Option<String>>,
    holders: Mutex<HashMap<SpiffeId, usize>>,
    shutdown: CancellationToken,
}

impl Identities {
    /// Starts fetching the trust bundle (retrying while the control plane is away);
    /// identities are issued once it is in.
    /// The bundle's federated trust domains follow `routes`' snapshots.
    pub fn start(
        signer: GrpcSigner,
        renewal: RenewalConfig,
        routes: Arc<crate::discovery::RouteStore>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (manager_tx, manager) = watch::channel(None);
        let (domain_tx, trust_domain) = watch::channel(None);
        tokio::spawn(bootstrap(signer, renewal, manager_tx, domain_tx, routes, shutdown.clone()));
        Arc::new(Self { manager, trust_domain, holders: Mutex::new(HashMap::new()), shutdown })
    }

    /// Issues (or shares) the certificate of `account` for a workload, filling `slot`
    /// once it is in. Dropping the lease releases it; the identity's renewals stop when
    /// its last holder goes.
    pub fn lease(self: &Arc<Self>, account: &ServiceAccount, slot: IdentitySlot) -> IdentityLease {
        slot.expect();
        let hub = self.clone();
        let account = account.clone();
        let held: Arc<Mutex<Option<SpiffeId>>> = Arc::default();
        let held2 = held.clone();
        let stop = self.shutdown.child_token();
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let mut manager = hub.manager.clone();
            let manager = tokio::select! {
                () = task_stop.cancelled() => return,
                m = manager.wait_for(Option::is_some) => match m {
                    Ok(m) => m.clone().expect("waited for Some"),
                    Err(_) => return,
                },
            };
            let Some(domain) = hub.trust_domain.borrow().clone() else {
                slot.give_up();
                return;
            };
            let id = match SpiffeId::new(&domain, &account.namespace, &account.name) {
                Ok(id) => id,
                Err(e) => {
                    warn!(identity = %account, error = %e, "workload identity is not a valid SPIFFE ID; mTLS unavailable for it");
                    slot.give_up();
                    return;
                }
            };
            let workload = match manager.identity(&id) {
                Ok(w) => w,
                Err(e) => {
                    warn!(identity = %id, error = %e, "workload identity cannot be set up; mTLS is unavailable for it");
                    slot.give_up();
                    return;
                }
            };
            *hub.holders.lock().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default() += 1;
            *held2.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
            let cert = tokio::select! {
                () = task_stop.cancelled() => return,
                c = workload.ready() => c,
            };
            let expires_in = cert.not_after().duration_since(SystemTime::now()).unwrap_or_default();
            info!(identity = %workload.id(), expires_in_s = expires_in.as_secs(), "workload certificate issued");
            let _ = slot.set(AgentIdentity { manager, workload });
        });
        IdentityLease { hub: self.clone(), held, stop }
    }

    fn release(&self, id: &SpiffeId) {
        let mut holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        let Some(count) = holders.get_mut(id) else { return };
        *count -= 1;
        if *count == 0 {
            holders.remove(id);
            if let Some(manager) = self.manager.borrow().as_ref() {
                manager.remove(id);
                info!(identity = %id, "last workload with this identity left; its certificate is no longer renewed");
            }
        }
    }

    /// Identities with a certificate being kept, for the admin endpoint.
    pub fn in_use(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> =
            self.holders.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        ids.sort_by_key(ToString::to_string);
        ids
    }
}

/// A workload's hold on an identity.
pub struct IdentityLease {
    hub: Arc<Identities>,
    held: Arc<Mutex<Option<SpiffeId>>>,
    stop: CancellationToken,
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(id) = self.held.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.hub.release(&id);
        }
    }
}

/// Fetches the CA's trust bundle (retrying while the control plane is away), then
/// publishes the certificate manager and keeps the bundle fresh.
async fn bootstrap(
    signer: GrpcSigner,
    renewal: RenewalConfig,
    manager_tx: watch::Sender<Option<Arc<CertManager>>>,
    domain_tx: watch::Sender<Option<String>>,
    routes: Arc<crate::discovery::RouteStore>,
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
    let manager = (|| {
        let bundle = TrustBundle::from_pem(&trust_domain, &roots).map_err(|e| e.to_string())?;
        CertManager::new(Arc::new(signer.clone()), bundle, Arc::new(TokioClock::new()), renewal)
            .map_err(|e| e.to_string())
    })();
    let manager = match manager {
        Ok(m) => Arc::new(m),
        Err(e) => {
            warn!(error = %e, "the CA's trust bundle cannot be used; mTLS is unavailable");
            return;
        }
    };
    let bundle = manager.trust_bundle().clone();
    tokio::spawn(crate::mtls::follow_federation(routes, bundle.clone(), shutdown.clone()));
    let _ = domain_tx.send(Some(trust_domain.clone()));
    let _ = manager_tx.send(Some(manager));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slot_without_a_lease_does_not_wait_and_a_pending_one_waits_its_patience() {
        let slot = IdentitySlot::default();
        let start = tokio::time::Instant::now();
        assert!(slot.wait(Duration::from_secs(10)).await.is_none());
        assert_eq!(start.elapsed(), Duration::ZERO, "no certificate is coming: no wait");
        slot.expect();
        assert!(slot.wait(Duration::from_secs(3)).await.is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(3), "a pending certificate is waited for");

        // A lease that gives up wakes its waiters at once.
        let waiter = {
            let slot = slot.clone();
            tokio::spawn(async move { slot.wait(Duration::from_secs(60)).await.is_none() })
        };
        tokio::task::yield_now().await;
        let before = tokio::time::Instant::now();
        slot.give_up();
        assert!(waiter.await.unwrap());
        assert_eq!(before.elapsed(), Duration::ZERO, "no wait once the certificate is known not to come");
    }
}
