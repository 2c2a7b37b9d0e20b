//! `mesh-control`: the mesh's control plane.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use control::{
    registry::{
        Source,
        file::FileSource,
        kubernetes::{KubernetesConfig, KubernetesSource},
    },
    server::{self, Settings},
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt};

/// Service mesh control plane: discovery and (soon) the CA.
#[derive(Parser, Debug)]
#[command(name = "mesh-control", version)]
struct Args {
    /// YAML registry file (the embedded default source); watched for changes.
    #[arg(long, env = "MESH_REGISTRY")]
    registry: Option<PathBuf>,

    /// Also discover services from Kubernetes (in-cluster service account, or the
    /// local kubeconfig): Services, EndpointSlices and Pods.
    #[arg(long, env = "MESH_KUBERNETES")]
    kubernetes: bool,

    /// Cluster DNS suffix for Kubernetes services' hostnames.
    #[arg(long, env = "MESH_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,

    /// Port of every node agent's mTLS inbound listener (Kubernetes endpoints' agent address).
    #[arg(long, env = "MESH_AGENT_INBOUND_PORT", default_value_t = 15008)]
    agent_inbound_port: u16,

    /// gRPC listen address for agents (discovery, certificates).
    #[arg(long, env = "MESH_CONTROL_LISTEN", default_value = "0.0.0.0:15010")]
    listen: SocketAddr,

    /// Admin endpoint (/live /ready /agents /config_dump).
    #[arg(long, env = "MESH_CONTROL_ADMIN_ADDR", default_value = "127.0.0.1:15011")]
    admin_addr: SocketAddr,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// Interval of HTTP/2 keepalive pings on agent streams (and their timeout).
    #[arg(long, env = "MESH_CONTROL_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive: Duration,

    /// Registry changes closer together than this are pushed as one version.
    #[arg(long, env = "MESH_CONTROL_SETTLE", default_value = "50ms", value_parser = humantime::parse_duration)]
    settle: Duration,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,

    /// Log as JSON lines.
    #[arg(long, env = "MESH_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log).with_context(|| format!("--log {:?}", args.log))?;
    if args.log_json {
        fmt().json().flatten_event(true).with_env_filter(filter).with_current_span(false).init();
    } else {
        fmt().with_env_filter(filter).init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(run(args));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if let Some(path) = &args.registry {
        // Fail fast on a bad file at start; later bad edits keep the last good state.
        let services = FileSource::load(path, &args.trust_domain).context("--registry")?;
        tracing::info!(file = %path.display(), services = services.len(), "registry file valid");
        sources.push(Box::new(FileSource::new(path, &args.trust_domain)));
    }
    if args.kubernetes {
        let config = KubernetesConfig {
            cluster_domain: args.cluster_domain.clone(),
            trust_domain: args.trust_domain.clone(),
            agent_inbound_port: args.agent_inbound_port,
            ..Default::default()
        };
        let source = KubernetesSource::from_environment(config).await.context("--kubernetes")?;
        sources.push(Box::new(source));
    }
    if sources.is_empty() {
        bail!(
            "no registry source: pass --registry FILE (MESH_REGISTRY) and/or --kubernetes (MESH_KUBERNETES)"
        );
    }
    let settings = Settings {
        grpc_addr: args.listen,
        admin_addr: args.admin_addr,
        trust_domain: args.trust_domain.clone(),
        keepalive: args.keepalive,
        settle: args.settle,
    };
    let shutdown = CancellationToken::new();
    let mut running = server::start(&settings, sources, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    let drain = async { while running.tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        tracing::warn!("shutdown took over 5s; exiting anyway");
    }
    Ok(())
}
