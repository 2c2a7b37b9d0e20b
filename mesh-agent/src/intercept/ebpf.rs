//! eBPF interception: loads the embedded `mesh-ebpf` object, programs its maps from
//! the agent's settings, attaches `connect4`/`connect6`/`sockops` to each enrolled
//! workload cgroup and `getsockopt` to the agent's own cgroup.
//!
//! Attachments are bpf_links owned by this process and never pinned: when the agent
//! exits, however it exits, the kernel detaches every program and frees the maps, so
//! a crashed agent cannot leave workloads redirected to a dead listener.

use std::{collections::BTreeMap, fs::File, net::IpAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLinkId, cgroup_sockopt::CgroupSockoptLinkId, sock_ops::SockOpsLinkId,
    },
};
use mesh_common::{
    FLAG_CIDRS_INCLUDE_ONLY, FLAG_DEBUG_LOG, FLAG_PORTS_INCLUDE_ONLY, InterceptConfig, MAP_CIDR_EXCLUDE,
    MAP_CIDR_INCLUDE, MAP_CONFIG, MAP_PORT_RULES, MAP_STATS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETSOCKOPT,
    PROG_SOCKOPS, RULE_INTERCEPT, RULE_SKIP, STATS_LEN, Stat, v4_mapped,
};
use serde::Serialize;
use tracing::{debug, info};

use super::Settings;
use crate::{
    cgroup::{CgroupPath, cgroup2_mount},
    cidr::Cidr,
};

/// The kernel side, built by `cargo xtask build-ebpf` and checked in CI against its
/// sources (`cargo xtask build-ebpf --check`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/mesh-ebpf.o");

/// Attachments are bpf_links, which the kernel always stacks with other programs on the
/// same cgroup (Cilium, systemd, another agent); `Single` is how aya asks for a link
/// without flags, which is the only thing `BPF_LINK_CREATE` accepts for cgroups.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Errors of the eBPF interception mode.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    // Not `source`: the summary already carries the cause, and a source would make
    // `{:#}` chains print it twice.
    #[error("eBPF program {name}: {}", summarize(.error))]
    Program { name: &'static str, error: ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("the eBPF object has no {0} (object out of date? run `cargo xtask build-ebpf`)")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error(transparent)]
    CgroupPath(#[from] crate::cgroup::CgroupError),
    #[error("cgroup {0} is not enrolled")]
    NotEnrolled(String),
}

/// A program error for one log line: the syscall error and, for a verifier rejection,
/// only the verifier's verdict (its last lines), not the whole instruction dump. The
/// full log is emitted at debug level.
fn summarize(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            tracing::debug!(verifier_log = %log, "eBPF verifier output");
            let verdict: Vec<&str> = log
                .lines()
                .filter(|l| {
                    !l.trim().is_empty()
                        && !l.starts_with(';')
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                        && !l.starts_with("processed ")
                })
                .rev()
                .take(2)
                .collect();
            let verdict: Vec<&str> = verdict.into_iter().rev().collect();
            format!("rejected by the kernel ({io_error}): {}", verdict.join(" / "))
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                s.push_str(&format!(": {e}"));
                src = e.source();
            }
            s
        }
    }
}

struct CgroupLinks {
    connect4: CgroupSockAddrLinkId,
    connect6: CgroupSockAddrLinkId,
    sockops: SockOpsLinkId,
}

/// Loaded programs and their attachments.
pub struct EbpfInterceptor {
    bpf: Ebpf,
    enrolled: BTreeMap<CgroupPath, CgroupLinks>,
    agent_cgroup: CgroupPath,
    _sockopt_link: CgroupSockoptLinkId,
}

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct EbpfStats {
    pub redirected: u64,
    pub skipped: u64,
    pub record_failed: u64,
    pub sockopt_answered: u64,
    pub established: u64,
    pub connect_failed: u64,
}

fn prog<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| EbpfError::Program { name, error: source })
}

fn map_mut<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, EbpfError> {
    bpf.map_mut(name).ok_or(EbpfError::Missing(name))
}

impl EbpfInterceptor {
    /// Loads and verifies the programs and programs the maps. Nothing is attached to a
    /// workload yet, so this doubles as the `auto` mode's probe.
    pub fn load(settings: &Settings) -> Result<Self, EbpfError> {
        let mut bpf = EbpfLoader::new().load(OBJECT)?;
        if settings.ebpf_log {
            forward_ebpf_logs(&mut bpf);
        }
        configure(&mut bpf, settings)?;

        let wrap = |name| move |source| EbpfError::Program { name, error: source };
        prog::<CgroupSockAddr>(&mut bpf, PROG_CONNECT4)?.load().map_err(wrap(PROG_CONNECT4))?;
        prog::<CgroupSockAddr>(&mut bpf, PROG_CONNECT6)?.load().map_err(wrap(PROG_CONNECT6))?;
        prog::<SockOps>(&mut bpf, PROG_SOCKOPS)?.load().map_err(wrap(PROG_SOCKOPS))?;
        prog::<CgroupSockopt>(&mut bpf, PROG_GETSOCKOPT)?.load().map_err(wrap(PROG_GETSOCKOPT))?;

        // The getsockopt program answers on the agent's accepted sockets, which live in
        // the agent's cgroup; it ignores every other option and socket.
        let mount = cgroup2_mount()?;
        let agent_cgroup = CgroupPath::resolve(&mount, &settings.agent_cgroup_or_own()?)?;
        let fd = open_cgroup(&agent_cgroup)?;
        let sockopt_link = prog::<CgroupSockopt>(&mut bpf, PROG_GETSOCKOPT)?
            .attach(&fd, ATTACH_MODE)
            .map_err(wrap(PROG_GETSOCKOPT))?;
        info!(cgroup = %agent_cgroup, "getsockopt(SO_ORIGINAL_DST) program attached to the agent's cgroup");
        Ok(Self { bpf, enrolled: BTreeMap::new(), agent_cgroup, _sockopt_link: sockopt_link })
    }

    /// Attaches the connect and sockops programs to a workload cgroup (idempotent).
    pub fn enroll(&mut self, cgroup: &CgroupPath) -> Result<(), EbpfError> {
        if self.enrolled.contains_key(cgroup) {
            return Ok(());
        }
        let fd = open_cgroup(cgroup)?;
        let wrap = |name| move |source| EbpfError::Program { name, error: source };
        let mode = ATTACH_MODE;
        let connect4 = prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT4)?
            .attach(&fd, mode)
            .map_err(wrap(PROG_CONNECT4))?;
        let connect6 = match prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT6)?.attach(&fd, mode) {
            Ok(id) => id,
            Err(source) => {
                let _ = prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT4)?.detach(connect4);
                return Err(EbpfError::Program { name: PROG_CONNECT6, error: source });
            }
        };
        let sockops = match prog::<SockOps>(&mut self.bpf, PROG_SOCKOPS)?.attach(&fd, mode) {
            Ok(id) => id,
            Err(source) => {
                let _ = prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT4)?.detach(connect4);
                let _ = prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT6)?.detach(connect6);
                return Err(EbpfError::Program { name: PROG_SOCKOPS, error: source });
            }
        };
        self.enrolled.insert(cgroup.clone(), CgroupLinks { connect4, connect6, sockops });
        info!(%cgroup, "cgroup enrolled (connect4, connect6, sockops attached)");
        Ok(())
    }

    /// Detaches the programs from a workload cgroup.
    pub fn unenroll(&mut self, cgroup: &CgroupPath) -> Result<(), EbpfError> {
        let links = self.enrolled.remove(cgroup).ok_or_else(|| EbpfError::NotEnrolled(cgroup.to_string()))?;
        self.detach(links)?;
        info!(%cgroup, "cgroup unenrolled (programs detached)");
        Ok(())
    }

    fn detach(&mut self, links: CgroupLinks) -> Result<(), EbpfError> {
        let wrap = |name| move |source| EbpfError::Program { name, error: source };
        prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT4)?
            .detach(links.connect4)
            .map_err(wrap(PROG_CONNECT4))?;
        prog::<CgroupSockAddr>(&mut self.bpf, PROG_CONNECT6)?
            .detach(links.connect6)
            .map_err(wrap(PROG_CONNECT6))?;
        prog::<SockOps>(&mut self.bpf, PROG_SOCKOPS)?.detach(links.sockops).map_err(wrap(PROG_SOCKOPS))
    }

    /// Enrolled cgroups.
    pub fn enrolled(&self) -> impl Iterator<Item = &CgroupPath> {
        self.enrolled.keys()
    }

    /// The cgroup the getsockopt program is attached to.
    pub fn agent_cgroup(&self) -> &CgroupPath {
        &self.agent_cgroup
    }

    /// Detaches everything (dropping the object would too; this says so in the log).
    pub fn shutdown(mut self) -> Result<(), EbpfError> {
        let enrolled = std::mem::take(&mut self.enrolled);
        let n = enrolled.len();
        for (_, links) in enrolled {
            self.detach(links)?;
        }
        drop(self);
        info!(cgroups = n, "eBPF programs detached");
        Ok(())
    }

    /// Per-program counters, summed over CPUs.
    pub fn stats(&self) -> Result<EbpfStats, EbpfError> {
        let map = self.bpf.map(MAP_STATS).ok_or(EbpfError::Missing(MAP_STATS))?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| EbpfError::Map { name: MAP_STATS, source })?;
        let mut sums = [0u64; STATS_LEN as usize];
        for (i, sum) in sums.iter_mut().enumerate() {
            let values =
                arr.get(&(i as u32), 0).map_err(|source| EbpfError::Map { name: MAP_STATS, source })?;
            *sum = values.iter().sum();
        }
        let at = |s: Stat| sums[s as usize];
        Ok(EbpfStats {
            redirected: at(Stat::Redirected),
            skipped: at(Stat::Skipped),
            record_failed: at(Stat::RecordFailed),
            sockopt_answered: at(Stat::SockoptAnswered),
            established: at(Stat::Established),
            connect_failed: at(Stat::ConnectFailed),
        })
    }
}

fn open_cgroup(cgroup: &CgroupPath) -> Result<File, EbpfError> {
    File::open(cgroup.absolute()).map_err(|source| EbpfError::Cgroup { path: cgroup.to_string(), source })
}

/// Writes the settings into the programs' maps before anything is attached.
fn configure(bpf: &mut Ebpf, s: &Settings) -> Result<(), EbpfError> {
    let mut flags = 0;
    if s.ebpf_log {
        flags |= FLAG_DEBUG_LOG;
    }
    if !s.include_ports.is_empty() {
        flags |= FLAG_PORTS_INCLUDE_ONLY;
    }
    if !s.include_cidrs.is_empty() {
        flags |= FLAG_CIDRS_INCLUDE_ONLY;
    }

    let mut ports: HashMap<_, u16, u32> = HashMap::try_from(map_mut(bpf, MAP_PORT_RULES)?)
        .map_err(|source| EbpfError::Map { name: MAP_PORT_RULES, source })?;
    let port_rules = s
        .exclude_ports
        .iter()
        .map(|p| (*p, RULE_SKIP))
        .chain(s.include_ports.iter().map(|p| (*p, RULE_INTERCEPT)));
    for (port, rule) in port_rules {
        ports.insert(port, rule, 0).map_err(|source| EbpfError::Map { name: MAP_PORT_RULES, source })?;
    }

    for (name, cidrs) in [(MAP_CIDR_INCLUDE, &s.include_cidrs), (MAP_CIDR_EXCLUDE, &s.exclude_cidrs)] {
        let mut trie: LpmTrie<_, [u32; 4], u32> =
            LpmTrie::try_from(map_mut(bpf, name)?).map_err(|source| EbpfError::Map { name, source })?;
        for cidr in cidrs {
            let (words, prefix) = cidr_key(cidr);
            trie.insert(&Key::new(prefix, words), 1, 0).map_err(|source| EbpfError::Map { name, source })?;
        }
    }

    // Written last: `outbound_port != 0` is what switches the programs on.
    let mut config: Array<_, InterceptConfig> = Array::try_from(map_mut(bpf, MAP_CONFIG)?)
        .map_err(|source| EbpfError::Map { name: MAP_CONFIG, source })?;
    let value = InterceptConfig { outbound_port: s.outbound_port, mark: s.mark, flags, ..Default::default() };
    config.set(0, value, 0).map_err(|source| EbpfError::Map { name: MAP_CONFIG, source })?;
    debug!(?value, "eBPF configuration written");
    Ok(())
}

/// A CIDR as the programs' trie key: four network-order words (IPv4-mapped for IPv4)
/// and the prefix length over all 128 bits.
fn cidr_key(cidr: &Cidr) -> ([u32; 4], u32) {
    match cidr.addr() {
        IpAddr::V4(v4) => (v4_mapped(u32::from_ne_bytes(v4.octets())), 96 + u32::from(cidr.prefix())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], u32::from(cidr.prefix()))
        }
    }
}

/// Forwards the programs' aya-log records into the agent's tracing output.
fn forward_ebpf_logs(bpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init_with_logger(bpf, TracingLog) {
        Ok(logger) => {
            tokio::spawn(async move {
                // SAFETY: the logger owns its ring buffer's fd, which stays open and
                // unchanged for as long as the logger (moved into the AsyncFd) lives.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
                };
                let Ok(mut fd) = registered else { return };
                while let Ok(mut guard) = fd.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "eBPF logging requested but unavailable"),
    }
}

/// A `log::Log` that re-emits aya-log records as tracing events.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "mesh_agent::ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_are_v4_mapped_network_order() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        let (w, p) = cidr_key(&c);
        assert_eq!(p, 112);
        assert_eq!(w, v4_mapped(u32::from_ne_bytes([10, 1, 0, 0])));
        let c: Cidr = "fd00::/8".parse().unwrap();
        let (w, p) = cidr_key(&c);
        assert_eq!(p, 8);
        assert_eq!(w[0].to_ne_bytes()[0], 0xfd);
    }
}
