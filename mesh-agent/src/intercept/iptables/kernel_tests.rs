//! Tests against the real kernel, each in a network namespace of its own: the
//! install transaction on live tables, and redirection end to end.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::command::Tables;
use super::fixtures::{cidr, rules_of, sample};
use super::*;
use crate::test_helpers::cgroup::{Cgroup, cgroup2_root};
use crate::test_helpers::netns::{NetNs, two_hosts};
use crate::test_helpers::sockets::{accept_within, connect_marked, listen_v6only, original_dst};
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
        assert_eq!(hook_rules[0], &format!("-A {hook} -p tcp -j {chain}"), "{family}: jump not first");
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
            inbound_ports: vec![],
            mark: 0x2a,
            exclude_uid: None,
            // More than one multiport rule's worth.
            include_ports: (8000..8020).collect(),
            exclude_ports: vec![53],
            include_cidrs: vec![],
            exclude_cidrs: vec![cidr("172.16.0.0/12"), cidr("fd12::/16")],
            cgroups: vec![],
            ipv6: true,
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
        let jumps =
            save(Family::V4).iter().filter(|l| l.starts_with("-A OUTPUT -p tcp -j MESH_OUTPUT")).count();
        assert_eq!(jumps, 3);
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
        inbound_ports: vec![8080],
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
        let _marked = a.run(|| connect_marked(dst, cfg.mark)).unwrap();
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
    let Some(root) = cgroup2_root() else {
        eprintln!("\n*** SKIPPED: cgroup_mode_redirects_only_the_listed_cgroup: no cgroup2 mount ***\n");
        return;
    };
    let name = format!("/mesh-ipt-test-{}", std::process::id());
    let cgroup = Cgroup(root.join(&name[1..]));
    std::fs::create_dir(&cgroup.0).unwrap();

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
            "-A MESH_OUTPUT -d 10.99.0.0/24 -p tcp -m cgroup --path \"{name}\" -j REDIRECT --to-ports 15201"
        );
        assert!(live.contains(&want), "{live:#?}");
        TcpListener::bind("127.0.0.1:15201").unwrap()
    });

    // This process is not in the cgroup: not redirected.
    let _direct = a.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
    assert!(accept_within(&real, patience).is_some());
    assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

    // A process that joins the cgroup before connecting is redirected.
    let procs = cgroup.0.join("cgroup.procs");
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
