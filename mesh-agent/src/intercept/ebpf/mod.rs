//! eBPF interception: loads the embedded `mesh-ebpf` object over maps pinned in bpffs
//! ([`pins`]), attaches the cgroup programs once at the cgroup root and the inbound
//! capture program to each captured network namespace, and enrols workloads as map
//! entries: a network namespace of its own (a pod) by netns cookie, a cgroup of the
//! node's namespace by cgroup id.
//!
//! Interception outlives the agent on purpose: links and maps stay pinned when it
//! stops or dies, so redirected connections are refused while no agent listens (fail
//! closed) and a new agent adopts them. `mesh-agent cleanup` removes them.

pub mod accel;
pub mod pins;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::IpAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, SockMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SockOps,
        cgroup_sockopt::CgroupSockoptLinkId, links::FdLink,
    },
};
use mesh_common::{
    FLAG_CIDRS_INCLUDE_ONLY, FLAG_DEBUG_LOG, FLAG_PORTS_INCLUDE_ONLY, HostCgroup, INBOUND_ALL_PORTS,
    INBOUND_PORT_CAPTURE, INBOUND_PORT_SKIP, INBOUND_SOCK_ENTRIES, InboundTarget, InterceptConfig,
    MAP_CIDR_EXCLUDE, MAP_CIDR_INCLUDE, MAP_CONFIG, MAP_HOST_CGROUPS, MAP_INBOUND_ADDRS, MAP_INBOUND_PORTS,
    MAP_INBOUND_SOCKS, MAP_POD_NETNS, MAP_PORT_RULES, MAP_STATS, PROG_CONNECT4, PROG_CONNECT6,
    PROG_GETSOCKOPT, PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SK_LOOKUP,
    PROG_SOCKOPS, PodNetns, RULE_INTERCEPT, RULE_SKIP, STATS_LEN, Stat, v4_mapped,
};
use serde::Serialize;
use tracing::{debug, info};

use self::pins::{PinDir, PinError};
use super::Settings;
use crate::{
    cgroup::{CgroupPath, cgroup2_mount},
    cidr::Cidr,
};

/// The kernel side, built by `cargo xtask build-ebpf` and checked in CI against its
/// sources (`cargo xtask build-ebpf --check`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../ebpf/mesh-ebpf.o");

/// The `cgroup/sock_addr` programs attached at the cgroup root: TCP connects, and
/// workloads' DNS (connected and unconnected UDP, and the answers' source).
const SOCK_ADDR_PROGRAMS: [&str; 6] =
    [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6, PROG_RECVMSG4, PROG_RECVMSG6];

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
    #[error("eBPF map {name}: duplicating its descriptor: {source}")]
    MapFd { name: &'static str, source: std::io::Error },
    #[error("the eBPF object has no {0} (object out of date? run `cargo xtask build-ebpf`)")]
    Missing(&'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error(transparent)]
    CgroupPath(#[from] crate::cgroup::CgroupError),
    #[error("cgroup {0} is not enrolled")]
    NotEnrolled(String),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("network namespace: {0}")]
    Netns(std::io::Error),
    #[error("eBPF link of {name}: {error}")]
    Link { name: &'static str, error: String },
    #[error("inbound capture: all {INBOUND_SOCK_ENTRIES} listener slots are in use")]
    SlotsExhausted,
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

/// An enrolled cgroup of the node's own network namespace.
#[derive(Debug, Clone, Copy)]
struct HostEntry {
    id: u64,
}

/// Inbound capture in one network namespace.
#[derive(Debug)]
struct Capture {
    addrs: Vec<[u32; 4]>,
    slots: Vec<u32>,
}

/// Loaded programs over pinned maps, and what is enrolled.
pub struct EbpfInterceptor {
    bpf: Ebpf,
    pins: PinDir,
    host: BTreeMap<CgroupPath, HostEntry>,
    pods: HashMap<u64, u16>,
    captures: HashMap<u64, Capture>,
    agent_cgroup: CgroupPath,
    cgroup_root: CgroupPath,
    default_port: u16,
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
    pub inbound_captured: u64,
    pub inbound_dropped: u64,
    /// Same-node acceleration (`--sockmap on`; all zero while off).
    pub sockmap: accel::AccelStats,
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

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |error| EbpfError::Program { name, error }
}

/// A cgroup v2 directory's id (its inode number), as `bpf_get_current_cgroup_id` gives it.
pub fn cgroup_id(cgroup: &CgroupPath) -> Result<u64, EbpfError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(cgroup.absolute())
        .map(|m| m.ino())
        .map_err(|source| EbpfError::Cgroup { path: cgroup.to_string(), source })
}

/// The cookie of the network namespace a socket lives in (`SO_NETNS_COOKIE`, 5.14+).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

impl EbpfInterceptor {
    /// Loads and verifies the programs over the pinned maps (created on first start,
    /// adopted after), programs the maps and attaches the cgroup programs at the cgroup
    /// root, replacing any a previous agent pinned. Nothing is enrolled yet, so this
    /// doubles as the `auto` mode's probe.
    pub fn load(settings: &Settings) -> Result<Self, EbpfError> {
        let pins = PinDir::open(&settings.bpffs_dir)?;
        let mut bpf = EbpfLoader::new().default_map_pin_directory(pins.maps()).load(OBJECT)?;
        if settings.ebpf_log {
            forward_ebpf_logs(&mut bpf);
        }
        let mount = cgroup2_mount()?;
        let agent_cgroup = CgroupPath::resolve(&mount, &settings.agent_cgroup_or_own()?)?;
        let cgroup_root = CgroupPath::resolve(&mount, &settings.cgroup_root)?;
        configure(&mut bpf, settings, cgroup_id(&agent_cgroup)?)?;
        accel::configure(&mut bpf, settings.sockmap)?;

        for name in SOCK_ADDR_PROGRAMS {
            prog::<CgroupSockAddr>(&mut bpf, name)?.load().map_err(prog_err(name))?;
        }
        prog::<SockOps>(&mut bpf, PROG_SOCKOPS)?.load().map_err(prog_err(PROG_SOCKOPS))?;
        prog::<CgroupSockopt>(&mut bpf, PROG_GETSOCKOPT)?.load().map_err(prog_err(PROG_GETSOCKOPT))?;
        prog::<SkLookup>(&mut bpf, PROG_SK_LOOKUP)?.load().map_err(prog_err(PROG_SK_LOOKUP))?;

        // The getsockopt program answers on the agent's accepted sockets, which live in
        // the agent's cgroup; it ignores every other option and socket. Not pinned: it
        // serves this process's sockets only.
        let fd = open_cgroup(&agent_cgroup)?;
        let sockopt_link = prog::<CgroupSockopt>(&mut bpf, PROG_GETSOCKOPT)?
            .attach(&fd, ATTACH_MODE)
            .map_err(prog_err(PROG_GETSOCKOPT))?;

        let root = open_cgroup(&cgroup_root)?;
        for name in SOCK_ADDR_PROGRAMS {
            let program = prog::<CgroupSockAddr>(&mut bpf, name)?;
            let id = program.attach(&root, ATTACH_MODE).map_err(prog_err(name))?;
            let link = FdLink::try_from(program.take_link(id).map_err(prog_err(name))?)
                .map_err(|e| EbpfError::Link { name, error: e.to_string() })?;
            pins.replace_link(name, link)?;
        }
        let program = prog::<SockOps>(&mut bpf, PROG_SOCKOPS)?;
        let id = program.attach(&root, ATTACH_MODE).map_err(prog_err(PROG_SOCKOPS))?;
        let link = FdLink::try_from(program.take_link(id).map_err(prog_err(PROG_SOCKOPS))?)
            .map_err(|e| EbpfError::Link { name: PROG_SOCKOPS, error: e.to_string() })?;
        pins.replace_link(PROG_SOCKOPS, link)?;
        info!(cgroup_root = %cgroup_root, agent_cgroup = %agent_cgroup, pins = %settings.bpffs_dir.display(),
            "eBPF programs attached and pinned (connect4|6, sendmsg4|6, recvmsg4|6, sockops at the cgroup root; getsockopt on the agent's cgroup)");
        if settings.sockmap {
            tracing::warn!(
                "experimental same-node acceleration on (--sockmap on): workloads' loopback connections to the agent skip TCP (sk_msg); a workload blocked in recv() while it half-closes can miss bytes on this path"
            );
        }
        Ok(Self {
            bpf,
            pins,
            host: BTreeMap::new(),
            pods: HashMap::new(),
            captures: HashMap::new(),
            agent_cgroup,
            cgroup_root,
            default_port: settings.outbound_port,
            _sockopt_link: sockopt_link,
        })
    }

    /// Enrols a cgroup of the node's own namespace: its connects (and those of its
    /// descendants not enrolled themselves) go to `port` on loopback. Idempotent.
    pub fn enroll(&mut self, cgroup: &CgroupPath, port: Option<u16>) -> Result<(), EbpfError> {
        let port = port.unwrap_or(self.default_port);
        let id = cgroup_id(cgroup)?;
        let mut map: BpfHashMap<_, u64, HostCgroup> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_HOST_CGROUPS)?)
                .map_err(map_err(MAP_HOST_CGROUPS))?;
        map.insert(id, HostCgroup { outbound_port: port, ..Default::default() }, 0)
            .map_err(map_err(MAP_HOST_CGROUPS))?;
        if *cgroup == self.agent_cgroup {
            tracing::warn!(%cgroup, "enrolled the agent's own cgroup: its other processes are not intercepted (the agent's connections are told apart by cgroup)");
        }
        self.host.insert(cgroup.clone(), HostEntry { id });
        info!(%cgroup, cgroup_id = id, port, "cgroup enrolled");
        Ok(())
    }

    /// Stops intercepting a cgroup.
    pub fn unenroll(&mut self, cgroup: &CgroupPath) -> Result<(), EbpfError> {
        let entry = self.host.remove(cgroup).ok_or_else(|| EbpfError::NotEnrolled(cgroup.to_string()))?;
        let mut map: BpfHashMap<_, u64, HostCgroup> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_HOST_CGROUPS)?)
                .map_err(map_err(MAP_HOST_CGROUPS))?;
        match map.remove(&entry.id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_HOST_CGROUPS)(e)),
        }
        info!(%cgroup, "cgroup unenrolled");
        Ok(())
    }

    /// Intercepts every connect made in the network namespace `cookie` (a pod's),
    /// towards the agent's listener on `port` in that namespace.
    pub fn add_pod(&mut self, cookie: u64, port: u16) -> Result<(), EbpfError> {
        let mut map: BpfHashMap<_, u64, PodNetns> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_POD_NETNS)?).map_err(map_err(MAP_POD_NETNS))?;
        map.insert(cookie, PodNetns { outbound_port: port, ..Default::default() }, 0)
            .map_err(map_err(MAP_POD_NETNS))?;
        self.pods.insert(cookie, port);
        Ok(())
    }

    /// Stops intercepting the namespace `cookie`.
    pub fn remove_pod(&mut self, cookie: u64) -> Result<(), EbpfError> {
        self.pods.remove(&cookie);
        let mut map: BpfHashMap<_, u64, PodNetns> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_POD_NETNS)?).map_err(map_err(MAP_POD_NETNS))?;
        match map.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            // The kernel's "no such key", as some aya versions report it.
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err(MAP_POD_NETNS)(e)),
        }
    }

    /// Captures new inbound TCP connections to `addrs` in the network namespace `netns`
    /// (cookie `cookie`): every port but the agent's own with `all_ports` (a pod), the
    /// `--inbound-ports` otherwise (the node's namespace). They are handed to `v4` / `v6`,
    /// the agent's inbound listeners in that namespace, with their destination intact.
    /// Replaces an earlier capture of the same namespace (a restarted agent's listeners
    /// take over the slots of the old one's).
    pub fn capture_inbound(
        &mut self,
        netns: BorrowedFd<'_>,
        cookie: u64,
        addrs: &[IpAddr],
        all_ports: bool,
        v4: BorrowedFd<'_>,
        v6: Option<BorrowedFd<'_>>,
    ) -> Result<(), EbpfError> {
        let keys: Vec<[u32; 4]> = addrs.iter().map(addr_key).collect();
        let targets: BpfHashMap<_, [u32; 4], InboundTarget> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_INBOUND_ADDRS)?)
                .map_err(map_err(MAP_INBOUND_ADDRS))?;
        // A previous agent's slots for these addresses are reused, so its listeners are
        // replaced in place; otherwise take free ones.
        let previous = keys.iter().find_map(|k| targets.get(k, 0).ok());
        let (v4_slot, v6_slot) = match previous {
            Some(t) => (t.v4_slot, t.v6_slot),
            None => {
                let mut used: Vec<u32> =
                    targets.iter().flatten().flat_map(|(_, t)| [t.v4_slot, t.v6_slot]).collect();
                used.extend(self.captures.values().flat_map(|c| c.slots.iter().copied()));
                let mut free = (0..INBOUND_SOCK_ENTRIES).filter(|s| !used.contains(s));
                (free.next().ok_or(EbpfError::SlotsExhausted)?, free.next().ok_or(EbpfError::SlotsExhausted)?)
            }
        };
        let flags = if all_ports { INBOUND_ALL_PORTS } else { 0 };
        let mut socks: SockMap<_> = SockMap::try_from(map_mut(&mut self.bpf, MAP_INBOUND_SOCKS)?)
            .map_err(map_err(MAP_INBOUND_SOCKS))?;
        socks.set(v4_slot, &v4.as_raw_fd(), 0).map_err(map_err(MAP_INBOUND_SOCKS))?;
        if let Some(v6) = v6 {
            socks.set(v6_slot, &v6.as_raw_fd(), 0).map_err(map_err(MAP_INBOUND_SOCKS))?;
        }
        let mut targets: BpfHashMap<_, [u32; 4], InboundTarget> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_INBOUND_ADDRS)?)
                .map_err(map_err(MAP_INBOUND_ADDRS))?;
        for k in &keys {
            targets
                .insert(*k, InboundTarget { v4_slot, v6_slot, flags, ..Default::default() }, 0)
                .map_err(map_err(MAP_INBOUND_ADDRS))?;
        }
        let program = prog::<SkLookup>(&mut self.bpf, PROG_SK_LOOKUP)?;
        let id = program.attach(netns).map_err(prog_err(PROG_SK_LOOKUP))?;
        let link: FdLink = program.take_link(id).map_err(prog_err(PROG_SK_LOOKUP))?.into();
        self.pins.replace_link(&sk_lookup_pin(cookie), link)?;
        self.captures.insert(cookie, Capture { addrs: keys, slots: vec![v4_slot, v6_slot] });
        info!(netns_cookie = cookie, addrs = ?addrs, all_ports, "inbound capture attached (sk_lookup)");
        Ok(())
    }

    /// Ends inbound capture in the namespace `cookie`: its addresses are forgotten and
    /// its link removed (a pod that left the node).
    pub fn release_inbound(&mut self, cookie: u64) -> Result<(), EbpfError> {
        let Some(capture) = self.captures.remove(&cookie) else { return Ok(()) };
        let mut targets: BpfHashMap<_, [u32; 4], InboundTarget> =
            BpfHashMap::try_from(map_mut(&mut self.bpf, MAP_INBOUND_ADDRS)?)
                .map_err(map_err(MAP_INBOUND_ADDRS))?;
        for k in &capture.addrs {
            let _ = targets.remove(k);
        }
        let mut socks: SockMap<_> = SockMap::try_from(map_mut(&mut self.bpf, MAP_INBOUND_SOCKS)?)
            .map_err(map_err(MAP_INBOUND_SOCKS))?;
        for s in &capture.slots {
            let _ = socks.clear_index(s);
        }
        self.pins.remove_link(&sk_lookup_pin(cookie))?;
        Ok(())
    }

    /// Enrolled cgroups of the node's namespace.
    pub fn enrolled(&self) -> impl Iterator<Item = &CgroupPath> {
        self.host.keys()
    }

    /// The cgroup the getsockopt program is attached to.
    pub fn agent_cgroup(&self) -> &CgroupPath {
        &self.agent_cgroup
    }

    /// The cgroup the connect and sockops programs are attached to.
    pub fn cgroup_root(&self) -> &CgroupPath {
        &self.cgroup_root
    }

    /// Stops this agent's part: the process's own attachment (getsockopt) goes; pinned
    /// interception stays (fail closed) until `mesh-agent cleanup` or a new agent.
    pub fn shutdown(self) -> Result<(), EbpfError> {
        let (hosts, pods) = (self.host.len(), self.pods.len());
        drop(self);
        info!(
            cgroups = hosts,
            pods,
            "eBPF interception left pinned (fail closed until an agent returns or `mesh-agent cleanup`)"
        );
        Ok(())
    }

    /// Per-program counters, summed over CPUs.
    pub fn stats(&self) -> Result<EbpfStats, EbpfError> {
        let sums = per_cpu_sums(&self.bpf, MAP_STATS, STATS_LEN)?;
        let at = |s: Stat| sums[s as usize];
        Ok(EbpfStats {
            redirected: at(Stat::Redirected),
            skipped: at(Stat::Skipped),
            record_failed: at(Stat::RecordFailed),
            sockopt_answered: at(Stat::SockoptAnswered),
            established: at(Stat::Established),
            connect_failed: at(Stat::ConnectFailed),
            inbound_captured: at(Stat::InboundCaptured),
            inbound_dropped: at(Stat::InboundDropped),
            sockmap: accel::stats(&self.bpf)?,
        })
    }
}

/// Each of a per-CPU counter array's `len` slots, summed over CPUs.
fn per_cpu_sums(bpf: &Ebpf, name: &'static str, len: u32) -> Result<Vec<u64>, EbpfError> {
    let map = bpf.map(name).ok_or(EbpfError::Missing(name))?;
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    (0..len).map(|i| arr.get(&i, 0).map(|values| values.iter().sum()).map_err(map_err(name))).collect()
}

fn sk_lookup_pin(cookie: u64) -> String {
    format!("sk_lookup-netns-{cookie}")
}

/// An address as the maps key it: four network-order words, IPv4-mapped for IPv4.
fn addr_key(addr: &IpAddr) -> [u32; 4] {
    match addr.to_canonical() {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

fn open_cgroup(cgroup: &CgroupPath) -> Result<File, EbpfError> {
    File::open(cgroup.absolute()).map_err(|source| EbpfError::Cgroup { path: cgroup.to_string(), source })
}

/// Writes the settings into the programs' maps before anything is attached. The maps
/// are pinned, so what an earlier agent wrote is replaced, not added to.
fn configure(bpf: &mut Ebpf, s: &Settings, agent_cgroup_id: u64) -> Result<(), EbpfError> {
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

    let port_rules: Vec<(u16, u32)> = s
        .exclude_ports
        .iter()
        .map(|p| (*p, RULE_SKIP))
        .chain(s.include_ports.iter().map(|p| (*p, RULE_INTERCEPT)))
        .collect();
    replace_u16_map(bpf, MAP_PORT_RULES, &port_rules)?;
    // Inbound: the agent's own ports are never captured (peers' tunnels, its listeners);
    // `--inbound-ports` are captured on the node's addresses.
    let inbound_rules: Vec<(u16, u32)> = s
        .agent_ports()
        .into_iter()
        .map(|p| (p, INBOUND_PORT_SKIP))
        .chain(s.inbound_ports.iter().map(|p| (*p, INBOUND_PORT_CAPTURE)))
        .collect();
    replace_u16_map(bpf, MAP_INBOUND_PORTS, &inbound_rules)?;

    for (name, cidrs) in [(MAP_CIDR_INCLUDE, &s.include_cidrs), (MAP_CIDR_EXCLUDE, &s.exclude_cidrs)] {
        let mut trie: LpmTrie<_, [u32; 4], u32> =
            LpmTrie::try_from(map_mut(bpf, name)?).map_err(map_err(name))?;
        let stale: Vec<Key<[u32; 4]>> = trie.keys().flatten().collect();
        for k in stale {
            let _ = trie.remove(&k);
        }
        for cidr in cidrs {
            let (words, prefix) = cidr_key(cidr);
            trie.insert(&Key::new(prefix, words), 1, 0).map_err(map_err(name))?;
        }
    }

    // Written last: `outbound_port != 0` is what switches the programs on.
    let mut config: Array<_, InterceptConfig> =
        Array::try_from(map_mut(bpf, MAP_CONFIG)?).map_err(map_err(MAP_CONFIG))?;
    // The agent that configured the maps before (their pins outlive it) may still be
    // draining: its own connects stay unredirected too.
    let before = config.get(&0, 0).unwrap_or_default();
    let previous_agent_cgroup_id = match before.agent_cgroup_id {
        0 => before.previous_agent_cgroup_id,
        id if id == agent_cgroup_id => before.previous_agent_cgroup_id,
        id => id,
    };
    let value = InterceptConfig {
        outbound_port: s.outbound_port,
        dns_port: s.dns_port.unwrap_or(0),
        flags,
        agent_cgroup_id,
        previous_agent_cgroup_id,
    };
    config.set(0, value, 0).map_err(map_err(MAP_CONFIG))?;
    debug!(?value, "eBPF configuration written");
    Ok(())
}

/// Makes a `u16 -> u32` map hold exactly `entries`.
fn replace_u16_map(bpf: &mut Ebpf, name: &'static str, entries: &[(u16, u32)]) -> Result<(), EbpfError> {
    let mut map: BpfHashMap<&mut MapData, u16, u32> =
        BpfHashMap::try_from(map_mut(bpf, name)?).map_err(map_err(name))?;
    let stale: Vec<u16> = map.keys().flatten().filter(|k| !entries.iter().any(|(p, _)| p == k)).collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    for (port, rule) in entries {
        map.insert(port, rule, 0).map_err(map_err(name))?;
    }
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
