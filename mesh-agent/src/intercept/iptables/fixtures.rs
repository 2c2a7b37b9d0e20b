//! Configs and helpers shared by this module's tests.

use super::{AgentSockets, Inbound, IptablesConfig};
use crate::cidr::Cidr;

/// A CIDR from a literal.
pub(crate) fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// A config using every field, both families.
pub(crate) fn sample() -> IptablesConfig {
    IptablesConfig {
        outbound_port: 15001,
        inbound_port: 15006,
        inbound: Inbound::Ports(vec![8080, 9090]),
        agent: AgentSockets::mark_only(0x539),
        exclude_uid: Some(1337),
        include_ports: vec![],
        exclude_ports: vec![22, 15020],
        include_cidrs: vec![cidr("10.0.0.0/8"), cidr("fd00::/64")],
        exclude_cidrs: vec![cidr("10.1.0.0/16"), cidr("fd00::1")],
        cgroups: vec![],
        cgroup_ports: Default::default(),
        ipv6: true,
        dns_port: None,
    }
}
