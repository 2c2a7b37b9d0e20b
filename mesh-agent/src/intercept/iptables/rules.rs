//! Rendering: an [`IptablesConfig`] becomes the `iptables-restore` input that
//! writes our two chains and the jumps to them. Pure text, no I/O, so every rule
//! can be checked without root.
//!
//! Rules are written in the exact form `iptables-save` prints them, so what
//! [`render`] returns can be compared line by line with the live table.

use super::{AgentSockets, Family, INBOUND_CHAIN, Inbound, IptablesConfig, OUTPUT_CHAIN};
use crate::cidr::Cidr;

/// `-m multiport` takes at most 15 ports per rule.
pub(super) const MULTIPORT_MAX: usize = 15;

/// Renders the `iptables-restore` input that installs `cfg` for `family` into
/// an untouched table: our two chains with their rules, and the jumps to them.
///
/// [`install`](super::install) feeds the same text, except that it leaves out each jump that is
/// already in place. Rules are in `iptables-save` form, one per line. The
/// config should have passed [`IptablesConfig::validate`]; this function never
/// fails, so the check lives in one place.
pub fn render(cfg: &IptablesConfig, family: Family) -> String {
    render_restore(cfg, family, Jumps { output: true, prerouting: true })
}

/// Which jumps a restore should add.
#[derive(Debug, Clone, Copy)]
pub(super) struct Jumps {
    pub(super) output: bool,
    pub(super) prerouting: bool,
}

/// The restore input for `cfg`, adding only the jumps `jumps` asks for.
pub(super) fn render_restore(cfg: &IptablesConfig, family: Family, jumps: Jumps) -> String {
    let mut lines =
        vec!["*nat".to_owned(), format!(":{OUTPUT_CHAIN} - [0:0]"), format!(":{INBOUND_CHAIN} - [0:0]")];
    lines.extend(output_rules(cfg, family).into_iter().map(|r| format!("-A {OUTPUT_CHAIN} {r}")));
    lines.extend(inbound_rules(cfg).into_iter().map(|r| format!("-A {INBOUND_CHAIN} {r}")));
    if jumps.output {
        lines.push(format!("-I {}", jump_spec("OUTPUT", OUTPUT_CHAIN).join(" ")));
    }
    if jumps.prerouting {
        lines.push(format!("-I {}", jump_spec("PREROUTING", INBOUND_CHAIN).join(" ")));
    }
    lines.push("COMMIT".to_owned());
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The lines of restore (or save) text that append to `chain`.
pub(crate) fn rules_of<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    text.lines().filter(|l| l.starts_with(&prefix)).collect()
}

/// The rule, after the chain name, that jumps from a built-in chain to ours:
/// outbound every protocol (the chain redirects DNS over UDP as well as TCP; its
/// other redirects match TCP themselves), inbound TCP only.
pub(super) fn jump_spec<'a>(hook: &'a str, chain: &'a str) -> Vec<&'a str> {
    if hook == "OUTPUT" { vec![hook, "-j", chain] } else { vec![hook, "-p", "tcp", "-j", chain] }
}

/// [`OUTPUT_CHAIN`]'s rules, without the `-A CHAIN` prefix: every exclusion
/// first, the agent's own sockets before anything else, then the redirects.
fn output_rules(cfg: &IptablesConfig, family: Family) -> Vec<String> {
    let mut rules = agent_rules(&cfg.agent);
    if let Some(uid) = cfg.exclude_uid {
        rules.push(format!("-m owner --uid-owner {uid} -j RETURN"));
    }
    // `-m cgroup --path` also matches descendants, and the first rule wins: deeper
    // cgroups first, so a workload nested in another keeps its own listener.
    let cgroups: Vec<Option<&str>> = if cfg.cgroups.is_empty() {
        vec![None]
    } else {
        let mut c: Vec<&str> = cfg.cgroups.iter().map(String::as_str).collect();
        c.sort_by_key(|p| (std::cmp::Reverse(p.matches('/').count()), *p));
        c.into_iter().map(Some).collect()
    };
    // DNS before the loopback exclusions: a resolver on loopback (127.0.0.53) is
    // where many hosts send it.
    if let Some(dns) = cfg.dns_port {
        for cgroup in &cgroups {
            for proto in ["udp", "tcp"] {
                let mut rule = format!("-p {proto} -m {proto} --dport 53 ");
                if let Some(path) = cgroup {
                    rule.push_str(&format!("-m cgroup --path \"{path}\" "));
                }
                rule.push_str(&format!("-j REDIRECT --to-ports {dns}"));
                rules.push(rule);
            }
        }
    }
    rules.push(format!("-d {} -j RETURN", family.loopback()));
    rules.push("-o lo -j RETURN".to_owned());
    rules.extend(cfg.exclude_ports.iter().map(|p| format!("-p tcp -m tcp --dport {p} -j RETURN")));
    rules.extend(
        cfg.exclude_cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
            .map(|c| format!("-d {c} -j RETURN")),
    );

    // An include list without this family's prefixes redirects nothing here.
    let destinations: Vec<Option<&Cidr>> = if cfg.include_cidrs.is_empty() {
        vec![None]
    } else {
        cfg.include_cidrs.iter().filter(|c| Family::of(&c.addr()) == family).map(Some).collect()
    };
    let port_sets: Vec<Option<String>> = if cfg.include_ports.is_empty() {
        vec![None]
    } else {
        cfg.include_ports
            .chunks(MULTIPORT_MAX)
            .map(|chunk| {
                let ports: Vec<String> = chunk.iter().map(u16::to_string).collect();
                Some(ports.join(","))
            })
            .collect()
    };
    for cgroup in &cgroups {
        for destination in &destinations {
            for ports in &port_sets {
                let mut rule = String::new();
                if let Some(cidr) = destination {
                    rule.push_str(&format!("-d {cidr} "));
                }
                rule.push_str("-p tcp ");
                if let Some(path) = cgroup {
                    rule.push_str(&format!("-m cgroup --path \"{path}\" "));
                }
                if let Some(ports) = ports {
                    rule.push_str(&format!("-m multiport --dports {ports} "));
                }
                // A `--workload`'s own listener is one port; the shared one a range.
                let to = match cgroup.and_then(|c| cfg.cgroup_ports.get(c)) {
                    Some(port) => port.to_string(),
                    None => outbound_to_ports(cfg.outbound_port),
                };
                rule.push_str(&format!("-j REDIRECT --to-ports {to}"));
                rules.push(rule);
            }
        }
    }
    rules
}

/// `--to-ports` for the shared outbound listener: its port range, as `iptables -S`
/// prints it back.
pub(super) fn outbound_to_ports(port: u16) -> String {
    let ports = super::outbound_ports(port);
    match ports.start() == ports.end() {
        true => port.to_string(),
        false => format!("{}-{}", ports.start(), ports.end()),
    }
}

/// The `RETURN`s for the agent's own sockets: the mark with each agent cgroup,
/// and the mark with the agent's uid/gid; the mark alone when neither is known.
fn agent_rules(agent: &AgentSockets) -> Vec<String> {
    let mark = format!("-m mark --mark {:#x}", agent.mark);
    if agent.cgroups.is_empty() && !agent.has_owner() {
        return vec![format!("{mark} -j RETURN")];
    }
    let mut rules: Vec<String> =
        agent.cgroups.iter().map(|path| format!("{mark} -m cgroup --path \"{path}\" -j RETURN")).collect();
    if agent.has_owner() {
        let mut rule = format!("{mark} -m owner");
        if let Some(uid) = agent.uid {
            rule.push_str(&format!(" --uid-owner {uid}"));
        }
        if let Some(gid) = agent.gid {
            rule.push_str(&format!(" --gid-owner {gid}"));
        }
        rule.push_str(" -j RETURN");
        rules.push(rule);
    }
    rules
}

/// [`INBOUND_CHAIN`]'s rules, without the `-A CHAIN` prefix.
fn inbound_rules(cfg: &IptablesConfig) -> Vec<String> {
    let redirect = format!("-j REDIRECT --to-ports {}", cfg.inbound_port);
    match &cfg.inbound {
        Inbound::Ports(ports) => {
            ports.iter().map(|p| format!("-p tcp -m tcp --dport {p} {redirect}")).collect()
        }
        Inbound::AllExcept(ports) => ports
            .iter()
            .map(|p| format!("-p tcp -m tcp --dport {p} -j RETURN"))
            .chain(std::iter::once(format!("-p tcp {redirect}")))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::intercept::iptables::fixtures::{cidr, sample};

    #[test]
    fn render_v4_golden() {
        let expected = "\
*nat
:MESH_OUTPUT - [0:0]
:MESH_INBOUND - [0:0]
-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN
-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN
-A MESH_OUTPUT -o lo -j RETURN
-A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN
-A MESH_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN
-A MESH_OUTPUT -d 10.1.0.0/16 -j RETURN
-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001-15004
-A MESH_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006
-A MESH_INBOUND -p tcp -m tcp --dport 9090 -j REDIRECT --to-ports 15006
-I OUTPUT -j MESH_OUTPUT
-I PREROUTING -p tcp -j MESH_INBOUND
COMMIT
";
        assert_eq!(render(&sample(), Family::V4), expected);
    }

    #[test]
    fn render_v6_uses_v6_loopback_and_only_v6_cidrs() {
        let text = render(&sample(), Family::V6);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN",
                "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -d ::1/128 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MESH_OUTPUT -d fd00::1/128 -j RETURN",
                "-A MESH_OUTPUT -d fd00::/64 -p tcp -j REDIRECT --to-ports 15001-15004",
            ]
        );
        assert!(!text.contains("10."), "IPv4 prefix in the IPv6 table:\n{text}");
        assert!(!text.contains("127.0.0.0/8"));
        let v4 = render(&sample(), Family::V4);
        assert!(!v4.contains("fd00"), "IPv6 prefix in the IPv4 table:\n{v4}");
        assert!(!v4.contains("::1"));
    }

    #[test]
    fn exclusions_come_before_every_redirect() {
        let mut cfg = sample();
        cfg.cgroups = vec!["/a".into(), "/b".into()];
        for family in [Family::V4, Family::V6] {
            let text = render(&cfg, family);
            let rules = rules_of(&text, OUTPUT_CHAIN);
            let first_redirect = rules.iter().position(|r| r.contains("REDIRECT")).unwrap();
            assert!(rules[..first_redirect].iter().all(|r| r.ends_with("-j RETURN")));
            assert!(rules[first_redirect..].iter().all(|r| r.contains("-j REDIRECT --to-ports 15001-15004")));
            // The agent's own traffic is matched before anything else.
            assert_eq!(rules[0], "-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN");
        }
    }

    #[test]
    fn minimal_config_redirects_everything_but_the_agent_and_loopback() {
        let mut cfg = IptablesConfig::new(7);
        cfg.inbound = Inbound::Ports(vec![]);
        let text = render(&cfg, Family::V4);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-A MESH_OUTPUT -m mark --mark 0x7 -j RETURN",
                "-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001-15004",
            ]
        );
        assert!(!text.contains("--uid-owner"));
        // The inbound chain and both jumps exist even with nothing inbound.
        assert!(text.contains(":MESH_INBOUND - [0:0]\n"));
        assert!(rules_of(&text, INBOUND_CHAIN).is_empty());
        assert!(text.contains("\n-I OUTPUT -j MESH_OUTPUT\n"));
        assert!(text.contains("\n-I PREROUTING -p tcp -j MESH_INBOUND\n"));
        assert!(text.starts_with("*nat\n") && text.ends_with("\nCOMMIT\n"));
    }

    #[test]
    fn cgroup_by_include_cidr_matrix() {
        let mut cfg = IptablesConfig::new(0x539);
        cfg.cgroups = vec!["/mesh/wl1".into(), "/mesh/wl2".into()];
        cfg.include_cidrs = vec![cidr("10.0.0.0/8"), cidr("fd00::/8"), cidr("192.168.0.0/16")];
        let text = render(&cfg, Family::V4);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                r#"-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001-15004"#,
                r#"-A MESH_OUTPUT -d 192.168.0.0/16 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001-15004"#,
                r#"-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001-15004"#,
                r#"-A MESH_OUTPUT -d 192.168.0.0/16 -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001-15004"#,
            ]
        );

        // Cgroups without includes: one redirect per cgroup, no -d.
        cfg.include_cidrs.clear();
        let text = render(&cfg, Family::V6);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                r#"-A MESH_OUTPUT -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001-15004"#,
                r#"-A MESH_OUTPUT -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001-15004"#,
            ]
        );
    }

    #[test]
    fn include_list_without_the_family_redirects_nothing_in_it() {
        let mut cfg = IptablesConfig::new(1);
        cfg.include_cidrs = vec![cidr("10.0.0.0/8")];
        let v6 = render(&cfg, Family::V6);
        assert!(!v6.contains("REDIRECT"), "an IPv4-only include list redirected IPv6:\n{v6}");
        // The exclusions are still there, harmless.
        assert!(v6.contains("-A MESH_OUTPUT -d ::1/128 -j RETURN"));
        assert!(render(&cfg, Family::V4).contains("-d 10.0.0.0/8 -p tcp -j REDIRECT"));
    }

    #[test]
    fn dns_goes_to_the_dns_listener_per_cgroup_before_the_loopback_exclusions() {
        let mut cfg = IptablesConfig::new(0x539);
        cfg.dns_port = Some(15053);
        let text = render(&cfg, Family::V4);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN",
                "-A MESH_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001-15004",
            ]
        );
        // The jump takes every protocol, so UDP reaches the chain.
        assert!(text.contains("\n-I OUTPUT -j MESH_OUTPUT\n"), "{text}");
        assert!(text.contains("\n-I PREROUTING -p tcp -j MESH_INBOUND\n"), "{text}");
        cfg.cgroups = vec!["/mesh/wl1".into()];
        let text = render(&cfg, Family::V6);
        let dns: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("--dport 53")).collect();
        assert_eq!(
            dns,
            [
                r#"-A MESH_OUTPUT -p udp -m udp --dport 53 -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15053"#,
                r#"-A MESH_OUTPUT -p tcp -m tcp --dport 53 -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15053"#,
            ]
        );
    }

    #[test]
    fn inbound_ports_redirect_to_the_inbound_listener() {
        let mut cfg = IptablesConfig::new(1);
        cfg.inbound_port = 16000;
        cfg.inbound = Inbound::Ports(vec![80, 443]);
        for family in [Family::V4, Family::V6] {
            let text = render(&cfg, family);
            assert_eq!(
                rules_of(&text, INBOUND_CHAIN),
                [
                    "-A MESH_INBOUND -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 16000",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 16000",
                ]
            );
        }
    }

    #[test]
    fn include_ports_go_into_every_redirect_fifteen_at_a_time() {
        let mut cfg = IptablesConfig::new(1);
        cfg.include_cidrs = vec![cidr("10.0.0.0/8")];
        cfg.include_ports = (1..=16).collect();
        let text = render(&cfg, Family::V4);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                "-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports \
                 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j REDIRECT --to-ports 15001-15004",
                "-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports 16 -j REDIRECT --to-ports 15001-15004",
            ]
        );
    }

    #[test]
    fn restore_without_missing_jumps_only_rewrites_our_chains() {
        let text = render_restore(&sample(), Family::V4, Jumps { output: false, prerouting: true });
        assert!(!text.contains("-I OUTPUT"));
        assert!(text.contains("-I PREROUTING -p tcp -j MESH_INBOUND"));
        let text = render_restore(&sample(), Family::V4, Jumps { output: false, prerouting: false });
        assert!(!text.contains("-I "));
        // Nothing outside our chains is ever appended to.
        for line in text.lines().filter(|l| l.starts_with('-')) {
            assert!(line.starts_with("-A MESH_"), "{line}");
        }
    }

    #[test]
    fn agent_sockets_are_the_mark_with_their_cgroup_or_owner() {
        let mut cfg = IptablesConfig::new(0x4d45);
        cfg.agent = AgentSockets {
            mark: 0x4d45,
            cgroups: vec!["/system.slice/mesh-agent.service".into(), "/mesh/next-agent".into()],
            uid: Some(1337),
            gid: Some(1338),
        };
        for family in [Family::V4, Family::V6] {
            let text = render(&cfg, family);
            assert_eq!(
                rules_of(&text, OUTPUT_CHAIN)[..4],
                [
                    r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/system.slice/mesh-agent.service" -j RETURN"#,
                    r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/mesh/next-agent" -j RETURN"#,
                    "-A MESH_OUTPUT -m mark --mark 0x4d45 -m owner --uid-owner 1337 --gid-owner 1338 -j RETURN",
                    &format!("-A MESH_OUTPUT -d {} -j RETURN", family.loopback()),
                ]
            );
            // The mark is never matched on its own: a workload can set it.
            assert!(!text.contains("--mark 0x4d45 -j RETURN"), "{text}");
        }
        cfg.agent = AgentSockets { gid: Some(7), ..AgentSockets::mark_only(0x4d45) };
        let text = render(&cfg, Family::V4);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN)[0],
            "-A MESH_OUTPUT -m mark --mark 0x4d45 -m owner --gid-owner 7 -j RETURN"
        );
        assert_eq!(rules_of(&text, OUTPUT_CHAIN)[1], "-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN");
    }

    #[test]
    fn inbound_all_except_redirects_every_other_port() {
        let mut cfg = IptablesConfig::new(1);
        cfg.inbound = Inbound::AllExcept(vec![15008, 15000]);
        for family in [Family::V4, Family::V6] {
            assert_eq!(
                rules_of(&render(&cfg, family), INBOUND_CHAIN),
                [
                    "-A MESH_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                    "-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                ]
            );
        }
        // With no exception, everything.
        cfg.inbound = Inbound::AllExcept(vec![]);
        let text = render(&cfg, Family::V4);
        assert_eq!(rules_of(&text, INBOUND_CHAIN), ["-A MESH_INBOUND -p tcp -j REDIRECT --to-ports 15006"]);
    }

    fn any_cidr() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Cidr::new_truncating(IpAddr::V4(a.into()), p)),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| Cidr::new_truncating(IpAddr::V6(a.into()), p)),
        ]
    }

    fn any_cgroup() -> impl Strategy<Value = String> {
        "/[a-z0-9._@-]{0,12}(/[a-z0-9._-]{1,8}){0,2}"
    }

    fn any_agent() -> impl Strategy<Value = AgentSockets> {
        (
            1u32..,
            proptest::collection::vec(any_cgroup(), 0..3),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(mark, cgroups, uid, gid)| AgentSockets { mark, cgroups, uid, gid })
    }

    fn any_config() -> impl Strategy<Value = IptablesConfig> {
        let ports = || proptest::collection::vec(1u16.., 0..20);
        let cidrs = || proptest::collection::vec(any_cidr(), 0..4);
        let inbound = prop_oneof![ports().prop_map(Inbound::Ports), ports().prop_map(Inbound::AllExcept)];
        (
            (1u16.., 1u16.., inbound, any_agent(), proptest::option::of(any::<u32>())),
            (ports(), ports(), cidrs(), cidrs()),
            (proptest::collection::vec(any_cgroup(), 0..3), any::<bool>()),
        )
            .prop_map(
                |(
                    (outbound_port, inbound_port, inbound, agent, exclude_uid),
                    (include_ports, exclude_ports, include_cidrs, exclude_cidrs),
                    (cgroups, ipv6),
                )| IptablesConfig {
                    outbound_port,
                    inbound_port,
                    inbound,
                    agent,
                    exclude_uid,
                    include_ports,
                    exclude_ports,
                    include_cidrs,
                    exclude_cidrs,
                    cgroups,
                    cgroup_ports: Default::default(),
                    ipv6,
                    dns_port: None,
                },
            )
    }

    proptest! {
        /// Whatever the config: valid, the agent's sockets first and always by
        /// their mark, every exclusion before every redirect, only the family's
        /// addresses, one redirect per combination, and every inbound port
        /// either redirected or left alone.
        #[test]
        fn render_invariants(cfg in any_config()) {
            prop_assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
            for family in [Family::V4, Family::V6] {
                let text = render(&cfg, family);
                let rules = rules_of(&text, OUTPUT_CHAIN);
                let first_redirect = rules.iter().position(|r| r.contains("REDIRECT")).unwrap_or(rules.len());
                prop_assert!(rules[..first_redirect].iter().all(|r| r.ends_with("-j RETURN")));
                let redirect = format!("-j REDIRECT --to-ports {}", outbound_to_ports(cfg.outbound_port));
                prop_assert!(rules[first_redirect..].iter().all(|r| r.ends_with(&redirect)));
                let agent_rules = cfg.agent.cgroups.len()
                    + usize::from(cfg.agent.uid.is_some() || cfg.agent.gid.is_some());
                let mark = format!("-A MESH_OUTPUT -m mark --mark {:#x} ", cfg.agent.mark);
                for rule in &rules[..agent_rules.max(1)] {
                    prop_assert!(rule.starts_with(&mark), "{}", rule);
                }
                prop_assert!(!rules[agent_rules.max(1)..].iter().any(|r| r.contains("--mark")));

                let in_family = |c: &&Cidr| Family::of(&c.addr()) == family;
                let destinations = if cfg.include_cidrs.is_empty() { 1 } else { cfg.include_cidrs.iter().filter(in_family).count() };
                let cgroups = cfg.cgroups.len().max(1);
                let port_sets = cfg.include_ports.len().div_ceil(MULTIPORT_MAX).max(1);
                prop_assert_eq!(rules.len() - first_redirect, cgroups * destinations * port_sets);

                for rule in &rules {
                    let tokens: Vec<&str> = rule.split(' ').collect();
                    for pair in tokens.windows(2).filter(|w| w[0] == "-d") {
                        let c: Cidr = pair[1].parse().unwrap();
                        prop_assert_eq!(Family::of(&c.addr()), family, "{}", rule);
                    }
                }
                let inbound = rules_of(&text, INBOUND_CHAIN);
                let to_listener = format!("-j REDIRECT --to-ports {}", cfg.inbound_port);
                match &cfg.inbound {
                    Inbound::Ports(ports) => {
                        prop_assert_eq!(inbound.len(), ports.len());
                        prop_assert!(inbound.iter().all(|r| r.ends_with(&to_listener)));
                    }
                    Inbound::AllExcept(ports) => {
                        prop_assert_eq!(inbound.len(), ports.len() + 1);
                        prop_assert!(inbound[..ports.len()].iter().all(|r| r.ends_with("-j RETURN")));
                        prop_assert_eq!(inbound[ports.len()], format!("-A MESH_INBOUND -p tcp {to_listener}"));
                    }
                }
                prop_assert_eq!(text.lines().filter(|l| l.starts_with("-I ")).count(), 2);
                prop_assert_eq!(text.lines().filter(|l| l.starts_with('*')).count(), 1);
            }
        }
    }
}
