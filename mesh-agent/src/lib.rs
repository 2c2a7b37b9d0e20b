//! The mesh's node agent.
//!
//! Follow the data path by module: [`intercept`] takes workload connections away
//! (eBPF or iptables), [`listener`] accepts them and recovers the original
//! destination through [`orig_dst`], [`sniff`] classifies the protocol without
//! losing a byte, and [`forward`] carries the bytes on through sockets made by
//! [`socket`]. [`dns`] answers workloads' DNS for registry hostnames. [`agent`]
//! wires it together; [`admin`] exposes it.

pub mod admin;
pub mod agent;
pub mod authz;
pub mod balance;
pub mod cgroup;
pub mod cidr;
pub mod config;
pub mod control_channel;
pub mod copy;
pub mod discovery;
pub mod dns;
pub mod forward;
pub mod gateway;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod l7;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod mtls;
pub mod observe;
pub mod orig_dst;
pub mod resilience;
pub mod routing;
pub mod sniff;
pub mod socket;
pub mod source_addr;
#[cfg(test)]
pub(crate) mod test_helpers;
pub mod tunnel;
pub mod workload;
pub mod workload_identity;
