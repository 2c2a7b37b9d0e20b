//! Wires the control plane together: sources -> snapshot builder -> gRPC server
//! and admin endpoint, with one shutdown token.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_api::discovery_server::DiscoveryServer;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    discovery::{AgentBook, DiscoveryService},
    registry::{Source, SourceView},
    snapshot::{SnapshotBuilder, Versioned},
};

/// Control-plane settings the library needs (the binary maps flags onto this).
#[derive(Debug, Clone)]
pub struct Settings {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: String,
    /// The mTLS mode of services whose policy does not set one.
    pub default_mtls: mesh_api::MtlsMode,
    /// HTTP/2 keepalive pings on agent streams, so dead agents are noticed.
    pub keepalive: Duration,
    /// Changes closer together than this become one version.
    pub settle: Duration,
    /// Bounds on agents' discovery streams and the book of agents.
    pub book: crate::agent_book::BookLimits,
}

/// Largest header list an agent's gRPC request may carry (h2's default is 16 MiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Concurrent gRPC calls on one connection: an agent has its discovery stream and
/// the odd certificate request open; meshctl one call.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// The CA and how callers authenticate, when certificates are served.
pub struct CaSettings {
    pub ca: Arc<crate::ca::Ca>,
    pub authenticator: Arc<dyn crate::ca::NodeAuthenticator>,
}

/// A running control plane.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshots: watch::Receiver<Arc<Versioned>>,
    pub agents: AgentBook,
    pub tasks: tokio::task::JoinSet<()>,
    /// The certificate service (for its counters), when the CA is on.
    pub certificates: Option<crate::ca::CertificatesService>,
}

/// Errors starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Grpc { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for admin on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
}

/// Starts sources, the snapshot builder and both listeners.
pub async fn start(
    settings: &Settings,
    sources: Vec<Box<dyn Source>>,
    ca: Option<CaSettings>,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut receivers = Vec::new();
    for source in sources {
        let (tx, rx) = watch::channel(SourceView::default());
        receivers.push((source.name().to_string(), rx));
        tasks.spawn(source.run(tx, shutdown.clone()));
    }
    let (targets_tx, targets_rx) = watch::channel(Default::default());
    let (failing_tx, failing_rx) = watch::channel(Default::default());
    tasks.spawn(crate::health::run(targets_rx, failing_tx, shutdown.clone()));
    let (builder, snapshots) = SnapshotBuilder::new(
        receivers,
        (settings.trust_domain.clone(), settings.default_mtls),
        targets_tx,
        failing_rx,
    );
    tasks.spawn(builder.run(settings.settle, shutdown.clone()));

    let agents = AgentBook::new(settings.book);
    let listener = TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|source| StartError::Grpc { addr: settings.grpc_addr, source })?;
    let grpc_addr =
        listener.local_addr().map_err(|source| StartError::Grpc { addr: settings.grpc_addr, source })?;
    let service = DiscoveryServer::new(DiscoveryService::new(snapshots.clone(), agents.clone()));
    let certificates = ca.map(|c| {
        let authorizer = Arc::new(crate::identity::RegistryAuthorizer::new(snapshots.clone()));
        crate::ca::CertificatesService::new(c.ca, c.authenticator, authorizer)
    });
    let cert_counts = certificates.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let keepalive = settings.keepalive;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .tcp_nodelay(true)
            .add_service(service)
            .add_optional_service(certificates.map(|c| c.into_server()))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let admin_addr = admin::spawn(
        settings.admin_addr,
        AdminState {
            snapshots: snapshots.clone(),
            agents: agents.clone(),
            metrics: match crate::metrics::install() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics unavailable");
                    None
                }
            },
        },
        shutdown.clone(),
    )
    .await
    .map_err(|source| StartError::Admin { addr: settings.admin_addr, source })?;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "control plane serving");
    Ok(Running { grpc_addr, admin_addr, snapshots, agents, tasks, certificates: cert_counts })
}
