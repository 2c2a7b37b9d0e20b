//! The discovery client: one stream to the control plane (TLS, the node's
//! credential), snapshots applied atomically and acknowledged, this node's
//! workload placements kept beside them, reconnects with capped, jittered
//! exponential backoff, and HTTP/2 keepalive so a dead control plane is noticed
//! even when no update is due. On the same stream it sends the node's edge
//! reports (traffic per edge, for the control plane's dashboard) every window.

use std::{sync::Arc, time::Duration};

use mesh_api as api;
use mesh_api::discovery_client::DiscoveryClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{store::RouteStore, table::RouteTable};
use crate::control_channel::{ChannelError, ControlPlane};

/// Discovery client settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub node: String,
    /// Where other agents reach this one (empty until mTLS inbound exists).
    pub agent_address: String,
    pub mode: String,
    pub max_endpoints: usize,
    pub backoff: Backoff,
    /// `None`: no edge reports (`--edge-report-interval 0`, or the gateway).
    pub edge_reports: Option<EdgeReports>,
}

/// Makes the node's edge report for the window that just ended (`None` when
/// there is nothing to say); called every `interval` while connected.
#[derive(Clone)]
pub struct EdgeReports {
    pub interval: Duration,
    pub build: Arc<dyn Fn(Duration) -> Option<api::EdgeReport> + Send + Sync>,
}

impl std::fmt::Debug for EdgeReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeReports").field("interval", &self.interval).finish_non_exhaustive()
    }
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
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Credential(#[from] ChannelError),
    #[error("stream failed: {:?}: {}", .0.code(), .0.message())]
    Stream(#[from] tonic::Status),
    #[error(
        "the control plane sent a message larger than this agent accepts ({limit} bytes for --max-endpoints \
         {max_endpoints}): {status}; raise --max-endpoints if the mesh has grown"
    )]
    TooLarge { limit: usize, max_endpoints: usize, status: tonic::Status },
    #[error("stream closed by the control plane")]
    Closed,
}

/// Runs the client until `shutdown`, keeping `store` up to date.
pub async fn run(
    settings: ClientSettings,
    control: Arc<ControlPlane>,
    store: Arc<RouteStore>,
    shutdown: CancellationToken,
) {
    let mut backoff = settings.backoff.clone();
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&settings, &control, &store, &mut backoff) => r,
        };
        let was_connected = store.is_connected();
        store.set_connected(false);
        let delay = backoff.next_delay();
        let err = match result {
            Ok(()) => SessionError::Closed.to_string(),
            Err(e) => e.to_string(),
        };
        if was_connected {
            warn!(control_plane = %control.url(), error = %err, retry_in_ms = delay.as_millis() as u64,
                "lost the control plane; routing from the last snapshot");
        } else {
            warn!(control_plane = %control.url(), error = %err, retry_in_ms = delay.as_millis() as u64,
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
    control: &ControlPlane,
    store: &RouteStore,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let channel = control.connect().await.map_err(SessionError::Connect)?;
    // A snapshot within --max-endpoints must never be cut off by the message size.
    let mut client = DiscoveryClient::new(channel)
        .max_decoding_message_size(api::limits::snapshot_message_limit(settings.max_endpoints));
    let (tx, rx) = mpsc::channel(4);
    let subscribe = api::Subscribe {
        node: settings.node.clone(),
        agent_address: settings.agent_address.clone(),
        workloads: Vec::new(),
        have_version: store.table().version,
        mode: settings.mode.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let _ =
        tx.try_send(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Subscribe(subscribe)) });
    let mut responses = client.stream(control.authorize(ReceiverStream::new(rx))?).await?.into_inner();
    store.set_connected(true);
    info!(control_plane = %control.url(), node = %settings.node, tls = control.is_tls(), "connected to the control plane");
    let too_large = |status: tonic::Status| match status.code() {
        tonic::Code::OutOfRange => SessionError::TooLarge {
            limit: api::limits::snapshot_message_limit(settings.max_endpoints),
            max_endpoints: settings.max_endpoints,
            status,
        },
        _ => SessionError::Stream(status),
    };
    // Without reports the tick never fires (a day apart, and skipped below).
    let period = settings.edge_reports.as_ref().map_or(Duration::from_secs(86_400), |r| r.interval);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window_start = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            m = responses.message() => m.map_err(too_large)?,
            _ = tick.tick() => {
                let Some(reports) = &settings.edge_reports else { continue };
                let window = window_start.elapsed();
                window_start = tokio::time::Instant::now();
                if let Some(report) = (reports.build)(window) {
                    // Never wait behind ACKs: a report that finds the queue full is
                    // dropped (the next window has fresher numbers).
                    let kind = api::discovery_request::Kind::EdgeReport(report);
                    if tx.try_send(api::DiscoveryRequest { kind: Some(kind) }).is_err() {
                        tracing::debug!("edge report dropped: the stream is behind");
                    }
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        backoff.reset();
        let version = msg.version;
        let reply = match RouteTable::decode(version, msg.snapshot, settings.max_endpoints) {
            Ok(table) => {
                let (routes, endpoints) = (table.routes().len(), table.endpoint_count());
                store.apply(table);
                let workloads = msg.workloads.len();
                store.set_placements(msg.workloads);
                info!(version, routes, endpoints, workloads, "snapshot applied");
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
    use prost::Message;

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

    /// A control plane that sends one fixed snapshot to every subscriber.
    struct OneSnapshot(bytes::Bytes);

    #[tonic::async_trait]
    impl api::discovery_server::Discovery for OneSnapshot {
        type StreamStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<api::DiscoveryResponse, tonic::Status>>>;

        async fn stream(
            &self,
            _request: tonic::Request<tonic::Streaming<api::DiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let response =
                api::DiscoveryResponse { version: 1, snapshot: self.0.clone(), ..Default::default() };
            Ok(tonic::Response::new(tokio_stream::iter(vec![Ok(response)])))
        }

        async fn agents(
            &self,
            _request: tonic::Request<api::AgentsRequest>,
        ) -> Result<tonic::Response<api::AgentsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test control plane"))
        }
    }

    /// `count` meshed endpoints of realistic size (identity, node, agent address,
    /// workload, locality), spread over services of 100.
    fn large_snapshot(count: usize) -> bytes::Bytes {
        let services = (0..count.div_ceil(100))
            .map(|s| api::Service {
                name: format!("service-{s}"),
                namespace: "shop".into(),
                vips: vec![format!("10.96.{}.{}", s / 250, s % 250 + 1)],
                ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
                endpoints: (0..100.min(count - s * 100))
                    .map(|e| api::Endpoint {
                        address: format!("10.{}.{}.{}", s / 250, s % 250, e + 1),
                        port: 8080,
                        weight: 1,
                        identity: format!("spiffe://cluster.local/ns/shop/sa/service-{s}"),
                        node: format!("node-{s}.zone-a.example.internal"),
                        agent_address: format!("10.{}.{}.{}:15008", s / 250, s % 250, e + 1),
                        workload: format!("service-{s}-7d8f9c6b5-{e:05}"),
                        locality: Some(api::Locality {
                            region: "eu-west-1".into(),
                            zone: "eu-west-1a".into(),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        let snapshot = api::Snapshot { services, trust_domain: "cluster.local".into(), ..Default::default() };
        snapshot.encode_to_vec().into()
    }

    async fn serve(snapshot: bytes::Bytes) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    api::discovery_server::DiscoveryServer::new(OneSnapshot(snapshot))
                        .max_encoding_message_size(usize::MAX),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn settings(max_endpoints: usize) -> ClientSettings {
        ClientSettings {
            node: "node-a".into(),
            agent_address: String::new(),
            mode: "ebpf".into(),
            max_endpoints,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            edge_reports: None,
        }
    }

    /// A plaintext channel to the test control plane at `url`, with a token in `dir`.
    fn control(url: String, dir: &tempfile::TempDir) -> Arc<ControlPlane> {
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "tok-node-a\n").unwrap();
        let settings = crate::control_channel::ControlPlaneSettings {
            url,
            token_file,
            insecure: true,
            keepalive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        };
        let anchor = crate::identity::TrustAnchor::first_use();
        ControlPlane::new(settings, anchor, crate::socket::SocketFactory::new(0)).unwrap()
    }

    #[tokio::test]
    async fn a_snapshot_within_max_endpoints_is_applied_whatever_its_size_in_bytes() {
        let snapshot = large_snapshot(40_000);
        assert!(
            snapshot.len() > 4 * 1024 * 1024,
            "{} bytes: over tonic's default limit of 4 MiB",
            snapshot.len()
        );
        let url = serve(snapshot).await;
        let store = RouteStore::new(true);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        // The test control plane ends the stream after its one snapshot.
        let dir = tempfile::tempdir().unwrap();
        let ended = session(&settings(100_000), &control(url, &dir), &store, &mut backoff).await;
        assert!(matches!(ended, Err(SessionError::Closed)), "{ended:?}");
        assert_eq!(store.table().endpoint_count(), 40_000, "the snapshot was applied");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_says_which_flag_bounds_it() {
        let url = serve(large_snapshot(40_000)).await;
        let store = RouteStore::new(true);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let dir = tempfile::tempdir().unwrap();
        let e = session(&settings(1_000), &control(url, &dir), &store, &mut backoff).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SessionError::TooLarge { max_endpoints: 1_000, .. }), "{msg}");
        assert!(msg.contains("--max-endpoints 1000"), "{msg}");
        assert!(!store.has_snapshot());
    }
}
