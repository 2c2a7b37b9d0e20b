//! Merges the sources' views into one versioned snapshot that every agent stream
//! shares.
//!
//! A snapshot is built once per change and handed to streams as an `Arc`, so a
//! thousand agents cost one copy of the state, not a thousand. Versions increase
//! strictly; a restarted control plane seeds them from the wall clock (ms since the
//! epoch), so its first version is above anything it sent before the restart.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_api as api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::registry::SourceView;

/// One published version of the mesh's state.
#[derive(Debug)]
pub struct Versioned {
    pub version: u64,
    /// The message every stream sends, built once.
    pub response: Arc<api::DiscoveryResponse>,
    /// Errors the sources currently report (the state served is their last good one).
    pub source_errors: Vec<(String, String)>,
    /// Whether every source finished its first load.
    pub ready: bool,
}

/// Builds snapshots from the sources' watch channels.
pub struct SnapshotBuilder {
    sources: Vec<(String, watch::Receiver<SourceView>)>,
    trust_domain: String,
    tx: watch::Sender<Arc<Versioned>>,
}

impl SnapshotBuilder {
    /// Returns the builder and the receiver streams subscribe to.
    pub fn new(
        sources: Vec<(String, watch::Receiver<SourceView>)>,
        trust_domain: String,
    ) -> (Self, watch::Receiver<Arc<Versioned>>) {
        let initial = Arc::new(Versioned {
            version: 0,
            response: Arc::new(api::DiscoveryResponse::default()),
            source_errors: Vec::new(),
            ready: false,
        });
        let (tx, rx) = watch::channel(initial);
        (Self { sources, trust_domain, tx }, rx)
    }

    /// Merges the current views (first source wins on a namespace/name clash).
    fn build(&self, version: u64) -> Versioned {
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
        let snapshot = api::Snapshot {
            services: merged.into_values().collect(),
            trust_domain: self.trust_domain.clone(),
        };
        Versioned {
            version,
            response: Arc::new(api::DiscoveryResponse { version, snapshot: Some(snapshot) }),
            source_errors: errors,
            ready,
        }
    }

    /// Publishes a new version whenever any source changes, until `shutdown`.
    /// Bursts of changes within `settle` become one version.
    pub async fn run(mut self, settle: Duration, shutdown: CancellationToken) {
        let mut version = epoch_ms();
        let first = self.build(version);
        self.tx.send_replace(Arc::new(first));
        loop {
            let changed = futures_util::future::select_all(
                self.sources.iter_mut().map(|(_, rx)| Box::pin(rx.changed())),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                (res, _, _) = changed => if res.is_err() { return },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(settle) => {}
            }
            for (_, rx) in &mut self.sources {
                rx.mark_unchanged();
            }
            let next = self.build(0);
            let current = self.tx.borrow().clone();
            let same = current.response.snapshot == next.response.snapshot;
            if same && current.source_errors == next.source_errors && current.ready == next.ready {
                continue;
            }
            if !same {
                version = (version + 1).max(epoch_ms());
            }
            let next = Versioned {
                version: if same { current.version } else { version },
                response: if same {
                    current.response.clone()
                } else {
                    Arc::new(api::DiscoveryResponse { version, snapshot: next.response.snapshot.clone() })
                },
                ..next
            };
            if !same {
                tracing::info!(
                    version,
                    services = next.response.snapshot.as_ref().map_or(0, |s| s.services.len()),
                    "new snapshot"
                );
            }
            for (source, err) in &next.source_errors {
                tracing::warn!(source, error = %err, "source reports an error; serving its last good state");
            }
            self.tx.send_replace(Arc::new(next));
        }
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}
