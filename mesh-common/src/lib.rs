//! Types shared by the kernel side (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so the eBPF programs and
//! userspace agree on every byte of every map key and value. Addresses are kept
//! exactly as the kernel hands them to programs: four 32-bit words in network
//! byte order, with IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`) so one key layout
//! serves both families. Ports are in host byte order.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

/// Entries in [`MAP_ORIG_DST_BY_COOKIE`]: connections between `connect()` and the
/// handshake completing. LRU so an entry whose socket never reports back cannot
/// leak; 64Ki in-flight connects per agent is far above any realistic SYN backlog.
pub const ORIG_DST_BY_COOKIE_ENTRIES: u32 = 65_536;
/// Entries in [`MAP_ORIG_DST_BY_TUPLE`]: redirected connections established but not
/// yet accepted by the agent (the agent's getsockopt consumes the entry). LRU ages out
/// entries of connections the agent never accepts.
pub const ORIG_DST_BY_TUPLE_ENTRIES: u32 = 65_536;
/// Maximum CIDRs in each of the include and exclude tries.
pub const CIDR_RULES_ENTRIES: u32 = 1_024;
/// Maximum include/exclude port rules.
pub const PORT_RULES_ENTRIES: u32 = 1_024;
/// Maximum workloads served in their own network namespace (pods) per node.
pub const POD_NETNS_ENTRIES: u32 = 4_096;
/// Maximum workload cgroups enrolled in the node's own network namespace.
pub const HOST_CGROUP_ENTRIES: u32 = 1_024;
/// Maximum local addresses whose inbound connections are captured (a pod has one
/// per family; the node's own addresses count too).
pub const INBOUND_ADDR_ENTRIES: u32 = 8_192;
/// Slots of the inbound listener sockets the capture program hands connections to.
pub const INBOUND_SOCK_ENTRIES: u32 = 8_192;
/// Entries in [`MAP_DNS_ORIG_BY_COOKIE`]: workload DNS sockets whose queries were sent
/// to the agent, with the resolver they asked. LRU, so closed sockets age out.
pub const DNS_ORIG_BY_COOKIE_ENTRIES: u32 = 65_536;
/// The DNS port: queries to it (UDP and TCP, any address) go to the agent's DNS.
pub const DNS_PORT: u16 = 53;
/// Deepest cgroup level the connect programs look at for an enrolled ancestor.
pub const MAX_CGROUP_LEVEL: i32 = 16;

/// Sockets in [`MAP_LOCAL_SOCKS`]: both ends of every accelerated loopback leg
/// between a workload and the agent. When it is full a new leg simply goes through
/// TCP (the insert fails and nothing is redirected).
pub const LOCAL_SOCKS_ENTRIES: u32 = 65_536;
/// Entries in [`MAP_LOCAL_FALLBACK`]: sockets of accelerated legs that once sent
/// through TCP and must keep doing so. LRU: closed sockets age out.
pub const LOCAL_FALLBACK_ENTRIES: u32 = 65_536;

/// Map names, as the agent looks them up in the loaded object (and as they are
/// pinned under the agent's bpffs directory).
pub const MAP_CONFIG: &str = "MESH_CONFIG";
pub const MAP_CIDR_INCLUDE: &str = "MESH_CIDR_INCLUDE";
pub const MAP_CIDR_EXCLUDE: &str = "MESH_CIDR_EXCLUDE";
pub const MAP_PORT_RULES: &str = "MESH_PORT_RULES";
pub const MAP_ORIG_DST_BY_COOKIE: &str = "MESH_ORIG_DST_BY_COOKIE";
pub const MAP_ORIG_DST_BY_TUPLE: &str = "MESH_ORIG_DST_BY_TUPLE";
pub const MAP_STATS: &str = "MESH_STATS";
pub const MAP_POD_NETNS: &str = "MESH_POD_NETNS";
pub const MAP_HOST_CGROUPS: &str = "MESH_HOST_CGROUPS";
pub const MAP_INBOUND_ADDRS: &str = "MESH_INBOUND_ADDRS";
pub const MAP_INBOUND_PORTS: &str = "MESH_INBOUND_PORTS";
pub const MAP_INBOUND_SOCKS: &str = "MESH_INBOUND_SOCKS";
pub const MAP_DNS_ORIG_BY_COOKIE: &str = "MESH_DNS_ORIG_BY_COOKIE";
pub const MAP_ACCEL_CONFIG: &str = "MESH_ACCEL_CONFIG";
pub const MAP_ACCEL_STATS: &str = "MESH_ACCEL_STATS";
pub const MAP_LOCAL_SOCKS: &str = "MESH_LOCAL_SOCKS";
pub const MAP_LOCAL_FALLBACK: &str = "MESH_LOCAL_FALLBACK";

/// Program names, as the agent looks them up in the loaded object.
pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_SOCKOPS: &str = "mesh_sockops";
pub const PROG_GETSOCKOPT: &str = "mesh_getsockopt";
pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
pub const PROG_SENDMSG4: &str = "mesh_sendmsg4";
pub const PROG_SENDMSG6: &str = "mesh_sendmsg6";
pub const PROG_RECVMSG4: &str = "mesh_recvmsg4";
pub const PROG_RECVMSG6: &str = "mesh_recvmsg6";
pub const PROG_SK_MSG: &str = "mesh_sk_msg";

/// Version of the maps' layout. Pinned maps live in a directory named after it, so
/// an agent whose layout differs never adopts maps it would misread.
pub const MAPS_LAYOUT_VERSION: u32 = 3;

/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`)
/// share the option number 80.
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// [`InterceptConfig::flags`]: emit aya-log debug records (off by default: each
/// record costs a ring-buffer write on the connect path).
pub const FLAG_DEBUG_LOG: u32 = 1 << 0;
/// [`InterceptConfig::flags`]: intercept only ports listed with [`RULE_INTERCEPT`]
/// in the port rules; otherwise every port not excluded is intercepted.
pub const FLAG_PORTS_INCLUDE_ONLY: u32 = 1 << 1;

/// [`InterceptConfig::flags`]: intercept only destinations inside a CIDR of
/// [`MAP_CIDR_INCLUDE`]; otherwise every destination not excluded is intercepted.
pub const FLAG_CIDRS_INCLUDE_ONLY: u32 = 1 << 2;

/// Port rule action: redirect connections to this port (with [`FLAG_PORTS_INCLUDE_ONLY`]).
pub const RULE_INTERCEPT: u32 = 1;
/// Port rule action: never redirect connections to this port.
pub const RULE_SKIP: u32 = 2;

/// [`MAP_INBOUND_PORTS`] value: connections to this local port are captured on
/// addresses whose [`InboundTarget`] lists its ports (a node's own address).
pub const INBOUND_PORT_CAPTURE: u32 = 1;
/// [`MAP_INBOUND_PORTS`] value: connections to this local port are never captured
/// (the agent's own tunnel and listener ports, health ports).
pub const INBOUND_PORT_SKIP: u32 = 2;
/// [`InboundTarget::flags`]: capture every port of the address but the skipped ones
/// (a pod's address); without it only [`INBOUND_PORT_CAPTURE`] ports are.
pub const INBOUND_ALL_PORTS: u32 = 1 << 0;

/// Global settings for the programs, a single entry in [`MAP_CONFIG`].
///
/// `outbound_port == 0` means "not configured": the programs intercept nothing,
/// so a half-initialised agent fails open rather than black-holing traffic.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct InterceptConfig {
    /// The outbound listener port on `127.0.0.1` and `[::1]` of workloads that have no
    /// port of their own (pods; the default host workload).
    pub outbound_port: u16,
    /// The agent's DNS listener on `127.0.0.1` and `[::1]` of every workload's
    /// namespace, where workloads' queries to port 53 go; 0: DNS is left alone. (Was
    /// padding before DNS: maps an older agent configured read as "off".)
    pub dns_port: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// cgroup v2 id of the agent's own cgroup: connects made by its tasks are never
    /// redirected. Unlike a socket mark, a workload cannot give itself this.
    pub agent_cgroup_id: u64,
    /// The cgroup id of the agent that configured the maps before this one (0: none):
    /// during an upgrade the old agent drains in its own cgroup, and its upstream
    /// connects must not be redirected while it does. cgroup ids are not reused
    /// while the system runs, so a stale one matches nothing.
    pub previous_agent_cgroup_id: u64,
}

/// Where an enrolled host cgroup's connections go: its workload's own outbound
/// listener port on loopback (workloads sharing the node's network namespace are
/// told apart by the listener they land on). Value of [`MAP_HOST_CGROUPS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCgroup {
    pub outbound_port: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// A workload in a network namespace of its own (a pod), by netns cookie: its
/// connections go to the agent's listener inside that namespace. Value of
/// [`MAP_POD_NETNS`].
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNetns {
    pub outbound_port: u16,
    pub _pad0: u16,
    pub _pad1: u32,
}

/// A local address whose inbound TCP connections are handed to the agent's inbound
/// listener (value of [`MAP_INBOUND_ADDRS`], keyed by the IPv4-mapped address).
/// The slots index [`MAP_INBOUND_SOCKS`], one listener per family.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundTarget {
    pub v4_slot: u32,
    pub v6_slot: u32,
    /// `INBOUND_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// Same-node acceleration (`--sockmap on`), a single entry in [`MAP_ACCEL_CONFIG`].
/// A map of its own rather than fields of [`InterceptConfig`], so maps pinned by an
/// agent without it keep their layout; all zero (the default) accelerates nothing.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AccelConfig {
    /// Non-zero: `sockops` puts the loopback legs between workloads and the agent in
    /// [`MAP_LOCAL_SOCKS`], where `sk_msg` hands each send to the peer socket.
    pub enabled: u32,
    pub _pad: u32,
}

/// Indexes of the per-CPU counters in [`MAP_ACCEL_STATS`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AccelStat {
    /// A socket of a loopback leg put in [`MAP_LOCAL_SOCKS`] (two per leg).
    Added = 0,
    /// A send handed straight to the peer socket.
    Redirected = 1,
    /// A send that went through TCP because the peer socket was not (or no longer)
    /// in the map; that socket sends through TCP from then on.
    FellBack = 2,
}

/// Number of [`AccelStat`] counters.
pub const ACCEL_STATS_LEN: u32 = 3;

/// Where a redirected connection was originally going.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order words; IPv4 is stored IPv4-mapped.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the workload used in `connect()`.
    pub family: u16,
}

/// A connection as seen from the workload's side: workload socket -> agent listener,
/// qualified by network namespace so agents in different namespaces on one kernel
/// never see each other's entries.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub netns_cookie: u64,
    /// The workload's local address (network byte order words, IPv4-mapped).
    pub src_addr: [u32; 4],
    /// The agent listener's address (network byte order words, IPv4-mapped).
    pub dst_addr: [u32; 4],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad: u32,
}

/// Key of the CIDR tries ([`MAP_CIDR_INCLUDE`], [`MAP_CIDR_EXCLUDE`]): the address
/// part after the trie's prefix-length header. IPv4 prefixes are stored IPv4-mapped
/// (`/p` becomes `/(96+p)`). Exclusions win over inclusions whatever their lengths,
/// exactly as the iptables chains check exclusions first.
pub type CidrKey = [u32; 4];

/// Indexes of the per-CPU counters in [`MAP_STATS`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stat {
    /// `connect()` rewritten to the agent.
    Redirected = 0,
    /// `connect()` of an enrolled workload left alone by a rule, loopback, or because
    /// the agent itself made it.
    Skipped = 1,
    /// Original destination could not be recorded (map error): the connect was refused
    /// rather than sent direct.
    RecordFailed = 2,
    /// `SO_ORIGINAL_DST` answered from the tuple map.
    SockoptAnswered = 3,
    /// Established redirected connection moved into the tuple map.
    Established = 4,
    /// Redirected connect that closed without establishing (refused, timed out).
    ConnectFailed = 5,
    /// Inbound connection handed to the agent's inbound listener.
    InboundCaptured = 6,
    /// Inbound connection dropped because no agent listener was there to take it
    /// (agent down or restarting): interception fails closed.
    InboundDropped = 7,
}

/// Number of [`Stat`] counters.
pub const STATS_LEN: u32 = 8;

/// The word stored in the third position of an IPv4-mapped IPv6 address
/// (`::ffff:0:0/96`), in network byte order as it sits in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 address word (network byte order, as in `sockaddr_in`) to the
/// IPv4-mapped four-word form used in every key.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr_be]
}

/// Whether a four-word address is IPv4-mapped.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Whether a four-word address (IPv4-mapped or IPv6) is a loopback address:
/// `127.0.0.0/8` or `::1`.
#[inline(always)]
pub const fn is_loopback(addr: &[u32; 4]) -> bool {
    if is_v4_mapped(addr) {
        addr[3].to_ne_bytes()[0] == 127
    } else {
        addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers, and have
    // explicit padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::InterceptConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockTuple {}
    unsafe impl aya::Pod for super::HostCgroup {}
    unsafe impl aya::Pod for super::PodNetns {}
    unsafe impl aya::Pod for super::InboundTarget {}
    unsafe impl aya::Pod for super::AccelConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<InterceptConfig>(), 24);
        assert_eq!(core::mem::size_of::<HostCgroup>(), 8);
        assert_eq!(core::mem::size_of::<PodNetns>(), 8);
        assert_eq!(core::mem::size_of::<InboundTarget>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 20);
        assert_eq!(core::mem::size_of::<SockTuple>(), 48);
        assert_eq!(core::mem::size_of::<AccelConfig>(), 8);
    }

    #[test]
    fn loopback_detection() {
        let v4 = |a: [u8; 4]| v4_mapped(u32::from_ne_bytes(a));
        assert!(is_loopback(&v4([127, 0, 0, 1])));
        assert!(is_loopback(&v4([127, 9, 8, 7])));
        assert!(!is_loopback(&v4([10, 0, 0, 1])));
        let v6_one = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert!(is_loopback(&v6_one));
        assert!(!is_loopback(&[u32::from_ne_bytes([0xfd, 0, 0, 0]), 0, 0, v6_one[3]]));
        assert!(is_v4_mapped(&v4([10, 1, 2, 3])));
        assert!(!is_v4_mapped(&v6_one));
    }
}
