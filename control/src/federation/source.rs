//! Importing from one peer: a registry source (`federation/<peer>`) that asks the
//! peer for its exports every `refresh` and publishes them as services, with the
//! peer's roots and gateways as a `FederatedDomain`.
//!
//! The source is ready at once, with nothing imported: a peer being down must
//! never hold back this cluster's first snapshot. As soon as the bundle file
//! reads as certificates, the peer's trust domain is published with those roots,
//! so agents here accept the peer's workloads even before (or without) a
//! successful call, since the peer may call us while we import nothing.
//!
//! Which roots are trusted (to verify the peer's control plane, and by agents for
//! its workloads): the bundle file's until a call succeeds; then the roots the peer
//! last sent, which is how its root rotations arrive. When a call fails on TLS (a
//! peer restored with another root, say), the bundle file is read again and its
//! roots are trusted beside the last sent ones until a call succeeds, so an
//! operator can always recover a link by updating the bundle file.
//!
//! A failed call or an answer that cannot be used keeps the last good import,
//! reports the error (`last_error`), and is retried with jittered exponential
//! backoff from `refresh` up to [`MAX_BACKOFF`].

use std::{io::Read, path::Path, sync::Arc, time::Duration};

use mesh_api as api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    client::{self, FetchError},
    config::{FederationConfig, PeerConfig},
    import::{self, Imported},
    roots,
    status::{Board, LinkState},
};
use crate::registry::{Source, SourceView};

/// Longest one call to a peer may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between retries of a failing peer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The import source of one peer.
pub struct PeerSource {
    name: String,
    peer: PeerConfig,
    own_cluster: String,
    refresh: Duration,
    timeout: Duration,
    board: Arc<Board>,
}

impl PeerSource {
    /// The source of `peer` of `config`, reporting to `board`.
    pub fn new(config: &FederationConfig, peer: &PeerConfig, board: Arc<Board>) -> PeerSource {
        PeerSource {
            name: format!("federation/{}", peer.name),
            peer: peer.clone(),
            own_cluster: config.cluster.clone(),
            refresh: config.refresh,
            timeout: CALL_TIMEOUT.min(config.refresh.max(Duration::from_secs(1)) * 2),
            board,
        }
    }

    /// Each call's time limit (tests shorten it).
    pub fn with_timeout(mut self, timeout: Duration) -> PeerSource {
        self.timeout = timeout;
        self
    }
}

/// What the source knows of its peer.
#[derive(Debug, Default)]
pub struct Link {
    /// The bundle file's roots, as last read well.
    bundle: Option<Vec<String>>,
    bundle_error: Option<String>,
    /// The last usable answer.
    imported: Option<Imported>,
    /// Why the last call failed or its answer was refused.
    error: Option<String>,
    /// The last call failed on TLS: the bundle file's roots are trusted again.
    tls_failed: bool,
    attempted: bool,
    last_success_unix: Option<u64>,
}

impl Link {
    /// Whether the bundle file's roots are trusted now.
    fn trusts_bundle(&self) -> bool {
        self.imported.is_none() || self.tls_failed
    }

    /// The roots trusted now (see the module), without duplicates.
    pub fn roots(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let fetched = self.imported.iter().flat_map(|i| i.domain.roots_pem.iter());
        let bundle = self.bundle.iter().flatten().filter(|_| self.trusts_bundle());
        for r in fetched.chain(bundle) {
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
        out
    }

    /// Re-reads the bundle file when its roots are trusted.
    fn read_bundle(&mut self, path: &Path) {
        if !self.trusts_bundle() {
            self.bundle_error = None;
            return;
        }
        match read_bounded(path).and_then(|text| roots::certificates(&text)) {
            Ok(certs) => {
                self.bundle = Some(certs);
                self.bundle_error = None;
            }
            Err(e) => self.bundle_error = Some(format!("bundle_file {}: {e}", path.display())),
        }
    }

    /// Takes the outcome of one call.
    fn record(&mut self, peer: &PeerConfig, outcome: Result<api::ExportsResponse, FetchError>) {
        self.attempted = true;
        self.tls_failed = matches!(outcome, Err(FetchError::Tls { .. }));
        match outcome
            .map_err(|e| e.to_string())
            .and_then(|r| import::convert(peer, r).map_err(|e| e.to_string()))
        {
            Ok(imported) => {
                self.imported = Some(imported);
                self.error = None;
                self.last_success_unix = Some(crate::agent_book::now_secs().max(0) as u64);
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Every problem, the most telling first.
    fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.error.iter().chain(&self.bundle_error).cloned().collect();
        if let Some(i) = &self.imported {
            out.extend(i.problems.iter().cloned());
        }
        out
    }

    /// The source's view of the peer.
    pub fn view(&self, peer: &PeerConfig) -> SourceView {
        let roots = self.roots();
        let federated = if roots.is_empty() {
            Vec::new()
        } else {
            vec![api::FederatedDomain {
                cluster: peer.name.clone(),
                trust_domain: peer.trust_domain.clone(),
                roots_pem: roots,
                gateways: self.imported.as_ref().map(|i| i.domain.gateways.clone()).unwrap_or_default(),
            }]
        };
        let problems = self.problems();
        SourceView {
            services: Arc::new(self.imported.as_ref().map(|i| i.services.clone()).unwrap_or_default()),
            workloads: Arc::default(),
            ready: true,
            // Each problem names the URL or file it is about; the snapshot builder
            // adds the source's name.
            last_error: (!problems.is_empty()).then(|| problems.join("; ")),
            federated: Arc::new(federated),
        }
    }

    fn state(&self) -> LinkState {
        match (self.attempted, &self.error) {
            (false, _) => LinkState::Pending,
            (true, None) => LinkState::Ok,
            (true, Some(_)) => LinkState::Error,
        }
    }
}

impl Source for PeerSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(
        self: Box<Self>,
        tx: watch::Sender<SourceView>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            tracing::info!(peer = %self.peer.name, url = %self.peer.url, trust_domain = %self.peer.trust_domain,
                refresh = ?self.refresh, "importing from a federated cluster");
            let mut link = Link::default();
            let mut failures: u32 = 0;
            loop {
                link.read_bundle(&self.peer.bundle_file);
                // Before the call: the bundle's roots reach agents without waiting for it.
                self.publish(&tx, &link);
                let trusted = link.roots();
                let outcome = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = client::fetch(&self.peer, &self.own_cluster, &trusted, self.timeout) => r,
                };
                link.record(&self.peer, outcome);
                self.publish(&tx, &link);
                let delay = match &link.error {
                    None => {
                        failures = 0;
                        self.refresh
                    }
                    Some(e) => {
                        tracing::warn!(peer = %self.peer.name, url = %self.peer.url, error = %e,
                            "federated cluster not imported; keeping the last import");
                        crate::metrics::registry_error(&self.name);
                        failures = failures.saturating_add(1);
                        backoff(self.refresh, failures)
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        })
    }
}

impl PeerSource {
    fn publish(&self, tx: &watch::Sender<SourceView>, link: &Link) {
        let view = link.view(&self.peer);
        self.board.update(&self.peer.name, |s| {
            s.state = link.state();
            s.last_success_unix = link.last_success_unix;
            s.last_error = view.last_error.clone();
            s.imported_services = view.services.len();
            s.roots = view.federated.first().map_or(0, |d| d.roots_pem.len());
            s.gateways = view.federated.first().map(|d| d.gateways.clone()).unwrap_or_default();
        });
        crate::metrics::set_registry_services(&self.name, view.services.len());
        tx.send_if_modified(|current| {
            if *current == view {
                return false;
            }
            *current = view;
            true
        });
    }
}

/// The wait after the `failures`th failure in a row: `refresh` doubled each time,
/// at most [`MAX_BACKOFF`] (or `refresh` when longer), with jitter.
fn backoff(refresh: Duration, failures: u32) -> Duration {
    let cap = MAX_BACKOFF.max(refresh);
    let base = refresh.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(cap);
    base.mul_f64(0.5 + fastrand::f64())
}

/// A bundle file's text, refused when over [`roots::MAX_BUNDLE_BYTES`].
fn read_bounded(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(roots::MAX_BUNDLE_BYTES as u64 + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() > roots::MAX_BUNDLE_BYTES {
        return Err(format!("longer than {} bytes", roots::MAX_BUNDLE_BYTES));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_refresh_to_the_cap() {
        let r = Duration::from_secs(5);
        for (n, base) in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (40, 60)] {
            let d = backoff(r, n);
            let base = Duration::from_secs(base);
            assert!(d >= base / 2 && d <= base * 3 / 2, "{n}: {d:?}");
        }
        assert!(backoff(Duration::from_secs(600), 3) <= Duration::from_secs(900), "refresh above the cap");
    }
}
