//! The routing table the data path reads, swapped whole on every applied snapshot,
//! and the workloads the control plane places on this node.
//!
//! Readers load an `Arc` of the current table without locking (arc-swap), so a
//! connection sees either the old or the new table, never a mix, and an update
//! never waits for readers. Placements are published on a watch channel, so what
//! serves workloads learns of each change.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use mesh_api::Workload;
use tokio::sync::watch;

use super::table::RouteTable;

/// Shared between the discovery client (writer) and the data path (readers).
#[derive(Debug)]
pub struct RouteStore {
    table: ArcSwap<RouteTable>,
    base: Instant,
    /// Milliseconds since `base` of the last applied snapshot (0: none yet).
    applied_at_ms: AtomicU64,
    /// Milliseconds since `base` when the stream was last seen alive.
    contact_ms: AtomicU64,
    connected: AtomicBool,
    /// Whether a control plane is configured at all.
    enabled: bool,
    /// The applied table's version, for those who wait for news (a pod the snapshot
    /// does not know yet).
    applied: tokio::sync::watch::Sender<u64>,
    /// This node's workloads (sorted by namespace then name), as last received.
    placements: watch::Sender<Arc<Vec<Workload>>>,
}

impl RouteStore {
    pub fn new(enabled: bool) -> Self {
        Self {
            table: ArcSwap::from_pointee(RouteTable::default()),
            base: Instant::now(),
            applied_at_ms: AtomicU64::new(0),
            contact_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            enabled,
            applied: tokio::sync::watch::Sender::new(0),
            placements: watch::Sender::new(Arc::default()),
        }
    }

    /// The workloads the control plane places on this node, and their changes: only
    /// this node's, as the control plane sends no other node's.
    pub fn placements(&self) -> watch::Receiver<Arc<Vec<Workload>>> {
        self.placements.subscribe()
    }

    /// Records the placements of the latest snapshot (subscribers wake only on change).
    pub(crate) fn set_placements(&self, workloads: Vec<Workload>) {
        self.placements.send_if_modified(|current| {
            if **current == workloads {
                return false;
            }
            *current = Arc::new(workloads);
            true
        });
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// The current table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Installs a validated table.
    pub fn apply(&self, table: RouteTable) {
        let version = table.version;
        self.table.store(Arc::new(table));
        let now = self.now_ms().max(1);
        self.applied_at_ms.store(now, Ordering::Release);
        self.contact_ms.store(now, Ordering::Release);
        // Last: a waiter woken by the version must find the rest already recorded.
        self.applied.send_replace(version);
    }

    /// Records the stream's state. Staleness counts from the moment a live stream
    /// was lost, not from the latest failed reconnect attempt.
    pub(crate) fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::AcqRel);
        if connected || was {
            self.contact_ms.store(self.now_ms().max(1), Ordering::Release);
        }
    }

    /// Changes whenever a table is applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether any snapshot has been applied.
    pub fn has_snapshot(&self) -> bool {
        self.applied_at_ms.load(Ordering::Acquire) != 0
    }

    /// How long the agent has been routing without a live control-plane stream:
    /// zero while connected, else the time since the stream was last alive (or since
    /// start when it never connected).
    pub fn staleness(&self) -> Duration {
        if !self.enabled || self.is_connected() {
            return Duration::ZERO;
        }
        Duration::from_millis(self.now_ms().saturating_sub(self.contact_ms.load(Ordering::Acquire)))
    }

    /// Time since the last applied snapshot, if any.
    pub fn since_last_update(&self) -> Option<Duration> {
        let at = self.applied_at_ms.load(Ordering::Acquire);
        (at != 0).then(|| Duration::from_millis(self.now_ms().saturating_sub(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_wake_subscribers_only_when_they_change() {
        let store = RouteStore::new(true);
        let mut rx = store.placements();
        assert!(rx.borrow_and_update().is_empty());
        let web = Workload { namespace: "shop".into(), name: "web-1".into(), ..Default::default() };
        store.set_placements(vec![web.clone()]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), Arc::new(vec![web.clone()]));
        // The next snapshot places the same: nothing to do for subscribers.
        store.set_placements(vec![web]);
        assert!(!rx.has_changed().unwrap());
        store.set_placements(Vec::new());
        assert!(rx.has_changed().unwrap());
    }
}
