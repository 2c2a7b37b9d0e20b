//! The agent's resource limits as operators see them: when one is hit it is counted
//! in `mesh_limit_hits_total{limit}` and logged at `warn`, at most once per
//! [`LOG_EVERY`] per limit (with how many hits the silence hid), since a flood hits
//! a limit in a loop and must not turn into a flood of log lines.

use std::{
    fmt,
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tracing::warn;

/// Limit hits, by limit.
pub const LIMIT_HITS_TOTAL: &str = "mesh_limit_hits_total";
/// TLS handshakes on the tunnel port under way now.
pub const TUNNEL_HANDSHAKES_IN_PROGRESS: &str = "mesh_tunnel_handshakes_in_progress";
/// Bytes of request bodies held for retries now.
pub const RETRY_BUFFER_BYTES: &str = "mesh_retry_buffer_bytes";

/// A logged hit of one limit is followed by silence this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Which limit was hit (the `limit` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Connections from one source address on the agent's listeners.
    ConnectionsPerSource,
    /// Connections on all the agent's listeners together.
    ConnectionsTotal,
    /// TLS handshakes under way on the tunnel port.
    TunnelHandshakes,
    /// A tunnel TLS or HTTP/2 handshake took longer than its deadline.
    TunnelHandshakeTimeout,
    /// Streams in progress on one tunnel connection (reset ones whose work goes on included).
    TunnelStreams,
    /// Connections to the admin port or socket.
    AdminConnections,
    /// Request bodies held for retries, all requests together.
    RetryBuffer,
    /// Connections to one upstream endpoint (or, direct, to one peer agent) at their
    /// bound: every HTTP/1 one busy, every HTTP/2 one out of free streams.
    UpstreamConnections,
    /// DNS queries forwarded to the node's resolver at once, in the whole agent.
    DnsForwards,
    /// DNS queries forwarded per second for one source address.
    DnsForwardRate,
}

const ALL: [Limit; 10] = [
    Limit::ConnectionsPerSource,
    Limit::ConnectionsTotal,
    Limit::TunnelHandshakes,
    Limit::TunnelHandshakeTimeout,
    Limit::TunnelStreams,
    Limit::AdminConnections,
    Limit::RetryBuffer,
    Limit::UpstreamConnections,
    Limit::DnsForwards,
    Limit::DnsForwardRate,
];

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ConnectionsPerSource => "connections_per_source",
            Limit::ConnectionsTotal => "connections_total",
            Limit::TunnelHandshakes => "tunnel_handshakes",
            Limit::TunnelHandshakeTimeout => "tunnel_handshake_timeout",
            Limit::TunnelStreams => "tunnel_streams",
            Limit::AdminConnections => "admin_connections",
            Limit::RetryBuffer => "retry_buffer",
            Limit::UpstreamConnections => "upstream_connections",
            Limit::DnsForwards => "dns_forwards",
            Limit::DnsForwardRate => "dns_forward_rate",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per limit: when it was last logged (ms since [`EPOCH`], plus one so 0 means
/// never) and the hits not logged since.
struct Throttle {
    logged_at: [AtomicU64; ALL.len()],
    silenced: [AtomicU64; ALL.len()],
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
static THROTTLE: Throttle = Throttle {
    logged_at: [const { AtomicU64::new(0) }; ALL.len()],
    silenced: [const { AtomicU64::new(0) }; ALL.len()],
};

impl Throttle {
    /// `Some(silenced hits)` when this hit is to be logged.
    fn admit(&self, limit: Limit, now_ms: u64) -> Option<u64> {
        let i = limit.index();
        let last = self.logged_at[i].load(Relaxed);
        let due = last == 0 || now_ms + 1 >= last + LOG_EVERY.as_millis() as u64;
        if due && self.logged_at[i].compare_exchange(last, now_ms + 1, Relaxed, Relaxed).is_ok() {
            return Some(self.silenced[i].swap(0, Relaxed));
        }
        self.silenced[i].fetch_add(1, Relaxed);
        None
    }
}

/// Counts a hit of `limit` and logs it (`detail` says what was refused or delayed),
/// throttled per limit.
pub fn hit(limit: Limit, detail: fmt::Arguments<'_>) {
    metrics::counter!(LIMIT_HITS_TOTAL, "limit" => limit.as_str()).increment(1);
    let now_ms = EPOCH.elapsed().as_millis() as u64;
    if let Some(silenced) = THROTTLE.admit(limit, now_ms) {
        warn!(limit = limit.as_str(), silenced_since_last_log = silenced, "limit reached: {detail}");
    }
}

/// Registers help texts (with the other metrics' descriptions).
pub fn describe() {
    metrics::describe_counter!(
        LIMIT_HITS_TOTAL,
        metrics::Unit::Count,
        "Times a resource limit refused or delayed something, by limit."
    );
    metrics::describe_gauge!(TUNNEL_HANDSHAKES_IN_PROGRESS, "TLS handshakes under way on the tunnel port.");
    metrics::describe_gauge!(
        RETRY_BUFFER_BYTES,
        metrics::Unit::Bytes,
        "Request body bytes held for retries."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_period_and_reports_what_it_silenced() {
        let t = Throttle {
            logged_at: [const { AtomicU64::new(0) }; ALL.len()],
            silenced: [const { AtomicU64::new(0) }; ALL.len()],
        };
        let every = LOG_EVERY.as_millis() as u64;
        assert_eq!(t.admit(Limit::RetryBuffer, 5), Some(0), "the first hit is logged");
        assert_eq!(t.admit(Limit::RetryBuffer, 6), None);
        assert_eq!(t.admit(Limit::RetryBuffer, every), None);
        assert_eq!(t.admit(Limit::ConnectionsTotal, 7), Some(0), "each limit has its own period");
        assert_eq!(t.admit(Limit::RetryBuffer, every + 5), Some(2), "logged again with the hits it hid");
        assert_eq!(t.admit(Limit::RetryBuffer, every + 6), None);
    }

    #[test]
    fn every_limit_has_its_own_slot() {
        for (i, l) in ALL.iter().enumerate() {
            assert_eq!(l.index(), i, "{}", l.as_str());
        }
    }
}
