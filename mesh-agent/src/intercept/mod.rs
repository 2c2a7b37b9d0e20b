//! Taking workload connections away from them: eBPF cgroup programs where the kernel
//! and privileges allow, iptables REDIRECT rules otherwise. Both end at the same
//! listeners, and both answer `SO_ORIGINAL_DST`, so nothing after this module knows
//! which one is in use.

pub mod ebpf;
pub mod iptables;
pub mod preflight;

use std::{fmt, str::FromStr};

use serde::Serialize;
use tracing::{info, warn};

use self::{
    ebpf::{EbpfError, EbpfInterceptor, EbpfStats},
    iptables::{AgentSockets, Inbound, IptablesConfig, IptablesError},
    preflight::Missing,
};
use crate::{cgroup::CgroupPath, cidr::Cidr};

/// The mode asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF when the kernel and capabilities allow it, otherwise iptables.
    Auto,
    /// cgroup connect/sockops/getsockopt programs; fails if unavailable.
    Ebpf,
    /// iptables NAT REDIRECT rules.
    Iptables,
}

/// The mode in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveMode {
    Ebpf,
    Iptables,
}

impl ActiveMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Iptables => "iptables",
        }
    }
}

impl fmt::Display for ActiveMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActiveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ebpf" => Ok(Self::Ebpf),
            "iptables" => Ok(Self::Iptables),
            other => Err(format!("unknown interception mode {other:?}")),
        }
    }
}

/// What to intercept and where to send it; one set of settings for both modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Destination ports redirected to the inbound listener (iptables mode only: in
    /// eBPF mode peers reach the agent directly).
    pub inbound_ports: Vec<u16>,
    pub mark: u32,
    /// The uid/gid the agent runs as: iptables rules recognise its sockets by the
    /// mark together with them (for rules an init container installs).
    pub agent_uid: Option<u32>,
    pub agent_gid: Option<u32>,
    pub exclude_uid: Option<u32>,
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub include_cidrs: Vec<Cidr>,
    pub exclude_cidrs: Vec<Cidr>,
    pub ipv6: bool,
    pub ebpf_log: bool,
    /// The agent's cgroup for the getsockopt program; `None` = read /proc/self/cgroup.
    pub agent_cgroup: Option<String>,
    /// iptables mode: rules were installed by an init container (`mesh-agent iptables
    /// install`); the agent neither installs nor removes them.
    pub iptables_external: bool,
    /// eBPF mode: the bpffs directory holding this agent's pinned maps and links.
    pub bpffs_dir: std::path::PathBuf,
    /// eBPF mode: the cgroup the connect and sockops programs attach to (the cgroup2
    /// root by default, so every workload below it can be enrolled by a map entry).
    pub cgroup_root: String,
    /// The mTLS tunnel port peers' agents dial: never captured inbound.
    pub tunnel_port: u16,
    /// The agent's DNS listener port in each workload's namespace, where workloads'
    /// DNS queries are sent; `None`: DNS is not intercepted.
    pub dns_port: Option<u16>,
    /// eBPF mode: loopback legs between workloads and the agent skip TCP (`--sockmap`).
    pub sockmap: bool,
}

impl Settings {
    pub(crate) fn agent_cgroup_or_own(&self) -> Result<String, crate::cgroup::CgroupError> {
        match &self.agent_cgroup {
            Some(c) => Ok(c.clone()),
            None => crate::cgroup::own_cgroup(),
        }
    }

    /// The agent's own ports, which inbound capture never takes: its listeners and the
    /// tunnel port peers dial.
    pub fn agent_ports(&self) -> Vec<u16> {
        let mut ports = vec![self.outbound_port, self.inbound_port, self.tunnel_port];
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// How iptables rules recognise the agent's own sockets: the mark, with the
    /// cgroup the agent runs in (`agent_cgroup`, when it installs the rules
    /// itself) and the configured uid/gid.
    pub fn agent_sockets(&self, agent_cgroup: Option<String>) -> AgentSockets {
        AgentSockets {
            mark: self.mark,
            cgroups: agent_cgroup.into_iter().collect(),
            uid: self.agent_uid,
            gid: self.agent_gid,
        }
    }

    /// The iptables rules for these settings and enrolled cgroups; `agent_cgroup`
    /// as in [`Settings::agent_sockets`].
    pub fn iptables_config(
        &self,
        cgroups: &[(CgroupPath, Option<u16>)],
        agent_cgroup: Option<String>,
    ) -> IptablesConfig {
        IptablesConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            inbound: Inbound::Ports(self.inbound_ports.clone()),
            agent: self.agent_sockets(agent_cgroup),
            exclude_uid: self.exclude_uid,
            include_ports: self.include_ports.clone(),
            exclude_ports: self.exclude_ports.clone(),
            include_cidrs: self.include_cidrs.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            cgroups: cgroups.iter().map(|(c, _)| c.relative().to_owned()).collect(),
            cgroup_ports: cgroups
                .iter()
                .filter_map(|(c, p)| p.map(|p| (c.relative().to_owned(), p)))
                .collect(),
            ipv6: self.ipv6,
            dns_port: self.dns_port,
        }
    }
}

/// Errors choosing or running an interception mode.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("{0}")]
    Missing(Missing),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("no interception mode is usable: eBPF: {ebpf}; iptables: {iptables}")]
    NoMode { ebpf: String, iptables: String },
    #[error("no IPv4 inbound listener to capture connections into")]
    NoInboundListener,
    #[error("{0}")]
    Unsupported(String),
}

/// The IPv4 and IPv6 listeners among `listeners`.
fn families(
    listeners: &[tokio::net::TcpListener],
) -> (Option<std::os::fd::BorrowedFd<'_>>, Option<std::os::fd::BorrowedFd<'_>>) {
    use std::os::fd::AsFd;
    let mut v4 = None;
    let mut v6 = None;
    for l in listeners {
        match l.local_addr() {
            Ok(a) if a.is_ipv4() => v4 = Some(l.as_fd()),
            Ok(_) => v6 = Some(l.as_fd()),
            Err(_) => {}
        }
    }
    (v4, v6)
}

/// The interception in use.
pub enum Interceptor {
    Ebpf(Box<EbpfInterceptor>),
    Iptables(Box<IptablesInterceptor>),
}

/// iptables mode: the rules for the enrolled cgroups (or the whole namespace).
pub struct IptablesInterceptor {
    settings: Settings,
    /// The cgroup the agent runs in, which its sockets belong to (`None` if it
    /// cannot be read: the rules then match the mark alone, and say so).
    own_cgroup: Option<String>,
    /// Enrolled cgroups, each with its workload's own outbound port if it has one.
    cgroups: Vec<(CgroupPath, Option<u16>)>,
    /// Whether any enrolment was ever asked for: until then, with no `--cgroup`, the
    /// whole network namespace is intercepted (the pod-level fallback).
    per_cgroup: bool,
}

impl IptablesInterceptor {
    fn new(settings: &Settings, per_cgroup: bool) -> Result<Self, IptablesError> {
        let own_cgroup = match crate::cgroup::own_cgroup() {
            Ok(cgroup) => Some(cgroup),
            Err(error) => {
                warn!(%error, "the agent's own cgroup is unknown: iptables rules tell its sockets apart by the mark alone");
                None
            }
        };
        let me = Self { settings: settings.clone(), own_cgroup, cgroups: Vec::new(), per_cgroup };
        if !per_cgroup {
            me.apply()?;
        }
        Ok(me)
    }

    /// A pod's rules: its listeners on the agent's ports in its namespace, the agent's
    /// sockets recognised by the mark with the agent's cgroup (and uid/gid when set).
    fn pod_rules(&self, outbound_port: u16) -> iptables::pod::PodRules {
        let s = &self.settings;
        let mut rules = iptables::pod::PodRules::new(s.agent_sockets(self.own_cgroup.clone()));
        rules.outbound_port = outbound_port;
        rules.inbound_port = s.inbound_port;
        rules.tunnel_port = s.tunnel_port;
        rules.exclude_ports = s.exclude_ports.clone();
        rules.exclude_cidrs = s.exclude_cidrs.clone();
        rules.ipv6 = s.ipv6;
        rules.dns_port = s.dns_port;
        rules
    }

    fn apply(&self) -> Result<(), IptablesError> {
        if self.settings.iptables_external {
            return Ok(());
        }
        if self.per_cgroup && self.cgroups.is_empty() {
            // Nothing enrolled: no redirect at all (not "everything").
            return iptables::uninstall(self.settings.ipv6);
        }
        iptables::install(&self.settings.iptables_config(&self.cgroups, self.own_cgroup.clone()))
    }
}

/// eBPF mode with `--intercept-all`: every connect of the agent's own network
/// namespace (but the agent's) goes to its outbound listener, as a pod's do: the
/// namespace is entered in the pods' map. Without it the entry is removed, since the
/// maps outlive the agent that wrote them.
fn intercept_own_netns(i: &mut EbpfInterceptor, all: bool, port: u16) -> Result<(), InterceptError> {
    let probe = std::net::UdpSocket::bind(("127.0.0.1", 0)).map_err(EbpfError::Netns)?;
    let cookie = ebpf::netns_cookie(std::os::fd::AsFd::as_fd(&probe)).map_err(EbpfError::Netns)?;
    if all {
        i.add_pod(cookie, port)?;
    } else {
        i.remove_pod(cookie)?;
    }
    Ok(())
}

impl Interceptor {
    /// Starts interception in `mode`. `per_cgroup` says whether workloads are enrolled
    /// by cgroup (with `--cgroup` or the admin API); without it, iptables mode
    /// intercepts the whole network namespace. Returns the interceptor and, for the
    /// log, why this mode was chosen.
    pub fn start(
        mode: Mode,
        settings: &Settings,
        per_cgroup: bool,
    ) -> Result<(Self, String), InterceptError> {
        match mode {
            Mode::Ebpf => {
                preflight::ebpf().map_err(InterceptError::Missing)?;
                let mut i = EbpfInterceptor::load(settings)?;
                intercept_own_netns(&mut i, !per_cgroup, settings.outbound_port)?;
                Ok((Self::Ebpf(Box::new(i)), "requested with --mode ebpf".into()))
            }
            Mode::Iptables => {
                if !settings.iptables_external {
                    preflight::iptables(settings.ipv6).map_err(InterceptError::Missing)?;
                }
                let i = IptablesInterceptor::new(settings, per_cgroup)?;
                Ok((Self::Iptables(Box::new(i)), "requested with --mode iptables".into()))
            }
            Mode::Auto => {
                let ebpf_failure = match preflight::ebpf() {
                    Err(missing) => missing.to_string(),
                    Ok(()) => match EbpfInterceptor::load(settings) {
                        Ok(mut i) => {
                            intercept_own_netns(&mut i, !per_cgroup, settings.outbound_port)?;
                            return Ok((
                                Self::Ebpf(Box::new(i)),
                                "auto: capabilities present, cgroup v2 mounted, programs verified and loaded"
                                    .into(),
                            ));
                        }
                        Err(e) => format!("program load failed: {e}"),
                    },
                };
                warn!(reason = %ebpf_failure, "eBPF interception unavailable, falling back to iptables");
                if settings.sockmap {
                    warn!("--sockmap on needs eBPF interception: same-node legs go through TCP");
                }
                if let Err(missing) = preflight::iptables(settings.ipv6) {
                    return Err(InterceptError::NoMode { ebpf: ebpf_failure, iptables: missing.to_string() });
                }
                let i = IptablesInterceptor::new(settings, per_cgroup)?;
                Ok((Self::Iptables(Box::new(i)), format!("auto: eBPF unavailable ({ebpf_failure})")))
            }
        }
    }

    pub fn mode(&self) -> ActiveMode {
        match self {
            Self::Ebpf(_) => ActiveMode::Ebpf,
            Self::Iptables(_) => ActiveMode::Iptables,
        }
    }

    /// Starts intercepting a workload cgroup's connections, towards the outbound
    /// listener on `port` (the default one when `None`).
    pub fn enroll(&mut self, cgroup: &CgroupPath, port: Option<u16>) -> Result<(), InterceptError> {
        match self {
            Self::Ebpf(e) => e.enroll(cgroup, port)?,
            Self::Iptables(i) => {
                let previous = i.cgroups.clone();
                i.cgroups.retain(|(c, _)| c != cgroup);
                i.cgroups.push((cgroup.clone(), port));
                i.cgroups.sort();
                i.per_cgroup = true;
                if let Err(e) = i.apply() {
                    i.cgroups = previous;
                    return Err(e.into());
                }
                info!(%cgroup, "cgroup enrolled (iptables rules updated)");
            }
        }
        Ok(())
    }

    /// Intercepts a pod's connections (towards the agent's listener on `port` in its
    /// namespace) and captures inbound connections to its `addrs` (handed to the
    /// `inbound` listeners in its namespace).
    pub fn add_pod(
        &mut self,
        netns: &crate::workload::netns::NetnsHandle,
        addrs: &[std::net::IpAddr],
        inbound: &[tokio::net::TcpListener],
        port: u16,
    ) -> Result<(), InterceptError> {
        match self {
            Self::Ebpf(e) => {
                e.add_pod(netns.cookie(), port)?;
                let (v4, v6) = families(inbound);
                let v4 = v4.ok_or(InterceptError::NoInboundListener)?;
                if let Err(err) = e.capture_inbound(netns.fd(), netns.cookie(), addrs, true, v4, v6) {
                    let _ = e.remove_pod(netns.cookie());
                    return Err(err.into());
                }
                Ok(())
            }
            Self::Iptables(i) => {
                // Inbound capture is the pod's own PREROUTING redirect to 15006.
                let _ = (addrs, inbound);
                let rules = i.pod_rules(port);
                iptables::pod::install(&iptables::Netns::path(netns.path()), &rules)?;
                info!(netns = %netns.path().display(), "pod's iptables rules installed");
                Ok(())
            }
        }
    }

    /// Stops intercepting a pod.
    pub fn remove_pod(&mut self, netns: &crate::workload::netns::NetnsHandle) -> Result<(), InterceptError> {
        match self {
            Self::Ebpf(e) => {
                e.release_inbound(netns.cookie())?;
                e.remove_pod(netns.cookie())?;
                Ok(())
            }
            Self::Iptables(i) => {
                match iptables::pod::uninstall(&iptables::Netns::path(netns.path()), i.settings.ipv6) {
                    Ok(()) | Err(IptablesError::NetnsGone { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// eBPF mode: captures `--inbound-ports` on the node's own addresses, handing them
    /// to the node's inbound listeners (iptables mode's chains do this themselves).
    pub fn capture_node(
        &mut self,
        netns: &crate::workload::netns::NetnsHandle,
        addrs: &[std::net::IpAddr],
        inbound: &[tokio::net::TcpListener],
    ) -> Result<(), InterceptError> {
        if let Self::Ebpf(e) = self {
            let (v4, v6) = families(inbound);
            let v4 = v4.ok_or(InterceptError::NoInboundListener)?;
            e.capture_inbound(netns.fd(), netns.cookie(), addrs, false, v4, v6)?;
        }
        Ok(())
    }

    /// Stops intercepting a workload cgroup's connections.
    pub fn unenroll(&mut self, cgroup: &CgroupPath) -> Result<(), InterceptError> {
        match self {
            Self::Ebpf(e) => e.unenroll(cgroup)?,
            Self::Iptables(i) => {
                if !i.cgroups.iter().any(|(c, _)| c == cgroup) {
                    return Err(EbpfError::NotEnrolled(cgroup.to_string()).into());
                }
                i.cgroups.retain(|(c, _)| c != cgroup);
                i.apply()?;
                info!(%cgroup, "cgroup unenrolled (iptables rules updated)");
            }
        }
        Ok(())
    }

    /// Enrolled cgroups.
    pub fn enrolled(&self) -> Vec<CgroupPath> {
        match self {
            Self::Ebpf(e) => e.enrolled().cloned().collect(),
            Self::Iptables(i) => i.cgroups.iter().map(|(c, _)| c.clone()).collect(),
        }
    }

    /// Kernel-side counters (eBPF mode only).
    pub fn ebpf_stats(&self) -> Option<EbpfStats> {
        match self {
            Self::Ebpf(e) => e.stats().ok(),
            Self::Iptables(_) => None,
        }
    }

    /// Stops this agent's part of interception. What redirects workloads (pinned eBPF
    /// links and maps, iptables rules) stays in place on purpose: while no agent
    /// listens, redirected connections are refused, never sent around the mesh; a new
    /// agent adopts it, and `mesh-agent cleanup` removes it.
    pub fn shutdown(self) -> Result<(), InterceptError> {
        match self {
            Self::Ebpf(e) => e.shutdown()?,
            Self::Iptables(i) => {
                if !i.settings.iptables_external {
                    info!(
                        "iptables rules left in place (connections fail closed until an agent returns or `mesh-agent cleanup`)"
                    );
                }
            }
        }
        Ok(())
    }
}
