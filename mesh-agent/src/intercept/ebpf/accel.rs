//! Same-node acceleration (`--sockmap on`, experimental): a workload's redirected
//! connection to the agent's loopback listener skips the TCP stack.
//!
//! `mesh_sockops` puts both ends of each such leg in a sockhash as they establish;
//! `mesh_sk_msg`, attached to that sockhash here, queues every send on one end
//! straight onto the other end's receive side. What it costs in correctness is why it
//! is off by default:
//!
//! - a socket in the sockhash reads through the kernel's sockmap receive path, and a
//!   workload blocked in `recv()` on one thread while another thread writes and
//!   half-closes has been seen to wait for ever for bytes already delivered (kernel
//!   6.18; the socket being in the map is enough, with no send redirected);
//! - a redirected send is charged to the receiving socket at once, with no waiting:
//!   a workload that writes faster than the agent reads (iperf3) gets ENOMEM from
//!   `write()` where TCP would have made it wait;
//! - a socket that receives with `splice(2)` never sees redirected bytes, so the
//!   agent's own plaintext relays stop splicing while it is on, and a workload that
//!   reads its sockets with `splice(2)` must not be accelerated;
//! - a send that finds no peer in the map (the peer had not established yet, or has
//!   gone) goes through TCP, and that socket stays on TCP from then on, so bytes are
//!   never read out of order.
//!
//! The attachment is the agent's own, not pinned: while no agent runs, new legs go
//! through TCP and legs already accelerated keep their program.

use aya::{
    Ebpf,
    maps::{Array, SockHash},
    programs::SkMsg,
};
use mesh_common::{
    ACCEL_STATS_LEN, AccelConfig, AccelStat, MAP_ACCEL_CONFIG, MAP_ACCEL_STATS, MAP_LOCAL_SOCKS, PROG_SK_MSG,
    SockTuple,
};
use serde::Serialize;

use super::{EbpfError, map_err, map_mut, prog, prog_err};

/// Counters of the acceleration, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct AccelStats {
    /// Sockets put in the sockhash (two per accelerated leg).
    pub sockets_added: u64,
    /// Sends handed straight to the peer socket.
    pub sends_redirected: u64,
    /// Sends that went through TCP (no peer in the map); their sockets stay on TCP.
    pub sends_fell_back: u64,
}

/// Writes the acceleration settings, and with `enabled` loads `mesh_sk_msg` and
/// attaches it to the sockhash. Called before the sockops program is attached, so
/// no socket is put in the map without the program that empties it.
pub(super) fn configure(bpf: &mut Ebpf, enabled: bool) -> Result<(), EbpfError> {
    if enabled {
        let map = bpf.map(MAP_LOCAL_SOCKS).ok_or(EbpfError::Missing(MAP_LOCAL_SOCKS))?;
        let socks: SockHash<_, SockTuple> = SockHash::try_from(map).map_err(map_err(MAP_LOCAL_SOCKS))?;
        let socks_fd =
            socks.fd().try_clone().map_err(|source| EbpfError::MapFd { name: MAP_LOCAL_SOCKS, source })?;
        let program = prog::<SkMsg>(bpf, PROG_SK_MSG)?;
        program.load().map_err(prog_err(PROG_SK_MSG))?;
        program.attach(&socks_fd).map_err(prog_err(PROG_SK_MSG))?;
    }
    let mut config: Array<_, AccelConfig> =
        Array::try_from(map_mut(bpf, MAP_ACCEL_CONFIG)?).map_err(map_err(MAP_ACCEL_CONFIG))?;
    let value = AccelConfig { enabled: u32::from(enabled), ..Default::default() };
    config.set(0, value, 0).map_err(map_err(MAP_ACCEL_CONFIG))?;
    Ok(())
}

/// The acceleration's counters (all zero while it is off).
pub(super) fn stats(bpf: &Ebpf) -> Result<AccelStats, EbpfError> {
    let sums = super::per_cpu_sums(bpf, MAP_ACCEL_STATS, ACCEL_STATS_LEN)?;
    let at = |s: AccelStat| sums[s as usize];
    Ok(AccelStats {
        sockets_added: at(AccelStat::Added),
        sends_redirected: at(AccelStat::Redirected),
        sends_fell_back: at(AccelStat::FellBack),
    })
}
