//! The running agent: listeners first, then interception, then enrolment; and on
//! SIGTERM/SIGINT the reverse: interception off, listeners closed, connections
//! drained within a deadline, created cgroups removed.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    admin,
    cgroup::{CgroupPath, cgroup2_mount},
    config::{ProxySettings, RunArgs},
    control_channel::{ControlPlane, ControlPlaneSettings},
    discovery::{
        self, RouteStore,
        client::{Backoff, ClientSettings},
    },
    identity::{RenewalConfig, TrustAnchor, signer::GrpcSigner},
    intercept::{ActiveMode, InterceptError, Interceptor, Settings},
    listener::{self, Direction, ProxyContext},
    orig_dst::SocketOption,
    socket::SocketFactory,
    workload_identity,
};

/// State shared between the data path's supervisor and the admin endpoint.
pub struct AgentState {
    pub mode: ActiveMode,
    pub mode_reason: String,
    pub settings: Settings,
    pub proxy: Arc<ProxyContext>,
    /// `None` once shut down. A std mutex: held only for map/attach syscalls or one
    /// iptables-restore run, never across an `.await`.
    interceptor: Mutex<Option<Interceptor>>,
    cgroup_mount: Option<PathBuf>,
    /// Cgroups the agent created (admin `create=true`) and removes on shutdown.
    created: Mutex<BTreeSet<CgroupPath>>,
    ready: AtomicBool,
    pub shutdown: CancellationToken,
    control_plane: Option<String>,
    /// An identity is configured: not ready until its first certificate is loaded.
    needs_identity: bool,
    /// Renders `/metrics`; `None` when another recorder was installed first.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Errors of enrol/unenrol requests.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// What `/config_dump` shows.
#[derive(Serialize)]
pub struct ConfigDump {
    pub mode: ActiveMode,
    pub mode_reason: String,
    pub ready: bool,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub inbound_ports: Vec<u16>,
    pub mark: String,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub include_cidrs: Vec<String>,
    pub exclude_cidrs: Vec<String>,
    pub ipv6: bool,
    pub enrolled: Vec<String>,
    pub opaque_ports: Vec<u16>,
    pub detect_timeout_ms: u128,
    pub discovery: DiscoveryStatus,
    /// Workload certificates in use, with expiry.
    pub certificates: Vec<crate::workload_identity::CertificateDump>,
    /// Service ports of the applied snapshot with their endpoints and health.
    pub routes: Vec<Arc<crate::discovery::table::Route>>,
    /// What this agent learned from traffic: per service port, the balancer and each
    /// endpoint's load, ejection and circuit-breaker state.
    pub balancing: Vec<crate::balance::service::BalancingDump>,
}

/// The discovery client's state, in `/stats` and `/config_dump`.
#[derive(Serialize)]
pub struct DiscoveryStatus {
    pub control_plane: Option<String>,
    pub connected: bool,
    pub applied_version: u64,
    /// Seconds routed without a live control-plane stream (0 while connected).
    pub staleness_seconds: f64,
    pub seconds_since_update: Option<f64>,
    pub services: usize,
    pub endpoints: usize,
}

impl AgentState {
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// What readiness still waits for: interception attached and listeners serving,
    /// the workload certificate loaded (with `--identity`), a discovery snapshot
    /// applied (with `--control-plane`). Empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.ready.load(Ordering::Acquire) {
            missing.push("interception");
        }
        if self.needs_identity && self.proxy.identity.get().is_none() {
            missing.push("certificate");
        }
        if self.proxy.routes.is_enabled() && !self.proxy.routes.has_snapshot() {
            missing.push("discovery snapshot");
        }
        missing
    }

    fn mount(&self) -> Result<&PathBuf, EnrollError> {
        self.cgroup_mount.as_ref().ok_or(EnrollError::Cgroup(crate::cgroup::CgroupError::NotMounted))
    }

    /// Enrols a cgroup, creating it first if asked and missing.
    pub fn enroll(&self, given: &str, create: bool) -> Result<CgroupPath, EnrollError> {
        let mount = self.mount()?;
        let (cgroup, created) = if create {
            CgroupPath::create(mount, given)?
        } else {
            (CgroupPath::resolve(mount, given)?, false)
        };
        let mut guard = self.interceptor.lock().unwrap_or_else(|p| p.into_inner());
        let interceptor = guard.as_mut().ok_or(EnrollError::ShuttingDown)?;
        let result = interceptor.enroll(&cgroup);
        drop(guard);
        if created {
            match &result {
                Ok(()) => {
                    self.created.lock().unwrap_or_else(|p| p.into_inner()).insert(cgroup.clone());
                }
                Err(_) => {
                    let _ = std::fs::remove_dir(cgroup.absolute());
                }
            }
        }
        result?;
        Ok(cgroup)
    }

    /// Unenrols a cgroup (and removes it if the agent created it and it is empty).
    pub fn unenroll(&self, given: &str) -> Result<CgroupPath, EnrollError> {
        let cgroup = CgroupPath::resolve(self.mount()?, given)?;
        let mut guard = self.interceptor.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_mut().ok_or(EnrollError::ShuttingDown)?.unenroll(&cgroup)?;
        drop(guard);
        if self.created.lock().unwrap_or_else(|p| p.into_inner()).remove(&cgroup) {
            remove_cgroup(&cgroup);
        }
        Ok(cgroup)
    }

    /// Gauges computed at scrape time (staleness grows without events).
    pub fn refresh_gauges(&self) {
        use crate::observe::{labels::MeshName, metrics};
        let routes = &self.proxy.routes;
        metrics::set_discovery_staleness(routes.staleness());
        metrics::set_discovery_applied_version(routes.table().version);
        for c in crate::workload_identity::dump(&self.proxy.identity) {
            metrics::set_certificate_expiry(&MeshName::known(&c.identity), c.expires_in_seconds as f64);
        }
    }

    pub fn discovery_status(&self) -> DiscoveryStatus {
        let routes = &self.proxy.routes;
        let table = routes.table();
        DiscoveryStatus {
            control_plane: self.control_plane.clone(),
            connected: routes.is_connected(),
            applied_version: table.version,
            staleness_seconds: routes.staleness().as_secs_f64(),
            seconds_since_update: routes.since_last_update().map(|d| d.as_secs_f64()),
            services: table.routes().len(),
            endpoints: table.endpoint_count(),
        }
    }

    pub fn config_dump(&self) -> ConfigDump {
        let enrolled = self
            .interceptor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|i| i.enrolled().iter().map(|c| c.relative().to_owned()).collect())
            .unwrap_or_default();
        let mut opaque_ports: Vec<u16> = self.proxy.opaque_ports.iter().copied().collect();
        opaque_ports.sort_unstable();
        let s = &self.settings;
        ConfigDump {
            mode: self.mode,
            mode_reason: self.mode_reason.clone(),
            ready: self.is_ready(),
            outbound_port: s.outbound_port,
            inbound_port: s.inbound_port,
            inbound_ports: s.inbound_ports.clone(),
            mark: format!("{:#x}", s.mark),
            include_ports: s.include_ports.clone(),
            exclude_ports: s.exclude_ports.clone(),
            include_cidrs: s.include_cidrs.iter().map(ToString::to_string).collect(),
            exclude_cidrs: s.exclude_cidrs.iter().map(ToString::to_string).collect(),
            ipv6: s.ipv6,
            enrolled,
            opaque_ports,
            detect_timeout_ms: self.proxy.detect_timeout.as_millis(),
            discovery: self.discovery_status(),
            certificates: crate::workload_identity::dump(&self.proxy.identity),
            routes: self.proxy.routes.table().routes().to_vec(),
            balancing: self.proxy.services.dump(),
        }
    }

    /// Kernel-side counters, eBPF mode only.
    pub fn ebpf_stats(&self) -> Option<crate::intercept::ebpf::EbpfStats> {
        self.interceptor.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|i| i.ebpf_stats())
    }

    /// Turns interception off (first, so no new connection is sent to a closing
    /// listener) and removes what the agent created.
    fn stop_intercepting(&self) {
        self.ready.store(false, Ordering::Release);
        let interceptor = self.interceptor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(i) = interceptor
            && let Err(e) = i.shutdown()
        {
            error!(error = %e, "removing interception failed; run `mesh-agent cleanup`");
        }
        for cgroup in std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner())) {
            remove_cgroup(&cgroup);
        }
    }
}

fn remove_cgroup(cgroup: &CgroupPath) {
    if let Err(e) = std::fs::remove_dir(cgroup.absolute()) {
        warn!(%cgroup, error = %e, "could not remove cgroup the agent created (processes still in it?)");
    } else {
        info!(%cgroup, "removed cgroup the agent created");
    }
}

/// Runs the agent until SIGTERM/SIGINT or an admin drain request.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (settings, proxy_settings) = args.validate()?;
    let ProxySettings {
        opaque_ports,
        detect_timeout,
        connect_timeout,
        drain_timeout,
        downstream_idle_timeout,
        tcp_idle_timeout,
    } = proxy_settings;
    let downstream = crate::l7::DownstreamTimeouts { idle: downstream_idle_timeout, ..Default::default() };
    // Before interception: an unusable anchor or URL is a start-up error that leaves
    // nothing behind.
    let control = match &args.control_plane {
        Some(url) => {
            let sockets = SocketFactory::new(settings.mark);
            Some(connect_control_plane(&args, url, sockets, connect_timeout)?)
        }
        None => None,
    };

    // Listeners first: once interception is on, redirected connections need somewhere
    // to land.
    let mut outbound = listener::bind_outbound(settings.outbound_port, settings.ipv6)?;
    let inbound = if args.mode != crate::intercept::Mode::Ebpf && !settings.inbound_ports.is_empty() {
        listener::bind_inbound(settings.inbound_port, settings.ipv6)?
    } else {
        Vec::new()
    };

    let per_cgroup = !args.cgroups.is_empty();
    let (interceptor, mode_reason) = {
        let (mode, settings) = (args.mode, settings.clone());
        tokio::task::spawn_blocking(move || Interceptor::start(mode, &settings, per_cgroup)).await??
    };
    let mode = interceptor.mode();
    info!(%mode, reason = %mode_reason, "interception mode selected");
    // eBPF mode has no inbound redirect; iptables mode may have been chosen by `auto`.
    let inbound = if mode == ActiveMode::Ebpf { Vec::new() } else { inbound };

    let mut own_addrs = Vec::new();
    for l in outbound.iter().chain(&inbound) {
        own_addrs.push(l.local_addr()?);
    }
    let routes = Arc::new(RouteStore::new(args.control_plane.is_some()));
    let identity_slot: crate::workload_identity::IdentitySlot = Default::default();
    let sockets = SocketFactory::new(settings.mark);
    let (access_log, access_log_writer) = match args.access_log.as_str() {
        "off" => (None, None),
        other => {
            let output = match other {
                "stdout" => crate::observe::access_log::Output::Stdout,
                path => crate::observe::access_log::Output::File(path.into()),
            };
            let config = crate::observe::access_log::AccessLogConfig { output, ..Default::default() };
            let (log, writer) = crate::observe::access_log::AccessLog::start(&config)
                .await
                .map_err(|e| anyhow::anyhow!("--access-log: {e}"))?;
            (Some(log), Some(writer))
        }
    };
    let (spans, span_exporter) = match &args.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let config = crate::observe::spans::SpanExportConfig {
                endpoint: endpoint.clone(),
                sample_ratio: args.otlp_sample_ratio,
                node: node_name(&args),
                mode,
                queue: crate::observe::spans::DEFAULT_QUEUE,
            };
            let (spans, exporter) = crate::observe::spans::Spans::start(&config)?;
            info!(%endpoint, sample_ratio = args.otlp_sample_ratio, "exporting spans over OTLP");
            (Some(spans), Some(exporter))
        }
    };
    let records = crate::observe::Records { access_log, spans };
    let tunnels = crate::mtls::pool(identity_slot.clone(), sockets, connect_timeout);
    let upstreams = Arc::new(crate::l7::pool::UpstreamPool::new(
        sockets,
        tunnels.clone(),
        identity_slot.clone(),
        args.upstream_idle_timeout,
    ));
    // Cancelled on SIGTERM/SIGINT or /quitquitquit: background tasks stop, the tunnel
    // listener sends GOAWAY and served HTTP connections close gracefully.
    let shutdown = CancellationToken::new();
    let proxy = Arc::new(ProxyContext {
        mode,
        sockets,
        lookup: Box::new(SocketOption),
        detect_timeout,
        connect_timeout,
        opaque_ports,
        own_addrs,
        stats: Default::default(),
        routes: routes.clone(),
        identity: identity_slot.clone(),
        tunnels,
        services: Default::default(),
        upstreams: upstreams.clone(),
        records: records.clone(),
        locality: {
            let l = crate::balance::Locality::new(args.region.clone(), args.zone.clone());
            l.is_known().then_some(l)
        },
        downstream,
        tcp_idle_timeout,
        shutdown: shutdown.clone(),
    });
    let state = Arc::new(AgentState {
        mode,
        mode_reason,
        settings,
        proxy: proxy.clone(),
        interceptor: Mutex::new(Some(interceptor)),
        cgroup_mount: cgroup2_mount().ok(),
        created: Mutex::new(BTreeSet::new()),
        ready: AtomicBool::new(false),
        shutdown,
        control_plane: args.control_plane.clone(),
        needs_identity: args.control_plane.is_some() && args.identity.is_some(),
        metrics: match args.metrics {
            crate::config::Switch::Off => None,
            crate::config::Switch::On => match crate::observe::metrics::install() {
                Ok(h) => {
                    crate::observe::metrics::set_interception_mode(mode);
                    Some(h)
                }
                Err(e) => {
                    warn!(error = %e, "metrics unavailable");
                    None
                }
            },
        },
    });

    for cg in &args.cgroups {
        if let Err(e) = state.enroll(cg, false) {
            state.stop_intercepting();
            return Err(anyhow::anyhow!("enrolling --cgroup {cg}: {e}"));
        }
    }

    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let mut listening = Vec::new();
    for (l, dir) in outbound
        .drain(..)
        .map(|l| (l, Direction::Outbound))
        .chain(inbound.into_iter().map(|l| (l, Direction::Inbound)))
    {
        listening.push(l.local_addr()?.to_string());
        tokio::spawn(listener::serve(l, dir, proxy.clone(), stop_accepting.clone(), tracker.clone()));
    }

    let admin_addr = match admin::spawn(args.admin_addr, state.clone()).await {
        Ok(a) => a,
        Err(e) => {
            state.stop_intercepting();
            return Err(anyhow::anyhow!("admin endpoint on {} (--admin-addr): {e}", args.admin_addr));
        }
    };

    // The receiving side's tunnel server, drained with the listeners at shutdown.
    let mut tunnel_server = None;
    if let Some(control) = control {
        let node = node_name(&args);
        let settings = ClientSettings {
            node,
            // Only the port: the control plane pairs it with the address it sees the
            // stream come from (the agent cannot know which of its addresses peers use).
            agent_address: if args.identity.is_some() {
                format!(":{}", args.tunnel_port)
            } else {
                String::new()
            },
            mode: mode.as_str().to_string(),
            max_endpoints: args.max_endpoints,
            backoff: Backoff::new(std::time::Duration::from_millis(100), args.discovery_backoff_max),
        };
        tokio::spawn(discovery::client::run(
            settings.clone(),
            control.clone(),
            routes.clone(),
            state.shutdown.clone(),
        ));
        if let Some(id) = &args.identity {
            let channel = control.lazy_channel().map_err(|e| anyhow::anyhow!("--control-plane: {e}"))?;
            let signer = GrpcSigner::new(channel, control.clone(), settings.node.clone());
            let (ns, sa) = id.split_once('/').unwrap_or_default();
            let renewal = RenewalConfig {
                renew_fraction: args.cert_renew_fraction,
                ttl: args.cert_ttl,
                ..Default::default()
            };
            tokio::spawn(workload_identity::run(
                signer,
                ns.to_owned(),
                sa.to_owned(),
                renewal,
                proxy.identity.clone(),
                state.shutdown.clone(),
            ));
            // Peers' tunnels land here; this node's workloads are reached from it.
            let tunnel_addr = std::net::SocketAddr::from(([0, 0, 0, 0], args.tunnel_port));
            let listener = tokio::net::TcpListener::bind(tunnel_addr)
                .await
                .map_err(|e| anyhow::anyhow!("tunnel listener on {tunnel_addr} (--tunnel-port): {e}"))?;
            info!(addr = %tunnel_addr, "mTLS tunnel listener bound");
            let inbound = crate::mtls::Inbound {
                slot: proxy.identity.clone(),
                routes: routes.clone(),
                node: settings.node.clone(),
                sockets: proxy.sockets,
                connect_timeout,
                mode,
                upstreams: upstreams.clone(),
                records: records.clone(),
                downstream,
                tcp_idle_timeout,
            };
            tunnel_server = Some(crate::mtls::serve_inbound(listener, inbound, state.shutdown.clone()));
        }
    }

    let _sweeper = upstreams.spawn_sweeper(std::time::Duration::from_secs(5), state.shutdown.clone());
    {
        // Breaker states as gauges, refreshed on the metrics scrape scale.
        let (proxy, shutdown) = (proxy.clone(), state.shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => proxy.services.publish_metrics(),
                }
            }
        });
    }
    state.ready.store(true, Ordering::Release);
    let enrolled: Vec<String> = state.config_dump().enrolled;
    info!(%mode, listeners = ?listening, admin = %admin_addr, enrolled = ?enrolled, "agent ready");

    wait_for_shutdown(&state.shutdown).await;
    // A signal stops everything /quitquitquit does.
    state.shutdown.cancel();

    let began = Instant::now();
    info!("shutting down: removing interception, closing listeners, draining connections");
    {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.stop_intercepting()).await?;
    }
    stop_accepting.cancel();
    tracker.close();
    let active = proxy.stats.snapshot().active;
    // Peers' tunnel streams (already sent GOAWAY by the shutdown token) drain within
    // the same deadline as the workloads' connections.
    let tunnel_drained = async {
        if let Some(server) = &mut tunnel_server {
            let _ = server.await;
        }
    };
    let drained = async { tokio::join!(tracker.wait(), tunnel_drained) };
    if tokio::time::timeout(drain_timeout, drained).await.is_ok() {
        info!(drained = active, elapsed_ms = began.elapsed().as_millis() as u64, "shutdown complete");
    } else {
        warn!(
            still_open = proxy.stats.snapshot().active,
            drain_timeout = ?drain_timeout,
            "drain deadline reached; closing remaining connections"
        );
        if let Some(server) = &tunnel_server {
            server.abort();
        }
    }
    drop(records);
    if let Some(exporter) = span_exporter {
        exporter.shutdown().await;
    }
    if let Some(writer) = access_log_writer
        && let Err(e) = writer.shutdown().await
    {
        warn!(error = %e, "access log did not flush cleanly");
    }
    Ok(())
}

async fn wait_for_shutdown(admin_drain: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers; the agent will only stop on /quitquitquit");
        admin_drain.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
        () = admin_drain.cancelled() => info!("drain requested on the admin endpoint"),
    }
}

/// The control channel from the flags: the trust anchor (`--control-plane-ca`, or
/// trust on first use with `--insecure-control-plane` alone) and the node credential.
fn connect_control_plane(
    args: &RunArgs,
    url: &str,
    sockets: SocketFactory,
    connect_timeout: std::time::Duration,
) -> anyhow::Result<Arc<ControlPlane>> {
    let anchor = match &args.control_plane_ca {
        Some(path) => TrustAnchor::from_file(path)?,
        None => TrustAnchor::first_use(),
    };
    let token_file = args
        .bootstrap_token_file
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--control-plane needs --bootstrap-token-file"))?;
    let settings = ControlPlaneSettings {
        url: url.to_owned(),
        token_file,
        insecure: args.insecure_control_plane,
        keepalive: args.discovery_keepalive,
        connect_timeout: connect_timeout.min(std::time::Duration::from_secs(5)),
    };
    let control =
        ControlPlane::new(settings, anchor, sockets).map_err(|e| anyhow::anyhow!("--control-plane: {e}"))?;
    if control.is_tls() {
        info!(control_plane = %url, anchor = %control.anchor().describe(), "control plane over TLS");
    } else {
        warn!(control_plane = %url, "control plane in plaintext (--insecure-control-plane): its answers and the node credential are not protected");
    }
    Ok(control)
}

/// `--node`, or the host name.
fn node_name(args: &RunArgs) -> String {
    args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into())
    })
}
