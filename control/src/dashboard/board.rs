//! The agents' edge reports as the control plane keeps them: per agent, a bounded
//! ring of its last windows and its latest node state (breakers, workloads and
//! certificates). An agent's data stays for a grace period after its stream ends
//! (a reconnecting agent keeps its history), then goes.
//!
//! Every read takes `now` (Unix milliseconds), so tests drive time by hand.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use mesh_api::{self as api, edges as shape};

/// How long windows are kept: the service page plots this much.
pub const HISTORY_MS: u64 = 5 * 60 * 1000;
/// Windows kept per agent, whatever their length (1-s windows over [`HISTORY_MS`],
/// with room for a faster agent).
const MAX_WINDOWS_PER_AGENT: usize = 600;
/// Agents kept; the agent book bounds streams already, this bounds the board too.
const MAX_AGENTS: usize = 10_000;
/// How long an agent's data outlives its stream.
pub const GRACE_MS: u64 = 60 * 1000;
/// Edge entries kept per agent over all its windows (200 edges every second for
/// the whole history); the oldest windows go first. With names bounded too, an
/// agent's history stays within a few tens of MiB whatever it sends.
const MAX_EDGE_ENTRIES_PER_AGENT: usize = 60_000;
/// The longest name kept (a DNS name's length, as the agents' label values).
const MAX_NAME: usize = 253;

/// One report as received.
#[derive(Debug, Clone)]
pub struct Window {
    /// When it arrived (Unix milliseconds): the end of the window.
    pub at_ms: u64,
    pub window_ms: u64,
    pub edges: Vec<api::EdgeSummary>,
    pub ejections: Vec<api::OutlierEjection>,
}

/// One agent's reports and latest state.
#[derive(Debug, Default)]
pub struct AgentData {
    pub windows: VecDeque<Window>,
    pub breakers: Vec<api::BreakerState>,
    pub workloads: Vec<api::WorkloadCertificate>,
    pub dropped_edges: u64,
    /// When its stream ended (`None` while connected).
    ended_at_ms: Option<u64>,
}

/// Every agent's reports. Cheap to clone; the lock is held only to copy in or out.
#[derive(Clone, Debug, Default)]
pub struct Board {
    agents: Arc<Mutex<BTreeMap<String, AgentData>>>,
}

/// An edge's traffic summed over agents and windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sum {
    pub requests: u64,
    pub errors: u64,
    pub denials: u64,
    pub bytes: u64,
    /// Requests per second over the windows summed.
    pub rps: f64,
    /// Denials per second, likewise.
    pub denials_per_s: f64,
    pub latency: [u64; shape::LATENCY_BUCKET_COUNT],
    /// Whether every report of the edge said mutual TLS.
    pub mtls: bool,
    pub http: bool,
}

impl Sum {
    fn add(&mut self, e: &api::EdgeSummary, covered_secs: f64) {
        if self.requests == 0 && self.errors == 0 && self.denials == 0 && self.bytes == 0 {
            self.mtls = e.mtls;
        } else {
            self.mtls &= e.mtls;
        }
        self.requests = self.requests.saturating_add(e.requests);
        self.errors = self.errors.saturating_add(e.errors);
        self.denials = self.denials.saturating_add(e.denials);
        self.bytes = self.bytes.saturating_add(e.bytes);
        self.rps += e.requests as f64 / covered_secs;
        self.denials_per_s += e.denials as f64 / covered_secs;
        self.http |= e.protocol == "http";
        shape::merge_buckets(&mut self.latency, &e.latency_buckets);
    }

    /// Adds another sum (of the same edge from another agent, or another protocol).
    pub fn merge(&mut self, o: &Sum) {
        let empty = self.requests == 0 && self.errors == 0 && self.denials == 0 && self.bytes == 0;
        self.mtls = if empty { o.mtls } else { self.mtls && o.mtls };
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.denials = self.denials.saturating_add(o.denials);
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.rps += o.rps;
        self.denials_per_s += o.denials_per_s;
        self.http |= o.http;
        shape::merge_buckets(&mut self.latency, &o.latency);
    }

    /// Errors as a percentage of requests (0 without requests).
    pub fn error_percent(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { 100.0 * self.errors as f64 / self.requests as f64 }
    }
}

/// Edge key: (recorded inbound, source, destination service).
pub type EdgeId = (bool, String, String);

impl Board {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `report` from the agent `node`, received at `now_ms`.
    pub fn record(&self, node: &str, report: api::EdgeReport, now_ms: u64) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if !agents.contains_key(node) && agents.len() >= MAX_AGENTS {
            tracing::debug!(node, "edge report dropped: the board holds as many agents as it may");
            return;
        }
        let a = agents.entry(node.to_owned()).or_default();
        a.ended_at_ms = None;
        let mut edges: Vec<api::EdgeSummary> = report
            .edges
            .into_iter()
            .filter(|e| e.source.len() <= MAX_NAME && e.destination_service.len() <= MAX_NAME)
            .take(shape::MAX_EDGES_PER_REPORT)
            .collect();
        for e in &mut edges {
            e.protocol.truncate(8);
            fold_buckets(&mut e.latency_buckets);
        }
        let short = |names: &[&String]| names.iter().all(|n| n.len() <= MAX_NAME);
        let ejections = bounded(report.ejections, |e| short(&[&e.service, &e.endpoint]));
        a.breakers = bounded(report.breakers, |b| short(&[&b.service, &b.endpoint, &b.state]));
        a.workloads = bounded(report.workloads, |w| short(&[&w.workload, &w.identity]));
        a.dropped_edges = a.dropped_edges.saturating_add(u64::from(report.dropped_edges));
        // A window is at least 1 ms and never longer than the history (a bogus
        // length must not make rates look tiny or huge).
        let window_ms = u64::from(report.window_ms).clamp(1, HISTORY_MS);
        a.windows.push_back(Window { at_ms: now_ms, window_ms, edges, ejections });
        let mut entries: usize = a.windows.iter().map(|w| w.edges.len()).sum();
        while a.windows.len() > MAX_WINDOWS_PER_AGENT || entries > MAX_EDGE_ENTRIES_PER_AGENT {
            let Some(old) = a.windows.pop_front() else { break };
            entries -= old.edges.len();
        }
        prune(&mut agents, now_ms);
    }

    /// The agent's stream ended at `now_ms`: its data goes after [`GRACE_MS`].
    pub fn stream_ended(&self, node: &str, now_ms: u64) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = agents.get_mut(node) {
            a.ended_at_ms = Some(now_ms);
        }
        prune(&mut agents, now_ms);
    }

    /// Nodes with data, for tests and the page.
    pub fn nodes(&self, now_ms: u64) -> Vec<String> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        agents.keys().cloned().collect()
    }

    /// Every edge's traffic over the windows that ended in the last `span_ms`.
    /// Rates divide each agent's counts by the time since its first window in the
    /// span began (agents skip idle windows, which count as time all the same; a
    /// new agent's rates are not diluted by the time before it reported), then add
    /// across agents.
    pub fn edges(&self, now_ms: u64, span_ms: u64) -> BTreeMap<EdgeId, Sum> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        let from = now_ms.saturating_sub(span_ms);
        let mut out: BTreeMap<EdgeId, Sum> = BTreeMap::new();
        for a in agents.values() {
            let recent: Vec<&Window> = a.windows.iter().filter(|w| w.at_ms > from).collect();
            let Some(start) = recent.iter().map(|w| w.at_ms.saturating_sub(w.window_ms)).min() else {
                continue;
            };
            let covered_ms = now_ms.saturating_sub(start.max(from));
            let covered_secs = (covered_ms as f64 / 1000.0).max(0.001);
            for w in recent {
                for e in &w.edges {
                    let id = (e.inbound, e.source.clone(), e.destination_service.clone());
                    out.entry(id).or_default().add(e, covered_secs);
                }
            }
        }
        out
    }

    /// Per second over the history, the traffic to `service`: outbound reports
    /// (the callers' view) where there are any, else inbound ones. Keys are Unix
    /// seconds.
    pub fn service_series(&self, service: &str, now_ms: u64) -> BTreeMap<u64, Sum> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        let from = now_ms.saturating_sub(HISTORY_MS);
        let mut by_side: [BTreeMap<u64, Sum>; 2] = Default::default();
        for a in agents.values() {
            for w in a.windows.iter().filter(|w| w.at_ms > from) {
                let secs = (w.window_ms as f64 / 1000.0).max(0.001);
                for e in w.edges.iter().filter(|e| e.destination_service == service) {
                    by_side[usize::from(e.inbound)].entry(w.at_ms / 1000).or_default().add(e, secs);
                }
            }
        }
        let [outbound, inbound] = by_side;
        if outbound.is_empty() { inbound } else { outbound }
    }

    /// Breakers not closed, by service: (endpoint, state, reporting node).
    pub fn breakers(&self, now_ms: u64) -> HashMap<String, Vec<(String, String, String)>> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        let mut out: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
        for (node, a) in agents.iter() {
            for b in &a.breakers {
                out.entry(b.service.clone()).or_default().push((
                    b.endpoint.clone(),
                    b.state.clone(),
                    node.clone(),
                ));
            }
        }
        out
    }

    /// Ejections by service and endpoint over the last `span_ms`.
    pub fn ejections(&self, now_ms: u64, span_ms: u64) -> HashMap<String, BTreeMap<String, u64>> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        let from = now_ms.saturating_sub(span_ms);
        let mut out: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
        for a in agents.values() {
            for w in a.windows.iter().filter(|w| w.at_ms > from) {
                for e in &w.ejections {
                    *out.entry(e.service.clone()).or_default().entry(e.endpoint.clone()).or_default() +=
                        u64::from(e.count);
                }
            }
        }
        out
    }

    /// Every agent's workloads: (node, workload, identity, certificate not-after).
    pub fn workloads(&self, now_ms: u64) -> Vec<(String, api::WorkloadCertificate)> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut agents, now_ms);
        agents.iter().flat_map(|(node, a)| a.workloads.iter().map(|w| (node.clone(), w.clone()))).collect()
    }

    /// Edges the agents left out of their reports, in all.
    pub fn dropped_edges(&self) -> u64 {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.values().map(|a| a.dropped_edges).sum()
    }
}

/// The entries that pass `keep`, at most [`shape::MAX_NODE_ENTRIES_PER_REPORT`].
fn bounded<T>(entries: Vec<T>, keep: impl Fn(&T) -> bool) -> Vec<T> {
    entries.into_iter().filter(|e| keep(e)).take(shape::MAX_NODE_ENTRIES_PER_REPORT).collect()
}

/// Keeps at most [`shape::LATENCY_BUCKET_COUNT`] counts, folding any more (from an
/// agent with finer buckets) into the last, open-ended one.
fn fold_buckets(buckets: &mut Vec<u64>) {
    if buckets.len() > shape::LATENCY_BUCKET_COUNT {
        let extra: u64 = buckets.drain(shape::LATENCY_BUCKET_COUNT..).fold(0, u64::saturating_add);
        if let Some(last) = buckets.last_mut() {
            *last = last.saturating_add(extra);
        }
    }
}

/// Drops windows older than the history and agents gone for longer than the grace.
fn prune(agents: &mut BTreeMap<String, AgentData>, now_ms: u64) {
    let from = now_ms.saturating_sub(HISTORY_MS);
    agents.retain(|_, a| {
        while a.windows.front().is_some_and(|w| w.at_ms <= from) {
            a.windows.pop_front();
        }
        a.ended_at_ms.is_none_or(|ended| now_ms.saturating_sub(ended) < GRACE_MS)
    });
}
