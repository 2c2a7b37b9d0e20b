//! Traffic per edge (source -> destination service) for the control plane's
//! dashboard: the same events the Prometheus metrics record, summed per window and
//! sent as an `EdgeReport` on the discovery stream, so the dashboard needs no
//! Prometheus.
//!
//! The hot path stays lock-light: a connection (or an HTTP connection's requests)
//! looks its edge up once, in a map behind a mutex held only for the lookup, and
//! then records with atomic adds on the [`EdgeCell`] it keeps. The reporter swaps
//! the counters to zero every window and forgets edges nobody holds that saw
//! nothing. Everything is bounded: [`MAX_TRACKED_EDGES`] edges (past it, traffic
//! is counted as dropped rather than tracked), and the breaker and ejection tables
//! at [`MAX_NODE_ENTRIES`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_api::{self as api, edges as shape};

use super::{
    labels::MeshName,
    metrics::{RequestLabels, RequestOutcome},
};
use crate::listener::Direction;

/// Edges tracked at once; a mesh's configuration bounds them (workloads of this
/// node times services, plus callers' identities inbound).
pub const MAX_TRACKED_EDGES: usize = 4 * shape::MAX_EDGES_PER_REPORT;
/// Breaker and ejection entries kept, each.
const MAX_NODE_ENTRIES: usize = shape::MAX_NODE_ENTRIES_PER_REPORT;

/// Which edge a record belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EdgeKey {
    /// Recorded by the destination's agent (source: the caller's principal) rather
    /// than the caller's (source: the calling workload).
    pub inbound: bool,
    pub source: MeshName,
    pub service: MeshName,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    pub mtls: bool,
}

/// One edge's counters for the current window.
#[derive(Debug, Default)]
pub struct EdgeCell {
    requests: AtomicU64,
    errors: AtomicU64,
    denials: AtomicU64,
    bytes: AtomicU64,
    latency: [AtomicU64; shape::LATENCY_BUCKET_COUNT],
}

impl EdgeCell {
    /// A finished request: `error` for 5xx, gRPC non-OK or no response.
    pub fn request(&self, latency: Duration, error: bool, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let bucket = shape::latency_bucket(latency.as_secs_f64() * 1000.0);
        if let Some(b) = self.latency.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A TCP connection opened (counted as the edge's request).
    pub fn connection(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection that never reached its destination.
    pub fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn denied(&self) {
        self.denials.fetch_add(1, Ordering::Relaxed);
    }

    /// The window's counts, reset to zero; `None` when nothing happened.
    fn take(&self) -> Option<Counts> {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        let counts = Counts {
            requests: take(&self.requests),
            errors: take(&self.errors),
            denials: take(&self.denials),
            bytes: take(&self.bytes),
            latency: self.latency.iter().map(take).collect(),
        };
        (counts.requests | counts.errors | counts.denials | counts.bytes != 0).then_some(counts)
    }
}

struct Counts {
    requests: u64,
    errors: u64,
    denials: u64,
    bytes: u64,
    latency: Vec<u64>,
}

/// The node's edges and the node state the dashboard shows beside them.
#[derive(Debug, Default)]
pub struct Edges {
    cells: Mutex<HashMap<EdgeKey, Arc<EdgeCell>>>,
    /// Where records of edges past [`MAX_TRACKED_EDGES`] go: counted, not reported.
    overflow: Arc<EdgeCell>,
    /// Breakers not closed, by (service, endpoint).
    breakers: Mutex<BTreeMap<(String, String), &'static str>>,
    /// Ejections this window, by (service, endpoint).
    ejections: Mutex<BTreeMap<(String, String), u32>>,
}

/// What one window produced (without the workloads, which the agent adds).
#[derive(Debug, Default)]
pub struct Window {
    pub edges: Vec<api::EdgeSummary>,
    pub dropped_edges: u32,
    pub breakers: Vec<api::BreakerState>,
    pub ejections: Vec<api::OutlierEjection>,
}

static GLOBAL: LazyLock<Edges> = LazyLock::new(Edges::default);

/// The process's aggregator, fed by [`super::metrics`]'s recording functions.
pub fn global() -> &'static Edges {
    &GLOBAL
}

impl Edges {
    /// The cell to record `key`'s traffic in; keep it for the connection's life.
    pub fn edge(&self, key: EdgeKey) -> Arc<EdgeCell> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cell) = cells.get(&key) {
            return cell.clone();
        }
        if cells.len() >= MAX_TRACKED_EDGES {
            return self.overflow.clone();
        }
        cells.entry(key).or_default().clone()
    }

    /// Publishes a breaker's state (`None`: closed, forgotten).
    pub fn breaker(&self, service: &str, endpoint: &str, state: Option<&'static str>) {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (service.to_owned(), endpoint.to_owned());
        match state {
            None => {
                breakers.remove(&key);
            }
            Some(s) if breakers.len() < MAX_NODE_ENTRIES || breakers.contains_key(&key) => {
                breakers.insert(key, s);
            }
            Some(_) => {}
        }
    }

    /// Counts an ejection by outlier detection.
    pub fn ejection(&self, service: &str, endpoint: &str) {
        let mut ejections = self.ejections.lock().unwrap_or_else(|p| p.into_inner());
        let key = (service.to_owned(), endpoint.to_owned());
        if ejections.len() < MAX_NODE_ENTRIES || ejections.contains_key(&key) {
            let n = ejections.entry(key).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// Ends the window: every edge that saw traffic (at most
    /// [`shape::MAX_EDGES_PER_REPORT`], busiest first), the breakers not closed, the
    /// window's ejections. Edges that saw nothing and that no connection holds are
    /// forgotten.
    pub fn take(&self) -> Window {
        let mut edges = Vec::new();
        {
            let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
            cells.retain(|key, cell| match cell.take() {
                Some(c) => {
                    edges.push(summary(key, c));
                    true
                }
                None => Arc::strong_count(cell) > 1,
            });
        }
        let overflow = self.overflow.take().map_or(0, |c| c.requests.max(1));
        edges.sort_by_key(|e| std::cmp::Reverse(e.requests));
        let cut = edges.len().saturating_sub(shape::MAX_EDGES_PER_REPORT);
        edges.truncate(shape::MAX_EDGES_PER_REPORT);
        let dropped_edges = u32::try_from(cut).unwrap_or(u32::MAX).saturating_add(u32::from(overflow > 0));
        let breakers = self
            .breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((service, endpoint), state)| api::BreakerState {
                service: service.clone(),
                endpoint: endpoint.clone(),
                state: (*state).to_owned(),
            })
            .collect();
        let ejections = std::mem::take(&mut *self.ejections.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|((service, endpoint), count)| api::OutlierEjection { service, endpoint, count })
            .collect();
        Window { edges, dropped_edges, breakers, ejections }
    }
}

fn summary(key: &EdgeKey, c: Counts) -> api::EdgeSummary {
    api::EdgeSummary {
        source: key.source.as_str().to_owned(),
        destination_service: key.service.as_str().to_owned(),
        inbound: key.inbound,
        protocol: key.protocol.to_owned(),
        mtls: key.mtls,
        requests: c.requests,
        errors: c.errors,
        denials: c.denials,
        bytes: c.bytes,
        latency_buckets: c.latency,
    }
}

// The metrics' request records, seen as the dashboard's edges.

impl RequestLabels {
    /// The dashboard's edge these requests belong to.
    pub(super) fn edge(&self) -> EdgeKey {
        let inbound = matches!(self.direction, Direction::Inbound);
        EdgeKey {
            inbound,
            source: if inbound { self.source_identity.clone() } else { self.source_workload.clone() },
            service: self.destination_service.clone(),
            protocol: "http",
            mtls: self.mtls,
        }
    }
}

impl RequestOutcome {
    /// Whether the dashboard counts it as an error: no response, a 5xx, or a gRPC
    /// status other than OK.
    pub(super) fn is_error(&self) -> bool {
        self.status.is_none_or(|s| s >= 500) || self.grpc_status.is_some_and(|g| g != 0)
    }

    pub(super) fn record_edge(&self, edge: &EdgeCell) {
        edge.request(self.duration, self.is_error(), self.request_bytes.saturating_add(self.response_bytes));
    }
}

/// Counts a denial by authorization policy at the destination on the edge from
/// `caller` (a principal) to `service`; `layer` as for the metric.
pub(super) fn denied(service: &MeshName, caller: &str, layer: &str) {
    global()
        .edge(EdgeKey {
            inbound: true,
            source: MeshName::known(caller),
            service: service.clone(),
            protocol: if layer == "request" { "http" } else { "tcp" },
            mtls: caller != crate::authz::UNAUTHENTICATED,
        })
        .denied();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: &str, service: &str) -> EdgeKey {
        EdgeKey {
            inbound: false,
            source: MeshName::known(source),
            service: MeshName::known(service),
            protocol: "http",
            mtls: true,
        }
    }

    #[test]
    fn a_window_sums_each_edge_and_resets_it() {
        let edges = Edges::default();
        let cell = edges.edge(key("shop/frontend", "shop/api"));
        cell.request(Duration::from_millis(3), false, 100);
        cell.request(Duration::from_millis(3), true, 50);
        edges.edge(key("shop/frontend", "shop/api")).denied();
        let w = edges.take();
        assert_eq!(w.edges.len(), 1);
        let e = &w.edges[0];
        assert_eq!((e.requests, e.errors, e.denials, e.bytes), (2, 1, 1, 150));
        assert_eq!(e.latency_buckets[shape::latency_bucket(3.0)], 2);
        assert_eq!(
            (e.source.as_str(), e.destination_service.as_str(), e.mtls),
            ("shop/frontend", "shop/api", true)
        );
        assert!(edges.take().edges.is_empty(), "counters were reset");
        // Held by a connection: kept while idle; dropped: forgotten.
        assert_eq!(edges.cells.lock().unwrap().len(), 1);
        drop(cell);
        edges.take();
        assert!(edges.cells.lock().unwrap().is_empty());
    }

    #[test]
    fn edges_past_the_bound_are_counted_as_dropped_not_tracked() {
        let edges = Edges::default();
        let held: Vec<_> = (0..MAX_TRACKED_EDGES + 3)
            .map(|i| {
                let c = edges.edge(key(&format!("shop/w{i}"), "shop/api"));
                c.connection();
                c
            })
            .collect();
        assert_eq!(edges.cells.lock().unwrap().len(), MAX_TRACKED_EDGES);
        let w = edges.take();
        assert_eq!(w.edges.len(), shape::MAX_EDGES_PER_REPORT);
        let cut = (MAX_TRACKED_EDGES - shape::MAX_EDGES_PER_REPORT) as u32;
        assert_eq!(w.dropped_edges, cut + 1, "the cut edges and the untracked ones");
        drop(held);
    }

    #[test]
    fn breakers_show_until_closed_and_ejections_per_window() {
        let edges = Edges::default();
        edges.breaker("shop/api", "10.0.0.1:80", Some("open"));
        edges.ejection("shop/api", "10.0.0.1:80");
        edges.ejection("shop/api", "10.0.0.1:80");
        let w = edges.take();
        assert_eq!(w.breakers.len(), 1);
        assert_eq!(w.ejections[0].count, 2);
        edges.breaker("shop/api", "10.0.0.1:80", None);
        let w = edges.take();
        assert!(w.breakers.is_empty() && w.ejections.is_empty());
    }
}
