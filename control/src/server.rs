//! Wires the control plane together: sources -> snapshot builder -> gRPC server
//! (TLS, every call authenticated) and admin endpoint, with one shutdown token.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh_api::discovery_server::DiscoveryServer;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    ca::serving::ServingNames,
    discovery::{AgentBook, DiscoveryService},
    registry::{Source, SourceView},
    snapshot::{SnapshotBuilder, Versioned},
    tls::{
        ServingCert, TlsError,
        accept::{self, AcceptLimits},
    },
};

/// How agents' connections are carried.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS with a certificate from the mesh CA for `names`, valid for `ttl` and renewed
    /// before it expires.
    Tls { names: ServingNames, ttl: Duration, limits: AcceptLimits },
    /// Plain HTTP/2: credentials and routing data in clear. Only for agents started
    /// with `--insecure-control-plane`.
    InsecurePlaintext,
}

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
    pub transport: Transport,
    /// Where services with hostnames and no VIP get one (`--dns-vip-range`).
    pub dns_vip_range: Option<crate::dns_vips::VipRange>,
    /// Federated clusters (`--federation`): one import source per peer, and the
    /// `Federation` service on the gRPC listener (TLS only: it carries the links'
    /// tokens).
    pub federation: Option<crate::federation::Federation>,
}

/// Largest header list an agent's gRPC request may carry (h2's default is 16 MiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Concurrent gRPC calls on one connection: an agent has its discovery stream and
/// the odd certificate request open; meshctl one call.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// The CA and how callers authenticate (for certificates and discovery alike).
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
    /// The certificate service (for its counters).
    pub certificates: crate::ca::CertificatesService,
    /// The certificate the gRPC listener presents (None in plaintext).
    pub serving: Option<Arc<ServingCert>>,
}

/// Errors starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for gRPC on {addr}: {source}")]
    Grpc { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen for admin on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("TLS on the gRPC listener: {0}")]
    Tls(#[from] TlsError),
    #[error("--federation needs TLS on the gRPC listener: the links' tokens must not travel in clear")]
    FederationInPlaintext,
}

/// Starts sources, the snapshot builder and both listeners.
pub async fn start(
    settings: &Settings,
    sources: Vec<Box<dyn Source>>,
    ca: CaSettings,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    if settings.federation.is_some() && matches!(settings.transport, Transport::InsecurePlaintext) {
        return Err(StartError::FederationInPlaintext);
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut receivers = Vec::new();
    let mut sources = sources;
    if let Some(federation) = &settings.federation {
        sources.extend(federation.sources());
    }
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
    let builder = builder.with_dns_vips(settings.dns_vip_range);
    tasks.spawn(builder.run(settings.settle, shutdown.clone()));

    let agents = AgentBook::new(settings.book);
    let board = crate::dashboard::Board::new();
    let listener = TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|source| StartError::Grpc { addr: settings.grpc_addr, source })?;
    let grpc_addr =
        listener.local_addr().map_err(|source| StartError::Grpc { addr: settings.grpc_addr, source })?;
    let service = DiscoveryServer::new(DiscoveryService::new(
        snapshots.clone(),
        agents.clone(),
        ca.authenticator.clone(),
        board.clone(),
    ));
    let authorizer = Arc::new(crate::identity::RegistryAuthorizer::new(snapshots.clone()));
    let certificates = crate::ca::CertificatesService::new(ca.ca.clone(), ca.authenticator, authorizer);
    let exports = settings.federation.as_ref().map(|f| {
        crate::federation::exports::ExportsService::new(
            f.config.clone(),
            ca.ca.trust_bundle_pem().to_vec(),
            snapshots.clone(),
        )
        .into_server()
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(settings.keepalive))
        .http2_keepalive_timeout(Some(settings.keepalive))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .tcp_nodelay(true)
        .add_service(service)
        .add_service(certificates.clone().into_server())
        .add_optional_service(exports);
    let stop = shutdown.clone();
    let serving = match &settings.transport {
        Transport::Tls { names, ttl, limits } => {
            let cert = ServingCert::issue(&ca.ca, names, *ttl)?;
            let config = crate::tls::server_config(cert.clone())?;
            tracing::info!(dns = ?names.dns, ips = ?names.ips, not_after = ?cert.not_after(),
                "TLS serving certificate issued");
            tasks.spawn(cert.clone().keep_renewed(ca.ca.clone(), names.clone(), *ttl, shutdown.clone()));
            let incoming = accept::incoming(listener, config, *limits, shutdown.clone());
            tasks.spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            });
            Some(cert)
        }
        Transport::InsecurePlaintext => {
            tracing::warn!("serving gRPC in plaintext: node credentials and routing data travel in clear");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tasks.spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            });
            None
        }
    };
    let admin_addr = admin::spawn(
        settings.admin_addr,
        AdminState {
            snapshots: snapshots.clone(),
            agents: agents.clone(),
            board,
            federation: settings.federation.as_ref().map(|f| f.board.clone()),
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
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, tls = serving.is_some(), "control plane serving");
    Ok(Running { grpc_addr, admin_addr, snapshots, agents, tasks, certificates, serving })
}
