//! What the control plane knows about each agent that has connected, bounded: at
//! most [`BookLimits::streams_per_node`] discovery streams per node (a new one
//! closes the oldest, which is most likely a dead connection not yet noticed), at
//! most [`BookLimits::max_agents`] nodes in the book (a new node evicts the one gone
//! longest, and is refused while every entry is connected), and agents gone longer
//! than [`BookLimits::retention`] are forgotten.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_api as api;
use tokio_util::sync::CancellationToken;

/// Default of `--max-streams-per-node`.
pub const DEFAULT_STREAMS_PER_NODE: usize = 4;
/// Default of `--max-agents`.
pub const DEFAULT_MAX_AGENTS: usize = 10_000;
/// Default of `--agent-retention`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

/// The book's bounds.
#[derive(Debug, Clone, Copy)]
pub struct BookLimits {
    /// Open discovery streams per node.
    pub streams_per_node: usize,
    /// Nodes remembered.
    pub max_agents: usize,
    /// How long a disconnected agent is remembered.
    pub retention: Duration,
}

impl Default for BookLimits {
    fn default() -> Self {
        BookLimits {
            streams_per_node: DEFAULT_STREAMS_PER_NODE,
            max_agents: DEFAULT_MAX_AGENTS,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// Why a stream was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{max} agents are connected (--max-agents); node {node:?} is not admitted")]
pub struct BookFull {
    pub node: String,
    pub max: usize,
}

#[derive(Debug)]
struct Entry {
    status: api::AgentStatus,
    /// Open streams, oldest first: (id, token closing it).
    streams: VecDeque<(u64, CancellationToken)>,
    /// When the last stream closed (None while one is open).
    gone_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    agents: HashMap<String, Entry>,
    next_stream: u64,
}

/// Every agent's status; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct AgentBook {
    inner: Arc<Mutex<Inner>>,
    limits: BookLimits,
}

/// One admitted discovery stream: [`StreamSlot::closed`] resolves when a newer
/// stream of the same node pushed it out; dropping it records the disconnect.
#[derive(Debug)]
pub struct StreamSlot {
    book: AgentBook,
    node: String,
    id: u64,
    close: CancellationToken,
}

impl StreamSlot {
    /// Resolves when the book closed this stream (superseded).
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.book.close_stream(&self.node, self.id, Instant::now());
    }
}

impl AgentBook {
    /// A book with `limits`.
    pub fn new(limits: BookLimits) -> AgentBook {
        AgentBook { inner: Default::default(), limits }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a stream of `node`, recording it connected and applying `f` to its
    /// status: closes the node's oldest stream beyond the per-node limit, and evicts
    /// agents gone too long (or, if the book is full, the one gone longest).
    pub fn open_stream(
        &self,
        node: &str,
        f: impl FnOnce(&mut api::AgentStatus),
    ) -> Result<StreamSlot, BookFull> {
        self.open_stream_at(node, Instant::now(), f)
    }

    fn open_stream_at(
        &self,
        node: &str,
        now: Instant,
        f: impl FnOnce(&mut api::AgentStatus),
    ) -> Result<StreamSlot, BookFull> {
        let mut inner = self.lock();
        evict_gone(&mut inner.agents, now, self.limits.retention);
        if !inner.agents.contains_key(node) && inner.agents.len() >= self.limits.max_agents {
            let longest_gone =
                inner.agents.iter().filter_map(|(name, e)| e.gone_since.map(|t| (t, name.clone()))).min();
            match longest_gone {
                Some((_, name)) => {
                    inner.agents.remove(&name);
                    limit_hit(
                        "max_agents",
                        format_args!("book full: forgot agent {name:?} (disconnected) for {node:?}"),
                    );
                }
                None => {
                    limit_hit(
                        "max_agents",
                        format_args!("{} agents connected; refused node {node:?}", self.limits.max_agents),
                    );
                    return Err(BookFull { node: node.to_owned(), max: self.limits.max_agents });
                }
            }
        }
        inner.next_stream += 1;
        let id = inner.next_stream;
        let close = CancellationToken::new();
        let entry = inner.agents.entry(node.to_owned()).or_insert_with(|| Entry {
            status: api::AgentStatus { node: node.into(), ..Default::default() },
            streams: VecDeque::new(),
            gone_since: None,
        });
        entry.streams.push_back((id, close.clone()));
        while entry.streams.len() > self.limits.streams_per_node.max(1) {
            if let Some((_, oldest)) = entry.streams.pop_front() {
                oldest.cancel();
                limit_hit(
                    "streams_per_node",
                    format_args!(
                        "node {node:?} opened stream {} of at most {}; its oldest stream is closed",
                        self.limits.streams_per_node + 1,
                        self.limits.streams_per_node
                    ),
                );
            }
        }
        entry.gone_since = None;
        entry.status.connected = true;
        f(&mut entry.status);
        entry.status.last_seen = now_secs();
        drop(inner);
        Ok(StreamSlot { book: self.clone(), node: node.to_owned(), id, close })
    }

    fn close_stream(&self, node: &str, id: u64, now: Instant) {
        let mut inner = self.lock();
        let Some(entry) = inner.agents.get_mut(node) else { return };
        entry.streams.retain(|(s, _)| *s != id);
        if entry.streams.is_empty() {
            entry.status.connected = false;
            entry.gone_since = Some(now);
            entry.status.last_seen = now_secs();
            tracing::info!(node = %node, "agent disconnected");
        }
    }

    /// Applies `f` to `node`'s status (an ACK, a NACK, a version sent), if known.
    pub fn update(&self, node: &str, f: impl FnOnce(&mut api::AgentStatus)) {
        if let Some(entry) = self.lock().agents.get_mut(node) {
            f(&mut entry.status);
            entry.status.last_seen = now_secs();
        }
    }

    /// Every agent, sorted by node name.
    pub fn list(&self) -> Vec<api::AgentStatus> {
        let mut inner = self.lock();
        evict_gone(&mut inner.agents, Instant::now(), self.limits.retention);
        let mut v: Vec<_> = inner.agents.values().map(|e| e.status.clone()).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Number of agents with an open stream.
    pub fn connected(&self) -> usize {
        self.lock().agents.values().filter(|e| !e.streams.is_empty()).count()
    }

    /// Open streams of `node`.
    pub fn streams(&self, node: &str) -> usize {
        self.lock().agents.get(node).map_or(0, |e| e.streams.len())
    }
}

fn evict_gone(agents: &mut HashMap<String, Entry>, now: Instant, retention: Duration) {
    agents.retain(|_, e| e.gone_since.is_none_or(|t| now.saturating_duration_since(t) < retention));
}

fn limit_hit(limit: &'static str, detail: std::fmt::Arguments<'_>) {
    crate::metrics::limit_hit(limit, detail);
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(streams_per_node: usize, max_agents: usize) -> AgentBook {
        AgentBook::new(BookLimits { streams_per_node, max_agents, retention: Duration::from_secs(60) })
    }

    #[test]
    fn a_stream_beyond_the_per_node_limit_closes_the_oldest() {
        let b = book(2, 10);
        let first = b.open_stream("a", |_| {}).unwrap();
        let second = b.open_stream("a", |_| {}).unwrap();
        assert!(!first.close.is_cancelled());
        let third = b.open_stream("a", |_| {}).unwrap();
        assert!(first.close.is_cancelled(), "the oldest stream is told to close");
        assert!(!second.close.is_cancelled() && !third.close.is_cancelled());
        assert_eq!(b.streams("a"), 2);
        drop(first);
        assert_eq!((b.streams("a"), b.connected()), (2, 1), "the closed stream's end changes nothing");
        drop((second, third));
        assert_eq!(b.connected(), 0);
        assert!(!b.list()[0].connected);
    }

    #[test]
    fn agents_gone_past_the_retention_are_forgotten() {
        let b = book(4, 10);
        let t0 = Instant::now();
        drop(b.open_stream_at("gone", t0, |_| {}).unwrap());
        let _live = b.open_stream_at("live", t0, |_| {}).unwrap();
        assert_eq!(b.list().len(), 2);
        let later = Instant::now() + Duration::from_secs(61);
        let _other = b.open_stream_at("other", later, |_| {}).unwrap();
        let nodes: Vec<String> = b.list().into_iter().map(|a| a.node).collect();
        assert_eq!(nodes, ["live", "other"], "a connected agent is kept however old");
    }

    #[test]
    fn a_full_book_forgets_the_agent_gone_longest_or_refuses() {
        let b = book(4, 2);
        let t0 = Instant::now();
        let a = b.open_stream_at("a", t0, |_| {}).unwrap();
        let bb = b.open_stream_at("b", t0, |_| {}).unwrap();
        let e = b.open_stream_at("c", t0, |_| {}).unwrap_err();
        assert_eq!(e, BookFull { node: "c".into(), max: 2 });
        assert!(e.to_string().contains("--max-agents"), "{e}");
        b.close_stream("a", a.id, t0);
        b.close_stream("b", bb.id, t0 + Duration::from_secs(1));
        std::mem::forget((a, bb));
        let _c = b.open_stream_at("c", t0 + Duration::from_secs(2), |_| {}).unwrap();
        let nodes: Vec<String> = b.list().into_iter().map(|a| a.node).collect();
        assert_eq!(nodes, ["b", "c"], "the agent gone longest made room");
        let _b2 = b
            .open_stream_at("b", t0 + Duration::from_secs(3), |_| {})
            .expect("a known node is always admitted");
    }

    #[test]
    fn updates_of_unknown_nodes_are_ignored() {
        let b = book(4, 10);
        b.update("nobody", |s| s.acked_version = 3);
        assert!(b.list().is_empty(), "an update never grows the book");
    }
}
