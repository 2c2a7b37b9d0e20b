//! The running agent: listeners first, then interception, then the workloads; and on
//! SIGTERM/SIGINT the reverse: listeners closed, connections drained within a
//! deadline, created cgroups removed. Interception itself stays in place on purpose
//! (pinned eBPF, iptables rules): while no agent listens, workloads' connections are
//! refused rather than sent around the mesh; a new agent adopts it, and `mesh-agent
//! cleanup` removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
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
    socket::SocketFactory,
    workload::{
        Placement, ServiceAccount, Source, Workload, WorkloadKey,
        netns::NetnsHandle,
        serve::{Node, Served},
    },
    workload_identity::{self, Identities},
};

/// State shared between the data path's supervisor and the admin endpoint.
pub struct AgentState {
    pub mode: ActiveMode,
    pub mode_reason: String,
    pub settings: Settings,
    /// What every workload's data path shares.
    pub node: Arc<Node>,
    /// The node's default workload's context (the `--cgroup`/`--identity` workload,
    /// and connections of the admin API's enrolled cgroups).
    pub proxy: Arc<ProxyContext>,
    /// `None` once shut down. A std mutex: held only for map/attach syscalls or one
    /// iptables-restore run, never across an `.await`.
    interceptor: Mutex<Option<Interceptor>>,
    /// The workloads served, by key. Held only to insert, remove or read.
    workloads: Mutex<BTreeMap<WorkloadKey, Served>>,
    cgroup_mount: Option<PathBuf>,
    /// Cgroups the agent created (admin `create=true`) and removes on shutdown.
    created: Mutex<BTreeSet<CgroupPath>>,
    ready: AtomicBool,
    pub shutdown: CancellationToken,
    control_plane: Option<String>,
    /// Renders `/metrics`; `None` when another recorder was installed first.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The pods the CNI plugin hands the agent (set once the state exists).
    pub cni: std::sync::OnceLock<Arc<crate::workload::cni::CniPods<crate::workload::pods::AgentPods>>>,
}

/// The node's default workload (its `--cgroup`s and `--identity`).
pub const DEFAULT_WORKLOAD: &str = "node";

/// Errors of enrol/unenrol requests.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("workload {0}: {1}")]
    Workload(String, String),
}

/// What `/config_dump` shows.
#[derive(Serialize)]
pub struct ConfigDump {
    /// The agent's release (`meshctl version`).
    pub version: &'static str,
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
    /// The workloads served.
    pub workloads: Vec<WorkloadDump>,
    /// Service ports of the applied snapshot with their endpoints and health.
    pub routes: Vec<Arc<crate::discovery::table::Route>>,
    /// What this agent learned from traffic: per service port, the balancer and each
    /// endpoint's load, ejection and circuit-breaker state.
    pub balancing: Vec<crate::balance::service::BalancingDump>,
}

/// A served workload, as `/workloads` and `/config_dump` show it.
#[derive(Serialize)]
pub struct WorkloadDump {
    pub key: WorkloadKey,
    pub name: String,
    pub namespace: String,
    pub service_account: Option<String>,
    /// Its SPIFFE ID once its certificate is issued.
    pub identity: Option<String>,
    /// The network namespace's path, or "host" for the node's own.
    pub netns: String,
    pub cgroup: Option<String>,
    pub addresses: Vec<String>,
    pub mode: ActiveMode,
    pub certificate_not_after: Option<u64>,
    pub source: Source,
    pub listeners: Vec<SocketAddr>,
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
        if self.static_identity_missing() {
            missing.push("certificate");
        }
        if self.proxy.routes.is_enabled() && !self.proxy.routes.has_snapshot() {
            missing.push("discovery snapshot");
        }
        missing
    }

    /// Whether a static workload with an identity still waits for its certificate.
    fn static_identity_missing(&self) -> bool {
        if self.node.identities.is_none() {
            return false;
        }
        self.workloads.lock().unwrap_or_else(|p| p.into_inner()).values().any(|s| {
            s.workload.source == Source::Static
                && s.workload.service_account.is_some()
                && s.ctx.identity.get().is_none()
        })
    }

    /// The workloads served, for `/workloads`.
    pub fn workloads(&self) -> Vec<WorkloadDump> {
        let served = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        served
            .values()
            .map(|s| {
                let w = &s.workload;
                let cert = workload_identity::dump(&s.ctx.identity);
                let (netns, cgroup) = match &w.placement {
                    Placement::Host { cgroups } => ("host".to_owned(), cgroups.first().cloned()),
                    Placement::Pod { netns, .. } => (netns.display().to_string(), None),
                };
                WorkloadDump {
                    key: w.key.clone(),
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.as_ref().map(|a| a.name.clone()),
                    identity: cert.as_ref().map(|c| c.identity.clone()),
                    netns,
                    cgroup,
                    addresses: w.addresses.iter().map(ToString::to_string).collect(),
                    mode: self.mode,
                    certificate_not_after: cert.map(|c| c.not_after),
                    source: w.source,
                    listeners: s.listening.clone(),
                }
            })
            .collect()
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
        let result = interceptor.enroll(&cgroup, None);
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
        use crate::observe::{expiry, labels::MeshName, metrics};
        // Everything that still exists is set (or touched) now, so that with
        // `--metrics-idle-timeout` only the series of what is gone expire.
        expiry::touch_gauges(Some(self.mode));
        self.node.services.publish_metrics();
        let routes = &self.proxy.routes;
        metrics::set_discovery_staleness(routes.staleness());
        metrics::set_discovery_applied_version(routes.table().version);
        for c in self.certificates() {
            metrics::set_certificate_expiry(&MeshName::known(&c.identity), c.expires_in_seconds as f64);
        }
    }

    /// The window's edge report for the control plane's dashboard: traffic per edge,
    /// breakers, ejections, and each workload's identity and certificate expiry
    /// (which also lets the control plane tie a caller's identity to a workload).
    /// `None` when the window saw nothing and no breaker is open; the workloads then
    /// go out with the next report.
    pub fn edge_report(&self, window: std::time::Duration) -> Option<mesh_api::EdgeReport> {
        let w = crate::observe::edges::global().take();
        if w.edges.is_empty() && w.breakers.is_empty() && w.ejections.is_empty() && w.dropped_edges == 0 {
            return None;
        }
        let workloads = self
            .workloads()
            .into_iter()
            .take(mesh_api::edges::MAX_NODE_ENTRIES_PER_REPORT)
            .map(|w| mesh_api::WorkloadCertificate {
                workload: format!("{}/{}", w.namespace, w.name),
                identity: w.identity.unwrap_or_default(),
                not_after: w.certificate_not_after.unwrap_or(0),
            })
            .collect();
        Some(mesh_api::EdgeReport {
            window_ms: u32::try_from(window.as_millis()).unwrap_or(u32::MAX),
            edges: w.edges,
            dropped_edges: w.dropped_edges,
            breakers: w.breakers,
            ejections: w.ejections,
            workloads,
        })
    }

    /// Every workload's current certificate, one entry per identity.
    pub fn certificates(&self) -> Vec<crate::workload_identity::CertificateDump> {
        let served = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        let mut certs: Vec<_> =
            served.values().filter_map(|s| workload_identity::dump(&s.ctx.identity)).collect();
        certs.sort_by(|a, b| a.identity.cmp(&b.identity));
        certs.dedup_by(|a, b| a.identity == b.identity);
        certs
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
            version: env!("CARGO_PKG_VERSION"),
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
            certificates: self.certificates(),
            workloads: self.workloads(),
            routes: self.proxy.routes.table().routes().to_vec(),
            balancing: self.proxy.services.dump(),
        }
    }

    /// Kernel-side counters, eBPF mode only.
    pub fn ebpf_stats(&self) -> Option<crate::intercept::ebpf::EbpfStats> {
        self.interceptor.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|i| i.ebpf_stats())
    }

    /// Starts serving a workload: its listeners, its identity, then its interception
    /// (listeners first, so redirected connections always find one).
    pub fn add_workload(&self, workload: Workload) -> Result<Vec<SocketAddr>, EnrollError> {
        let key = workload.key.clone();
        if self.shutdown.is_cancelled() {
            return Err(EnrollError::ShuttingDown);
        }
        if self.workloads.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key) {
            return Err(EnrollError::Workload(key.0, "is already served".into()));
        }
        let served = match &workload.placement {
            Placement::Pod { netns, .. } => self.serve_pod(workload.clone(), netns.clone())?,
            Placement::Host { .. } => {
                return Err(EnrollError::Workload(key.0, "host workloads are added at start".into()));
            }
        };
        let listening = served.listening.clone();
        self.workloads.lock().unwrap_or_else(|p| p.into_inner()).insert(key, served);
        Ok(listening)
    }

    /// Stops serving a workload: its interception first (new connections of it are
    /// refused from then on), then its listeners; its open connections run to their end.
    pub fn remove_workload(&self, key: &WorkloadKey) -> Result<bool, EnrollError> {
        let Some(served) = self.workloads.lock().unwrap_or_else(|p| p.into_inner()).remove(key) else {
            return Ok(false);
        };
        if let Some(netns) = &served.netns {
            let mut guard = self.interceptor.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = guard.as_mut() {
                i.remove_pod(netns)?;
            }
        }
        served.stop();
        info!(workload = %key, "workload removed");
        Ok(true)
    }

    /// Gives a served workload the identity it lacked.
    pub fn set_identity(&self, key: &WorkloadKey, account: &ServiceAccount) {
        let Some(identities) = &self.node.identities else { return };
        if let Some(served) = self.workloads.lock().unwrap_or_else(|p| p.into_inner()).get_mut(key) {
            served.lease_identity(identities, account);
        }
    }

    /// Whether `key` is served, and its identity if issued.
    pub fn served_identity(&self, key: &WorkloadKey) -> Option<Option<String>> {
        let served = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        served.get(key).map(|s| s.ctx.identity.get().map(|i| i.workload.id().to_string()))
    }

    /// The SPIFFE ID `account` has in this mesh's trust domain.
    pub fn spiffe_id(&self, account: &ServiceAccount) -> String {
        let td = self.node.routes.table().trust_domain.clone();
        format!("spiffe://{td}/ns/{}/sa/{}", account.namespace, account.name)
    }

    /// Opens a pod's listeners inside its namespace and intercepts its traffic.
    fn serve_pod(&self, workload: Workload, path: PathBuf) -> Result<Served, EnrollError> {
        let key = workload.key.0.clone();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            EnrollError::Workload(key.clone(), format!("{what}: {e}"))
        };
        let netns = Arc::new(NetnsHandle::open(&path).map_err(|e| fail("network namespace", &e))?);
        if let Err(e) = netns.migrate_requests() {
            warn!(workload = %key, error = %e, "net.ipv4.tcp_migrate_req not set: an upgrade may reset connections queued on the old agent");
        }
        let node = &self.node;
        let sockets = node.sockets.in_netns(netns.clone());
        let outbound = listener::bind_outbound(&sockets, node.outbound_port, node.ipv6)
            .map_err(|e| fail("outbound listener", &e))?;
        let inbound = listener::bind_any(&sockets, node.inbound_port, node.ipv6)
            .map_err(|e| fail("inbound listener", &e))?;
        let tunnel = match node.identities.is_some() {
            true => listener::bind_any(&sockets, node.tunnel_port, node.ipv6)
                .map_err(|e| fail("tunnel listener", &e))?,
            false => Vec::new(),
        };
        let dns = match &node.dns {
            Some(dns) => Some(dns.bind(&sockets, node.ipv6).map_err(|e| fail("DNS listener", &e))?),
            None => None,
        };
        let mut listening = Vec::new();
        for l in outbound.iter().chain(&inbound).chain(&tunnel) {
            listening.push(l.local_addr().map_err(|e| fail("listener", &e))?);
        }
        let slot = workload_identity::IdentitySlot::default();
        let lease = match (&node.identities, &workload.service_account) {
            (Some(ids), Some(account)) => Some(ids.lease(account, slot.clone())),
            _ => None,
        };
        let name =
            crate::observe::labels::MeshName::known(&format!("{}/{}", workload.namespace, workload.name));
        let ctx = node.context(name, sockets, slot, listening.clone());
        let stop = node.shutdown.child_token();
        {
            let mut guard = self.interceptor.lock().unwrap_or_else(|p| p.into_inner());
            let interceptor = guard.as_mut().ok_or(EnrollError::ShuttingDown)?;
            interceptor.add_pod(&netns, &workload.addresses, &inbound, node.outbound_port)?;
        }
        node.spawn_listeners(outbound, Direction::Outbound, &ctx, &stop);
        node.spawn_listeners(inbound, Direction::Inbound, &ctx, &stop);
        if let (Some(service), Some(dns)) = (&node.dns, dns) {
            service.spawn(dns, &stop);
        }
        let tunnels = node.spawn_tunnel(tunnel, &ctx, &stop);
        info!(workload = %workload.key, pod = %format!("{}/{}", workload.namespace, workload.name),
            netns = %path.display(), addresses = ?workload.addresses,
            identity = ?workload.service_account.as_ref().map(ToString::to_string), "pod served in its network namespace");
        Ok(Served::new(workload, ctx, listening, stop)
            .in_netns(netns)
            .with_tunnels(tunnels)
            .with_lease(lease))
    }

    /// Closes every workload's listeners. Interception stays: see [`Self::stop_intercepting`].
    fn stop_serving(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.ready.store(false, Ordering::Release);
        let mut tunnels = Vec::new();
        for served in self.workloads.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            served.stop();
            tunnels.extend(served.take_tunnels());
        }
        tunnels
    }

    /// Lets go of this agent's part of interception once its connections are drained,
    /// leaving the rest in place (pinned eBPF programs and iptables rules keep
    /// redirecting to the listeners now gone, so workloads' connections are refused,
    /// never sent around the mesh, until an agent returns or `mesh-agent cleanup`
    /// runs). Not before the drain: in eBPF mode a connection accepted just before the
    /// listeners closed still asks for its original destination through the
    /// getsockopt program this drops, and without it would be reset during an upgrade.
    fn stop_intercepting(&self) {
        let interceptor = self.interceptor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(i) = interceptor
            && let Err(e) = i.shutdown()
        {
            error!(error = %e, "stopping interception failed; run `mesh-agent cleanup`");
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

/// A static workload of the node's own namespace, from the flags, with its outbound
/// listeners (the default workload's on `--outbound-port`, others' on free ports).
struct HostWorkload {
    workload: Workload,
    outbound: Vec<tokio::net::TcpListener>,
    /// `None`: the default outbound port.
    port: Option<u16>,
}

/// The node's static workloads: the default one (`--cgroup` with `--identity`, or no
/// identity) and one per `--workload CGROUP=NAMESPACE/SERVICE_ACCOUNT`.
fn host_workloads(
    args: &RunArgs,
    sockets: &SocketFactory,
    settings: &Settings,
) -> anyhow::Result<Vec<HostWorkload>> {
    let mut out = Vec::new();
    let account =
        args.identity.as_deref().map(ServiceAccount::parse).transpose().map_err(anyhow::Error::msg)?;
    let outbound = listener::bind_outbound(sockets, settings.outbound_port, settings.ipv6).map_err(|e| {
        anyhow::anyhow!("outbound listener (--outbound-port {}): {e}", settings.outbound_port)
    })?;
    out.push(HostWorkload {
        workload: Workload {
            key: WorkloadKey(DEFAULT_WORKLOAD.into()),
            name: account.as_ref().map_or_else(|| DEFAULT_WORKLOAD.to_owned(), |a| a.name.clone()),
            namespace: account.as_ref().map(|a| a.namespace.clone()).unwrap_or_default(),
            service_account: account,
            placement: Placement::Host { cgroups: args.cgroups.clone() },
            addresses: Vec::new(),
            labels: Default::default(),
            source: Source::Static,
        },
        outbound,
        port: None,
    });
    for spec in &args.workloads {
        let (cgroup, account) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--workload {spec:?}: not CGROUP=NAMESPACE/SERVICE_ACCOUNT"))?;
        let account =
            ServiceAccount::parse(account).map_err(|e| anyhow::anyhow!("--workload {spec:?}: {e}"))?;
        let outbound = listener::bind_outbound(sockets, 0, settings.ipv6)
            .map_err(|e| anyhow::anyhow!("outbound listener of --workload {spec}: {e}"))?;
        let port = outbound[0].local_addr()?.port();
        out.push(HostWorkload {
            workload: Workload {
                key: WorkloadKey(cgroup.to_owned()),
                name: account.name.clone(),
                namespace: account.namespace.clone(),
                service_account: Some(account),
                placement: Placement::Host { cgroups: vec![cgroup.to_owned()] },
                addresses: Vec::new(),
                labels: Default::default(),
                source: Source::Static,
            },
            outbound,
            port: Some(port),
        });
    }
    Ok(out)
}

/// The node's own addresses (not loopback), where `--inbound-ports` are captured.
fn node_addresses() -> Vec<std::net::IpAddr> {
    let mut addrs: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
            })
            .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
            .collect()
        })
        .unwrap_or_default();
    addrs.sort();
    addrs.dedup();
    addrs
}

fn is_link_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
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
        request_header_timeout,
        tcp_idle_timeout,
        splice,
    } = proxy_settings;
    let downstream = crate::l7::DownstreamTimeouts {
        idle: downstream_idle_timeout,
        header: request_header_timeout,
        ..Default::default()
    };
    let sockets = SocketFactory::new(settings.mark);

    // Before interception: an unusable anchor, URL or admin socket path is a start-up
    // error that leaves nothing behind.
    let control = match &args.control_plane {
        Some(url) => Some(connect_control_plane(&args, url, sockets.clone(), connect_timeout)?),
        None => None,
    };
    let admin_socket = admin::AdminSocket::bind(&args.admin_socket)?;
    let (connection_limits, splice) = connection_limits(&args, splice);

    // Listeners first: once interception is on, redirected connections need somewhere
    // to land. Connections queued on a draining agent's listeners move to this one's.
    if let Err(e) = crate::workload::netns::migrate_requests_here() {
        warn!(error = %e, "net.ipv4.tcp_migrate_req not set: an upgrade may reset connections queued on the old agent");
    }
    let mut hosts = host_workloads(&args, &sockets, &settings)?;
    let inbound = if !settings.inbound_ports.is_empty() {
        listener::bind_any(&sockets, settings.inbound_port, settings.ipv6).map_err(|e| {
            anyhow::anyhow!("inbound listener (--inbound-port {}): {e}", settings.inbound_port)
        })?
    } else {
        Vec::new()
    };
    let has_tunnel = control.is_some();
    let tunnel = if has_tunnel && hosts.iter().any(|h| h.workload.service_account.is_some()) {
        listener::bind_any(&sockets, args.tunnel_port, false).map_err(|e| {
            anyhow::anyhow!("tunnel listener on port {} (--tunnel-port): {e}", args.tunnel_port)
        })?
    } else {
        Vec::new()
    };

    // The node's DNS listener, for the workloads of its own namespace (pods get one
    // in theirs), before interception sends their queries to it.
    let routes = Arc::new(RouteStore::new(args.control_plane.is_some()));
    let dns = match args
        .dns_settings(&std::fs::read_to_string(crate::dns::resolv::RESOLV_CONF).unwrap_or_default())
    {
        Some(dns_settings) => {
            if dns_settings.upstreams.is_empty() {
                warn!(
                    "DNS: no upstream resolver (no --dns-upstream, no nameserver in /etc/resolv.conf): names outside the registry get SERVFAIL"
                );
            }
            info!(port = dns_settings.port, upstreams = ?dns_settings.upstreams,
                max_forwards = dns_settings.max_forwards, forward_rate = dns_settings.forward_rate,
                "DNS for registry hostnames on");
            let dns = crate::dns::Dns::new(dns_settings, routes.clone(), sockets.clone());
            let listeners = dns
                .bind(&sockets, settings.ipv6)
                .map_err(|e| anyhow::anyhow!("DNS listener (--dns-port {}): {e}", dns.settings().port))?;
            Some((dns, listeners))
        }
        None => None,
    };

    // Without --intercept-all, only enrolled cgroups of the node's namespace are
    // intercepted (none at all for a node agent that serves pods only).
    let per_cgroup = !args.intercept_all;
    let (mut interceptor, mode_reason) = {
        let (mode, settings) = (args.mode, settings.clone());
        tokio::task::spawn_blocking(move || {
            let started = Interceptor::start(mode, &settings, per_cgroup);
            // Loading the eBPF object parsed the kernel's BTF: return that burst now
            // rather than when this blocking thread retires (see memory.rs).
            crate::memory::return_freed();
            started
        })
        .await??
    };
    let mode = interceptor.mode();
    info!(%mode, reason = %mode_reason, "interception mode selected");

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
    // Cancelled on SIGTERM/SIGINT or /quitquitquit: background tasks stop, the tunnel
    // listener sends GOAWAY and served HTTP connections close gracefully.
    let shutdown = CancellationToken::new();
    let node_name = node_name(&args);
    let identities = match &control {
        Some(control) => {
            let channel = control.lazy_channel().map_err(|e| anyhow::anyhow!("--control-plane: {e}"))?;
            let signer = GrpcSigner::new(channel, control.clone(), node_name.clone());
            let renewal = RenewalConfig {
                renew_fraction: args.cert_renew_fraction,
                ttl: args.cert_ttl,
                ..Default::default()
            };
            Some(Identities::start(signer, renewal, routes.clone(), shutdown.clone()))
        }
        None => None,
    };
    let node = Arc::new(Node {
        name: node_name.clone(),
        mode,
        ipv6: settings.ipv6,
        outbound_port: settings.outbound_port,
        inbound_port: settings.inbound_port,
        tunnel_port: args.tunnel_port,
        sockets: sockets.clone(),
        detect_timeout,
        connect_timeout,
        opaque_ports,
        stats: Default::default(),
        routes: routes.clone(),
        services: Default::default(),
        rate_limits: Default::default(),
        records: records.clone(),
        locality: {
            let l = crate::balance::Locality::new(args.region.clone(), args.zone.clone());
            l.is_known().then_some(l)
        },
        downstream,
        tcp_idle_timeout,
        splice,
        upstream_idle_timeout: args.upstream_idle_timeout,
        shutdown: shutdown.clone(),
        stop_accepting: CancellationToken::new(),
        tracker: TaskTracker::new(),
        identities: identities.clone(),
        dns: dns.as_ref().map(|(dns, _)| dns.clone()),
        limits: connection_limits,
        handshakes: crate::mtls::Handshakes {
            limits: {
                // Peer agents dial from their workloads' (or their own) addresses,
                // which the routing table lists: they may use the reserved slots.
                let table = routes.clone();
                crate::limits::HandshakeLimits::new(
                    crate::limits::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
                    args.max_tunnel_handshakes,
                )
                .with_known_peers(Arc::new(move |ip| table.table().is_mesh_peer(ip)))
            },
            timeout: args.tunnel_handshake_timeout,
            runtime: match args.tunnel_handshake_threads {
                0 => None,
                n => Some(Arc::new(
                    crate::tunnel::HandshakeRuntime::new(n, args.tunnel_handshake_nice)
                        .map_err(|e| anyhow::anyhow!("--tunnel-handshake-threads: {e}"))?,
                )),
            },
        },
    });

    // The node's own namespace: inbound capture of `--inbound-ports` (eBPF mode; the
    // iptables chains do it themselves).
    if mode == ActiveMode::Ebpf && !inbound.is_empty() {
        let own = NetnsHandle::own()?;
        interceptor
            .capture_node(&own, &node_addresses(), &inbound)
            .map_err(|e| anyhow::anyhow!("inbound capture: {e}"))?;
    }

    let mut listening_dns = Vec::new();
    if let Some((service, listeners)) = dns {
        listening_dns = listeners.local_addrs();
        service.spawn(listeners, &node.shutdown.child_token());
    }

    // Contexts, identities and cgroups of the static workloads.
    let mut served = BTreeMap::new();
    let mut default_ctx = None;
    let mut tunnel_ctx: Option<Arc<ProxyContext>> = None;
    for h in hosts.drain(..) {
        let slot = workload_identity::IdentitySlot::default();
        let lease = match (&identities, &h.workload.service_account) {
            (Some(ids), Some(account)) => Some(ids.lease(account, slot.clone())),
            _ => None,
        };
        let mut listening = Vec::new();
        for l in &h.outbound {
            listening.push(l.local_addr()?);
        }
        let own_addrs: Vec<SocketAddr> =
            listening.iter().copied().chain(inbound.iter().filter_map(|l| l.local_addr().ok())).collect();
        let label =
            h.workload.service_account.as_ref().map_or_else(crate::observe::labels::MeshName::unknown, |a| {
                crate::observe::labels::MeshName::known(&a.to_string())
            });
        let ctx = node.context(label, sockets.clone(), slot, own_addrs);
        if let Placement::Host { cgroups } = &h.workload.placement {
            for cg in cgroups {
                let mount = cgroup2_mount().map_err(|e| anyhow::anyhow!("enrolling {cg}: {e}"))?;
                let cgroup =
                    CgroupPath::resolve(&mount, cg).map_err(|e| anyhow::anyhow!("enrolling {cg}: {e}"))?;
                interceptor.enroll(&cgroup, h.port).map_err(|e| anyhow::anyhow!("enrolling {cg}: {e}"))?;
            }
        }
        let stop = node.shutdown.child_token();
        node.spawn_listeners(h.outbound, Direction::Outbound, &ctx, &stop);
        if h.workload.key.0 == DEFAULT_WORKLOAD {
            default_ctx = Some(ctx.clone());
        }
        if tunnel_ctx.is_none() && h.workload.service_account.is_some() {
            tunnel_ctx = Some(ctx.clone());
        }
        served
            .insert(h.workload.key.clone(), Served::new(h.workload, ctx, listening, stop).with_lease(lease));
    }
    let default_ctx = default_ctx.expect("the default workload is always built");
    // The node's inbound and tunnel listeners serve its default workload (the first
    // static workload with an identity for the tunnel).
    let node_stop = node.shutdown.child_token();
    let mut listening: Vec<String> =
        served.values().flat_map(|s: &Served| s.listening.iter().map(ToString::to_string)).collect();
    for l in inbound.iter().chain(&tunnel) {
        listening.push(l.local_addr()?.to_string());
    }
    listening.extend(listening_dns.iter().map(|a| format!("{a} (dns)")));
    node.spawn_listeners(inbound, Direction::Inbound, &default_ctx, &node_stop);
    let mut node_tunnels = match &tunnel_ctx {
        Some(ctx) if !tunnel.is_empty() => {
            info!(port = args.tunnel_port, "mTLS tunnel listener bound");
            node.spawn_tunnel(tunnel, ctx, &node_stop)
        }
        _ => Vec::new(),
    };

    let state = Arc::new(AgentState {
        mode,
        mode_reason,
        settings,
        node: node.clone(),
        proxy: default_ctx.clone(),
        interceptor: Mutex::new(Some(interceptor)),
        workloads: Mutex::new(served),
        cgroup_mount: cgroup2_mount().ok(),
        created: Mutex::new(BTreeSet::new()),
        ready: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        control_plane: args.control_plane.clone(),
        cni: std::sync::OnceLock::new(),
        metrics: match args.metrics {
            crate::config::Switch::Off => None,
            crate::config::Switch::On => match crate::observe::metrics::install(
                (!args.metrics_idle_timeout.is_zero()).then_some(args.metrics_idle_timeout),
            ) {
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

    // Pods from the CNI plugin, and those it handed a previous agent: served again
    // before the agent says it is ready, with no CNI call.
    {
        let pods = crate::workload::pods::AgentPods::new(&state, args.pod_identity_patience);
        let store = crate::workload::store::WorkloadStore::new(&args.pod_state, args.max_pods);
        let limits = crate::workload::cni::CniLimits { max_pods: args.max_pods, ..Default::default() };
        let cni = Arc::new(crate::workload::cni::CniPods::new(pods, Some(store), limits));
        let _ = state.cni.set(cni.clone());
        let report = cni.restore(crate::workload::store::netns_exists).await;
        if !report.restored.is_empty() || !report.failed.is_empty() || !report.dropped.is_empty() {
            info!(restored = ?report.restored, failed = ?report.failed.iter().map(|(c, e)| format!("{c}: {e}")).collect::<Vec<_>>(),
                dropped = report.dropped.len(), "pods from the state file served again");
        }
        if let Some(e) = report.error {
            warn!(error = %e, file = %args.pod_state.display(), "pod state file unreadable; starting with no CNI pods");
        }
    }

    let admin_addr = match admin::spawn_tcp(args.admin_addr, state.clone()).await {
        Ok(a) => a,
        Err(e) => {
            state.stop_serving();
            state.stop_intercepting();
            return Err(anyhow::anyhow!("admin endpoint on {} (--admin-addr): {e}", args.admin_addr));
        }
    };
    let scrape_addr = match args.metrics_addr {
        None => None,
        Some(addr) => match admin::spawn_scrape(addr, state.clone()).await {
            Ok(a) => Some(a),
            Err(e) => {
                state.shutdown.cancel();
                state.stop_serving();
                state.stop_intercepting();
                return Err(anyhow::anyhow!("scrape endpoint on {addr} (--metrics-addr): {e}"));
            }
        },
    };
    let admin_socket_path = admin_socket.path().display().to_string();
    let admin_socket = admin::spawn_socket(admin_socket, state.clone());

    if let Some(control) = &control {
        let settings = ClientSettings {
            node: node_name.clone(),
            // Only the port: the control plane pairs it with the address it sees the
            // stream come from (the agent cannot know which of its addresses peers use).
            agent_address: if tunnel_ctx.is_some() {
                format!(":{}", args.tunnel_port)
            } else {
                String::new()
            },
            mode: mode.as_str().to_string(),
            max_endpoints: args.max_endpoints,
            backoff: Backoff::new(std::time::Duration::from_millis(100), args.discovery_backoff_max),
            edge_reports: (!args.edge_report_interval.is_zero()).then(|| {
                let state = state.clone();
                discovery::client::EdgeReports {
                    interval: args.edge_report_interval,
                    build: Arc::new(move |window| state.edge_report(window)),
                }
            }),
        };
        tokio::spawn(discovery::client::run(
            settings,
            control.clone(),
            routes.clone(),
            state.shutdown.clone(),
        ));
    }

    if let Some(handle) = state.metrics.clone()
        && !args.metrics_idle_timeout.is_zero()
    {
        crate::observe::expiry::spawn(handle, args.metrics_idle_timeout, state.shutdown.clone());
    }
    {
        // Upstream pools' idle connections, and breaker states as gauges.
        let (state, shutdown) = (state.clone(), state.shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        state.node.services.publish_metrics();
                        let contexts: Vec<Arc<ProxyContext>> = state.workloads.lock().unwrap_or_else(|p| p.into_inner()).values().map(|s| s.ctx.clone()).collect();
                        for ctx in contexts {
                            ctx.upstreams.sweep();
                        }
                    }
                }
            }
        });
    }
    state.ready.store(true, Ordering::Release);
    let enrolled: Vec<String> = state.config_dump().enrolled;
    info!(%mode, listeners = ?listening, admin = %admin_addr, admin_socket = %admin_socket_path, enrolled = ?enrolled,
        metrics = ?scrape_addr,
        "agent ready");

    wait_for_shutdown(&state.shutdown).await;
    // A signal stops everything /quitquitquit does.
    state.shutdown.cancel();

    let began = Instant::now();
    info!(
        "shutting down: closing listeners, draining connections (interception stays in place: connections fail closed)"
    );
    node.stop_accepting.cancel();
    let mut tunnels = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.stop_serving()).await?
    };
    tunnels.append(&mut node_tunnels);
    node.tracker.close();
    let active = node.stats.snapshot().active;
    // Peers' tunnel streams (already sent GOAWAY by the shutdown token) drain within
    // the same deadline as the workloads' connections.
    let tunnel_drained = async {
        for t in &mut tunnels {
            let _ = t.await;
        }
    };
    let drained = async { tokio::join!(node.tracker.wait(), tunnel_drained) };
    if tokio::time::timeout(drain_timeout, drained).await.is_ok() {
        info!(drained = active, elapsed_ms = began.elapsed().as_millis() as u64, "shutdown complete");
    } else {
        warn!(
            still_open = node.stats.snapshot().active,
            drain_timeout = ?drain_timeout,
            "drain deadline reached; closing remaining connections"
        );
        for t in &tunnels {
            t.abort();
        }
    }
    {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.stop_intercepting()).await?;
    }
    drop(records);
    // The socket task ends with the shutdown token and removes the socket file.
    let _ = admin_socket.await;
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

pub(crate) async fn wait_for_shutdown(admin_drain: &CancellationToken) {
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
        () = admin_drain.cancelled() => info!("drain requested on the admin socket"),
    }
}

/// The listeners' connection limits, with the file-descriptor limit raised to its
/// hard limit first and `--max-connections` fitted under it; and, with `splice`, the
/// pipes of the plaintext relays' bulk directions, fitted to the descriptors the
/// connections leave (see [`crate::limits::fit_to_nofile`] and
/// [`crate::limits::pipe_budget`]).
fn connection_limits(
    args: &RunArgs,
    splice: bool,
) -> (Arc<crate::limits::ConnectionLimits>, crate::forward::splice::Pipes) {
    let (total, nofile) = match crate::limits::raise_nofile() {
        Ok(nofile) => {
            let fitted = crate::limits::fit_to_nofile(args.max_connections, nofile, splice);
            if fitted < args.max_connections {
                warn!(
                    max_connections = args.max_connections,
                    nofile,
                    lowered_to = fitted,
                    splice,
                    "--max-connections lowered to what RLIMIT_NOFILE can hold (two descriptors per connection; with splice, an eighth kept for pipes)"
                );
            } else {
                info!(nofile, max_connections = fitted, "file-descriptor limit raised to its hard limit");
            }
            (fitted, Some(nofile))
        }
        Err(e) => {
            warn!(error = %e, "cannot raise RLIMIT_NOFILE; --max-connections kept as given");
            (args.max_connections, None)
        }
    };
    let pipes = if splice {
        let max = match nofile {
            Some(nofile) => crate::limits::pipe_budget(total, nofile),
            None => crate::forward::splice::FALLBACK_BUDGET,
        };
        let pipes = crate::forward::splice::Pipes::new(max);
        if max == 0 {
            warn!(
                nofile,
                max_connections = total,
                "no descriptor left for splice(2) pipes: plaintext relays copy"
            );
        } else {
            info!(pipes = max, "plaintext relays splice bulk directions (--splice on)");
        }
        pipes
    } else {
        info!("plaintext relays copy every byte (--splice off)");
        crate::forward::splice::Pipes::off()
    };
    (crate::limits::ConnectionLimits::new(args.max_connections_per_source, total), pipes)
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
