//! The mesh's kernel side.
//!
//! - `mesh_connect4` / `mesh_connect6` (`cgroup/connect4`, `cgroup/connect6`, on
//!   enrolled workload cgroups): decide whether a TCP `connect()` is intercepted,
//!   record its original destination under the socket cookie, and rewrite the
//!   destination to the agent's outbound listener on loopback.
//! - `mesh_sockops` (`sockops`, on the same cgroups): once the redirected connection
//!   is established, move the original destination to a map keyed by the
//!   connection's 4-tuple (and network namespace); drop the entry of a connect that
//!   closes without ever establishing.
//! - `mesh_getsockopt` (`cgroup/getsockopt`, on the agent's cgroup): answer
//!   `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the agent's accepted sockets from
//!   that map, consuming the entry, so the agent recovers the destination exactly as
//!   under iptables. Entries for connections the agent never accepts age out of the
//!   LRU map.
//!
//! Every program always lets the syscall proceed: a failure to record or look up
//! means "not intercepted" (fail open), never a refused connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sock_ops_cb_flags_set},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    AF_INET, AF_INET6, CIDR_RULES_ENTRIES, CidrKey, FLAG_CIDRS_INCLUDE_ONLY, FLAG_DEBUG_LOG,
    FLAG_PORTS_INCLUDE_ONLY, InterceptConfig, ORIG_DST_BY_COOKIE_ENTRIES, ORIG_DST_BY_TUPLE_ENTRIES, OrigDst,
    PORT_RULES_ENTRIES, RULE_INTERCEPT, RULE_SKIP, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, STATS_LEN, SockTuple,
    Stat, is_loopback, is_v4_mapped, v4_mapped,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `sizeof(struct sockaddr_in)` / `sizeof(struct sockaddr_in6)`.
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[map(name = "MESH_CONFIG")]
static CONFIG: Array<InterceptConfig> = Array::with_max_entries(1, 0);

#[map(name = "MESH_CIDR_INCLUDE")]
static CIDR_INCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::with_max_entries(CIDR_RULES_ENTRIES, 0);

#[map(name = "MESH_CIDR_EXCLUDE")]
static CIDR_EXCLUDE: LpmTrie<CidrKey, u32> = LpmTrie::with_max_entries(CIDR_RULES_ENTRIES, 0);

#[map(name = "MESH_PORT_RULES")]
static PORT_RULES: HashMap<u16, u32> = HashMap::with_max_entries(PORT_RULES_ENTRIES, 0);

#[map(name = "MESH_ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_BY_COOKIE_ENTRIES, 0);

#[map(name = "MESH_ORIG_DST_BY_TUPLE")]
static ORIG_DST_BY_TUPLE: LruHashMap<SockTuple, OrigDst> =
    LruHashMap::with_max_entries(ORIG_DST_BY_TUPLE_ENTRIES, 0);

#[map(name = "MESH_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

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

/// Whether the socket behind a sock_addr context carries the agent's mark.
#[inline(always)]
fn is_agent_socket(ctx: &SockAddrContext, cfg: &InterceptConfig) -> bool {
    // SAFETY: `sk` of a sock_addr context is a valid, non-NULL socket pointer
    // for the program's duration (the verifier types it PTR_TO_SOCKET).
    unsafe {
        let sk: *mut bpf_sock = (*ctx.sock_addr).__bindgen_anon_1.sk;
        !sk.is_null() && (*sk).mark == cfg.mark
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx);
    1
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return;
    }
    let addr = v4_mapped(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    if is_agent_socket(ctx, cfg) || !wants_intercept(cfg, &addr, port) {
        count(Stat::Skipped);
        return;
    }
    if !record(ctx, cfg, addr, port, AF_INET) {
        return;
    }
    sa.user_ip4 = LOOPBACK_V4;
    sa.user_port = u32::from(cfg.outbound_port.to_be());
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx);
    1
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) {
    let Some(cfg) = config() else { return };
    // SAFETY: the context pointer is valid for the program's duration.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return;
    }
    let addr = words(&sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    if is_agent_socket(ctx, cfg) || !wants_intercept(cfg, &addr, port) {
        count(Stat::Skipped);
        return;
    }
    if !record(ctx, cfg, addr, port, AF_INET6) {
        return;
    }
    // A dual-stack socket dialling an IPv4-mapped address must stay on IPv4.
    sa.user_ip6 = if is_v4_mapped(&addr) { v4_mapped(LOOPBACK_V4) } else { LOOPBACK_V6 };
    sa.user_port = u32::from(cfg.outbound_port.to_be());
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
/// connect goes to its original destination) when the entry cannot be stored.
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
        && op != BPF_SOCK_OPS_STATE_CB
    {
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
            // SAFETY: pointer to a live map value returned by the lookup.
            let dst = unsafe { *dst };
            let key = sockops_tuple(ctx);
            if ORIG_DST_BY_TUPLE.insert(&key, &dst, 0).is_ok() {
                count(Stat::Established);
            }
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
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

/// The workload-side 4-tuple of a redirected connection, from the workload socket.
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
