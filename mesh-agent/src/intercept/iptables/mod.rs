//! iptables interception: NAT `REDIRECT` rules that send workload TCP traffic to
//! the agent's local listeners.
//!
//! This is the fallback for kernels or privileges that rule out the eBPF mode,
//! and the pod-level mode an init container sets up. Both modes end in the same
//! place for the agent: the listener reads the original destination with
//! `getsockopt(SO_ORIGINAL_DST)`.
//!
//! Everything this module adds lives in the `nat` table, in two chains of its
//! own, [`OUTPUT_CHAIN`] and [`INBOUND_CHAIN`], plus one jump to each from the
//! built-in `OUTPUT` and `PREROUTING` chains:
//!
//! ```text
//! -I OUTPUT -j MESH_OUTPUT                                 every protocol: DNS is UDP too
//! -I PREROUTING -p tcp -j MESH_INBOUND
//! -A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/agent" -j RETURN
//!                                                          agent's own sockets: the mark
//!                                                          with the agent's cgroup
//! -A MESH_OUTPUT -m mark --mark 0x4d45 -m owner --gid-owner 1337 -j RETURN
//!                                                          or with its uid/gid
//! -A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN       optional
//! -A MESH_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
//! -A MESH_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
//!                                                          DNS, to any address, to the
//!                                                          agent's DNS (per cgroup if any)
//! -A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN                  (IPv6: ::1/128)
//! -A MESH_OUTPUT -o lo -j RETURN
//! -A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN        per excluded port
//! -A MESH_OUTPUT -d 10.1.0.0/16 -j RETURN                  per excluded CIDR
//! -A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001-15004
//!      (one redirect per cgroup x included CIDR x group of 15 included ports,
//!       each match only when configured)
//! -A MESH_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006
//!      (a host: the listed ports; a pod: every port but the agent's own,
//!       `-p tcp -m tcp --dport 15008 -j RETURN` ... `-p tcp -j REDIRECT --to-ports 15006`)
//! ```
//!
//! The rules go into the caller's network namespace or into another one given
//! by path ([`Netns`]): the agent programs each pod's namespace from the node,
//! and [`pod`] holds the rules a pod gets. How the agent's own sockets are
//! recognised, and why the mark alone is not enough, is in [`AgentSockets`].
//!
//! The parts, by concern: `config` says what to intercept (`agent_sockets` how
//! the agent's own sockets are told apart), `rules` renders it as
//! `iptables-restore` input, `apply` installs and removes it as one transaction
//! per family, `check` compares it with the live tables, `command` runs the
//! tools (in the namespace `netns` opened) and explains their failures.
//!
//! [`install`] leaves both chains and both jumps in place after every run, even
//! with no inbound ports, so every install leaves the same shape behind whatever
//! the previous config was. [`uninstall`] touches nothing else: after it the
//! `nat` table is exactly as it was before the first install.
//!
//! The jumps are inserted at the top of `OUTPUT` and `PREROUTING` rather than
//! appended: on a node where kube-proxy DNATs service VIPs in those chains, the
//! agent must see the VIP the workload dialled, not the endpoint kube-proxy
//! picked.
//!
//! The binaries are `iptables`/`ip6tables` unless [`ENV_IPTABLES`] /
//! [`ENV_IP6TABLES`] name others (for example `iptables-legacy`); the restore
//! tool is that name with `-restore` appended. Commands run synchronously: this
//! happens at start, at stop, when the enrolled cgroups change and when a pod
//! comes or goes, and callers on an async runtime wrap the calls in
//! `spawn_blocking`.
//!
//! CIDRs are the crate's shared [`Cidr`](crate::cidr::Cidr) (host bits rejected
//! at parse time).

mod agent_sockets;
mod apply;
mod check;
mod command;
mod config;
mod error;
mod family;
mod netns;
pub mod pod;
mod rules;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod kernel_tests;

use tracing::{debug, warn};

pub use self::agent_sockets::AgentSockets;
pub use self::check::Check;
use self::check::FamilyCheck;
use self::command::Tables;
pub use self::config::{Inbound, IptablesConfig};
pub use self::error::IptablesError;
pub use self::family::{ENV_IP6TABLES, ENV_IPTABLES, Family, binary};
pub use self::netns::Netns;
pub use self::rules::render;

/// Our chain in the `nat` table for locally generated (outbound) traffic.
pub const OUTPUT_CHAIN: &str = "MESH_OUTPUT";
/// Our chain in the `nat` table for traffic arriving from the network (inbound).
pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
/// The agent's outbound listener port unless configured otherwise.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound listener port unless configured otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// How many consecutive ports, from the outbound port up, the agent listens on
/// (`127.0.0.1` and `::1`) and the outbound `REDIRECT` may choose from.
///
/// Why more than one: `REDIRECT` maps every intercepted connection onto the reply
/// tuple `listener <- workload:port`. The workload's kernel picks its source port
/// knowing only the original destination, so a new connection to one service can
/// draw a port whose connection to another service still has a conntrack entry
/// (TIME_WAIT lasts 120 s). With one listener port both map onto the same reply
/// tuple, NAT cannot make it unique, and the SYN is dropped until its retransmit a
/// second later (measured: a workload alternating between two ports fell from 28k
/// to 1-6k new connections/s, with hundreds of SYN retransmits). With a range,
/// NAT takes the next free port of it instead. eBPF mode rewrites the destination
/// before the source port is chosen and has no such clash; it uses the first port.
pub const OUTBOUND_PORT_SPAN: u16 = 4;

/// The outbound listener ports for `port`: `port` and the ones after it, as many
/// as [`OUTBOUND_PORT_SPAN`] (fewer where they would pass 65535).
pub fn outbound_ports(port: u16) -> std::ops::RangeInclusive<u16> {
    port..=port.saturating_add(OUTBOUND_PORT_SPAN - 1)
}

/// Installs (or replaces) the interception rules in the caller's network
/// namespace; see [`install_in`].
pub fn install(cfg: &IptablesConfig) -> Result<(), IptablesError> {
    install_in(&Netns::Current, cfg)
}

/// Installs (or replaces) the interception rules in `netns`, for IPv4 and, if
/// `cfg.ipv6`, IPv6. Idempotent: running it again with the same config changes
/// nothing, with another config leaves exactly that config's rules.
///
/// With `cfg.ipv6` off, rules a previous install left in the IPv6 table are
/// removed (best effort: a host without `ip6tables` is fine). If IPv6 fails
/// after IPv4 succeeded, the IPv4 rules stay; [`uninstall_in`] removes both.
/// When the config lets a workload pass for the agent (see
/// [`AgentSockets::weakness`]), the install says so in the log.
pub fn install_in(netns: &Netns, cfg: &IptablesConfig) -> Result<(), IptablesError> {
    cfg.validate()?;
    if let Some(weakness) = cfg.agent.weakness(&cfg.cgroups) {
        warn!(%netns, mark = format!("{:#x}", cfg.agent.mark), "{weakness}");
    }
    let ns = netns.open()?;
    Tables::from_env(Family::V4).in_netns(ns.clone()).install(cfg)?;
    let v6 = Tables::from_env(Family::V6).in_netns(ns);
    if cfg.ipv6 {
        v6.install(cfg)?;
    } else {
        match v6.uninstall() {
            Ok(()) => {}
            Err(IptablesError::NotInstalled { binary, .. }) => {
                debug!(%binary, "IPv6 interception disabled and ip6tables absent: nothing to remove");
            }
            Err(error) => {
                warn!(%error, "IPv6 interception disabled; could not check for stale IPv6 rules")
            }
        }
    }
    Ok(())
}

/// Removes every rule this module added in the caller's network namespace; see
/// [`uninstall_in`].
pub fn uninstall(ipv6: bool) -> Result<(), IptablesError> {
    uninstall_in(&Netns::Current, ipv6)
}

/// Removes every rule this module added in `netns`: the jumps to our chains
/// from `OUTPUT` and `PREROUTING` (duplicates included), then the chains.
/// Anything missing is skipped, so it is idempotent and safe after a failed or
/// partial install. Both families are attempted even if the first fails; the
/// first error wins. A namespace path that names nothing gives
/// [`IptablesError::NetnsGone`]: the rules went with the namespace.
pub fn uninstall_in(netns: &Netns, ipv6: bool) -> Result<(), IptablesError> {
    let ns = netns.open()?;
    let v4 = Tables::from_env(Family::V4).in_netns(ns.clone()).uninstall();
    let v6 = if ipv6 { Tables::from_env(Family::V6).in_netns(ns).uninstall() } else { Ok(()) };
    v4.and(v6)
}

/// Compares the live tables of `netns` with what [`install_in`] would leave for
/// `cfg`: both chains with exactly the rendered rules, in order, and one jump
/// to each (in the IPv6 table only with `cfg.ipv6`; without it, nothing of ours
/// in IPv6). Changes nothing.
pub fn check_in(netns: &Netns, cfg: &IptablesConfig) -> Result<Check, IptablesError> {
    cfg.validate()?;
    let ns = netns.open()?;
    let v4 = Tables::from_env(Family::V4).in_netns(ns.clone()).check(Some(cfg))?;
    let v6 = Tables::from_env(Family::V6).in_netns(ns);
    let v6 = match v6.check(cfg.ipv6.then_some(cfg)) {
        // No ip6tables and IPv6 off: nothing of ours can be there.
        Err(IptablesError::NotInstalled { .. }) if !cfg.ipv6 => FamilyCheck::default(),
        other => other?,
    };
    Ok(Check::of([v4, v6]))
}

/// Whether our chains exist in `family`'s `nat` table.
pub fn is_installed(family: Family) -> Result<bool, IptablesError> {
    let tables = Tables::from_env(family);
    Ok(tables.chain_exists(OUTPUT_CHAIN)? && tables.chain_exists(INBOUND_CHAIN)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_rejects_a_bad_config_before_running_anything() {
        let err = install(&IptablesConfig::new(0)).unwrap_err();
        assert!(matches!(err, IptablesError::InvalidConfig { field: "mark", .. }), "{err}");
    }
}
