//! Bounds on what the agent's listeners hold open: connections per source address
//! and in total (outbound, inbound and tunnel listeners share one
//! [`ConnectionLimits`]), and TLS handshakes under way on the tunnel port
//! ([`HandshakeLimits`]: per peer address, and a semaphore for all).
//!
//! A connection over a limit is refused at once (reset), counted and logged through
//! [`crate::observe::limits`]; nothing queues without bound.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::observe::limits::{self, Limit};

/// Default of `--max-connections`: connections on all listeners together.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Default of `--max-connections-per-source`.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 4_096;
/// Default of `--max-tunnel-handshakes`: TLS handshakes under way on the tunnel port.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Handshakes one peer address may have under way at once (a peer agent opens a
/// handful of pooled connections; more is a flood).
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 32;
/// File descriptors kept free of connections (listeners, pools, the control plane,
/// logs) when `--max-connections` is fitted to `RLIMIT_NOFILE`.
pub const RESERVED_FDS: u64 = 1024;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{from} already has {limit} connections open (--max-connections-per-source)")]
    PerSource { from: IpAddr, limit: usize },
    #[error("{limit} connections are open (--max-connections)")]
    Total { limit: usize },
}

impl Refused {
    /// Which limit it was.
    pub fn limit(self) -> Limit {
        match self {
            Refused::PerSource { .. } => Limit::ConnectionsPerSource,
            Refused::Total { .. } => Limit::ConnectionsTotal,
        }
    }
}

/// Counts of open connections per source address and in total.
#[derive(Debug)]
pub struct ConnectionLimits {
    per_source: usize,
    total: usize,
    /// Open connections per source; the total is the sum, kept beside it.
    open: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

impl ConnectionLimits {
    /// At most `per_source` connections from one address and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits { per_source, total, open: Mutex::new((HashMap::new(), 0)) })
    }

    /// No limit at all (tests, embedders).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX, usize::MAX)
    }

    /// Admits one more connection from `source`, or says which limit refuses it.
    /// The connection counts until its [`ConnectionPermit`] is dropped.
    pub fn try_admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionPermit, Refused> {
        let source = source.to_canonical();
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by_source, total) = &mut *guard;
        if *total >= self.total {
            return Err(Refused::Total { limit: self.total });
        }
        let count = by_source.entry(source).or_insert(0);
        if *count >= self.per_source {
            return Err(Refused::PerSource { from: source, limit: self.per_source });
        }
        *count += 1;
        *total += 1;
        Ok(ConnectionPermit { limits: self.clone(), source })
    }

    /// [`Self::try_admit`], counting and logging a refusal (`what` names the listener).
    pub fn admit(self: &Arc<Self>, source: IpAddr, what: &str) -> Option<ConnectionPermit> {
        match self.try_admit(source) {
            Ok(permit) => Some(permit),
            Err(refused) => {
                limits::hit(refused.limit(), format_args!("{what}: refused a connection: {refused}"));
                None
            }
        }
    }

    /// Connections open now (all sources).
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Sources with a connection open now (the map's size, which the per-source
    /// entries never outgrow).
    pub fn sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }
}

/// One admitted connection; releases its count when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    source: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut guard = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by_source, total) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// Handshakes under way on the tunnel port: a peer address may have a few (more are
/// refused at once), all together at most a semaphore's worth (more wait for a slot
/// within their handshake deadline), plus a reserve that only addresses known as
/// mesh peers may take, so that a flood of handshakes from elsewhere cannot keep a
/// peer agent from opening a new tunnel connection.
#[derive(Clone)]
pub struct HandshakeLimits {
    per_source: Arc<ConnectionLimits>,
    slots: Arc<Semaphore>,
    max: usize,
    reserve: Arc<Semaphore>,
    reserved: usize,
    known: KnownPeers,
}

/// Tells addresses of mesh peers (from the routing table) from others.
pub type KnownPeers = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

impl std::fmt::Debug for HandshakeLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeLimits")
            .field("max", &self.max)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

/// A handshake's admission: held while the handshake runs.
#[derive(Debug)]
pub struct HandshakePermit {
    _source: ConnectionPermit,
    _slot: OwnedSemaphorePermit,
}

/// A handshake's place among its peer address's, held from accept until the
/// handshake ends (while it waits for a slot, too).
#[derive(Debug)]
pub struct SourcePermit(ConnectionPermit, IpAddr);

impl HandshakeLimits {
    /// At most `per_source` handshakes from one address and `max` in all, and a
    /// quarter of `max` more for known peers (none are known until
    /// [`HandshakeLimits::with_known_peers`]).
    pub fn new(per_source: usize, max: usize) -> Self {
        let reserved = (max / 4).max(1);
        HandshakeLimits {
            per_source: ConnectionLimits::new(per_source, usize::MAX),
            slots: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            reserve: Arc::new(Semaphore::new(reserved)),
            reserved,
            known: Arc::new(|_| false),
        }
    }

    /// Addresses `known` says are mesh peers may also take the reserve.
    pub fn with_known_peers(mut self, known: KnownPeers) -> Self {
        self.known = known;
        self
    }

    /// A place for a handshake from `source`, or `None` (counted and logged) if that
    /// address has too many under way. Synchronous, so the accept loop can refuse a
    /// flood from one address before spending a task or a TLS configuration on it.
    pub fn admit_source(&self, source: IpAddr) -> Option<SourcePermit> {
        match self.per_source.try_admit(source) {
            Ok(p) => Some(SourcePermit(p, source)),
            Err(_) => {
                limits::hit(
                    Limit::TunnelHandshakes,
                    format_args!(
                        "tunnel port: refused a connection from {source}: it already has {} TLS handshakes under way",
                        self.per_source.per_source
                    ),
                );
                None
            }
        }
    }

    /// Waits for one of the `max` slots (or, for a known peer, of the reserve) for
    /// an admitted source; the caller bounds the wait with the handshake's deadline.
    /// `None` only if the slots are gone.
    pub async fn slot(&self, source: SourcePermit) -> Option<HandshakePermit> {
        let SourcePermit(permit, ip) = source;
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(HandshakePermit { _source: permit, _slot: slot });
        }
        let known = (self.known)(ip);
        if known && let Ok(slot) = self.reserve.clone().try_acquire_owned() {
            return Some(HandshakePermit { _source: permit, _slot: slot });
        }
        limits::hit(
            Limit::TunnelHandshakes,
            format_args!("tunnel port: {} TLS handshakes under way; new ones wait for a slot", self.max),
        );
        let slot = if known {
            tokio::select! {
                s = self.slots.clone().acquire_owned() => s.ok()?,
                s = self.reserve.clone().acquire_owned() => s.ok()?,
            }
        } else {
            self.slots.clone().acquire_owned().await.ok()?
        };
        Some(HandshakePermit { _source: permit, _slot: slot })
    }

    /// [`Self::admit_source`], then [`Self::slot`].
    pub async fn admit(&self, source: IpAddr) -> Option<HandshakePermit> {
        self.slot(self.admit_source(source)?).await
    }

    /// Handshakes under way now.
    pub fn in_progress(&self) -> usize {
        self.max - self.slots.available_permits() + self.reserved - self.reserve.available_permits()
    }
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HANDSHAKES_PER_SOURCE, DEFAULT_MAX_HANDSHAKES)
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (connections are
/// file descriptors: the usual soft limit of 1024 would cap the agent long before
/// its own limits) and returns the limit now in effect.
pub fn raise_nofile() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard)
}

/// Share of the descriptors kept for splice pipes when `RLIMIT_NOFILE`, not
/// `--max-connections`, bounds the connections: one eighth.
pub const PIPE_SHARE: u64 = 8;

/// `wanted` connections, or fewer if `nofile` descriptors cannot hold them (two per
/// proxied connection, plus [`RESERVED_FDS`]).
///
/// With `splice`, a bulk direction of a plaintext relay also holds a pipe (two more
/// descriptors). Counting four for every direction would cut the connections of an
/// agent whose connections rarely splice to a third; counting none would leave pipes
/// nothing when the limit binds (a hard limit of 20,000 fits 9,488 connections and
/// no pipe). So when the limit binds, the connections fit in seven eighths of the
/// room and the pipes get what is left ([`pipe_budget`]).
pub fn fit_to_nofile(wanted: usize, nofile: u64, splice: bool) -> usize {
    let mut room = nofile.saturating_sub(RESERVED_FDS);
    if splice && room / 2 < u64::try_from(wanted).unwrap_or(u64::MAX) {
        room -= room / PIPE_SHARE;
    }
    wanted.min(usize::try_from(room / 2).unwrap_or(usize::MAX)).max(1)
}

/// Pipes the plaintext relays may hold at once (`--splice`, see
/// [`crate::forward::splice`]): the descriptors `connections` and [`RESERVED_FDS`]
/// leave of `nofile`, two per pipe, and never more than one per direction of every
/// connection. Past them, a relay copies.
pub fn pipe_budget(connections: usize, nofile: u64) -> usize {
    let connections = u64::try_from(connections).unwrap_or(u64::MAX);
    let spare = nofile.saturating_sub(RESERVED_FDS).saturating_sub(connections.saturating_mul(2));
    let pipes = (spare / 2).min(connections.saturating_mul(2));
    usize::try_from(pipes).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn counts_per_source_and_in_total_and_releases_on_drop() {
        let limits = ConnectionLimits::new(2, 3);
        let a1 = limits.try_admit(ip(1)).unwrap();
        let _a2 = limits.try_admit(ip(1)).unwrap();
        assert_eq!(limits.try_admit(ip(1)).unwrap_err(), Refused::PerSource { from: ip(1), limit: 2 });
        let _b1 = limits.try_admit(ip(2)).unwrap();
        assert_eq!(limits.try_admit(ip(3)).unwrap_err(), Refused::Total { limit: 3 });
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _c1 = limits.try_admit(ip(3)).expect("a closed connection frees its place");
        assert_eq!(limits.sources(), 3);
    }

    #[test]
    fn v4_mapped_sources_count_as_their_v4_address() {
        let limits = ConnectionLimits::new(1, 10);
        let _v4 = limits.try_admit(ip(9)).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert!(matches!(limits.try_admit(mapped), Err(Refused::PerSource { .. })));
    }

    #[test]
    fn sources_without_connections_are_forgotten() {
        let limits = ConnectionLimits::new(5, 100_000);
        for i in 0..=255u8 {
            drop(limits.try_admit(ip(i)).unwrap());
        }
        assert_eq!(
            (limits.open(), limits.sources()),
            (0, 0),
            "the per-source map is bounded by open connections"
        );
    }

    #[tokio::test]
    async fn handshakes_are_capped_per_source_and_wait_for_a_slot_overall() {
        let hs = HandshakeLimits::new(1, 2);
        let a = hs.admit(ip(1)).await.unwrap();
        assert!(hs.admit(ip(1)).await.is_none(), "a second handshake from the same address is refused");
        let _b = hs.admit(ip(2)).await.unwrap();
        assert_eq!(hs.in_progress(), 2);
        let waiting = tokio::time::timeout(Duration::from_millis(50), hs.admit(ip(3))).await;
        assert!(waiting.is_err(), "a third waits for a slot");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), hs.admit(ip(3))).await.unwrap();
        assert!(c.is_some(), "a finished handshake frees its slot");
    }

    #[tokio::test]
    async fn a_source_waiting_for_a_slot_keeps_its_place_in_the_per_source_cap() {
        let hs = HandshakeLimits::new(1, 1);
        let running = hs.admit(ip(1)).await.unwrap();
        let waiting = hs.admit_source(ip(2)).expect("another address is admitted");
        assert!(hs.admit_source(ip(2)).is_none(), "its place is taken while it waits for a slot");
        drop(running);
        let _slot = tokio::time::timeout(Duration::from_secs(5), hs.slot(waiting)).await.unwrap().unwrap();
        assert!(hs.admit_source(ip(2)).is_none(), "and while its handshake runs");
    }

    #[tokio::test]
    async fn a_known_peer_gets_a_reserved_slot_when_a_flood_holds_the_others() {
        let known = ip(9);
        let hs = HandshakeLimits::new(8, 4).with_known_peers(Arc::new(move |a| a == known));
        // A flood from other addresses holds every ordinary slot.
        let mut flood = Vec::new();
        for i in 0..4 {
            flood.push(hs.admit(ip(i)).await.unwrap());
        }
        let stranger = tokio::time::timeout(Duration::from_millis(50), hs.admit(ip(7))).await;
        assert!(stranger.is_err(), "an unknown address waits for an ordinary slot");
        let _peer = tokio::time::timeout(Duration::from_millis(50), hs.admit(known))
            .await
            .expect("the known peer takes the reserve at once")
            .expect("a slot");
        assert_eq!(hs.in_progress(), 5);
        let second = tokio::time::timeout(Duration::from_millis(50), hs.admit(known)).await;
        assert!(second.is_err(), "the reserve (a quarter of 4: one) is bounded too");
    }

    #[test]
    fn connections_fit_the_descriptor_limit() {
        for splice in [false, true] {
            assert_eq!(fit_to_nofile(16_384, 1_048_576, splice), 16_384);
            assert_eq!(fit_to_nofile(16_384, 100, splice), 1);
        }
        assert_eq!(fit_to_nofile(16_384, 4_096, false), 1_536);
        // Splicing keeps an eighth of the room for pipes when the limit binds.
        assert_eq!(fit_to_nofile(16_384, 4_096, true), 1_344);
    }

    #[test]
    fn pipes_get_the_descriptors_the_connections_leave() {
        // Plenty: one pipe per direction of every connection.
        assert_eq!(pipe_budget(16_384, 1_048_576), 32_768);
        // Some room: half of what is left, two descriptors per pipe.
        assert_eq!(pipe_budget(16_384, 1024 + 32_768 + 2_000), 1_000);
        // Connections lowered to the limit: the eighth kept for pipes.
        assert_eq!(pipe_budget(fit_to_nofile(16_384, 20_000, true), 20_000), 1_186);
        assert_eq!(pipe_budget(fit_to_nofile(16_384, 20_000, false), 20_000), 0);
        assert_eq!(pipe_budget(1, 100), 0);
    }
}
