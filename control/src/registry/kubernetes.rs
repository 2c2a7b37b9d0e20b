//! The Kubernetes registry source: Services, EndpointSlices and Pods, watched.
//!
//! Three kube-rs watchers keep reflector stores of the objects; whenever any of
//! them changes, the whole mesh view is rebuilt from the stores (see `mapping.rs`
//! for the services, `placements.rs` for which workload runs on which node) and
//! published. Rebuilding from the stores rather than patching
//! per event keeps the view a pure function of the cluster state, and a short
//! debounce turns a burst of events (a rollout touches many slices and pods) into
//! one update for the agents.
//!
//! Recovery is mostly kube-rs's: a dropped watch is re-opened from the last
//! resource version, an expired one (410 Gone event) relists, and errors back off
//! exponentially. One change here: kube-rs retries a watch that cannot be opened
//! from the same version forever, even when refused with an HTTP 410, so such a
//! failure restarts the watcher from a list instead; that also makes the recovery
//! visible, which is what clears the error from `last_error`.
//!
//! `last_error` carries what needs an operator: lists or watches the API refuses
//! (RBAC, an unreachable server) and bad mesh annotations. Watches dropping in
//! the middle and 410s are routine and only logged.

pub mod annotations;
mod http_routes;
mod mapping;
mod placements;

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceView};
pub use mapping::{SERVICE_NAME_LABEL, protocol_hint};

/// The ClusterRole rules this source needs: read-only access to the four
/// kinds it watches, nothing else (the deploy manifests embed these).
pub const RBAC_RULES: &str = "\
# Read-only access for the mesh control plane's Kubernetes registry source.
rules:
  - apiGroups: [\"\"]
    resources: [\"services\", \"pods\"]
    verbs: [\"get\", \"list\", \"watch\"]
  - apiGroups: [\"discovery.k8s.io\"]
    resources: [\"endpointslices\"]
    verbs: [\"get\", \"list\", \"watch\"]
  - apiGroups: [\"gateway.networking.k8s.io\"]
    resources: [\"httproutes\"]
    verbs: [\"get\", \"list\", \"watch\"]
";

/// How cluster objects become mesh services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// DNS suffix of the cluster, for the services' hostnames ("cluster.local").
    pub cluster_domain: String,
    /// SPIFFE trust domain of workload identities ("cluster.local").
    pub trust_domain: String,
    /// Port of each node agent's mTLS inbound listener (15008).
    pub agent_inbound_port: u16,
    /// How long to gather events before publishing one view (100 ms).
    pub debounce: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            agent_inbound_port: 15008,
            debounce: Duration::from_millis(100),
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// No usable in-cluster or kubeconfig configuration, or a bad one.
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[from] kube::Error),
}

/// The Kubernetes registry source; see the module documentation.
pub struct KubernetesSource {
    client: Client,
    config: KubernetesConfig,
}

impl KubernetesSource {
    /// A source reading through `client` (tests point it at a fake API server).
    pub fn new(client: Client, config: KubernetesConfig) -> Self {
        Self { client, config }
    }

    /// A source using the in-cluster service account, or the local kubeconfig
    /// when run outside a cluster.
    pub async fn from_environment(config: KubernetesConfig) -> Result<Self, KubernetesError> {
        Ok(Self::new(Client::try_default().await?, config))
    }
}

impl Source for KubernetesSource {
    fn name(&self) -> &str {
        "kubernetes"
    }

    fn run(
        self: Box<Self>,
        tx: watch::Sender<SourceView>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(self.client, self.config, tx, shutdown))
    }
}

/// The kinds watched, in the order their errors are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services = 0,
    EndpointSlices = 1,
    Pods = 2,
    /// Gateway API HTTPRoutes: optional, as the Gateway API CRDs may not be
    /// installed (see [`Signal::Absent`]).
    HttpRoutes = 3,
}

const KINDS: [Kind; 4] = [Kind::Services, Kind::EndpointSlices, Kind::Pods, Kind::HttpRoutes];

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Pods => "pods",
            Kind::HttpRoutes => "httproutes.gateway.networking.k8s.io",
        }
    }
}

/// What one watcher step means for the published view.
#[derive(Debug)]
enum Signal {
    /// The kind's store changed (or its list progressed): its error is over.
    Changed(Kind),
    /// The kind's initial list (or a relist) completed.
    Synced(Kind),
    /// The watcher hit an error; it backs off and retries by itself.
    Failed(Kind, String),
    /// The API does not know the kind (HTTPRoute without the Gateway API CRDs):
    /// nothing to wait for or report; the watcher keeps retrying, so routes are
    /// read once the CRDs are installed.
    Absent(Kind),
}

/// Which kinds have synced and which are failing.
#[derive(Debug, Default)]
struct Progress {
    synced: [bool; 4],
    errors: [Option<String>; 4],
}

impl Progress {
    fn record(&mut self, signal: Signal) {
        match signal {
            Signal::Changed(kind) => self.errors[kind as usize] = None,
            Signal::Synced(kind) => {
                self.errors[kind as usize] = None;
                self.synced[kind as usize] = true;
            }
            Signal::Failed(kind, error) => self.errors[kind as usize] = Some(error),
            Signal::Absent(kind) => {
                self.errors[kind as usize] = None;
                self.synced[kind as usize] = true;
            }
        }
    }

    fn ready(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    routes: Store<http_routes::HttpRoute>,
}

async fn run(
    client: Client,
    config: KubernetesConfig,
    tx: watch::Sender<SourceView>,
    shutdown: CancellationToken,
) {
    let (services, services_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let (routes, routes_writer) = reflector::store();
    let stores = Stores { services, slices, pods, routes };
    let mut memory = http_routes::Memory::default();

    let signals = stream::select_all([
        watch_kind(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            strip_service,
            services_writer,
            Kind::Services,
        )
        .boxed(),
        watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            // Only slices that belong to a Service.
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            strip_slice,
            slices_writer,
            Kind::EndpointSlices,
        )
        .boxed(),
        watch_kind(
            Api::<http_routes::HttpRoute>::all(client.clone()),
            watcher::Config::default(),
            strip_route,
            routes_writer,
            Kind::HttpRoutes,
        )
        .boxed(),
        watch_kind(
            Api::<Pod>::all(client),
            // Finished pods serve nothing; leaving them out keeps the store small.
            watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
            strip_pod,
            pods_writer,
            Kind::Pods,
        )
        .boxed(),
    ]);
    let mut signals = std::pin::pin!(signals);
    let mut progress = Progress::default();
    let mut due: Option<Instant> = None;
    loop {
        let deadline = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(deadline), if due.is_some() => {
                due = None;
                publish(&tx, &stores, &progress, &config, &mut memory);
            }
            signal = signals.next() => match signal {
                Some(signal) => {
                    progress.record(signal);
                    due.get_or_insert_with(|| Instant::now() + config.debounce);
                }
                // The watchers retry forever; an end means the runtime is going away.
                None => return,
            },
        }
    }
}

/// Rebuilds the view from the stores and publishes it if it differs.
fn publish(
    tx: &watch::Sender<SourceView>,
    stores: &Stores,
    progress: &Progress,
    config: &KubernetesConfig,
    memory: &mut http_routes::Memory,
) {
    let mut errors: Vec<String> = KINDS
        .into_iter()
        .filter_map(|k| progress.errors[k as usize].as_ref().map(|e| format!("watching {}: {e}", k.plural())))
        .collect();
    let ready = progress.ready();
    let (services, workloads) = if ready {
        let pod = |ns: &str, name: &str| stores.pods.get(&ObjectRef::new(name).within(ns));
        let mut mapped =
            mapping::map_services(&stores.services.state(), &stores.slices.state(), &pod, config);
        let mut route_problems = annotations::Problems::default();
        let mut routes = stores.routes.state();
        // Store order is arbitrary; the output must not be.
        routes.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        http_routes::attach(&mut mapped.services, &routes, memory, &mut route_problems);
        let placed = placements::map_workloads(&stores.pods.state());
        // A pod's bad annotation is met by both mappings; report it once.
        let problems: std::collections::BTreeSet<String> =
            mapped.problems.into_iter().chain(placed.problems).chain(route_problems.into_vec()).collect();
        errors.extend(problems);
        (mapped.services, placed.workloads)
    } else {
        // Until every list is in, a partial view (services without their
        // endpoints) would look like an outage to the agents.
        (Vec::new(), Vec::new())
    };
    let view = SourceView {
        services: Arc::new(services),
        workloads: Arc::new(workloads),
        ready,
        last_error: (!errors.is_empty()).then(|| errors.join("; ")),
        ..Default::default()
    };
    tx.send_if_modified(|current| {
        if *current == view {
            return false;
        }
        if view.last_error != current.last_error
            && let Some(e) = &view.last_error
        {
            tracing::warn!(source = "kubernetes", error = %e, "registry problems");
        }
        tracing::debug!(source = "kubernetes", services = view.services.len(), ready, "view updated");
        *current = view;
        true
    });
}

/// One kind's watcher, recovering on its own, applied to its store and turned
/// into signals.
fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    strip: fn(&mut K),
    mut writer: Writer<K>,
    kind: Kind,
) -> impl Stream<Item = Signal> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    relisting_watcher(api, config).modify(strip).default_backoff().filter_map(move |item| {
        let signal = match item {
            Ok(event) => {
                writer.apply_watcher_event(&event);
                match event {
                    // Emitted before the list is even requested; says nothing yet.
                    watcher::Event::Init => None,
                    watcher::Event::InitDone => Some(Signal::Synced(kind)),
                    _ => Some(Signal::Changed(kind)),
                }
            }
            Err(e) if kind == Kind::HttpRoutes && is_not_found(&e) => {
                tracing::debug!(
                    kind = kind.plural(),
                    "not served by this API server (Gateway API CRDs not installed)"
                );
                Some(Signal::Absent(kind))
            }
            Err(e) if is_gone(&e) => {
                tracing::debug!(kind = kind.plural(), "watch expired (410 Gone); relisting");
                None
            }
            Err(e @ watcher::Error::WatchFailed(_)) => {
                tracing::debug!(kind = kind.plural(), error = %error_chain(&e), "watch dropped; resuming");
                None
            }
            Err(e) => {
                let message = error_chain(&e);
                tracing::debug!(kind = kind.plural(), error = %message, "watch failed; backing off");
                Some(Signal::Failed(kind, message))
            }
        };
        std::future::ready(signal)
    })
}

/// `watcher` that starts over (relists) when a watch cannot be opened, rather
/// than retrying from a version that may have expired (an HTTP 410 refusal would
/// otherwise repeat forever).
fn relisting_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let start = move || watcher(api.clone(), config.clone()).boxed();
    let first = start();
    stream::unfold((start, first), |(start, mut inner)| async move {
        let item = inner.next().await?;
        let inner = match &item {
            Err(watcher::Error::WatchStartFailed(_)) => start(),
            _ => inner,
        };
        Some((item, (start, inner)))
    })
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// The error and its causes on one line, for `last_error` (the federation client's
/// errors too).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Keeps only mesh annotations: the others (last-applied-configuration above
/// all) can be large and are never read.
fn mesh_annotations(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.take() {
        let kept: BTreeMap<String, String> =
            a.into_iter().filter(|(k, _)| k.starts_with(annotations::PREFIX)).collect();
        meta.annotations = (!kept.is_empty()).then_some(kept);
    }
}

fn strip_service(svc: &mut Service) {
    mesh_annotations(&mut svc.metadata);
    svc.status = None;
}

fn strip_route(route: &mut http_routes::HttpRoute) {
    route.metadata.managed_fields = None;
    route.metadata.annotations = None;
}

fn strip_slice(slice: &mut EndpointSlice) {
    slice.metadata.managed_fields = None;
    slice.metadata.annotations = None;
}

/// Pods are the largest and most numerous objects; keep only what the mappings
/// read (annotations, labels, service account, node, host network, host and pod IPs).
fn strip_pod(pod: &mut Pod) {
    mesh_annotations(&mut pod.metadata);
    pod.metadata.owner_references = None;
    pod.spec = pod.spec.take().map(|s| PodSpec {
        service_account_name: s.service_account_name,
        node_name: s.node_name,
        host_network: s.host_network,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        host_ip: s.host_ip,
        host_ips: s.host_ips,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..Default::default()
    });
}
