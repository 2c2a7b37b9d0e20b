//! The rules of a pod's own network namespace, when the agent serves the pod
//! there (as ztunnel's in-pod mode): the agent opens the pod's outbound (15001),
//! inbound (15006) and tunnel (15008) listeners inside the pod's namespace, and
//! these rules send the pod's TCP to them.
//!
//! - Outbound: every TCP connection the pod makes goes to the outbound listener,
//!   except to loopback, to the configured exclusions, and from the agent's own
//!   sockets (the mark with the agent's cgroup or owner; see [`AgentSockets`]).
//!   The agent's listeners in the pod are its own sockets too: connections it
//!   accepts are never NEW connections for NAT, and the connections it opens
//!   from the pod's namespace (upstream, or to the pod's app over loopback) are
//!   excluded by the rules above.
//! - Inbound: every TCP connection arriving for the pod goes to the inbound
//!   listener, whatever its port, except those for the agent's own ports (the
//!   tunnel, the two listeners, admin or health ports) and the configured
//!   exclusions. Peers' agents reach the tunnel port directly; everything else
//!   passes the agent before it reaches the pod's app.
//!
//! The agent installs them from the node, into the pod's namespace by path; a
//! pod's init container installs the same rules from inside the pod (`mesh-agent
//! iptables pod install`). Both leave the same chains; [`uninstall`] removes
//! exactly them, from either side.

use std::path::PathBuf;

use super::agent_sockets::invalid;
use super::{
    AgentSockets, Check, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, Inbound, IptablesConfig, IptablesError,
    Netns,
};
use crate::cidr::Cidr;

/// The agent's tunnel port (HTTP/2 CONNECT over mTLS) unless configured otherwise.
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;

/// What a pod's namespace intercepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    /// The agent's outbound listener in the pod (`127.0.0.1` and `::1`).
    pub outbound_port: u16,
    /// The agent's inbound listener in the pod.
    pub inbound_port: u16,
    /// The agent's tunnel listener in the pod, which peers' agents dial directly.
    pub tunnel_port: u16,
    /// Other ports the agent serves in the pod (admin, health), reached directly.
    pub agent_ports: Vec<u16>,
    /// Inbound destination ports that reach the pod's app directly.
    pub inbound_exclude_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_ports: Vec<u16>,
    /// Outbound destinations left alone.
    pub exclude_cidrs: Vec<Cidr>,
    /// How the agent's own sockets are recognised.
    pub agent: AgentSockets,
    /// Also program the IPv6 table.
    pub ipv6: bool,
    /// The agent's DNS listener in the pod (UDP and TCP on loopback): the pod's DNS
    /// queries are redirected to it. `None`: the pod's DNS is left alone.
    pub dns_port: Option<u16>,
}

impl PodRules {
    /// The default ports, no exclusion, IPv4 and IPv6.
    pub fn new(agent: AgentSockets) -> Self {
        PodRules {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            tunnel_port: DEFAULT_TUNNEL_PORT,
            agent_ports: Vec::new(),
            inbound_exclude_ports: Vec::new(),
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            agent,
            ipv6: true,
            dns_port: None,
        }
    }

    /// The ports inbound redirection leaves alone: the agent's listeners and
    /// other ports, then the configured exclusions, each once, in that order.
    pub fn inbound_exceptions(&self) -> Vec<u16> {
        let mut ports = vec![self.tunnel_port, self.inbound_port, self.outbound_port];
        ports.extend(&self.agent_ports);
        ports.extend(&self.inbound_exclude_ports);
        let mut seen = std::collections::HashSet::new();
        ports.retain(|p| seen.insert(*p));
        ports
    }

    /// The table config: the whole namespace outbound, every port but the
    /// exceptions inbound. Fails on ports that are 0 or listeners that share a
    /// port, naming the field.
    pub fn config(&self) -> Result<IptablesConfig, IptablesError> {
        for (field, port) in [
            ("outbound_port", self.outbound_port),
            ("inbound_port", self.inbound_port),
            ("tunnel_port", self.tunnel_port),
        ] {
            if port == 0 {
                return Err(invalid(field, 0, "port 0 cannot be listened on"));
            }
        }
        let listeners = [self.outbound_port, self.inbound_port, self.tunnel_port];
        let outbound = super::outbound_ports(self.outbound_port);
        if outbound.contains(&self.inbound_port)
            || outbound.contains(&self.tunnel_port)
            || self.inbound_port == self.tunnel_port
        {
            return Err(invalid(
                "outbound_port/inbound_port/tunnel_port",
                listeners,
                "the agent's listeners need their own ports, and the outbound one takes a range from its port up",
            ));
        }
        if self.agent_ports.contains(&0) {
            return Err(invalid("agent_ports", &self.agent_ports, "port 0 is not a destination port"));
        }
        let cfg = IptablesConfig {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            inbound: Inbound::AllExcept(self.inbound_exceptions()),
            agent: self.agent.clone(),
            exclude_uid: None,
            include_ports: Vec::new(),
            exclude_ports: self.exclude_ports.clone(),
            include_cidrs: Vec::new(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            cgroups: Vec::new(),
            cgroup_ports: Default::default(),
            ipv6: self.ipv6,
            dns_port: self.dns_port,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Installs (or replaces) `rules` in `netns`: idempotent, IPv4 and IPv6.
pub fn install(netns: &Netns, rules: &PodRules) -> Result<(), IptablesError> {
    super::install_in(netns, &rules.config()?)
}

/// Whether `netns` holds exactly `rules`; changes nothing.
pub fn check(netns: &Netns, rules: &PodRules) -> Result<Check, IptablesError> {
    super::check_in(netns, &rules.config()?)
}

/// Removes exactly what [`install`] added in `netns` (idempotent). A namespace
/// that no longer exists gives [`IptablesError::NetnsGone`].
pub fn uninstall(netns: &Netns, ipv6: bool) -> Result<(), IptablesError> {
    super::uninstall_in(netns, ipv6)
}

/// What [`cleanup`] did in one namespace.
#[derive(Debug)]
pub enum Cleaned {
    /// Our rules, if any were there, are gone.
    Removed,
    /// The namespace no longer exists, and its rules went with it.
    Gone,
}

/// Removes the pod rules from each namespace in `paths` (the agent's persisted
/// pods, or `mesh-agent cleanup --netns`): every namespace is attempted, and a
/// namespace that no longer exists counts as cleaned.
pub fn cleanup(paths: &[PathBuf], ipv6: bool) -> Vec<(PathBuf, Result<Cleaned, IptablesError>)> {
    paths
        .iter()
        .map(|path| {
            let result = match uninstall(&Netns::Path(path.clone()), ipv6) {
                Ok(()) => Ok(Cleaned::Removed),
                Err(IptablesError::NetnsGone { .. }) => Ok(Cleaned::Gone),
                Err(e) => Err(e),
            };
            (path.clone(), result)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::iptables::{Family, INBOUND_CHAIN, OUTPUT_CHAIN, render, rules::rules_of};

    fn rules() -> PodRules {
        PodRules {
            agent_ports: vec![15000, 15021],
            inbound_exclude_ports: vec![9090, 15021],
            exclude_ports: vec![22],
            exclude_cidrs: vec!["169.254.0.0/16".parse().unwrap()],
            ..PodRules::new(AgentSockets {
                cgroups: vec!["/kubepods/mesh-agent".into()],
                ..AgentSockets::mark_only(0x4d45)
            })
        }
    }

    #[test]
    fn pod_golden_v4() {
        let text = render(&rules().config().unwrap(), Family::V4);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/kubepods/mesh-agent" -j RETURN"#,
                "-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A MESH_OUTPUT -d 169.254.0.0/16 -j RETURN",
                // The whole namespace, every destination.
                "-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001-15004",
            ]
        );
        assert_eq!(
            rules_of(&text, INBOUND_CHAIN),
            [
                "-A MESH_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A MESH_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
                "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            ]
        );
        let v6 = render(&rules().config().unwrap(), Family::V6);
        assert!(v6.contains("-A MESH_OUTPUT -d ::1/128 -j RETURN"), "{v6}");
        assert!(!v6.contains("169.254"), "{v6}");
        assert_eq!(rules_of(&v6, INBOUND_CHAIN), rules_of(&text, INBOUND_CHAIN));
    }

    #[test]
    fn listeners_follow_their_configured_ports() {
        let moved = PodRules { outbound_port: 16001, inbound_port: 16006, tunnel_port: 16008, ..rules() };
        assert_eq!(moved.inbound_exceptions()[..3], [16008, 16006, 16001]);
        let text = render(&moved.config().unwrap(), Family::V4);
        assert!(text.contains("-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 16001-16004\n"), "{text}");
        assert!(text.contains("-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 16006\n"), "{text}");
        for default in ["15001", "15006", "15008"] {
            assert!(!text.contains(default), "{text}");
        }
    }

    #[test]
    fn bad_ports_are_named() {
        let cases = [
            (PodRules { tunnel_port: 0, ..rules() }, "tunnel_port = 0"),
            (PodRules { inbound_port: 15001, ..rules() }, "outbound_port/inbound_port/tunnel_port"),
            (PodRules { agent_ports: vec![0], ..rules() }, "agent_ports = [0]"),
            (PodRules { inbound_exclude_ports: vec![0], ..rules() }, "inbound_exclude_ports"),
            (PodRules { exclude_ports: vec![0], ..rules() }, "exclude_ports = [0]"),
            (PodRules { agent: AgentSockets::mark_only(0), ..rules() }, "mark = 0"),
        ];
        for (bad, needle) in cases {
            let err = bad.config().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not name {needle:?}");
        }
    }

    #[test]
    fn a_missing_namespace_is_named_and_cleanup_counts_it_cleaned() {
        let gone = PathBuf::from("/var/run/netns/mesh-test-no-such-pod");
        let err = install(&Netns::Path(gone.clone()), &rules()).unwrap_err();
        assert!(matches!(err, IptablesError::NetnsGone { .. }), "{err:?}");
        assert!(err.to_string().contains("mesh-test-no-such-pod"), "{err}");
        let cleaned = cleanup(std::slice::from_ref(&gone), true);
        assert!(matches!(cleaned[..], [(_, Ok(Cleaned::Gone))]), "{cleaned:?}");
    }

    #[test]
    fn a_path_that_is_not_a_network_namespace_is_refused() {
        for path in ["/proc/self/ns/mnt", "/proc/self/status"] {
            let err = check(&Netns::path(path), &rules()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, IptablesError::Netns { .. }), "{err:?}");
            assert!(msg.contains(path) && msg.contains("/proc/PID/ns/net"), "{msg}");
        }
    }
}
