//! What the rules intercept and where they send it, checked once before anything
//! is rendered or run.

use super::agent_sockets::{AgentSockets, check_cgroup_path, invalid};
use super::{DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, IptablesError};
use crate::cidr::Cidr;

/// What to intercept and where to send it.
///
/// One config drives both families; CIDRs are sorted into the table of their
/// family when the rules are rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesConfig {
    /// The agent's outbound listener (on `127.0.0.1` and `::1`, where `REDIRECT`
    /// sends locally generated traffic).
    pub outbound_port: u16,
    /// The agent's inbound listener (on the receiving interface's address, where
    /// `REDIRECT` sends traffic arriving from the network).
    pub inbound_port: u16,
    /// Which connections arriving from the network are sent to `inbound_port`.
    pub inbound: Inbound,
    /// How the agent's own sockets are recognised: they are matched first and
    /// never redirected, so the agent's upstream connections are never sent
    /// back to itself.
    pub agent: AgentSockets,
    /// A uid whose sockets are also left alone (Istio-style: the sidecar's uid),
    /// for agents that cannot mark every socket they open.
    pub exclude_uid: Option<u32>,
    /// If non-empty, only these outbound destination ports are redirected (as
    /// the eBPF mode's include-only port list).
    pub include_ports: Vec<u16>,
    /// Outbound destination ports left alone; checked before the includes.
    pub exclude_ports: Vec<u16>,
    /// If non-empty, only these destinations are redirected outbound. A family
    /// with no entry here is then not redirected at all (an IPv4-only include
    /// list must not turn into "redirect all IPv6").
    pub include_cidrs: Vec<Cidr>,
    /// Outbound destinations left alone; checked before the includes.
    pub exclude_cidrs: Vec<Cidr>,
    /// cgroup v2 paths relative to the cgroup2 root (such as `/mesh/wl1`). If
    /// non-empty, only sockets of these cgroups are redirected outbound (node
    /// mode); empty means the whole network namespace (pod mode). Each cgroup
    /// must exist when the rules are installed: the kernel resolves the path
    /// then, and a cgroup that is removed and re-created needs a re-install.
    pub cgroups: Vec<String>,
    /// The outbound listener port of cgroups that have their own (workloads of the
    /// node's namespace with an identity of their own, `--workload`); the others go
    /// to `outbound_port`.
    pub cgroup_ports: std::collections::BTreeMap<String, u16>,
    /// Also program the IPv6 table with `ip6tables`.
    pub ipv6: bool,
    /// The agent's DNS listener: the same sockets' DNS queries (UDP and TCP to port
    /// 53, to any address, loopback resolvers included) are redirected to it.
    /// `None`: DNS is left alone.
    pub dns_port: Option<u16>,
}

/// Which connections arriving from the network the inbound chain redirects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Only those to these destination ports (a host's `--inbound-ports`);
    /// empty means no inbound redirection (the chain stays, empty).
    Ports(Vec<u16>),
    /// Those to every destination port but these (a pod: everything reaches
    /// the workload through the agent except the agent's own ports and the
    /// configured exclusions).
    AllExcept(Vec<u16>),
}

impl Inbound {
    /// Whether any connection is redirected at all.
    pub fn redirects(&self) -> bool {
        !matches!(self, Inbound::Ports(ports) if ports.is_empty())
    }
}

impl IptablesConfig {
    /// Default ports, nothing excluded beyond the agent's `mark`, nothing
    /// inbound, the whole network namespace, IPv4 and IPv6.
    pub fn new(mark: u32) -> Self {
        IptablesConfig {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            inbound: Inbound::Ports(Vec::new()),
            agent: AgentSockets::mark_only(mark),
            exclude_uid: None,
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            cgroups: Vec::new(),
            cgroup_ports: Default::default(),
            ipv6: true,
            dns_port: None,
        }
    }

    /// Checks what the type system cannot: ports and mark non-zero, and cgroup
    /// paths that are absolute and safe to place in a restore file.
    pub fn validate(&self) -> Result<(), IptablesError> {
        if self.outbound_port == 0 {
            return Err(invalid("outbound_port", 0, "port 0 cannot be listened on"));
        }
        self.agent.validate()?;
        if self.inbound.redirects() && self.inbound_port == 0 {
            return Err(invalid("inbound_port", 0, "port 0 cannot be listened on"));
        }
        match &self.inbound {
            Inbound::Ports(ports) if ports.contains(&0) => {
                return Err(invalid("inbound_ports", ports, "port 0 is not a destination port"));
            }
            Inbound::AllExcept(ports) if ports.contains(&0) => {
                return Err(invalid("inbound_exclude_ports", ports, "port 0 is not a destination port"));
            }
            _ => {}
        }
        if self.dns_port == Some(0) {
            return Err(invalid("dns_port", 0, "port 0 cannot be listened on"));
        }
        if self.include_ports.contains(&0) {
            return Err(invalid("include_ports", &self.include_ports, "port 0 is not a destination port"));
        }
        if self.exclude_ports.contains(&0) {
            return Err(invalid("exclude_ports", &self.exclude_ports, "port 0 is not a destination port"));
        }
        for cgroup in &self.cgroups {
            check_cgroup_path("cgroups", cgroup)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::iptables::fixtures::sample;

    #[test]
    fn validate_rejects_with_the_field_and_value() {
        let ok = sample();
        ok.validate().unwrap();
        let cases: Vec<(IptablesConfig, &str)> = vec![
            (IptablesConfig { agent: AgentSockets::mark_only(0), ..ok.clone() }, "mark = 0"),
            (IptablesConfig { outbound_port: 0, ..ok.clone() }, "outbound_port = 0"),
            (IptablesConfig { inbound_port: 0, ..ok.clone() }, "inbound_port = 0"),
            (
                IptablesConfig { inbound: Inbound::Ports(vec![80, 0]), ..ok.clone() },
                "inbound_ports = [80, 0]",
            ),
            (
                IptablesConfig { inbound: Inbound::AllExcept(vec![0]), ..ok.clone() },
                "inbound_exclude_ports = [0]",
            ),
            (IptablesConfig { exclude_ports: vec![0], ..ok.clone() }, "exclude_ports = [0]"),
            (IptablesConfig { cgroups: vec!["mesh/wl".into()], ..ok.clone() }, r#"cgroups = "mesh/wl""#),
            (
                IptablesConfig { cgroups: vec!["/a\n-A OUTPUT -j DROP".into()], ..ok.clone() },
                r#"cgroups = "/a\n-A OUTPUT -j DROP""#,
            ),
            (IptablesConfig { cgroups: vec!["/a b".into()], ..ok.clone() }, r#"cgroups = "/a b""#),
            (IptablesConfig { cgroups: vec!["/a\"b".into()], ..ok.clone() }, r#"cgroups = "/a\"b""#),
            (IptablesConfig { cgroups: vec![format!("/{}", "x".repeat(5000))], ..ok.clone() }, "cgroups = "),
            (
                IptablesConfig {
                    agent: AgentSockets {
                        cgroups: vec!["/agent\n-A OUTPUT -j DROP".into()],
                        ..ok.agent.clone()
                    },
                    ..ok.clone()
                },
                r#"agent_cgroups = "/agent\n-A OUTPUT -j DROP""#,
            ),
            (
                IptablesConfig {
                    agent: AgentSockets { cgroups: vec!["agent".into()], ..ok.agent.clone() },
                    ..ok.clone()
                },
                r#"agent_cgroups = "agent""#,
            ),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, IptablesError::InvalidConfig { .. }));
            let msg = err.to_string();
            assert!(msg.contains(needle), "{msg:?} does not name {needle:?}");
        }
        // An unused inbound port may be 0.
        IptablesConfig { inbound_port: 0, inbound: Inbound::Ports(vec![]), ..ok }.validate().unwrap();
    }
}
