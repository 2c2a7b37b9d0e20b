//! The discovery client: one stream to the control plane, snapshots applied
//! atomically and acknowledged, reconnects with capped, jittered exponential
//! backoff, and HTTP/2 keepalive so a dead control plane is noticed even when no
//! update is due.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use mesh_api as api;
use mesh_api::discovery_client::DiscoveryClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};
use tracing::{info, warn};

use super::{store::RouteStore, table::RouteTable};
use crate::socket::SocketFactory;

/// Discovery client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `http://host:port` of the control plane's gRPC listener.
    pub control_plane: String,
    pub node: String,
    /// Where other agents reach this one (empty until mTLS inbound exists).
    pub agent_address: String,
    pub mode: String,
    pub max_endpoints: usize,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
}

/// Capped exponential backoff with equal jitter: the n-th retry waits between half
/// and all of `min(max, base * 2^n)`, so agents restarted together do not reconnect
/// in lockstep, yet none waits longer than `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0, rng: fastrand::Rng::new() }
    }

    /// Deterministic jitter for tests.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.max);
        let half = ceiling / 2;
        let jitter_ms = self.rng.u64(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }
}

/// Errors of one stream session (all lead to a reconnect).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("invalid control plane address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("stream failed: {0}")]
    Stream(#[from] tonic::Status),
    #[error("stream closed by the control plane")]
    Closed,
}

/// Runs the client until `shutdown`, keeping `store` up to date.
pub async fn run(
    settings: ClientSettings,
    sockets: SocketFactory,
    store: Arc<RouteStore>,
    shutdown: CancellationToken,
) {
    let mut backoff = settings.backoff.clone();
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&settings, &sockets, &store, &mut backoff) => r,
        };
        let was_connected = store.is_connected();
        store.set_connected(false);
        let delay = backoff.next_delay();
        let err = match result {
            Ok(()) => SessionError::Closed.to_string(),
            Err(e) => e.to_string(),
        };
        if was_connected {
            warn!(control_plane = %settings.control_plane, error = %err, retry_in_ms = delay.as_millis() as u64,
                "lost the control plane; routing from the last snapshot");
        } else {
            warn!(control_plane = %settings.control_plane, error = %err, retry_in_ms = delay.as_millis() as u64,
                staleness_s = store.staleness().as_secs(), "control plane unreachable");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session(
    settings: &ClientSettings,
    sockets: &SocketFactory,
    store: &RouteStore,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let uri: Uri = settings.control_plane.parse().map_err(|e: http::uri::InvalidUri| {
        SessionError::Address(settings.control_plane.clone(), e.to_string())
    })?;
    let endpoint = Endpoint::from(uri)
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive)
        .keep_alive_timeout(settings.keepalive)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    // The agent's own sockets carry its mark so interception never loops them back.
    let sockets = *sockets;
    let connect_timeout = settings.connect_timeout;
    let connector = tower::service_fn(move |uri: Uri| {
        let sockets = sockets;
        async move {
            let host = uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address"));
            for addr in addrs {
                match sockets.connect(addr, connect_timeout).await {
                    Ok(s) => return Ok::<_, std::io::Error>(TokioIo::new(s)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    });
    let channel = endpoint.connect_with_connector(connector).await.map_err(SessionError::Connect)?;
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let subscribe = api::Subscribe {
        node: settings.node.clone(),
        agent_address: settings.agent_address.clone(),
        workloads: Vec::new(),
        have_version: store.table().version,
        mode: settings.mode.clone(),
    };
    let _ =
        tx.try_send(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Subscribe(subscribe)) });
    let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    store.set_connected(true);
    info!(control_plane = %settings.control_plane, node = %settings.node, "connected to the control plane");
    while let Some(msg) = responses.message().await? {
        backoff.reset();
        let version = msg.version;
        let reply = match RouteTable::decode(version, msg.snapshot, settings.max_endpoints) {
            Ok(table) => {
                let (routes, endpoints) = (table.routes().len(), table.endpoint_count());
                store.apply(table);
                info!(version, routes, endpoints, "snapshot applied");
                api::discovery_request::Kind::Ack(api::Ack { version })
            }
            Err(e) => {
                warn!(version, error = %e, kept_version = store.table().version, "snapshot refused (NACK)");
                api::discovery_request::Kind::Nack(api::Nack { version, reason: e.to_string() })
            }
        };
        if tx.send(api::DiscoveryRequest { kind: Some(reply) }).await.is_err() {
            break;
        }
    }
    Err(SessionError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_jittered_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(3)).with_seed(7);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let ceiling = (Duration::from_millis(100) * (1 << n)).min(Duration::from_secs(3));
            assert!(
                *d >= ceiling / 2 && *d <= ceiling,
                "attempt {n}: {d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        assert!(delays[11] >= Duration::from_millis(1500), "capped delays stay near the cap");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
