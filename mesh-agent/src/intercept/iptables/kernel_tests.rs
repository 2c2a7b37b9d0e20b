//! Tests against the real kernel, each in a network namespace of its own: the
//! install transaction on live tables, redirection end to end, and a pod's rules
//! installed from outside its namespace.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::command::Tables;
use super::fixtures::{cidr, sample};
use super::pod::PodRules;
use super::rules::rules_of;
use super::*;
use crate::test_helpers::cgroup::Cgroup;
use crate::test_helpers::netns::{NetNs, two_hosts};
use crate::test_helpers::sockets::{
    Opener, accept_within, connect_in_child, connect_marked, listen_v6only, original_dst,
};
use crate::test_helpers::{have_root, sh};

/// `iptables-save -t nat` without its timestamps and counters.
fn save(family: Family) -> Vec<String> {
    let tables = Tables::from_env(family);
    let out = sh(&format!("{}-save", tables.iptables), &["-t", "nat"]);
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_owned(),
        })
        .collect()
}

fn ipt(family: Family, args: &[&str]) {
    sh(&Tables::from_env(family).iptables, args);
}

/// Rules somebody else owns, which must survive everything we do.
fn add_foreign_rules(family: Family) {
    ipt(family, &["-t", "nat", "-N", "OTHER"]);
    ipt(family, &["-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN"]);
    ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "OTHER"]);
    ipt(family, &["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "7", "-j", "OTHER"]);
    ipt(family, &["-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN"]);
}

/// The live table must be `before` plus exactly `cfg`'s rules, with one
/// jump to each of our chains, at the top.
fn assert_installed(family: Family, before: &[String], cfg: &IptablesConfig) {
    let now = save(family);
    let rendered = render(cfg, family);
    for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
        let live: Vec<&str> =
            now.iter().map(String::as_str).filter(|l| l.starts_with(&format!("-A {chain} "))).collect();
        assert_eq!(live, rules_of(&rendered, chain), "{family} {chain}");
        assert!(now.iter().any(|l| l.starts_with(&format!(":{chain} "))));
    }
    for (hook, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
        let hook_rules: Vec<&String> = now.iter().filter(|l| l.starts_with(&format!("-A {hook} "))).collect();
        let jumps = hook_rules.iter().filter(|l| l.ends_with(&format!("-j {chain}"))).count();
        assert_eq!(jumps, 1, "{family}: jumps from {hook}: {hook_rules:#?}");
        let jump = if hook == "OUTPUT" {
            format!("-A {hook} -j {chain}")
        } else {
            format!("-A {hook} -p tcp -j {chain}")
        };
        assert_eq!(hook_rules[0], &jump, "{family}: jump not first");
    }
    let others: Vec<&String> = now.iter().filter(|l| !l.contains("MESH_")).collect();
    let others_before: Vec<&String> = before.iter().filter(|l| !l.contains("MESH_")).collect();
    assert_eq!(others, others_before, "{family}: a rule that is not ours changed");
    assert!(is_installed(family).unwrap());
}

#[test]
fn install_replace_uninstall_restores_the_table_exactly() {
    if !have_root("install_replace_uninstall_restores_the_table_exactly") {
        return;
    }
    let ns = NetNs::new();
    ns.run(|| {
        let families = [Family::V4, Family::V6];
        for family in families {
            add_foreign_rules(family);
            assert!(!is_installed(family).unwrap());
        }
        let before: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();

        let a = sample();
        install(&a).unwrap();
        for (family, before) in families.iter().zip(&before) {
            assert_installed(*family, before, &a);
        }
        let after_first: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();

        // Again: nothing changes, in particular no second jump.
        install(&a).unwrap();
        let after_second: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();
        assert_eq!(after_first, after_second);

        // Another config replaces the rules.
        let b = IptablesConfig {
            outbound_port: 16001,
            inbound_port: 16006,
            inbound: Inbound::Ports(vec![]),
            agent: AgentSockets::mark_only(0x2a),
            exclude_uid: None,
            // More than one multiport rule's worth.
            include_ports: (8000..8020).collect(),
            exclude_ports: vec![53],
            include_cidrs: vec![],
            exclude_cidrs: vec![cidr("172.16.0.0/12"), cidr("fd12::/16")],
            cgroups: vec![],
            cgroup_ports: Default::default(),
            ipv6: true,
            // DNS rules as the kernel lists them back.
            dns_port: Some(15053),
        };
        install(&b).unwrap();
        for (family, before) in families.iter().zip(&before) {
            assert_installed(*family, before, &b);
            assert!(!save(*family).iter().any(|l| l.contains("15001") || l.contains("0x539")));
        }

        uninstall(true).unwrap();
        for (family, before) in families.iter().zip(&before) {
            assert_eq!(&save(*family), before, "{family}: table not restored");
            assert!(!is_installed(*family).unwrap());
        }
        uninstall(true).unwrap();
        for (family, before) in families.iter().zip(&before) {
            assert_eq!(&save(*family), before, "{family}: second uninstall changed the table");
        }
    });
}

#[test]
fn ipv6_off_removes_stale_ipv6_rules_and_leaves_v6_alone_otherwise() {
    if !have_root("ipv6_off_removes_stale_ipv6_rules_and_leaves_v6_alone_otherwise") {
        return;
    }
    let ns = NetNs::new();
    ns.run(|| {
        let before_v6 = save(Family::V6);
        let before_v4 = save(Family::V4);
        install(&sample()).unwrap();
        assert!(is_installed(Family::V6).unwrap());
        let v4_only = IptablesConfig { ipv6: false, ..sample() };
        install(&v4_only).unwrap();
        assert_eq!(save(Family::V6), before_v6);
        assert_installed(Family::V4, &before_v4, &v4_only);
        uninstall(false).unwrap();
        assert_eq!(save(Family::V4), before_v4);
    });
}

#[test]
fn uninstall_removes_duplicate_and_legacy_jumps_and_partial_installs() {
    if !have_root("uninstall_removes_duplicate_and_legacy_jumps_and_partial_installs") {
        return;
    }
    let ns = NetNs::new();
    ns.run(|| {
        for family in [Family::V4, Family::V6] {
            add_foreign_rules(family);
        }
        let before = [save(Family::V4), save(Family::V6)];
        install(&sample()).unwrap();
        for family in [Family::V4, Family::V6] {
            // What older or racing installers may have left.
            ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
            ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
            ipt(family, &["-t", "nat", "-A", "OUTPUT", "-j", OUTPUT_CHAIN]);
            ipt(
                family,
                &["-t", "nat", "-I", "PREROUTING", "2", "-p", "tcp", "--dport", "80", "-j", INBOUND_CHAIN],
            );
        }
        // A re-install does not add another jump on top of those.
        install(&sample()).unwrap();
        let jumps = save(Family::V4).iter().filter(|l| *l == "-A OUTPUT -j MESH_OUTPUT").count();
        assert_eq!(jumps, 2);
        uninstall(true).unwrap();
        assert_eq!(save(Family::V4), before[0]);
        assert_eq!(save(Family::V6), before[1]);

        // A partial install: only the outbound chain and its jump.
        for family in [Family::V4, Family::V6] {
            ipt(family, &["-t", "nat", "-N", OUTPUT_CHAIN]);
            ipt(family, &["-t", "nat", "-A", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"]);
            ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
            assert!(!is_installed(family).unwrap());
        }
        uninstall(true).unwrap();
        assert_eq!(save(Family::V4), before[0]);
        assert_eq!(save(Family::V6), before[1]);
    });
}

#[test]
fn redirect_works_end_to_end_and_spares_marked_sockets() {
    if !have_root("redirect_works_end_to_end_and_spares_marked_sockets") {
        return;
    }
    let (a, b) = two_hosts();
    let cfg = IptablesConfig {
        outbound_port: 15101,
        inbound_port: 15106,
        inbound: Inbound::Ports(vec![8080]),
        ..IptablesConfig::new(0x539)
    };
    let patience = Duration::from_secs(3);

    // The real destinations, in b.
    let (real4, real6) =
        b.run(|| (TcpListener::bind("10.99.0.2:80").unwrap(), TcpListener::bind("[fd99::2]:80").unwrap()));
    let (out4, out6, in4, in6) = a.run(|| {
        install(&cfg).unwrap();
        (
            TcpListener::bind(("127.0.0.1", cfg.outbound_port)).unwrap(),
            TcpListener::bind(("::1", cfg.outbound_port)).unwrap(),
            TcpListener::bind(("0.0.0.0", cfg.inbound_port)).unwrap(),
            listen_v6only(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, cfg.inbound_port, 0, 0)),
        )
    });

    for (dst, outbound, real) in [
        ("10.99.0.2:80".parse::<SocketAddr>().unwrap(), &out4, &real4),
        ("[fd99::2]:80".parse().unwrap(), &out6, &real6),
    ] {
        // A workload socket lands on the agent, which learns where it was going.
        let mut client = a.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
        let (mut accepted, peer) =
            accept_within(outbound, patience).unwrap_or_else(|| panic!("{dst}: not redirected"));
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(original_dst(&accepted), dst);
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert!(
            accept_within(real, Duration::from_millis(100)).is_none(),
            "{dst}: reached the real destination"
        );

        // The agent's own (marked) socket goes where it asked to.
        let _marked = a.run(|| connect_marked(dst, cfg.agent.mark)).unwrap();
        assert!(accept_within(real, patience).is_some(), "{dst}: marked connection did not arrive");
        assert!(
            accept_within(outbound, Duration::from_millis(100)).is_none(),
            "{dst}: marked connection was redirected"
        );
    }

    // Inbound: b connects to a's port 8080, a's inbound listener takes it.
    for (dst, inbound) in
        [("10.99.0.1:8080".parse::<SocketAddr>().unwrap(), &in4), ("[fd99::1]:8080".parse().unwrap(), &in6)]
    {
        let _client = b.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
        let (accepted, _) =
            accept_within(inbound, patience).unwrap_or_else(|| panic!("{dst}: not redirected inbound"));
        assert_eq!(original_dst(&accepted), dst);
    }
    // Ports not listed inbound are untouched: nothing listens on 8081.
    let refused = b.run(|| TcpStream::connect_timeout(&"10.99.0.1:8081".parse().unwrap(), patience));
    assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);

    a.run(|| uninstall(true)).unwrap();
    // With the rules gone, a workload connection reaches the destination.
    let _direct = a.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
    assert!(accept_within(&real4, patience).is_some());
}

#[test]
fn cgroup_mode_redirects_only_the_listed_cgroup() {
    if !have_root("cgroup_mode_redirects_only_the_listed_cgroup") {
        return;
    }
    let Some(cgroup) = Cgroup::create("cgroup_mode_redirects_only_the_listed_cgroup", "mesh-ipt-test") else {
        return;
    };
    let name = cgroup.relative.clone();

    let (a, b) = two_hosts();
    let cfg = IptablesConfig {
        outbound_port: 15201,
        cgroups: vec![name.clone()],
        include_cidrs: vec![cidr("10.99.0.0/24")],
        ipv6: false,
        ..IptablesConfig::new(0x539)
    };
    let patience = Duration::from_secs(3);
    let real = b.run(|| TcpListener::bind("10.99.0.2:80").unwrap());
    let outbound = a.run(|| {
        install(&cfg).unwrap();
        let live = save(Family::V4);
        let want = format!(
            "-A MESH_OUTPUT -d 10.99.0.0/24 -p tcp -m cgroup --path \"{name}\" -j REDIRECT --to-ports 15201-15204"
        );
        assert!(live.contains(&want), "{live:#?}");
        TcpListener::bind("127.0.0.1:15201").unwrap()
    });

    // This process is not in the cgroup: not redirected.
    let _direct = a.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
    assert!(accept_within(&real, patience).is_some());
    assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

    // A process that joins the cgroup before connecting is redirected.
    let procs = cgroup.dir.join("cgroup.procs");
    let script = format!(
        "echo $$ > {} && exec 3<>/dev/tcp/10.99.0.2/80 && read -r line <&3 && echo \"$line\"",
        procs.display()
    );
    let mut child =
        a.run(|| Command::new("bash").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap());
    let accepted = accept_within(&outbound, patience);
    let Some((mut accepted, _)) = accepted else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("connection from the cgroup was not redirected");
    };
    assert_eq!(original_dst(&accepted), "10.99.0.2:80".parse().unwrap());
    accepted.write_all(b"bye\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bye\n");

    a.run(|| uninstall(false)).unwrap();
}

const AGENT_GID: u32 = 4242;
const MARK: u32 = 0x4d45;

/// Pod rules whose agent is recognised by `cgroup` or by [`AGENT_GID`].
fn pod_rules(cgroup: &str) -> PodRules {
    PodRules {
        agent_ports: vec![15000],
        inbound_exclude_ports: vec![9090],
        ..PodRules::new(AgentSockets {
            cgroups: vec![cgroup.to_owned()],
            gid: Some(AGENT_GID),
            ..AgentSockets::mark_only(MARK)
        })
    }
}

#[test]
fn pod_rules_from_outside_capture_both_ways_and_spare_only_the_agent() {
    let test = "pod_rules_from_outside_capture_both_ways_and_spare_only_the_agent";
    if !have_root(test) {
        return;
    }
    let Some(cgroup) = Cgroup::create(test, "mesh-ipt-agent") else { return };
    let (pod, peer) = two_hosts();
    let pod_ns = Netns::Path(pod.path());
    let rules = pod_rules(&cgroup.relative);
    let patience = Duration::from_secs(3);
    let quiet = Duration::from_millis(100);
    let before = pod.run(|| [save(Family::V4), save(Family::V6)]);
    let ours_here = || save(Family::V4).into_iter().filter(|l| l.contains("MESH_")).count();
    let ours_here_before = ours_here();

    // From this thread, which stays in the host's namespace: twice, same tables.
    assert_eq!(pod::check(&pod_ns, &rules).unwrap(), Check::Absent);
    pod::install(&pod_ns, &rules).unwrap();
    let first = pod.run(|| [save(Family::V4), save(Family::V6)]);
    pod::install(&pod_ns, &rules).unwrap();
    assert_eq!(pod.run(|| [save(Family::V4), save(Family::V6)]), first);
    assert_eq!(pod::check(&pod_ns, &rules).unwrap(), Check::Installed);
    let cfg = rules.config().unwrap();
    pod.run(|| {
        for (family, before) in [Family::V4, Family::V6].into_iter().zip(&before) {
            assert_installed(family, before, &cfg);
        }
    });
    // The calling thread's namespace got nothing.
    assert_eq!(ours_here(), ours_here_before);

    // The agent's listeners and the pod's app, all inside the pod.
    let (out4, out6, in4, in6, tunnel, app) = pod.run(|| {
        (
            TcpListener::bind("127.0.0.1:15001").unwrap(),
            TcpListener::bind("[::1]:15001").unwrap(),
            TcpListener::bind("0.0.0.0:15006").unwrap(),
            listen_v6only(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 15006, 0, 0)),
            TcpListener::bind("0.0.0.0:15008").unwrap(),
            TcpListener::bind("0.0.0.0:9090").unwrap(),
        )
    });
    let (real4, real6) =
        peer.run(|| (TcpListener::bind("10.99.0.2:80").unwrap(), TcpListener::bind("[fd99::2]:80").unwrap()));

    for (dst, outbound, real) in [
        ("10.99.0.2:80".parse::<SocketAddr>().unwrap(), &out4, &real4),
        ("[fd99::2]:80".parse().unwrap(), &out6, &real6),
    ] {
        // A workload connection lands on the agent, which learns where it was going.
        let _client = pod.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
        let (accepted, _) =
            accept_within(outbound, patience).unwrap_or_else(|| panic!("{dst}: not redirected"));
        assert_eq!(original_dst(&accepted), dst);

        // A root workload that puts the agent's mark on its socket is still caught.
        let _forged = pod.run(|| connect_marked(dst, MARK)).unwrap();
        let (accepted, _) =
            accept_within(outbound, patience).unwrap_or_else(|| panic!("{dst}: the mark alone escaped"));
        assert_eq!(original_dst(&accepted), dst);
        assert!(accept_within(real, quiet).is_none(), "{dst}: a workload reached the destination");

        // The agent's own sockets, in its cgroup or with its gid, and marked, go
        // where they asked to: the agent's connections from inside the pod.
        for (who, opener) in [
            ("agent cgroup", Opener { mark: Some(MARK), cgroup: Some(&cgroup.dir), gid: None }),
            ("agent gid", Opener { mark: Some(MARK), cgroup: None, gid: Some(AGENT_GID) }),
        ] {
            pod.run(|| connect_in_child(dst, opener)).unwrap_or_else(|e| panic!("{dst} from {who}: {e}"));
            assert!(accept_within(real, patience).is_some(), "{dst}: {who} did not reach the destination");
            assert!(accept_within(outbound, quiet).is_none(), "{dst}: {who} was redirected");
        }
        // The agent's cgroup without the mark is a workload like any other.
        pod.run(|| connect_in_child(dst, Opener { mark: None, cgroup: Some(&cgroup.dir), gid: None }))
            .unwrap();
        assert!(
            accept_within(outbound, patience).is_some(),
            "{dst}: unmarked socket in the agent's cgroup escaped"
        );
    }

    // Inbound: every port goes to the inbound listener, except the agent's own
    // (the tunnel) and the excluded ones (9090), which are reached directly.
    for (dst, inbound) in
        [("10.99.0.1:8080".parse::<SocketAddr>().unwrap(), &in4), ("[fd99::1]:443".parse().unwrap(), &in6)]
    {
        let _client = peer.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
        let (accepted, _) =
            accept_within(inbound, patience).unwrap_or_else(|| panic!("{dst}: not redirected inbound"));
        assert_eq!(original_dst(&accepted), dst);
    }
    for (port, direct) in [(15008, &tunnel), (9090, &app)] {
        let dst: SocketAddr = format!("10.99.0.1:{port}").parse().unwrap();
        let _client = peer.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
        let (accepted, _) =
            accept_within(direct, patience).unwrap_or_else(|| panic!("{dst}: not reached directly"));
        assert_eq!(accepted.local_addr().unwrap(), dst);
        assert!(accept_within(&in4, quiet).is_none(), "{dst}: redirected inbound");
    }

    // Removal from outside takes exactly what was added, and again changes nothing.
    for _ in 0..2 {
        pod::uninstall(&pod_ns, true).unwrap();
        assert_eq!(pod.run(|| [save(Family::V4), save(Family::V6)]), before);
    }
    assert_eq!(pod::check(&pod_ns, &rules).unwrap(), Check::Absent);
    let _direct = pod.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
    assert!(accept_within(&real4, patience).is_some(), "not direct after uninstall");
}

#[test]
fn pod_rules_from_inside_are_those_from_outside_and_check_names_drift() {
    let test = "pod_rules_from_inside_are_those_from_outside_and_check_names_drift";
    if !have_root(test) {
        return;
    }
    let pod = NetNs::new();
    let pod_ns = Netns::Path(pod.path());
    let rules = pod_rules("/");
    pod::install(&pod_ns, &rules).unwrap();
    let from_outside = pod.run(|| [save(Family::V4), save(Family::V6)]);
    pod::uninstall(&pod_ns, true).unwrap();

    // An init container: the same call from inside, on its own namespace.
    pod.run(|| pod::install(&Netns::Current, &rules)).unwrap();
    assert_eq!(pod.run(|| [save(Family::V4), save(Family::V6)]), from_outside);
    assert!(pod.run(|| pod::check(&Netns::Current, &rules)).unwrap().is_installed());

    // Drift is named: a rule gone, a rule added, a second jump, another config.
    pod.run(|| {
        ipt(Family::V4, &["-t", "nat", "-D", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"]);
        ipt(Family::V6, &["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", "--dport", "22", "-j", "RETURN"]);
        ipt(Family::V6, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
    });
    let Check::Differs(differences) = pod::check(&pod_ns, &rules).unwrap() else { panic!("no drift found") };
    assert_eq!(
        differences,
        [
            "IPv4: missing `-A MESH_OUTPUT -o lo -j RETURN`",
            "IPv6: unexpected `-A MESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN`",
            "IPv6: 2 jumps from OUTPUT to MESH_OUTPUT",
        ]
    );
    let other = PodRules { tunnel_port: 16008, ..rules.clone() };
    assert!(matches!(pod::check(&pod_ns, &other).unwrap(), Check::Differs(_)));
    // IPv6 off expects nothing of ours there.
    let v4_only = PodRules { ipv6: false, ..rules.clone() };
    let Check::Differs(differences) = pod::check(&pod_ns, &v4_only).unwrap() else { panic!() };
    assert!(
        differences.iter().all(|d| d.starts_with("IPv4: missing") || d.contains("IPv6 is not intercepted")),
        "{differences:?}"
    );

    // Uninstall removes the drifted rules too.
    pod::uninstall(&pod_ns, true).unwrap();
    assert_eq!(pod::check(&pod_ns, &rules).unwrap(), Check::Absent);
    pod.run(|| {
        for family in [Family::V4, Family::V6] {
            assert!(!save(family).iter().any(|l| l.contains("MESH_")), "{family}");
        }
    });
}
