//! `mesh-agent gateway`: the east-west gateway through which federated clusters
//! reach this cluster's agents.
//!
//! Another cluster's agent cannot reach this cluster's agents' addresses, so it
//! dials a gateway and names the destination agent in its ClientHello's server
//! name ([`sni`]). The gateway reads that ClientHello and nothing more, checks that
//! the name is for this cluster's trust domain and for an agent serving an exported
//! service (the snapshot says which), connects there and forwards the bytes
//! unopened both ways. It holds no certificate and no key: the caller's mutual TLS
//! ends at the destination agent, which verifies the caller against its own trust
//! domain's roots and enforces policy. A gateway that is compromised can drop
//! traffic, not read or forge it.
//!
//! The gateway subscribes to the control plane like an agent (a node credential,
//! its own node name) to learn the exported agents; it intercepts nothing.

pub mod sni;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::LogFormat;
use crate::control_channel::{ControlPlane, ControlPlaneSettings};
use crate::discovery::{
    self,
    client::{Backoff, ClientSettings},
    store::RouteStore,
};
use crate::identity::TrustAnchor;
use crate::sniff::{self, Protocol};
use crate::socket::SocketFactory;

/// `mesh-agent gateway`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Where federated clusters' agents connect (the address their control planes
    /// advertise as this cluster's gateway).
    #[arg(long, env = "MESH_GATEWAY_LISTEN", default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,

    /// The control plane (`https://host:port`), as for `mesh-agent run`.
    #[arg(long, env = "MESH_CONTROL_PLANE")]
    pub control_plane: String,

    /// The control plane's CA root (PEM), as for `mesh-agent run`. Required: the
    /// gateway forwards where the snapshot says, so it takes no snapshot on trust.
    #[arg(long, env = "MESH_CONTROL_PLANE_CA")]
    pub control_plane_ca: std::path::PathBuf,

    /// This gateway node's credential for the control plane, as for `mesh-agent run`.
    #[arg(long, env = "MESH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: std::path::PathBuf,

    /// The node name the credential belongs to (default: the host name).
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,

    /// Connections passed through at once; further ones wait in the kernel's
    /// backlog.
    #[arg(long, env = "MESH_GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// How long a caller has to send its whole ClientHello.
    #[arg(long, env = "MESH_GATEWAY_HELLO_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub hello_timeout: Duration,

    /// How long connecting to the destination agent may take.
    #[arg(long, env = "MESH_GATEWAY_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,

    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,
}

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections (MESH_GATEWAY_MAX_CONNECTIONS) must be at least 1");
    }
    let node = args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "gateway".into())
    });
    if !args.control_plane.starts_with("https://") {
        anyhow::bail!("--control-plane (MESH_CONTROL_PLANE) {:?} must be https://", args.control_plane);
    }
    let anchor = TrustAnchor::from_file(&args.control_plane_ca).context("--control-plane-ca")?;
    // No mark: the gateway intercepts nothing, and runs without CAP_NET_ADMIN.
    let sockets = SocketFactory::new(0);
    let settings = ControlPlaneSettings {
        url: args.control_plane.clone(),
        token_file: args.bootstrap_token_file.clone(),
        insecure: false,
        keepalive: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
    };
    let control = ControlPlane::new(settings, anchor, sockets.clone())
        .map_err(|e| anyhow::anyhow!("--control-plane: {e}"))?;
    let routes = Arc::new(RouteStore::new(true));
    let shutdown = CancellationToken::new();
    let client = ClientSettings {
        node: node.clone(),
        agent_address: String::new(),
        mode: "gateway".into(),
        max_endpoints: 100_000,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
        // A gateway passes TLS through: it has no edges of its own to report.
        edge_reports: None,
    };
    tokio::spawn(discovery::client::run(client, control, routes.clone(), shutdown.clone()));
    let mut versions = routes.subscribe();
    let signalled = crate::agent::wait_for_shutdown(&shutdown);
    let mut signalled = std::pin::pin!(signalled);
    tokio::select! {
        () = &mut signalled => return Ok(()),
        ready = versions.wait_for(|version| *version != 0) => { ready.context("discovery stopped")?; }
    }
    // Listening only now: a readiness probe that connects sees a gateway that knows
    // where to forward.
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding --listen {}", args.listen))?;
    let table = routes.table();
    info!(listen = %args.listen, %node, trust_domain = %table.trust_domain,
        exported_agents = table.exported_agent_count(), "gateway ready");
    let passer =
        Passer { routes, sockets, hello_timeout: args.hello_timeout, connect_timeout: args.connect_timeout };
    tokio::select! {
        () = &mut signalled => {}
        () = serve(listener, Arc::new(passer), args.max_connections, shutdown.clone()) => {}
    }
    shutdown.cancel();
    Ok(())
}

/// What one passed-through connection needs.
pub struct Passer {
    pub routes: Arc<RouteStore>,
    pub sockets: SocketFactory,
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
}

/// Accepts on `listener` until `shutdown`, at most `max` connections at once.
pub async fn serve(listener: TcpListener, passer: Arc<Passer>, max: usize, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (client, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (passer, shutdown) = (passer.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = passer.pass(client, peer) => {}
            }
        });
    }
}

impl Passer {
    /// Reads the caller's ClientHello, and forwards the connection to the agent it
    /// names if that is allowed; otherwise closes it and says why.
    pub async fn pass(&self, mut client: TcpStream, peer: SocketAddr) {
        let _ = client.set_nodelay(true);
        let mut hello = BytesMut::new();
        let (agent, mut upstream) = match self.open(&mut client, &mut hello).await {
            Ok(opened) => opened,
            // A connection that sent nothing (a TCP readiness probe) is not worth a
            // warning.
            Err(why) if hello.is_empty() => {
                tracing::debug!(%peer, reason = %why, "closed a connection that sent nothing");
                return;
            }
            Err(why) => {
                warn!(%peer, reason = %why, "refused a connection");
                return;
            }
        };
        info!(%peer, %agent, "passing through");
        if let Err(e) = upstream.write_all(&hello).await {
            warn!(%peer, %agent, error = %e, "destination agent failed");
            return;
        }
        drop(hello);
        let start = tokio::time::Instant::now();
        match crate::copy::bidirectional(&mut client, &mut upstream).await {
            Ok((sent, received)) => info!(%peer, %agent, bytes_in = sent, bytes_out = received,
                duration_ms = start.elapsed().as_millis() as u64, "passed through"),
            Err(e) => info!(%peer, %agent, error = %e, duration_ms = start.elapsed().as_millis() as u64,
                "passed through until an error"),
        }
    }

    /// The destination agent named by the ClientHello and a connection to it.
    async fn open(
        &self,
        client: &mut TcpStream,
        hello: &mut BytesMut,
    ) -> Result<(SocketAddr, TcpStream), String> {
        let protocol = sniff::sniff(client, hello, self.hello_timeout)
            .await
            .map_err(|e| format!("reading the hello: {e}"))?;
        let info = match protocol {
            Protocol::Tls(info) => info,
            other => return Err(format!("not a TLS ClientHello ({})", other.name())),
        };
        let name = info.sni.ok_or("the ClientHello names no server")?;
        let table = self.routes.table();
        let agent = sni::decode(&name, &table.trust_domain).map_err(|e| e.to_string())?;
        if !table.exports_agent(agent) {
            return Err(format!("{agent} is not an agent serving an exported service"));
        }
        let upstream = self
            .sockets
            .connect(agent, self.connect_timeout)
            .await
            .map_err(|e| format!("connecting to agent {agent}: {e}"))?;
        Ok((agent, upstream))
    }
}
