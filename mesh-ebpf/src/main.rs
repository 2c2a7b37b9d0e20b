//! The mesh's kernel side.
//!
//! Every program is attached once, not per workload: the cgroup programs to the cgroup
//! root the agent is given (`--cgroup-root`), `sk_lookup` to each network namespace
//! whose inbound connections are captured. Which sockets are a workload's is decided by
//! map entries the agent writes, so enrolling or removing a workload is a map update
//! that never disturbs another workload, and every map is pinned in bpffs so a
//! restarted agent adopts them.
//!
//! - `mesh_connect4` / `mesh_connect6` (`cgroup/connect4`, `cgroup/connect6`): a TCP
//!   `connect()` of a workload is rewritten to the agent's outbound listener on
//!   loopback, after recording its original destination under the socket cookie. A
//!   workload is a network namespace of its own (a pod, [`MESH_POD_NETNS`] by netns
//!   cookie) or an enrolled cgroup in the node's namespace ([`MESH_HOST_CGROUPS`],
//!   deepest enrolled ancestor wins, each with its own listener port). The agent's own
//!   connects are recognised by its cgroup, which a workload cannot give itself (a
//!   socket mark it can).
//! - DNS: a workload's queries (UDP or TCP to port 53, whatever the address, loopback
//!   resolvers included) go to the agent's DNS listener on loopback in the workload's
//!   namespace (`InterceptConfig::dns_port`): `mesh_connect4|6` rewrite TCP and
//!   connected UDP sockets, `mesh_sendmsg4|6` (`cgroup/sendmsg4|6`) each datagram of
//!   unconnected ones, recording the resolver the workload asked under the socket
//!   cookie; `mesh_recvmsg4|6` (`cgroup/recvmsg4|6`) put that resolver back as the
//!   source of the answer, since resolver libraries drop answers from anyone else.
//! - `mesh_sockops` (`sockops`): once a redirected connection is established, move the
//!   original destination to a map keyed by the connection's 4-tuple and network
//!   namespace; drop the entry of a connect that closes without establishing.
//! - `mesh_getsockopt` (`cgroup/getsockopt`, on the agent's cgroup): answer
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the agent's accepted sockets from
//!   that map, consuming the entry, so the agent recovers the destination exactly as
//!   under iptables.
//! - `mesh_sk_lookup` (`sk_lookup`, per captured network namespace): a new inbound TCP
//!   connection to a captured local address and port is handed to the agent's inbound
//!   listener in that namespace, keeping its destination (no NAT). Connections arriving
//!   over loopback (the agent reaching its workload) are left alone.
//!
//! - `mesh_sk_msg` (`sk_msg`, on [`LOCAL_SOCKS`], only with `--sockmap on`): the
//!   loopback leg between a workload and the agent on its node (the workload's
//!   redirected connect to the agent's outbound listener) skips the TCP stack:
//!   `mesh_sockops` puts both ends in the sockhash as they establish, and each send
//!   on one end is queued straight on the other end's receive side. A send that
//!   finds no peer goes through TCP, and that socket keeps sending through TCP from
//!   then on, so bytes are never read out of order.
//!
//! Interception fails closed: a connect whose destination cannot be recorded is
//! refused, and an inbound connection whose listener is gone (agent down) is dropped,
//! never delivered around the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
        sk_action,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sock_ops_cb_flags_set,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    ACCEL_STATS_LEN, AF_INET, AF_INET6, AccelConfig, AccelStat, CIDR_RULES_ENTRIES, CidrKey,
    DNS_ORIG_BY_COOKIE_ENTRIES, DNS_PORT, FLAG_CIDRS_INCLUDE_ONLY, FLAG_DEBUG_LOG, FLAG_PORTS_INCLUDE_ONLY,
    HOST_CGROUP_ENTRIES, HostCgroup, INBOUND_ADDR_ENTRIES, INBOUND_ALL_PORTS, INBOUND_PORT_CAPTURE,
    INBOUND_PORT_SKIP, INBOUND_SOCK_ENTRIES, InboundTarget, InterceptConfig, LOCAL_FALLBACK_ENTRIES,
    LOCAL_SOCKS_ENTRIES, MAX_CGROUP_LEVEL, ORIG_DST_BY_COOKIE_ENTRIES, ORIG_DST_BY_TUPLE_ENTRIES, OrigDst,
    POD_NETNS_ENTRIES, PORT_RULES_ENTRIES, PodNetns, RULE_INTERCEPT, RULE_SKIP, SO_ORIGINAL_DST, SOL_IP,
    SOL_IPV6, STATS_LEN, SockTuple, Stat, is_loopback, is_v4_mapped, v4_mapped,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `sizeof(struct sockaddr_in)` / `sizeof(struct sockaddr_in6)`.
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
/// A network namespace's loopback device always has this index.
const LOOPBACK_IFINDEX: u32 = 1;
/// `sk_lookup` verdicts.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[map(name = "MESH_CONFIG")]
static CONFIG: Array<InterceptConfig> = Array::pinned(1, 0);

#[map(name = "MESH_CIDR_INCLUDE")]
static CIDR_INCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::pinned(CIDR_RULES_ENTRIES, 0);

#[map(name = "MESH_CIDR_EXCLUDE")]
static CIDR_EXCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::pinned(CIDR_RULES_ENTRIES, 0);

#[map(name = "MESH_PORT_RULES")]
static PORT_RULES: HashMap<u16, u32> = HashMap::pinned(PORT_RULES_ENTRIES, 0);

#[map(name = "MESH_ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_BY_COOKIE_ENTRIES, 0);

#[map(name = "MESH_ORIG_DST_BY_TUPLE")]
static ORIG_DST_BY_TUPLE: LruHashMap<SockTuple, OrigDst> = LruHashMap::pinned(ORIG_DST_BY_TUPLE_ENTRIES, 0);

/// The resolver a workload's DNS socket was sending to, by socket cookie, for the
/// recvmsg programs to put back as the answer's source. LRU: sockets come and go.
#[map(name = "MESH_DNS_ORIG_BY_COOKIE")]
static DNS_ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(DNS_ORIG_BY_COOKIE_ENTRIES, 0);

#[map(name = "MESH_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

#[map(name = "MESH_POD_NETNS")]
static POD_NETNS: HashMap<u64, PodNetns> = HashMap::pinned(POD_NETNS_ENTRIES, 0);

#[map(name = "MESH_HOST_CGROUPS")]
static HOST_CGROUPS: HashMap<u64, HostCgroup> = HashMap::pinned(HOST_CGROUP_ENTRIES, 0);

#[map(name = "MESH_INBOUND_ADDRS")]
static INBOUND_ADDRS: HashMap<[u32; 4], InboundTarget> = HashMap::pinned(INBOUND_ADDR_ENTRIES, 0);

#[map(name = "MESH_INBOUND_PORTS")]
static INBOUND_PORTS: HashMap<u16, u32> = HashMap::pinned(PORT_RULES_ENTRIES, 0);

#[map(name = "MESH_INBOUND_SOCKS")]
static INBOUND_SOCKS: SockMap = SockMap::pinned(INBOUND_SOCK_ENTRIES, 0);

#[map(name = "MESH_ACCEL_CONFIG")]
static ACCEL_CONFIG: Array<AccelConfig> = Array::pinned(1, 0);

#[map(name = "MESH_ACCEL_STATS")]
static ACCEL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(ACCEL_STATS_LEN, 0);

/// Both ends of each accelerated loopback leg, keyed by the socket's own view of its
/// connection (local end as `src`). Pinned so a restarted agent's programs redirect
/// between the sockets its predecessor's put there.
#[map(name = "MESH_LOCAL_SOCKS")]
static LOCAL_SOCKS: SockHash<SockTuple> = SockHash::pinned(LOCAL_SOCKS_ENTRIES, 0);

/// Active ends put in [`LOCAL_SOCKS`] whose passive end has not established yet: the
/// passive end joins only if its peer is here, so only legs whose both ends belong
/// to the mesh are accelerated. LRU: an end whose peer never shows ages out.
#[map(name = "MESH_LOCAL_PENDING")]
static LOCAL_PENDING: LruHashMap<SockTuple, u8> = LruHashMap::with_max_entries(LOCAL_FALLBACK_ENTRIES, 0);

/// Sockets of accelerated legs that sent through TCP once (their peer was not in the
/// map yet, or any more). They never redirect again: redirected bytes would be read
/// before the ones still queued in TCP.
#[map(name = "MESH_LOCAL_FALLBACK")]
static LOCAL_FALLBACK: LruHashMap<SockTuple, u8> = LruHashMap::pinned(LOCAL_FALLBACK_ENTRIES, 0);

#[inline(always)]
fn count_accel(stat: AccelStat) {
    if let Some(slot) = ACCEL_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of a map value; programs do not migrate CPUs mid-run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of a map value; programs do not migrate CPUs mid-run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static InterceptConfig> {
    CONFIG.get(0).filter(|c| c.outbound_port != 0)
}

/// Whether a destination (IPv4-mapped or IPv6 words, host-order port) is to be
/// intercepted: loopback never, then the port rules, then the CIDRs: any exclusion
/// wins; with an include list, the destination must be in it.
#[inline(always)]
fn wants_intercept(cfg: &InterceptConfig, addr: &[u32; 4], port: u16) -> bool {
    if is_loopback(addr) {
        return false;
    }
    // A plain integer (0 = no rule) rather than an Option: LLVM leaves the payload of
    // a `None` undefined, and the verifier rejects reading an uninitialised register.
    let port_rule = match PORT_RULES.get_ptr(port) {
        // SAFETY: pointer to a live map value returned by the lookup.
        Some(p) => unsafe { *p },
        None => 0,
    };
    if port_rule == RULE_SKIP {
        return false;
    }
    if cfg.flags & FLAG_PORTS_INCLUDE_ONLY != 0 && port_rule != RULE_INTERCEPT {
        return false;
    }
    let key = Key::new(128, *addr);
    if CIDR_EXCLUDE.get(&key).is_some() {
        return false;
    }
    cfg.flags & FLAG_CIDRS_INCLUDE_ONLY == 0 || CIDR_INCLUDE.get(&key).is_some()
}

/// The outbound listener port of the workload making this connect, or 0 when it is
/// not a workload's (or is the agent's own).
///
/// A plain integer (0 = none) rather than an Option, for the verifier (see above).
#[inline(always)]
fn workload_port(ctx: &SockAddrContext, cfg: &InterceptConfig) -> u16 {
    // SAFETY: helper valid for cgroup sock_addr programs, no arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup == cfg.agent_cgroup_id || cgroup == cfg.previous_agent_cgroup_id {
        return 0;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(pod) = POD_NETNS.get_ptr(&netns) {
        // SAFETY: pointer to a live map value returned by the lookup.
        return unsafe { (*pod).outbound_port };
    }
    host_cgroup_port()
}

/// The port of the deepest enrolled cgroup among the current task's ancestors
/// (level 0, the root, is never a workload), or 0.
#[inline(always)]
fn host_cgroup_port() -> u16 {
    let mut port = 0;
    let mut level = 1;
    while level <= MAX_CGROUP_LEVEL {
        // SAFETY: helper valid for cgroup sock_addr programs; returns 0 past the
        // current cgroup's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if let Some(host) = HOST_CGROUPS.get_ptr(&id) {
            // SAFETY: pointer to a live map value returned by the lookup.
            port = unsafe { (*host).outbound_port };
        }
        level += 1;
    }
    port
}

/// `connect()` proceeds (1) or fails with EPERM (0).
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    i32::from(try_connect4(&ctx))
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = config() else { return true };
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    let udp = sa.type_ == SOCK_DGRAM && sa.protocol == IPPROTO_UDP;
    if !udp && (sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP) {
        return true;
    }
    let listener = workload_port(ctx, cfg);
    if listener == 0 {
        return true;
    }
    let addr = v4_mapped(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    if port == DNS_PORT && cfg.dns_port != 0 {
        // UDP: the answer's source is put back by recvmsg4; TCP needs nothing back.
        if udp && !remember_dns(ctx, addr, AF_INET) {
            return false;
        }
        sa.user_ip4 = LOOPBACK_V4;
        sa.user_port = u32::from(cfg.dns_port.to_be());
        return true;
    }
    if udp {
        return true;
    }
    if !wants_intercept(cfg, &addr, port) {
        count(Stat::Skipped);
        return true;
    }
    if !record(ctx, cfg, addr, port, AF_INET) {
        return false;
    }
    sa.user_ip4 = LOOPBACK_V4;
    sa.user_port = u32::from(listener.to_be());
    true
}

/// `connect()` proceeds (1) or fails with EPERM (0).
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    i32::from(try_connect6(&ctx))
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = config() else { return true };
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    let udp = sa.type_ == SOCK_DGRAM && sa.protocol == IPPROTO_UDP;
    if !udp && (sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP) {
        return true;
    }
    let listener = workload_port(ctx, cfg);
    if listener == 0 {
        return true;
    }
    let addr = words(&sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    if port == DNS_PORT && cfg.dns_port != 0 {
        if udp && !remember_dns(ctx, addr, AF_INET6) {
            return false;
        }
        sa.user_ip6 = if is_v4_mapped(&addr) { v4_mapped(LOOPBACK_V4) } else { LOOPBACK_V6 };
        sa.user_port = u32::from(cfg.dns_port.to_be());
        return true;
    }
    if udp {
        return true;
    }
    if !wants_intercept(cfg, &addr, port) {
        count(Stat::Skipped);
        return true;
    }
    if !record(ctx, cfg, addr, port, AF_INET6) {
        return false;
    }
    // A dual-stack socket dialling an IPv4-mapped address must stay on IPv4.
    sa.user_ip6 = if is_v4_mapped(&addr) { v4_mapped(LOOPBACK_V4) } else { LOOPBACK_V6 };
    sa.user_port = u32::from(listener.to_be());
    true
}

/// Records the resolver a workload's DNS socket sends to, for the answer's source.
/// False (and the send or connect fails rather than going around the agent) when it
/// cannot be stored.
#[inline(always)]
fn remember_dns(ctx: &SockAddrContext, addr: [u32; 4], family: u16) -> bool {
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dst = OrigDst { addr, port: DNS_PORT, family };
    if DNS_ORIG_BY_COOKIE.insert(&cookie, &dst, 0).is_err() {
        count(Stat::RecordFailed);
        return false;
    }
    true
}

/// `sendmsg()` proceeds (1) or fails with EPERM (0).
#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    i32::from(try_sendmsg4(&ctx))
}

/// A datagram of an unconnected UDP socket to port 53 goes to the agent's DNS.
#[inline(always)]
fn try_sendmsg4(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = config() else { return true };
    if cfg.dns_port == 0 {
        return true;
    }
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != DNS_PORT || workload_port(ctx, cfg) == 0 {
        return true;
    }
    if !remember_dns(ctx, v4_mapped(sa.user_ip4), AF_INET) {
        return false;
    }
    sa.user_ip4 = LOOPBACK_V4;
    sa.user_port = u32::from(cfg.dns_port.to_be());
    true
}

/// `sendmsg()` proceeds (1) or fails with EPERM (0).
#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    i32::from(try_sendmsg6(&ctx))
}

#[inline(always)]
fn try_sendmsg6(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = config() else { return true };
    if cfg.dns_port == 0 {
        return true;
    }
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != DNS_PORT || workload_port(ctx, cfg) == 0 {
        return true;
    }
    let addr = words(&sa.user_ip6);
    if !remember_dns(ctx, addr, AF_INET6) {
        return false;
    }
    sa.user_ip6 = if is_v4_mapped(&addr) { v4_mapped(LOOPBACK_V4) } else { LOOPBACK_V6 };
    sa.user_port = u32::from(cfg.dns_port.to_be());
    true
}

/// Always 1: recvmsg programs may only rewrite the source.
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_recvmsg4(&ctx);
    1
}

/// An answer from the agent's DNS listener to a socket whose query was redirected
/// shows the resolver the workload asked as its source.
#[inline(always)]
fn try_recvmsg4(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    if cfg.dns_port == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != cfg.dns_port || sa.user_ip4 != LOOPBACK_V4 {
        return;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(dst) = DNS_ORIG_BY_COOKIE.get_ptr(&cookie) else { return };
    // SAFETY: pointer to a live map value returned by the lookup.
    let dst = unsafe { *dst };
    if is_v4_mapped(&dst.addr) {
        sa.user_ip4 = dst.addr[3];
        sa.user_port = u32::from(dst.port.to_be());
    }
}

/// Always 1: recvmsg programs may only rewrite the source.
#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_recvmsg6(&ctx);
    1
}

#[inline(always)]
fn try_recvmsg6(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    if cfg.dns_port == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != cfg.dns_port {
        return;
    }
    let from = words(&sa.user_ip6);
    if from != LOOPBACK_V6 && from != v4_mapped(LOOPBACK_V4) {
        return;
    }
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(dst) = DNS_ORIG_BY_COOKIE.get_ptr(&cookie) else { return };
    // SAFETY: pointer to a live map value returned by the lookup.
    let dst = unsafe { *dst };
    // One word at a time: the verifier refuses a copy loop into the context.
    // SAFETY: each write is of an aligned u32 inside the context's `user_ip6`.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], dst.addr[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], dst.addr[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], dst.addr[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], dst.addr[3]);
    }
    sa.user_port = u32::from(dst.port.to_be());
}

/// Copies a four-word address out of a context or socket structure one word at a
/// time. The verifier only allows loads at constant offsets from an unmodified context
/// or socket pointer; a whole-array copy would compile to pointer arithmetic first.
#[inline(always)]
fn words(src: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each read is of an aligned, initialised u32 inside `src`.
    unsafe {
        [
            core::ptr::read_volatile(&src[0]),
            core::ptr::read_volatile(&src[1]),
            core::ptr::read_volatile(&src[2]),
            core::ptr::read_volatile(&src[3]),
        ]
    }
}

/// Records the original destination under the socket cookie. Returns false (and the
/// connect is refused: it never goes to its destination around the agent) when the
/// entry cannot be stored.
#[inline(always)]
fn record(ctx: &SockAddrContext, cfg: &InterceptConfig, addr: [u32; 4], port: u16, family: u16) -> bool {
    // SAFETY: helper valid for sock_addr programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dst = OrigDst { addr, port, family };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &dst, 0).is_err() {
        count(Stat::RecordFailed);
        return false;
    }
    count(Stat::Redirected);
    if cfg.flags & FLAG_DEBUG_LOG != 0 {
        debug!(ctx, "redirect cookie={} port={} family={}", cookie, port, family);
    }
    true
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    1
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        accelerate_passive(ctx);
        return;
    }
    // SAFETY: helper valid for sockops programs; the context pointer is valid.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // Only redirected sockets ask to hear about their state changes.
            if ORIG_DST_BY_COOKIE.get_ptr(cookie).is_some() {
                // SAFETY: the context is a full TCP socket at this callback.
                unsafe {
                    bpf_sock_ops_cb_flags_set(ctx.ops, (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                };
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let Some(dst) = ORIG_DST_BY_COOKIE.get_ptr(cookie) else { return };
            let key = sockops_tuple(ctx);
            // SAFETY: pointer to a live map value returned by the lookup.
            let dst = unsafe { *dst };
            if ORIG_DST_BY_TUPLE.insert(&key, &dst, 0).is_ok() {
                count(Stat::Established);
            }
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
            accelerate_active(ctx, &key);
        }
        _ => {
            // BPF_SOCK_OPS_STATE_CB: args[1] is the new state. A cookie entry still
            // present at close belongs to a connect that never established. The tuple
            // entry is deliberately left alone: a client that resets before the agent
            // accepts must still have its destination found, and the agent's
            // getsockopt consumes the entry anyway.
            if ctx.arg(1) == BPF_TCP_CLOSE && ORIG_DST_BY_COOKIE.remove(&cookie).is_ok() {
                count(Stat::ConnectFailed);
            }
        }
    }
}

/// Whether `--sockmap on` turned the acceleration on.
#[inline(always)]
fn accel_on() -> bool {
    ACCEL_CONFIG.get(0).is_some_and(|cfg| cfg.enabled != 0)
}

/// Puts the connecting end of a workload's leg to the agent in [`LOCAL_SOCKS`]: a
/// connect the programs redirected to the agent's loopback listener. Only these are
/// known for certain to be the mesh's own legs; any other local connection is the
/// workload's business and left to TCP.
#[inline(always)]
fn accelerate_active(ctx: &SockOpsContext, key: &SockTuple) {
    if !accel_on() || !local_leg(key) {
        return;
    }
    if add_local(ctx, key) {
        let _ = LOCAL_PENDING.insert(key, &1, 0);
    }
}

/// Puts the accepting end of a local leg in [`LOCAL_SOCKS`] when its connecting end
/// is there (the connecting end establishes first).
#[inline(always)]
fn accelerate_passive(ctx: &SockOpsContext) {
    if !accel_on() {
        return;
    }
    let key = sockops_tuple(ctx);
    if !local_leg(&key) {
        return;
    }
    let peer = reversed(&key);
    if LOCAL_PENDING.get_ptr(&peer).is_none() {
        return;
    }
    let _ = LOCAL_PENDING.remove(&peer);
    add_local(ctx, &key);
}

/// A connection between two loopback addresses: both ends are sockets of one
/// network namespace, which the kernel serves without a device queue. Keys carry
/// the namespace's cookie, so two namespaces' equal tuples never meet.
#[inline(always)]
fn local_leg(key: &SockTuple) -> bool {
    is_loopback(&key.src_addr) && is_loopback(&key.dst_addr)
}

/// Puts a socket in [`LOCAL_SOCKS`]; false when the map refused it (full).
#[inline(always)]
fn add_local(ctx: &SockOpsContext, key: &SockTuple) -> bool {
    // A socket that reuses a closed one's tuple starts with a clean slate.
    let _ = LOCAL_FALLBACK.remove(key);
    // SAFETY: the context pointer is valid for the program's duration.
    let ops = unsafe { &mut *ctx.ops };
    if LOCAL_SOCKS.update(*key, ops, u64::from(BPF_NOEXIST)).is_ok() {
        count_accel(AccelStat::Added);
        true
    } else {
        false
    }
}

/// The other end's view of a connection.
#[inline(always)]
fn reversed(key: &SockTuple) -> SockTuple {
    SockTuple {
        netns_cookie: key.netns_cookie,
        src_addr: key.dst_addr,
        dst_addr: key.src_addr,
        src_port: key.dst_port,
        dst_port: key.src_port,
        _pad: 0,
    }
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    // Always pass: a redirect set above sends the message to the peer, no redirect
    // sends it through TCP. Nothing is ever dropped here.
    sk_action::SK_PASS
}

/// Hands a send on one end of an accelerated leg to the other end's receive queue,
/// unless this socket already sent through TCP (see [`LOCAL_FALLBACK`]).
#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the context pointer is valid for the program's duration.
    let md = unsafe { &*ctx.msg };
    let (local, remote) = if md.family == u32::from(AF_INET) {
        (v4_mapped(md.local_ip4), v4_mapped(md.remote_ip4))
    } else {
        (words(&md.local_ip6), words(&md.remote_ip6))
    };
    let own = SockTuple {
        // SAFETY: helper valid for sk_msg programs; the context pointer is valid.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src_addr: local,
        dst_addr: remote,
        src_port: md.local_port as u16,
        dst_port: u16::from_be((md.remote_port >> 16) as u16),
        _pad: 0,
    };
    if LOCAL_FALLBACK.get_ptr(&own).is_some() {
        return;
    }
    let mut peer = reversed(&own);
    if LOCAL_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(sk_action::SK_PASS) {
        count_accel(AccelStat::Redirected);
    } else {
        let _ = LOCAL_FALLBACK.insert(&own, &1, 0);
        count_accel(AccelStat::FellBack);
    }
}

/// A socket's own view of its connection (its local end as `src`): from a
/// redirected workload socket, the key the agent's getsockopt looks up; from any
/// socket, its key in [`LOCAL_SOCKS`].
#[inline(always)]
fn sockops_tuple(ctx: &SockOpsContext) -> SockTuple {
    let (src_addr, dst_addr) = if ctx.family() == u32::from(AF_INET) {
        (v4_mapped(ctx.local_ip4()), v4_mapped(ctx.remote_ip4()))
    } else {
        // SAFETY: the context pointer is valid for the program's duration.
        unsafe { (words(&(*ctx.ops).local_ip6), words(&(*ctx.ops).remote_ip6)) }
    };
    SockTuple {
        // SAFETY: helper valid for sockops programs; the context pointer is valid.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src_addr,
        dst_addr,
        // local_port is host order; remote_port holds the network-order port in its
        // upper 16 bits on little-endian.
        src_port: ctx.local_port() as u16,
        dst_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        _pad: 0,
    }
}

#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    1
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    // SAFETY: the context pointer is valid for the program's duration.
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return;
    }
    // SAFETY: `sk` of a sockopt context is a valid full socket pointer.
    let sk = unsafe { &*so.__bindgen_anon_1.sk };
    if sk.protocol != IPPROTO_TCP {
        return;
    }
    let Some(cfg) = config() else { return };
    // A socket reset before the agent accepted it has released its port binding, and
    // the kernel zeroes its local port then; the listener's port is what it was.
    let local_port = if sk.src_port != 0 { sk.src_port as u16 } else { cfg.outbound_port };
    // The accepted socket's remote end is the workload, its local end the listener.
    let (src_addr, dst_addr) = if sk.family == u32::from(AF_INET) {
        (v4_mapped(sk.dst_ip4), v4_mapped(sk.src_ip4))
    } else {
        (words(&sk.dst_ip6), words(&sk.src_ip6))
    };
    let key = SockTuple {
        // SAFETY: helper valid for cgroup sockopt programs; the context pointer is valid.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src_addr,
        dst_addr,
        src_port: u16::from_be(sk.dst_port),
        dst_port: local_port,
        _pad: 0,
    };
    let Some(dst) = ORIG_DST_BY_TUPLE.get_ptr(&key) else { return };
    // SAFETY: pointer to a live map value returned by the lookup.
    let dst = unsafe { *dst };
    // The handoff is one-shot: the agent asks once per accepted connection, so the
    // entry lives only from establishment to accept.
    let _ = ORIG_DST_BY_TUPLE.remove(&key);

    // SAFETY: optval/optval_end bound the kernel's copy of the caller's buffer; every
    // write below is checked against optval_end first, as the verifier requires.
    unsafe {
        let start = so.__bindgen_anon_2.optval as *mut u8;
        let end = so.__bindgen_anon_3.optval_end as *mut u8;
        if so.level == SOL_IP {
            if !is_v4_mapped(&dst.addr) || start.add(SOCKADDR_IN_LEN) > end {
                return;
            }
            // struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8] }
            (start as *mut u16).write_unaligned(AF_INET);
            (start.add(2) as *mut u16).write_unaligned(dst.port.to_be());
            (start.add(4) as *mut u32).write_unaligned(dst.addr[3]);
            (start.add(8) as *mut u64).write_unaligned(0);
            so.optlen = SOCKADDR_IN_LEN as i32;
        } else {
            if start.add(SOCKADDR_IN6_LEN) > end {
                return;
            }
            // struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u32 addr[4]; u32 scope_id }
            (start as *mut u16).write_unaligned(AF_INET6);
            (start.add(2) as *mut u16).write_unaligned(dst.port.to_be());
            (start.add(4) as *mut u32).write_unaligned(0);
            (start.add(8) as *mut u32).write_unaligned(dst.addr[0]);
            (start.add(12) as *mut u32).write_unaligned(dst.addr[1]);
            (start.add(16) as *mut u32).write_unaligned(dst.addr[2]);
            (start.add(20) as *mut u32).write_unaligned(dst.addr[3]);
            (start.add(24) as *mut u32).write_unaligned(0);
            so.optlen = SOCKADDR_IN6_LEN as i32;
        }
    }
    so.retval = 0;
    count(Stat::SockoptAnswered);
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

/// Hands a new inbound TCP connection for a captured address and port to the agent's
/// inbound listener of that namespace; drops it when the listener is gone.
#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's duration.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // The agent reaches its workloads from inside their namespace: over loopback, or
    // from the workload's own address to itself (a local route, whose packets do not
    // always say loopback here); so does anything else local to the workload. Traffic
    // from other hosts and namespaces arrives on a real interface, and one carrying
    // a local address as its source is dropped by the kernel as a martian before it
    // gets here, so a sender cannot pass for either.
    if l.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let (addr, v6) = if l.family == u32::from(AF_INET) {
        if l.remote_ip4 == l.local_ip4 {
            return SK_PASS;
        }
        (v4_mapped(l.local_ip4), false)
    } else {
        if l.remote_ip6 == l.local_ip6 {
            return SK_PASS;
        }
        (words(&l.local_ip6), true)
    };
    let Some(target) = INBOUND_ADDRS.get_ptr(&addr) else { return SK_PASS };
    // SAFETY: pointer to a live map value returned by the lookup.
    let target = unsafe { *target };
    let port = l.local_port as u16;
    let rule = match INBOUND_PORTS.get_ptr(&port) {
        // SAFETY: pointer to a live map value returned by the lookup.
        Some(p) => unsafe { *p },
        None => 0,
    };
    if rule == INBOUND_PORT_SKIP {
        return SK_PASS;
    }
    if target.flags & INBOUND_ALL_PORTS == 0 && rule != INBOUND_PORT_CAPTURE {
        return SK_PASS;
    }
    let slot = if v6 { target.v6_slot } else { target.v4_slot };
    match INBOUND_SOCKS.redirect_sk_lookup(ctx, slot, 0) {
        Ok(()) => {
            count(Stat::InboundCaptured);
            SK_PASS
        }
        Err(_) => {
            count(Stat::InboundDropped);
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
