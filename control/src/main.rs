//! `mesh-control`: the mesh's control plane.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use control::{
    ca::{
        Ca, CaConfig, CaMode, CaStore, DEFAULT_ROOT_VALIDITY, FileStore, FirstOf, NodeAuthenticator,
        SealedStore, Sealer, SealingKey, SecretStore, TokenFileAuthenticator, TokenReviewAuthenticator,
        TokenReviewConfig, publish::ConfigMapPublisher, rotation,
    },
    federation::{Federation, FederationConfig},
    registry::{
        Source,
        consul::{ConsulConfig, ConsulSource},
        file::FileSource,
        kubernetes::{KubernetesConfig, KubernetesSource},
    },
    server::{self, CaSettings, Settings, Transport},
    tls::names::{self, InCluster},
};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt};

/// Service mesh control plane: discovery and the CA.
/// `--mtls-default`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MtlsDefault {
    Permissive,
    Strict,
}

#[derive(Parser, Debug)]
#[command(name = "mesh-control", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replace the CA's root with a new one and exit: the old root stays in the trust
    /// bundle, and the new one is cross-signed by it, so agents anchored on the old root
    /// accept the new one and mutual TLS keeps working. Restart the control plane to
    /// serve with the new root.
    RotateRoot(RotateArgs),
}

/// Flags of `rotate-root`.
#[derive(clap::Args, Debug)]
struct RotateArgs {
    /// Directory of the CA (as for serving).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh/ca")]
    ca_dir: PathBuf,

    /// The CA's Kubernetes Secret, `NAMESPACE/NAME`, instead of --ca-dir.
    #[arg(long, env = "MESH_CA_SECRET", conflicts_with = "ca_dir", value_parser = parse_secret_ref)]
    ca_secret: Option<(String, String)>,

    /// SPIFFE trust domain of the mesh (must be the stored root's).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// Lifetime of the new root.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    root_validity: Duration,

    #[command(flatten)]
    sealing: SealingArgs,
}

/// The CA key's encryption at rest (`ca::sealed`), for serving and `rotate-root`.
#[derive(clap::Args, Debug, Clone)]
struct SealingArgs {
    /// Encrypt the CA's private key at rest (in --ca-dir or --ca-secret) with the
    /// AES-256-GCM key in this file: 32 random bytes in base64 (`openssl rand -base64
    /// 32`), kept apart from the CA. The environment variable MESH_CA_KEY_ENCRYPTION_KEY
    /// may hold the key itself instead. A key stored in clear is encrypted on start.
    #[arg(long, env = "MESH_CA_KEY_ENCRYPTION_KEY_FILE")]
    ca_key_encryption_key_file: Option<PathBuf>,

    /// A key-encryption key the CA key may still be sealed under (a file as above;
    /// repeatable): to rotate, give the new key as the current one and the old one
    /// here; the CA key is re-encrypted under the new one on start.
    #[arg(
        long = "ca-key-previous-encryption-key-file",
        env = "MESH_CA_KEY_PREVIOUS_ENCRYPTION_KEY_FILES",
        value_delimiter = ','
    )]
    ca_key_previous_encryption_key_files: Vec<PathBuf>,
}

/// Environment variable holding the current key-encryption key itself (base64).
const KEY_ENCRYPTION_KEY_ENV: &str = "MESH_CA_KEY_ENCRYPTION_KEY";

impl SealingArgs {
    fn sealer(&self) -> anyhow::Result<Sealer> {
        let from_file = |flag: &str, path: &PathBuf| -> anyhow::Result<SealingKey> {
            let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))?;
            Ok(SealingKey::from_base64(&text, &format!("{flag} {}", path.display()))?)
        };
        let from_env = std::env::var(KEY_ENCRYPTION_KEY_ENV).ok().filter(|v| !v.trim().is_empty());
        let current = match (&self.ca_key_encryption_key_file, from_env) {
            (Some(_), Some(_)) => {
                bail!("--ca-key-encryption-key-file and {KEY_ENCRYPTION_KEY_ENV} both give the key: keep one")
            }
            (Some(path), None) => Some(from_file("--ca-key-encryption-key-file", path)?),
            (None, Some(text)) => Some(SealingKey::from_base64(&text, KEY_ENCRYPTION_KEY_ENV)?),
            (None, None) => None,
        };
        let previous = self
            .ca_key_previous_encryption_key_files
            .iter()
            .map(|p| from_file("--ca-key-previous-encryption-key-file", p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Sealer::new(current, previous))
    }

    /// `store`, wrapped to encrypt the key when a key-encryption key is configured,
    /// and in any case to refuse a sealed key it cannot open with a clear error.
    fn wrap(&self, store: Box<dyn CaStore>) -> anyhow::Result<Box<dyn CaStore>> {
        Ok(Box::new(SealedStore::new(store, self.sealer()?)))
    }
}

#[derive(clap::Args, Debug)]
struct Args {
    /// YAML registry file (the embedded default source); watched for changes.
    #[arg(long, env = "MESH_REGISTRY")]
    registry: Option<PathBuf>,

    /// Also read services from this Consul agent's catalog (`http://HOST:8500` or
    /// `https://HOST:8501`), followed with blocking queries.
    #[arg(long, env = "MESH_CONSUL")]
    consul: Option<String>,

    /// CA certificates (PEM) verifying an https --consul agent.
    #[arg(long, env = "MESH_CONSUL_CA", requires = "consul")]
    consul_ca: Option<PathBuf>,

    /// File holding the Consul ACL token (sent as X-Consul-Token; re-read on every call).
    #[arg(long, env = "MESH_CONSUL_TOKEN_FILE", requires = "consul")]
    consul_token_file: Option<PathBuf>,

    /// Consul datacenter to read (default: the agent's own).
    #[arg(long, env = "MESH_CONSUL_DATACENTER", requires = "consul")]
    consul_datacenter: Option<String>,

    /// Mesh namespace of Consul's services (`web` becomes NAMESPACE/web).
    #[arg(long, env = "MESH_CONSUL_NAMESPACE", default_value = "consul")]
    consul_namespace: String,

    /// Longest a blocking query to Consul waits for a change.
    #[arg(long, env = "MESH_CONSUL_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    consul_wait: Duration,

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

    /// gRPC listen address for agents (discovery, certificates), served over TLS.
    #[arg(long, env = "MESH_CONTROL_LISTEN", default_value = "0.0.0.0:15010")]
    listen: SocketAddr,

    /// Further DNS names or IP addresses for the gRPC serving certificate (repeatable,
    /// or comma-separated). It always names the host name, localhost, the listen
    /// address (every interface's address when listening on all), and with
    /// --kubernetes the Service `mesh-control` in this pod's namespace.
    #[arg(long = "tls-san", env = "MESH_CONTROL_TLS_SANS", value_delimiter = ',', value_parser = names::parse_san)]
    tls_sans: Vec<String>,

    /// Lifetime of the gRPC serving certificate; it is renewed at two thirds of it.
    #[arg(long, env = "MESH_CONTROL_SERVING_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    serving_cert_ttl: Duration,

    /// Serve gRPC without TLS: node credentials and routing data travel in clear.
    /// Only for agents started with --insecure-control-plane; never in production.
    #[arg(long, env = "MESH_CONTROL_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,

    /// Admin endpoint (/live /ready /agents /config_dump).
    #[arg(long, env = "MESH_CONTROL_ADMIN_ADDR", default_value = "127.0.0.1:15011")]
    admin_addr: SocketAddr,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// mTLS mode of services that do not set one (`policy.mtls`, annotation
    /// `mesh.dev/mtls`): `permissive` accepts plaintext at their workloads as the
    /// principal "unauthenticated", `strict` refuses it.
    #[arg(long, env = "MESH_MTLS_DEFAULT", value_enum, default_value_t = MtlsDefault::Permissive)]
    mtls_default: MtlsDefault,

    /// IPv4 range from which services that have hostnames but no VIP get one (DNS
    /// auto-allocation): agents answer DNS for those hostnames with it and route it
    /// like any VIP. Derived from the hostname, so stable across restarts; `off`
    /// allocates none.
    #[arg(long, env = "MESH_DNS_VIP_RANGE", default_value = control::dns_vips::DEFAULT_RANGE)]
    dns_vip_range: String,

    /// Directory of the CA's root (or intermediate) certificate and key; created with
    /// a new root on first start, reused afterwards (same trust root across restarts).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh/ca")]
    ca_dir: PathBuf,

    /// Keep the CA's certificate and key in this Kubernetes Secret, `NAMESPACE/NAME`
    /// (keys `ca.pem`, `ca-key.pem`) instead of --ca-dir: created on first start (one
    /// replica wins, the others use its root), reused afterwards. Needs get/update on
    /// the Secret and create on secrets in its namespace.
    #[arg(long, env = "MESH_CA_SECRET", conflicts_with = "ca_dir", value_parser = parse_secret_ref)]
    ca_secret: Option<(String, String)>,

    /// Run the CA as an intermediate under this root certificate (PEM)...
    #[arg(long, env = "MESH_CA_ROOT_CERT", requires = "ca_root_key")]
    ca_root_cert: Option<PathBuf>,

    /// ...and this root key (PEM, PKCS#8).
    #[arg(long, env = "MESH_CA_ROOT_KEY", requires = "ca_root_cert")]
    ca_root_key: Option<PathBuf>,

    /// Publish the CA's roots (public certificates only) in this Kubernetes ConfigMap,
    /// `NAMESPACE/NAME`, key `ca.pem`: the trust anchor agents mount as their
    /// --control-plane-ca. Needs get/update on it and create on configmaps.
    #[arg(long, env = "MESH_CA_CONFIGMAP", value_parser = parse_secret_ref)]
    ca_configmap: Option<(String, String)>,

    #[command(flatten)]
    sealing: SealingArgs,

    /// File of agent bootstrap tokens, one `TOKEN NODE` per line (re-read on change).
    /// Agents present theirs as `authorization: Bearer TOKEN` on every call (discovery
    /// and certificates).
    #[arg(long, env = "MESH_BOOTSTRAP_TOKENS")]
    bootstrap_tokens: Option<PathBuf>,

    /// Authenticate agents by their Kubernetes service-account token (TokenReview):
    /// accepted when valid for --token-review-audience, owned by
    /// --agent-service-account and bound to a pod on a node, which is the agent's node.
    /// Alone or with --bootstrap-tokens; one of them is required.
    #[arg(long, env = "MESH_TOKEN_REVIEW")]
    token_review: bool,

    /// Audience agents' projected tokens are issued for (with --token-review).
    #[arg(long, env = "MESH_TOKEN_REVIEW_AUDIENCE", default_value = "mesh-control")]
    token_review_audience: String,

    /// Service account the agents run as, `NAMESPACE/NAME` (with --token-review).
    #[arg(
        long,
        env = "MESH_AGENT_SERVICE_ACCOUNT",
        default_value = "mesh-system/mesh-agent",
        value_parser = parse_service_account
    )]
    agent_service_account: (String, String),

    /// Lifetime of workload certificates unless an agent asks for less.
    #[arg(long, env = "MESH_CA_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,

    /// Longest workload certificate lifetime issued.
    #[arg(long, env = "MESH_CA_CERT_MAX_TTL", default_value = "7d", value_parser = humantime::parse_duration)]
    cert_max_ttl: Duration,

    /// Interval of HTTP/2 keepalive pings on agent streams (and their timeout).
    #[arg(long, env = "MESH_CONTROL_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive: Duration,

    /// Discovery streams one node may have open; a newer one closes its oldest (most
    /// likely a dead connection not yet noticed by keepalive).
    #[arg(long, env = "MESH_MAX_STREAMS_PER_NODE", default_value_t = control::agent_book::DEFAULT_STREAMS_PER_NODE)]
    max_streams_per_node: usize,

    /// Agents (nodes) the control plane remembers: a new node evicts the agent
    /// disconnected longest, and is refused while every one is connected.
    #[arg(long, env = "MESH_MAX_AGENTS", default_value_t = control::agent_book::DEFAULT_MAX_AGENTS)]
    max_agents: usize,

    /// How long a disconnected agent stays in `meshctl status` and /agents.
    #[arg(long, env = "MESH_AGENT_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    agent_retention: Duration,

    /// Registry changes closer together than this are pushed as one version.
    #[arg(long, env = "MESH_CONTROL_SETTLE", default_value = "50ms", value_parser = humantime::parse_duration)]
    settle: Duration,

    /// Federate with other clusters, as this YAML file says: this cluster's name
    /// (`cluster`) and east-west gateways (`gateways`), how often peers are asked
    /// (`refresh`, default 5s), and each peer (`peers`: name, trust_domain, https
    /// url, bundle_file with its initial roots, token_file with the link's shared
    /// token). Services marked `export` are offered to the peers; theirs are
    /// imported as NAME.PEER. Read once at start; needs TLS on --listen.
    #[arg(long, env = "MESH_FEDERATION")]
    federation: Option<PathBuf>,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,

    /// Log output: `text` or `json` (one object per line), as the agent's flag.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Former spelling of `--log-format json`, still accepted.
    #[arg(long, hide = true)]
    log_json: bool,
}

/// Output format of the control plane's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = cli.args;
    let filter = EnvFilter::try_new(&args.log).with_context(|| format!("--log {:?}", args.log))?;
    if args.log_json || args.log_format == LogFormat::Json {
        fmt().json().flatten_event(true).with_env_filter(filter).with_current_span(false).init();
    } else {
        fmt().with_env_filter(filter).init();
    }
    for (flag, value) in
        [("--max-streams-per-node", args.max_streams_per_node), ("--max-agents", args.max_agents)]
    {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    // Every agent holds a connection: the usual soft limit of 1024 descriptors would
    // cap the control plane long before its own limits.
    match raise_nofile() {
        Ok(nofile) => tracing::info!(nofile, "file-descriptor limit raised to its hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = match cli.command {
        Some(Command::RotateRoot(rotate)) => rt.block_on(rotate_root(rotate)),
        None => rt.block_on(run(args)),
    };
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit in effect.
fn raise_nofile() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard)
}

fn parse_secret_ref(value: &str) -> Result<(String, String), String> {
    SecretStore::parse_ref(value)
}

fn parse_service_account(value: &str) -> Result<(String, String), String> {
    TokenReviewConfig::parse_service_account(value)
}

/// `rotate-root`: a new root, cross-signed by the current one, saved to the store.
async fn rotate_root(args: RotateArgs) -> anyhow::Result<()> {
    let (store, flag): (Box<dyn CaStore>, String) = match &args.ca_secret {
        Some((ns, name)) => {
            let client =
                kube::Client::try_default().await.context("connecting to Kubernetes (for --ca-secret)")?;
            (Box::new(SecretStore::new(client, ns, name)), format!("--ca-secret {ns}/{name}"))
        }
        None => (Box::new(FileStore::new(&args.ca_dir)), format!("--ca-dir {}", args.ca_dir.display())),
    };
    let store = args.sealing.wrap(store)?;
    let validity = if args.root_validity.is_zero() { DEFAULT_ROOT_VALIDITY } else { args.root_validity };
    rotation::rotate(store.as_ref(), &args.trust_domain, validity)
        .await
        .with_context(|| format!("rotating the root in {flag}"))?;
    tracing::info!(store = %store.describe(),
        "rotated the root: the new one is cross-signed by the old one, which stays trusted; restart the \
         control plane to serve with it");
    Ok(())
}

/// The CA (from --ca-dir or --ca-secret) and the authenticators the flags ask for;
/// its roots are published to --ca-configmap.
async fn open_ca(args: &Args) -> anyhow::Result<CaSettings> {
    if args.bootstrap_tokens.is_none() && !args.token_review {
        bail!(
            "no --bootstrap-tokens (MESH_BOOTSTRAP_TOKENS) or --token-review (MESH_TOKEN_REVIEW): every agent \
             call (discovery, certificates) needs a node credential, and none could be checked"
        );
    }
    let needs_kube = args.token_review || args.ca_secret.is_some() || args.ca_configmap.is_some();
    let client = if needs_kube {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (for --ca-secret / --ca-configmap / --token-review)")?;
        Some(client)
    } else {
        None
    };
    let mut authenticators: Vec<Arc<dyn NodeAuthenticator>> = Vec::new();
    if let Some(tokens) = &args.bootstrap_tokens {
        authenticators.push(Arc::new(TokenFileAuthenticator::new(tokens.clone())));
    }
    if let (true, Some(client)) = (args.token_review, &client) {
        let (ns, sa) = &args.agent_service_account;
        let config = TokenReviewConfig::new(&args.token_review_audience, ns, sa);
        tracing::info!(service_account = %config.username(), audience = %config.audience, "agents authenticated by TokenReview");
        authenticators.push(Arc::new(TokenReviewAuthenticator::new(client.clone(), config)));
    }
    let authenticator: Arc<dyn NodeAuthenticator> = match authenticators.len() {
        1 => authenticators.remove(0),
        _ => Arc::new(FirstOf::new(authenticators)),
    };
    let mode = match (&args.ca_root_cert, &args.ca_root_key) {
        (Some(root_cert), Some(root_key)) => {
            CaMode::Intermediate { root_cert: root_cert.clone(), root_key: root_key.clone() }
        }
        _ => CaMode::SelfSignedRoot,
    };
    let config = CaConfig {
        trust_domain: args.trust_domain.clone(),
        default_ttl: args.cert_ttl,
        max_ttl: args.cert_max_ttl,
        mode,
        ..Default::default()
    };
    let (store, flag): (Box<dyn CaStore>, String) = match (&args.ca_secret, &client) {
        (Some((ns, name)), Some(client)) => {
            (Box::new(SecretStore::new(client.clone(), ns, name)), format!("--ca-secret {ns}/{name}"))
        }
        _ => (Box::new(FileStore::new(&args.ca_dir)), format!("--ca-dir {}", args.ca_dir.display())),
    };
    let store = args.sealing.wrap(store)?;
    let ca = Ca::open(config, store.as_ref()).await.with_context(|| format!("opening the CA in {flag}"))?;
    tracing::info!(store = %store.describe(), trust_domain = %args.trust_domain,
        roots = ca.trust_bundle_pem().len(), cross_signed = ca.cross_signed_pem().len(), "CA ready");
    if let (Some((ns, name)), Some(client)) = (&args.ca_configmap, &client) {
        let publisher = ConfigMapPublisher::new(client.clone(), ns, name);
        let wrote = publisher.publish(&ca.trust_bundle_pem().concat()).await.context("--ca-configmap")?;
        tracing::info!(configmap = %publisher.configmap(), updated = wrote, "CA roots published");
    }
    Ok(CaSettings { ca: Arc::new(ca), authenticator })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    if let Some(path) = &args.registry {
        // Fail fast on a bad file at start; later bad edits keep the last good state.
        let registry = FileSource::load(path, &args.trust_domain).context("--registry")?;
        tracing::info!(file = %path.display(), services = registry.services.len(),
            workloads = registry.workloads.len(), "registry file valid");
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
    if let Some(url) = &args.consul {
        let config = ConsulConfig {
            url: url.clone(),
            ca: args.consul_ca.clone(),
            token_file: args.consul_token_file.clone(),
            datacenter: args.consul_datacenter.clone(),
            namespace: args.consul_namespace.clone(),
            trust_domain: args.trust_domain.clone(),
            wait: args.consul_wait,
            ..Default::default()
        };
        sources.push(Box::new(ConsulSource::new(config)?));
    }
    let federation = match &args.federation {
        Some(path) => {
            let config = FederationConfig::load(path, &args.trust_domain).context("--federation")?;
            if args.insecure_plaintext {
                bail!("--federation needs TLS on --listen: drop --insecure-plaintext");
            }
            tracing::info!(file = %path.display(), cluster = %config.cluster, gateways = ?config.gateways,
                peers = ?config.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                refresh = ?config.refresh, "federation file valid");
            Some(Federation::new(config))
        }
        None => None,
    };
    if sources.is_empty() {
        bail!(
            "no registry source: pass --registry FILE (MESH_REGISTRY), --kubernetes (MESH_KUBERNETES) and/or \
             --consul URL (MESH_CONSUL)"
        );
    }
    let transport = if args.insecure_plaintext {
        Transport::InsecurePlaintext
    } else {
        let cluster = args.kubernetes.then(|| InCluster::from_environment(&args.cluster_domain));
        let names = names::serving_names(
            args.listen,
            &args.tls_sans,
            names::host_name(),
            &names::interface_addresses(),
            cluster.as_ref(),
        );
        Transport::Tls { names, ttl: args.serving_cert_ttl, limits: Default::default() }
    };
    if args.serving_cert_ttl < Duration::from_secs(60) {
        bail!("--serving-cert-ttl {:?} is too short: at least 1m", args.serving_cert_ttl);
    }
    let settings = Settings {
        grpc_addr: args.listen,
        admin_addr: args.admin_addr,
        trust_domain: args.trust_domain.clone(),
        default_mtls: match args.mtls_default {
            MtlsDefault::Permissive => mesh_api::MtlsMode::Permissive,
            MtlsDefault::Strict => mesh_api::MtlsMode::Strict,
        },
        keepalive: args.keepalive,
        settle: args.settle,
        book: control::agent_book::BookLimits {
            streams_per_node: args.max_streams_per_node,
            max_agents: args.max_agents,
            retention: args.agent_retention,
        },
        transport,
        federation,
        dns_vip_range: match args.dns_vip_range.trim() {
            "off" => None,
            range => Some(
                range.parse().map_err(|e| anyhow::anyhow!("--dns-vip-range (MESH_DNS_VIP_RANGE): {e}"))?,
            ),
        },
    };
    let ca = open_ca(&args).await?;
    let shutdown = CancellationToken::new();
    let mut running = server::start(&settings, sources, ca, shutdown.clone()).await?;
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
