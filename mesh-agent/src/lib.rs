//! The mesh's node agent.
//!
//! Follow the data path by module: [`intercept`] takes workload connections away
//! (eBPF or iptables), [`listener`] accepts them and recovers the original
//! destination through [`orig_dst`], [`sniff`] classifies the protocol without
//! losing a byte, and [`forward`] carries the bytes on.

pub mod sniff;
