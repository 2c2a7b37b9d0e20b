//! Merges the sources' views (and the health checker's verdicts) into one
//! versioned snapshot that every agent stream shares.
//!
//! A snapshot is encoded once per version; streams send the same reference-counted
//! buffer, so a thousand agents cost one encoding of the state, not a thousand.
//! Beside it, each version holds the workloads placed on each node
//! ([`Placements`]); a stream adds only its own node's to the shared buffer.
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

/// The workloads placed on each node, by node name; each list sorted by namespace then
/// name.
pub type Placements = BTreeMap<String, Vec<api::Workload>>;

/// One published version of the mesh's state.
#[derive(Debug)]
pub struct Versioned {
    pub version: u64,
    /// The decoded snapshot, for the admin endpoint and tools.
    pub snapshot: Arc<api::Snapshot>,
    /// What every stream sends: the snapshot is a shared buffer; no workloads (see
    /// [`Versioned::response_for`]).
    pub response: api::DiscoveryResponse,
    /// The workloads of every node; each agent receives its own node's only.
    pub placements: Arc<Placements>,
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
    /// Where services with hostnames and no VIP get one (`None`: they get none).
    dns_vips: Option<crate::dns_vips::VipRange>,
}

impl SnapshotBuilder {
    /// Allocates VIPs from `range` to services that have hostnames but no VIP.
    pub fn with_dns_vips(mut self, range: Option<crate::dns_vips::VipRange>) -> Self {
        self.dns_vips = range;
        self
    }

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
            placements: Arc::default(),
            source_errors: Vec::new(),
            ready: false,
        });
        let (tx, rx) = watch::channel(initial);
        (Self { sources, trust_domain, default_mtls, tx, targets, failing, dns_vips: None }, rx)
    }

    /// Merges the current views (first source wins on a namespace/name clash of a
    /// service or a workload) and marks endpoints failing their checks unhealthy.
    fn merge(&self) -> (api::Snapshot, Placements, Vec<(String, String)>, bool, Targets) {
        let mut merged: BTreeMap<(String, String), api::Service> = BTreeMap::new();
        let mut workloads: BTreeMap<(String, String), api::Workload> = BTreeMap::new();
        // By trust domain, so agents receive them sorted and a clash is seen.
        let mut federated: BTreeMap<String, api::FederatedDomain> = BTreeMap::new();
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
            for d in view.federated.iter() {
                if federated.contains_key(&d.trust_domain) || d.trust_domain == self.trust_domain {
                    errors.push((
                        name.clone(),
                        format!("federated trust domain {} also defined elsewhere", d.trust_domain),
                    ));
                    continue;
                }
                federated.insert(d.trust_domain.clone(), d.clone());
            }
            for w in view.workloads.iter() {
                let key = (w.namespace.clone(), w.name.clone());
                if workloads.contains_key(&key) {
                    errors.push((
                        name.clone(),
                        format!("workload {}/{} also defined by another source", key.0, key.1),
                    ));
                    continue;
                }
                workloads.insert(key, w.clone());
            }
        }
        let mut placements = Placements::new();
        for w in workloads.into_values() {
            placements.entry(w.node.clone()).or_default().push(w);
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
        let mut services: Vec<api::Service> = merged.into_values().collect();
        if let Some(range) = &self.dns_vips {
            errors.extend(
                crate::dns_vips::allocate(&mut services, range)
                    .into_iter()
                    .map(|p| ("dns-vip-range".into(), p)),
            );
        }
        let snapshot = api::Snapshot {
            services,
            trust_domain: self.trust_domain.clone(),
            default_mtls: self.default_mtls as i32,
            federated: federated.into_values().collect(),
        };
        (snapshot, placements, errors, ready, targets)
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
            let (snapshot, placements, source_errors, ready, targets) = self.merge();
            self.targets.send_if_modified(|t| {
                let changed = *t != targets;
                *t = targets;
                changed
            });
            let current = self.tx.borrow().clone();
            let same_services = !first && *current.snapshot == snapshot;
            let same = same_services && *current.placements == placements;
            if same && current.source_errors == source_errors && current.ready == ready {
                continue;
            }
            let next = if same {
                Versioned {
                    version: current.version,
                    snapshot: current.snapshot.clone(),
                    response: current.response.clone(),
                    placements: current.placements.clone(),
                    source_errors,
                    ready,
                }
            } else {
                if !first {
                    version = (version + 1).max(epoch_ms());
                }
                let workloads: usize = placements.values().map(Vec::len).sum();
                tracing::info!(version, services = snapshot.services.len(), workloads, "new snapshot");
                // Only placements changed: the shared buffer is the same, not re-encoded.
                let (snapshot, encoded) = if same_services {
                    (current.snapshot.clone(), current.response.snapshot.clone())
                } else {
                    let encoded = Bytes::from(snapshot.encode_to_vec());
                    (Arc::new(snapshot), encoded)
                };
                Versioned {
                    version,
                    snapshot,
                    response: api::DiscoveryResponse { version, snapshot: encoded, workloads: Vec::new() },
                    placements: Arc::new(placements),
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

impl Versioned {
    /// The response for `node`'s agent: the shared snapshot and the workloads placed on
    /// that node, and no other node's.
    pub fn response_for(&self, node: &str) -> api::DiscoveryResponse {
        api::DiscoveryResponse {
            workloads: self.placements.get(node).cloned().unwrap_or_default(),
            ..self.response.clone()
        }
    }

    /// Whether `node` hosts a workload running as `namespace`/`service_account`.
    pub fn places(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.placements.get(node).is_some_and(|ws| {
            ws.iter().any(|w| w.namespace == namespace && w.service_account == service_account)
        })
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str) -> api::Workload {
        api::Workload {
            namespace: "shop".into(),
            name: name.into(),
            service_account: name.into(),
            node: node.into(),
            ..Default::default()
        }
    }

    fn view(workloads: Vec<api::Workload>) -> SourceView {
        let service = api::Service { name: "cart".into(), namespace: "shop".into(), ..Default::default() };
        SourceView {
            services: Arc::new(vec![service]),
            workloads: Arc::new(workloads),
            ready: true,
            last_error: None,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn each_node_gets_its_placements_and_the_shared_part_is_encoded_once() {
        let (file_tx, file_rx) =
            watch::channel(view(vec![workload("a-1", "node-a"), workload("b-1", "node-b")]));
        // A second source placing a workload the first already placed: first wins, reported.
        let (_kube_tx, kube_rx) = watch::channel(SourceView {
            workloads: Arc::new(vec![workload("a-1", "node-b")]),
            ready: true,
            ..Default::default()
        });
        let (targets, _targets_rx) = watch::channel(Targets::new());
        let (_failing_tx, failing) = watch::channel(Failing::default());
        let sources = vec![("file".to_owned(), file_rx), ("kubernetes".to_owned(), kube_rx)];
        let (builder, mut rx) = SnapshotBuilder::new(
            sources,
            ("cluster.local".into(), api::MtlsMode::Permissive),
            targets,
            failing,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(builder.run(Duration::from_millis(1), stop.clone()));

        let first = rx.wait_for(|v| v.version > 0).await.unwrap().clone();
        let names = |node: &str| -> Vec<String> {
            first.response_for(node).workloads.iter().map(|w| w.name.clone()).collect()
        };
        assert_eq!(names("node-a"), ["a-1"]);
        assert_eq!(names("node-b"), ["b-1"], "the clashing a-1 of the second source is not placed");
        assert!(names("node-c").is_empty());
        assert!(first.places("node-b", "shop", "b-1") && !first.places("node-a", "shop", "b-1"));
        assert!(
            first.source_errors.iter().any(|(s, e)| s == "kubernetes" && e.contains("workload shop/a-1"))
        );
        assert!(first.response.workloads.is_empty(), "the shared response carries no node's workloads");

        // Only placements change: a new version, the same encoded buffer.
        file_tx.send_replace(view(vec![workload("a-1", "node-a"), workload("a-2", "node-a")]));
        let second = rx.wait_for(|v| v.version > first.version).await.unwrap().clone();
        assert_eq!(second.response_for("node-a").workloads.len(), 2);
        assert!(second.response_for("node-b").workloads.is_empty(), "b-1 is gone");
        assert_eq!(second.response.snapshot.as_ptr(), first.response.snapshot.as_ptr(), "not re-encoded");
        stop.cancel();
        task.await.unwrap();
    }

    /// Every source's federated domains reach the snapshot, sorted by trust domain;
    /// a second claim on a trust domain (or one on our own) is dropped and reported.
    #[tokio::test]
    async fn federated_domains_of_all_sources_are_merged_sorted() {
        let domain = |cluster: &str, td: &str| api::FederatedDomain {
            cluster: cluster.into(),
            trust_domain: td.into(),
            roots_pem: vec!["root".into()],
            gateways: vec![],
        };
        let source = |domains: Vec<api::FederatedDomain>| {
            watch::channel(SourceView { ready: true, federated: Arc::new(domains), ..Default::default() })
        };
        let (_west_tx, west) = source(vec![domain("west", "west.local")]);
        let (_north_tx, north) = source(vec![domain("north", "b-north.local"), domain("x", "west.local")]);
        let (_own_tx, own) = source(vec![domain("self", "cluster.local")]);
        let (targets, _targets_rx) = watch::channel(Targets::new());
        let (_failing_tx, failing) = watch::channel(Failing::default());
        let sources = vec![
            ("federation/west".to_owned(), west),
            ("federation/north".to_owned(), north),
            ("federation/self".to_owned(), own),
        ];
        let (builder, mut rx) = SnapshotBuilder::new(
            sources,
            ("cluster.local".into(), api::MtlsMode::Permissive),
            targets,
            failing,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(builder.run(Duration::from_millis(1), stop.clone()));
        let first = rx.wait_for(|v| v.version > 0).await.unwrap().clone();
        let got: Vec<(&str, &str)> =
            first.snapshot.federated.iter().map(|d| (d.trust_domain.as_str(), d.cluster.as_str())).collect();
        assert_eq!(got, [("b-north.local", "north"), ("west.local", "west")]);
        for (source, td) in [("federation/north", "west.local"), ("federation/self", "cluster.local")] {
            assert!(
                first.source_errors.iter().any(|(s, e)| s == source && e.contains(td)),
                "{:?}",
                first.source_errors
            );
        }
        stop.cancel();
        task.await.unwrap();
    }

    /// The merge rule for services: sources are read in the order they are given
    /// (--registry, --kubernetes, --consul), and a service the file already names is
    /// kept from the file; the later source's copy is dropped and reported. Services
    /// of different names (a Consul `web` is `consul/web`) all stay.
    #[tokio::test]
    async fn a_service_named_by_two_sources_is_taken_from_the_first_and_the_clash_reported() {
        let svc = |ns: &str, name: &str, address: &str| api::Service {
            name: name.into(),
            namespace: ns.into(),
            endpoints: vec![api::Endpoint { address: address.into(), ..Default::default() }],
            ..Default::default()
        };
        let (_file_tx, file_rx) = watch::channel(SourceView {
            services: Arc::new(vec![svc("consul", "web", "10.0.0.1")]),
            ready: true,
            ..Default::default()
        });
        let (_consul_tx, consul_rx) = watch::channel(SourceView {
            services: Arc::new(vec![svc("consul", "web", "10.0.0.9"), svc("consul", "db", "10.0.0.3")]),
            ready: true,
            ..Default::default()
        });
        let (targets, _targets_rx) = watch::channel(Targets::new());
        let (_failing_tx, failing) = watch::channel(Failing::default());
        let sources = vec![("file".to_owned(), file_rx), ("consul".to_owned(), consul_rx)];
        let (builder, mut rx) = SnapshotBuilder::new(
            sources,
            ("cluster.local".into(), api::MtlsMode::Permissive),
            targets,
            failing,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(builder.run(Duration::from_millis(1), stop.clone()));
        let first = rx.wait_for(|v| v.version > 0).await.unwrap().clone();
        let by_name: BTreeMap<String, String> = first
            .snapshot
            .services
            .iter()
            .map(|s| (s.name.clone(), s.endpoints[0].address.clone()))
            .collect();
        assert_eq!(by_name.get("web").map(String::as_str), Some("10.0.0.1"), "the file's copy wins");
        assert_eq!(by_name.get("db").map(String::as_str), Some("10.0.0.3"));
        assert!(
            first
                .source_errors
                .iter()
                .any(|(s, e)| s == "consul" && e.contains("service consul/web also defined")),
            "{:?}",
            first.source_errors
        );
        stop.cancel();
        task.await.unwrap();
    }
}
