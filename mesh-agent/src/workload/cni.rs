//! Pods handed to the agent by the `mesh-cni` plugin: the contract's types (shared
//! with the plugin, from `mesh_cni::contract`), the [`PodSink`] the agent implements
//! to start and stop serving a pod, and [`CniPods`], which stands between the two:
//! it checks what the plugin sends, makes repeated and concurrent calls for one
//! container safe, keeps calls for different containers apart, and records each
//! served pod in the [`WorkloadStore`] so a restarted agent serves it again
//! ([`CniPods::restore`]). [`super::cni_http`] turns requests on the agent's unix
//! socket into calls here.
//!
//! Idempotency, by container id (the sandbox, which the runtime never reuses):
//! - ADD of a served container with the same announcement (addresses compared as
//!   sets) answers as the first ADD did, without asking the sink again; with any
//!   difference it is refused ([`code::CONFLICT`]) naming the fields, and the served
//!   pod is left as it was. A runtime that retries an ADD after a timeout sends the
//!   same announcement; a different one means two sandboxes disagree.
//! - Another container announcing a network namespace already served is refused.
//! - DEL of an unknown container succeeds: DEL must be repeatable.
//! - Calls for one container run one at a time (a DEL that arrives during its ADD
//!   waits for it); calls for different containers never wait for each other.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

pub use mesh_cni::contract::{
    ADD_PATH, CHECK_PATH, CniError, DEL_PATH, InvalidField, MAX_BODY_BYTES, PATH_PREFIX, PodAnnounce, PodRef,
    PodRelease, PodServed, code,
};
use tracing::{info, warn};

use super::store::{Dropped, StoreError, WorkloadStore};

/// What the agent does when a pod comes and goes; the agent's workload model
/// implements it. Each call concerns one pod and must leave the others alone.
/// [`CniPods`] never calls it twice at once for the same container, bounds each call
/// by [`CniLimits::sink_timeout`], and calls [`PodSink::remove`] after an `add` that
/// timed out, so `remove` must accept a pod that was half added or never added.
pub trait PodSink: Send + Sync + 'static {
    /// Starts serving `pod` (listeners in its network namespace, interception, its
    /// identity from the control plane's snapshot). Returns once it is served: the
    /// runtime starts the pod's containers after ADD returns. Refuse a pod the
    /// control plane does not know with [`CniError::pod_unknown`].
    fn add(&self, pod: &PodAnnounce) -> impl Future<Output = Result<PodServed, CniError>> + Send;

    /// Serves again a pod the CNI admitted before the agent restarted. The control
    /// plane's snapshot may not have arrived yet, so an implementation should not
    /// refuse the pod for an identity it cannot see yet. Defaults to [`PodSink::add`].
    fn restore(&self, pod: &PodAnnounce) -> impl Future<Output = Result<PodServed, CniError>> + Send {
        self.add(pod)
    }

    /// Stops serving `pod`; succeeds when there is nothing (left) to stop.
    fn remove(&self, pod: &PodAnnounce) -> impl Future<Output = Result<(), CniError>> + Send;

    /// Whether `pod` is served as it was added (listeners open, interception in place).
    fn check(&self, pod: &PodAnnounce) -> impl Future<Output = Result<PodServed, CniError>> + Send;
}

/// Bounds on what the plugin can make the agent do.
#[derive(Debug, Clone)]
pub struct CniLimits {
    /// Most pods served through the CNI at once (the kubelet's default is 110 per node).
    pub max_pods: usize,
    /// Longest a sink call may take.
    pub sink_timeout: Duration,
}

impl Default for CniLimits {
    fn default() -> Self {
        Self { max_pods: 1024, sink_timeout: Duration::from_secs(30) }
    }
}

/// A container the CNI added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniRecord {
    pub pod: PodAnnounce,
    /// `None` when serving it again after a restart failed (CHECK says so, an
    /// identical ADD tries again, DEL removes it).
    pub served: Option<PodServed>,
}

/// One container's state; its async lock orders that container's calls.
type Slot = Arc<tokio::sync::Mutex<Option<CniRecord>>>;

/// Added pods by container id, and which container holds each network namespace.
#[derive(Debug, Default)]
struct Index {
    pods: BTreeMap<String, PodAnnounce>,
    netns: HashMap<String, String>,
}

/// What [`CniPods::restore`] did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Container ids served again.
    pub restored: Vec<String>,
    /// Pods the sink would not serve again (kept: CHECK reports them, DEL removes them).
    pub failed: Vec<(String, CniError)>,
    /// Lines of the state file not restored (a gone netns, damage).
    pub dropped: Vec<Dropped>,
    /// The file could not be read at all (the agent starts with no CNI pods).
    pub error: Option<String>,
}

/// The CNI side of the agent's workload set (see the module docs).
pub struct CniPods<S> {
    sink: S,
    store: Option<Arc<WorkloadStore>>,
    limits: CniLimits,
    slots: Mutex<HashMap<String, Slot>>,
    index: Arc<Mutex<Index>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for CniPods<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CniPods")
            .field("sink", &self.sink)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: PodSink> CniPods<S> {
    /// `store` is where served pods are recorded (`None`: not persisted, for tests
    /// and hosts without a CNI).
    pub fn new(sink: S, store: Option<WorkloadStore>, limits: CniLimits) -> Self {
        Self {
            sink,
            store: store.map(Arc::new),
            limits,
            slots: Mutex::new(HashMap::new()),
            index: Arc::new(Mutex::new(Index::default())),
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The pods added through the CNI (or restored), by container id.
    pub fn pods(&self) -> Vec<PodAnnounce> {
        lock(&self.index).pods.values().cloned().collect()
    }

    /// The container's slot, made if `create`; refuses past [`CniLimits::max_pods`].
    fn slot(&self, container_id: &str, create: bool) -> Result<Option<Slot>, CniError> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(container_id) {
            return Ok(Some(s.clone()));
        }
        if !create {
            return Ok(None);
        }
        if slots.len() >= self.limits.max_pods {
            return Err(CniError::new(
                code::LIMIT,
                format!("this node's agent already serves {} pods, its limit", self.limits.max_pods),
            ));
        }
        let slot = Slot::default();
        slots.insert(container_id.to_owned(), slot.clone());
        Ok(Some(slot))
    }

    /// Forgets an empty slot nobody else holds (holders clone it under `slots`).
    fn release_slot(&self, container_id: &str, slot: Slot) {
        let mut slots = lock(&self.slots);
        // Ours and the map's: no other call is waiting on it.
        if Arc::strong_count(&slot) == 2 && slot.try_lock().is_ok_and(|r| r.is_none()) {
            slots.remove(container_id);
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        pod: &PodAnnounce,
        call: impl Future<Output = Result<T, CniError>>,
    ) -> Result<T, CniError> {
        match tokio::time::timeout(self.limits.sink_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the agent took longer than {:?} to {what} {}",
                    self.limits.sink_timeout,
                    pod.describe()
                ),
            )),
        }
    }

    /// Writes the index to the store (in the blocking pool; the index is read under
    /// the store's write lock, so the last write holds the newest state).
    async fn persist(&self) -> Result<(), StoreError> {
        let Some(store) = self.store.clone() else { return Ok(()) };
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            let pods: Vec<PodAnnounce> = lock(&index).pods.values().cloned().collect();
            store.save(&pods)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Io { path: "workload state".into(), source: std::io::Error::other(e) })
        })
    }

    /// CNI ADD (see the module docs for repeats and conflicts).
    pub async fn add(&self, pod: PodAnnounce) -> Result<PodServed, CniError> {
        pod.check()?;
        let slot = self.slot(&pod.container_id, true)?.expect("created");
        let result = self.add_in(&slot, pod.clone()).await;
        self.release_slot(&pod.container_id, slot);
        result
    }

    async fn add_in(&self, slot: &Slot, pod: PodAnnounce) -> Result<PodServed, CniError> {
        let mut record = slot.lock().await;
        if let Some(existing) = record.as_ref() {
            let diffs = shown(&existing.pod, &pod);
            if !diffs.is_empty() {
                return Err(CniError::new(
                    code::CONFLICT,
                    format!(
                        "container {} is already served as {} with a different {}; DEL it before adding it again",
                        pod.container_id,
                        existing.pod.describe(),
                        diffs
                    ),
                ));
            }
            if let Some(served) = &existing.served {
                return Ok(served.clone());
            }
        }
        // Claim the network namespace before the sink opens anything in it.
        {
            let mut index = lock(&self.index);
            match index.netns.get(&pod.netns) {
                Some(holder) if *holder != pod.container_id => {
                    return Err(CniError::new(
                        code::CONFLICT,
                        format!("network namespace {} is already served for container {holder}", pod.netns),
                    ));
                }
                _ => {
                    index.netns.insert(pod.netns.clone(), pod.container_id.clone());
                }
            }
        }
        let served = match self.bounded("serve", &pod, self.sink.add(&pod)).await {
            Ok(s) => s,
            Err(e) => {
                if e.code == code::TRY_AGAIN_LATER {
                    // The add may have got half way: undo whatever it did.
                    let _ = self.bounded("release", &pod, self.sink.remove(&pod)).await;
                }
                if record.is_none() {
                    lock(&self.index).netns.remove(&pod.netns);
                }
                return Err(e);
            }
        };
        lock(&self.index).pods.insert(pod.container_id.clone(), pod.clone());
        if let Err(e) = self.persist().await {
            // A pod not on record would not be served after a restart: refuse it now,
            // the runtime retries, rather than lose it silently later.
            let _ = self.bounded("release", &pod, self.sink.remove(&pod)).await;
            let mut index = lock(&self.index);
            index.pods.remove(&pod.container_id);
            index.netns.remove(&pod.netns);
            *record = None;
            return Err(CniError::new(code::AGENT_FAILED, format!("recording {} failed", pod.describe()))
                .with_details(e.to_string()));
        }
        info!(container = %pod.container_id, netns = %pod.netns, workload = %pod.describe(), identity = ?served.identity, "CNI pod served");
        *record = Some(CniRecord { pod, served: Some(served.clone()) });
        Ok(served)
    }

    /// CNI DEL: succeeds for a container this agent does not know.
    pub async fn remove(&self, release: PodRelease) -> Result<(), CniError> {
        release.check()?;
        let Some(slot) = self.slot(&release.container_id, false)? else { return Ok(()) };
        let result = async {
            let mut record = slot.lock().await;
            let Some(existing) = record.as_ref() else { return Ok(()) };
            let pod = existing.pod.clone();
            self.bounded("release", &pod, self.sink.remove(&pod)).await?;
            {
                let mut index = lock(&self.index);
                index.pods.remove(&pod.container_id);
                index.netns.remove(&pod.netns);
            }
            *record = None;
            if let Err(e) = self.persist().await {
                // Harmless beyond a restart: the entry's netns is gone by then and it is dropped on load.
                warn!(error = %e, container = %pod.container_id, "removing a CNI pod from the state file failed");
            }
            info!(container = %pod.container_id, workload = %pod.describe(), "CNI pod released");
            Ok(())
        }
        .await;
        self.release_slot(&release.container_id, slot);
        result
    }

    /// CNI CHECK: the container is served, as announced, and the sink confirms it.
    pub async fn check(&self, pod: PodAnnounce) -> Result<PodServed, CniError> {
        pod.check()?;
        let not_served = |why: String| CniError::new(code::NOT_SERVED, why);
        let Some(slot) = self.slot(&pod.container_id, false)? else {
            return Err(not_served(format!(
                "container {} is not served by this node's agent",
                pod.container_id
            )));
        };
        let result = async {
            let record = slot.lock().await;
            let Some(existing) = record.as_ref() else {
                return Err(not_served(format!(
                    "container {} is not served by this node's agent",
                    pod.container_id
                )));
            };
            let diffs = shown(&existing.pod, &pod);
            if !diffs.is_empty() {
                return Err(not_served(format!(
                    "container {} is served with a different {} than the runtime has",
                    pod.container_id, diffs
                )));
            }
            if existing.served.is_none() {
                return Err(not_served(format!(
                    "{} was not served again after the agent restarted (see the agent's log)",
                    pod.describe()
                )));
            }
            self.bounded("check", &pod, self.sink.check(&existing.pod)).await
        }
        .await;
        self.release_slot(&pod.container_id, slot);
        result
    }

    /// Serves again every pod in the state file whose network namespace still
    /// exists (`netns_alive`), then rewrites the file without the rest. Call once, at
    /// start, before the unix socket accepts CNI calls.
    pub async fn restore(&self, netns_alive: impl Fn(&str) -> bool + Send + 'static) -> RestoreReport {
        let mut report = RestoreReport::default();
        let Some(store) = self.store.clone() else { return report };
        let loaded = match tokio::task::spawn_blocking(move || store.load(netns_alive)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                report.error = Some(e.to_string());
                return report;
            }
            Err(e) => {
                report.error = Some(e.to_string());
                return report;
            }
        };
        report.dropped = loaded.dropped;
        for pod in loaded.pods {
            let Ok(Some(slot)) = self.slot(&pod.container_id, true) else { continue };
            let mut record = slot.lock().await;
            {
                let mut index = lock(&self.index);
                index.netns.insert(pod.netns.clone(), pod.container_id.clone());
                index.pods.insert(pod.container_id.clone(), pod.clone());
            }
            let served = match self.bounded("serve again", &pod, self.sink.restore(&pod)).await {
                Ok(s) => {
                    report.restored.push(pod.container_id.clone());
                    Some(s)
                }
                Err(e) => {
                    report.failed.push((pod.container_id.clone(), e));
                    None
                }
            };
            *record = Some(CniRecord { pod, served });
        }
        if let Err(e) = self.persist().await {
            report.error = Some(e.to_string());
        }
        report
    }
}

/// The fields in which two announcements of one container differ, then both values of
/// each: `ips (served 10.88.0.10 vs now 10.88.0.99)`; empty when they agree.
fn shown(served: &PodAnnounce, announced: &PodAnnounce) -> String {
    let diffs = served.differences_shown(announced);
    if diffs.is_empty() {
        return String::new();
    }
    let fields: Vec<&str> = diffs.iter().map(|(field, _)| *field).collect();
    let values: Vec<String> = diffs.iter().map(|(field, values)| format!("{field} {values}")).collect();
    format!("{} (served vs now: {})", fields.join(", "), values.join("; "))
}

#[cfg(test)]
#[path = "cni_tests.rs"]
mod tests;
