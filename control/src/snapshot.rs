//! Merges the sources' views (and the health checker's verdicts) into one
//! versioned snapshot that every agent stream shares.
//!
//! A snapshot is encoded once per version; streams send the same reference-counted
//! buffer, so a thousand agents cost one encoding of the state, not a thousand.
//! Versions increase strictly; a restarted control plane seeds them from the wall
//! clock (ms since the epoch), so its first version is above anything it sent
//! before the restart.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use mesh_api as api;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    health::{self, CheckSpec, Failing, Targets},
    registry::SourceView,
};

/// One published version of the mesh's state.
#[derive(Debug)]
pub struct Versioned {
    pub version: u64,
    /// The decoded snapshot, for the admin endpoint and tools.
    pub snapshot: Arc<api::Snapshot>,
    /// The message every stream sends: its snapshot is a shared buffer.
    pub response: api::DiscoveryResponse,
    /// Errors the sources currently report (the state served is their last good one).
    pub source_errors: Vec<(String, String)>,
    /// Whether every source finished its first load.
    pub ready: bool,
}

/// Builds snapshots from the sources' watch channels.
pub struct SnapshotBuilder {
    sources: Vec<(String, watch::Receiver<SourceView>)>,
    trust_domain: String,
    /// The mTLS mode of services whose policy sets none.
    default_mtls: api::MtlsMode,
    tx: watch::Sender<Arc<Versioned>>,
    targets: watch::Sender<Targets>,
    failing: watch::Receiver<Failing>,
}

impl SnapshotBuilder {
    /// Returns the builder and the receiver streams subscribe to; `health` gets the
    /// endpoints to check and reports the failing ones.
    pub fn new(
        sources: Vec<(String, watch::Receiver<SourceView>)>,
        (trust_domain, default_mtls): (String, api::MtlsMode),
        targets: watch::Sender<Targets>,
        failing: watch::Receiver<Failing>,
    ) -> (Self, watch::Receiver<Arc<Versioned>>) {
        let initial = Arc::new(Versioned {
            version: 0,
            snapshot: Arc::default(),
            response: api::DiscoveryResponse::default(),
            source_errors: Vec::new(),
            ready: false,
        });
        let (tx, rx) = watch::channel(initial);
        (Self { sources, trust_domain, default_mtls, tx, targets, failing }, rx)
    }

    /// Merges the current views (first source wins on a namespace/name clash) and
    /// marks endpoints failing their checks unhealthy.
    fn merge(&self) -> (api::Snapshot, Vec<(String, String)>, bool, Targets) {
        let mut merged: BTreeMap<(String, String), api::Service> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut ready = true;
        for (name, rx) in &self.sources {
            let view = rx.borrow();
            ready &= view.ready;
            if let Some(e) = &view.last_error {
                errors.push((name.clone(), e.clone()));
            }
            for s in view.services.iter() {
                let key = (s.namespace.clone(), s.name.clone());
                if merged.contains_key(&key) {
                    errors.push((
                        name.clone(),
                        format!("service {}/{} also defined by another source", key.0, key.1),
                    ));
                    continue;
                }
                merged.insert(key, s.clone());
            }
        }
        let failing = self.failing.borrow().clone();
        let mut targets = Targets::new();
        for s in merged.values_mut() {
            let Some(check) = s.health_check else { continue };
            let spec = CheckSpec::from_api(&check);
            let service = s.clone();
            for e in &mut s.endpoints {
                let Some(addr) = health::check_address(&service, e) else { continue };
                targets.insert(addr, spec);
                if let Some(reason) = failing.get(&addr)
                    && e.health() != api::Health::Unhealthy
                {
                    e.health = api::Health::Unhealthy as i32;
                    e.health_reason = reason.clone();
                }
            }
        }
        let snapshot = api::Snapshot {
            services: merged.into_values().collect(),
            trust_domain: self.trust_domain.clone(),
            default_mtls: self.default_mtls as i32,
        };
        (snapshot, errors, ready, targets)
    }

    /// Publishes a new version whenever a source or a health verdict changes, until
    /// `shutdown`. Bursts of changes within `settle` become one version.
    pub async fn run(mut self, settle: Duration, shutdown: CancellationToken) {
        let mut version = epoch_ms();
        let mut first = true;
        loop {
            if !first {
                let sources = futures_util::future::select_all(
                    self.sources.iter_mut().map(|(_, rx)| Box::pin(rx.changed())),
                );
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    (res, _, _) = sources => if res.is_err() { return },
                    res = self.failing.changed() => if res.is_err() { return },
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(settle) => {}
                }
                for (_, rx) in &mut self.sources {
                    rx.mark_unchanged();
                }
                self.failing.mark_unchanged();
            }
            let (snapshot, source_errors, ready, targets) = self.merge();
            self.targets.send_if_modified(|t| {
                let changed = *t != targets;
                *t = targets;
                changed
            });
            let current = self.tx.borrow().clone();
            let same = !first && *current.snapshot == snapshot;
            if same && current.source_errors == source_errors && current.ready == ready {
                continue;
            }
            let next = if same {
                Versioned {
                    version: current.version,
                    snapshot: current.snapshot.clone(),
                    response: current.response.clone(),
                    source_errors,
                    ready,
                }
            } else {
                if !first {
                    version = (version + 1).max(epoch_ms());
                }
                tracing::info!(version, services = snapshot.services.len(), "new snapshot");
                let encoded = Bytes::from(snapshot.encode_to_vec());
                Versioned {
                    version,
                    snapshot: Arc::new(snapshot),
                    response: api::DiscoveryResponse { version, snapshot: encoded },
                    source_errors,
                    ready,
                }
            };
            for (source, err) in &next.source_errors {
                tracing::warn!(source, error = %err, "source reports an error; serving its last good state");
            }
            first = false;
            self.tx.send_replace(Arc::new(next));
        }
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}
