//! How the agent picks its interception mode, what it says when it cannot, and the
//! iptables-only flows: the pod init container, inbound redirection, and a pod's
//! own rules installed from the node or from inside the pod.

use std::{
    process::{Command, Output},
    time::Duration,
};

use mesh_tests::{Agent, AgentOptions, Cgroup, Lab, bins, eventually, require_root, servers};

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `setpriv` arguments that remove capabilities from the bounding set (and so from
/// the agent's effective set, even as root).
fn drop_caps(caps: &[&str]) -> Vec<String> {
    let list: Vec<String> = caps.iter().map(|c| format!("-{c}")).collect();
    vec!["--bounding-set".into(), list.join(","), "--inh-caps".into(), list.join(","), "--".into()]
}

#[test]
fn auto_mode_picks_ebpf_when_allowed_and_says_why() {
    if !require_root("auto_mode_picks_ebpf_when_allowed_and_says_why") {
        return;
    }
    let lab = Lab::new(&["client"]).unwrap();
    let wl = Cgroup::new("wl").unwrap();
    let agent = Agent::start(lab.host("client"), AgentOptions::new("auto").cgroup(&wl)).unwrap();
    assert_eq!(agent.mode(), "ebpf");
    let rec = agent.find(|v| v["message"] == "interception mode selected").unwrap();
    assert!(rec["reason"].as_str().unwrap().contains("auto"), "{rec}");
}

#[test]
fn ebpf_mode_without_cap_bpf_names_the_capability() {
    if !require_root("ebpf_mode_without_cap_bpf_names_the_capability") {
        return;
    }
    let lab = Lab::new(&["client"]).unwrap();
    let mut cmd = lab.host("client").command("setpriv", None).unwrap();
    cmd.args(drop_caps(&["bpf"])).arg(bins::agent()).args(["run", "--mode", "ebpf"]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("CAP_BPF"), "{t}");
    assert!(t.contains("--cap-add BPF") && t.contains("--mode iptables"), "says how to fix it: {t}");
}

#[test]
fn auto_mode_falls_back_to_iptables_without_cap_bpf() {
    if !require_root("auto_mode_falls_back_to_iptables_without_cap_bpf") {
        return;
    }
    let lab = Lab::new(&["client", "server"]).unwrap();
    let wl = Cgroup::new("wl").unwrap();
    let _http = servers::http(lab.host("server"), 8080, "s1").unwrap();
    let mut opts = AgentOptions::new("auto").cgroup(&wl);
    opts.wrapper = Some(["setpriv".to_owned()].into_iter().chain(drop_caps(&["bpf"])).collect());
    let agent = Agent::start(lab.host("client"), opts).unwrap();
    assert_eq!(agent.mode(), "iptables");
    let rec = agent.find(|v| v["message"] == "interception mode selected").unwrap();
    assert!(rec["reason"].as_str().unwrap().contains("CAP_BPF"), "fallback says why: {rec}");

    // And the fallback actually intercepts.
    let dst = lab.host("server").v4_addr(8080);
    let out = run(lab.host("client").command("curl", Some(wl.absolute())).unwrap().args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{dst}/fallback"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "server=s1 HTTP/1.1 GET /fallback");
    assert_eq!(agent.wait_conn(dst)["mode"], "iptables");
}

#[test]
fn no_mode_usable_is_one_clear_error() {
    if !require_root("no_mode_usable_is_one_clear_error") {
        return;
    }
    let lab = Lab::new(&["client"]).unwrap();
    let mut cmd = lab.host("client").command("setpriv", None).unwrap();
    cmd.args(drop_caps(&["bpf", "net_admin"])).arg(bins::agent()).args(["run", "--mode", "auto"]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("no interception mode is usable"), "{t}");
    assert!(t.contains("CAP_BPF") && t.contains("CAP_NET_ADMIN"), "{t}");
}

#[test]
fn invalid_flag_is_named() {
    // No privilege needed: validation happens before anything is touched.
    let out = run(Command::new(bins::agent()).args(["run", "--inbound-port", "15001"]));
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("--inbound-port") && t.contains("MESH_INBOUND_PORT"), "{t}");
    let out = run(Command::new(bins::agent()).args(["run", "--exclude-cidrs", "10.0.0.1/8"]));
    assert!(text(&out).contains("--exclude-cidrs"), "{}", text(&out));
}

/// The pod-level fallback: an init container with only CAP_NET_ADMIN installs the
/// rules for the whole namespace; the agent runs beside the app without touching them.
#[test]
fn init_container_install_then_agent_then_uninstall() {
    if !require_root("init_container_install_then_agent_then_uninstall") {
        return;
    }
    let lab = Lab::new(&["pod", "server"]).unwrap();
    let _http = servers::http(lab.host("server"), 8080, "s1").unwrap();
    let pod = lab.host("pod");

    // Only CAP_NET_ADMIN (and what iptables needs to run as root with it): drop BPF
    // and SYS_ADMIN to show they are not required.
    let mut install = pod.command("setpriv", None).unwrap();
    install
        .args(drop_caps(&["bpf", "sys_admin", "perfmon"]))
        .arg(bins::agent())
        .args(["iptables", "install"]);
    let out = run(&mut install);
    assert!(out.status.success(), "{}", text(&out));

    let opts = AgentOptions::new("iptables").arg("--iptables-external");
    let agent = Agent::start(pod, opts).unwrap();
    // No cgroup given: every process in the pod's namespace is intercepted.
    let app = Cgroup::new("app").unwrap();
    let dst = lab.host("server").v4_addr(8080);
    let out = run(pod.command("curl", Some(app.absolute())).unwrap().args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{dst}/pod"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "server=s1 HTTP/1.1 GET /pod");
    agent.wait_conn(dst);

    // The agent leaves rules it did not install.
    assert!(agent.terminate().unwrap().success());
    let save = run(pod.command("iptables-save", None).unwrap().args(["-t", "nat"]));
    assert!(text(&save).contains("MESH_OUTPUT"));

    let out = run(pod.command(bins::agent(), None).unwrap().args(["iptables", "uninstall"]));
    assert!(out.status.success(), "{}", text(&out));
    for bin in ["iptables-save", "ip6tables-save"] {
        let save = run(pod.command(bin, None).unwrap().args(["-t", "nat"]));
        assert!(!text(&save).contains("MESH_"), "{bin}: {}", text(&save));
    }
}

/// iptables mode redirects connections arriving for configured ports to the inbound
/// listener, which forwards them to the local workload.
#[test]
fn iptables_inbound_redirect_reaches_local_workload() {
    if !require_root("iptables_inbound_redirect_reaches_local_workload") {
        return;
    }
    let lab = Lab::new(&["client", "server"]).unwrap();
    let server = lab.host("server");
    let _http = servers::http(server, 8080, "s1").unwrap();
    let wl = Cgroup::new("wl").unwrap();
    let opts = AgentOptions::new("iptables").cgroup(&wl).arg("--inbound-ports").arg("8080");
    let agent = Agent::start(server, opts).unwrap();

    let dst = server.v4_addr(8080);
    let out = run(lab.host("client").command("curl", None).unwrap().args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{dst}/in"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "server=s1 HTTP/1.1 GET /in");
    let rec = agent.wait_conn(dst);
    assert_eq!(rec["direction"], "inbound", "{rec}");
    assert_eq!(rec["protocol"], "http1", "{rec}");
}

/// A workload on `host` (its own cgroup, root) asks `dst` which peer it saw, with
/// `extra` probe flags: true when the connection went through an agent (the
/// server saw another socket than the workload's own).
fn intercepted(host: &mesh_tests::Host, dst: std::net::SocketAddr, extra: &[&str]) -> bool {
    let app = Cgroup::new("app").unwrap();
    let mut cmd = host.command(bins::probe(), Some(app.absolute())).unwrap();
    cmd.args(["--connect", &dst.to_string()]).args(extra).arg("whoami");
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    v["server_saw"] != v["local"]
}

/// A pod served in its own network namespace, its rules installed from the node
/// (`iptables pod install --netns`): the pod's outbound TCP goes through the agent
/// (a root workload with the agent's mark too), inbound TCP to any port of the pod
/// goes through the agent, and `cleanup --netns` removes exactly what was added.
/// The agent runs inside the pod as a stand-in for the in-pod listeners.
#[test]
fn pod_rules_from_the_node_capture_the_pod_and_cleanup_removes_them() {
    if !require_root("pod_rules_from_the_node_capture_the_pod_and_cleanup_removes_them") {
        return;
    }
    let lab = Lab::new(&["node", "pod", "server"]).unwrap();
    let (node, pod, server) = (lab.host("node"), lab.host("pod"), lab.host("server"));
    let _remote = servers::whoami(server, 7001).unwrap();
    let _app = servers::http(pod, 8080, "app").unwrap();
    let before = pod.nat_tables().unwrap();

    let agent_cgroup = Cgroup::new("agent").unwrap();
    let opts = AgentOptions {
        in_cgroup: Some(agent_cgroup.relative().to_owned()),
        // The agent binds its inbound listener for the rules installed below.
        ..AgentOptions::new("iptables").arg("--iptables-external").arg("--inbound-ports").arg("8080")
    };
    let agent = Agent::start(pod, opts).unwrap();

    // From the node's namespace, into the pod's by path.
    let netns = pod.ns.path();
    let pod_rules = ["--netns", netns.as_str(), "--agent-cgroup", agent_cgroup.relative()];
    let on_node = |args: &[&str]| run(node.command(bins::agent(), None).unwrap().args(args));
    for _ in 0..2 {
        let out = on_node(&[&["iptables", "pod", "install"][..], &pod_rules[..]].concat());
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(!node.nat_tables().unwrap().contains("MESH_"), "rules landed in the node's namespace");
    let check = on_node(&[&["iptables", "pod", "check"][..], &pod_rules[..]].concat());
    assert!(check.status.success() && text(&check).contains("installed"), "{}", text(&check));

    let dst = server.v4_addr(7001);
    assert!(intercepted(pod, dst, &[]), "outbound not intercepted");
    assert!(intercepted(pod, server.v6_addr(7001), &[]), "IPv6 outbound not intercepted");
    assert!(intercepted(pod, dst, &["--mark", "0x4d45"]), "a workload with the agent's mark escaped");
    agent.wait_conn(dst);

    // Inbound: a client on another host reaches the pod's app through the agent.
    let app = pod.v4_addr(8080);
    let out = run(server.command("curl", None).unwrap().args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{app}/in"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "server=app HTTP/1.1 GET /in", "{}", text(&out));
    assert_eq!(agent.wait_conn(app)["direction"], "inbound");

    // Cleanup from the node, twice: the pod's tables are as they were.
    for _ in 0..2 {
        let out = on_node(&["cleanup", "--netns", &netns]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("pod rules removed"), "{}", text(&out));
        assert_eq!(pod.nat_tables().unwrap(), before);
    }
    let check = on_node(&[&["iptables", "pod", "check"][..], &pod_rules[..]].concat());
    assert!(!check.status.success() && text(&check).contains("absent"), "{}", text(&check));
    assert!(!intercepted(pod, dst, &[]), "still intercepted after cleanup");
    let gone = on_node(&["cleanup", "--netns", "/var/run/netns/mesh-test-no-such-pod"]);
    assert!(gone.status.success() && text(&gone).contains("namespace gone"), "{}", text(&gone));
}

/// A pod's init container installs the pod rules from inside the pod with only
/// CAP_NET_ADMIN, naming the gid the agent (a sidecar) runs as: the agent's own
/// connections pass, a root workload that sets the agent's mark does not.
#[test]
fn init_container_pod_rules_tell_the_agent_by_its_gid() {
    if !require_root("init_container_pod_rules_tell_the_agent_by_its_gid") {
        return;
    }
    const AGENT_GID: &str = "1337";
    let lab = Lab::new(&["pod", "server"]).unwrap();
    let (pod, server) = (lab.host("pod"), lab.host("server"));
    let _remote = servers::whoami(server, 7001).unwrap();

    let mut install = pod.command("setpriv", None).unwrap();
    install.args(drop_caps(&["bpf", "sys_admin", "perfmon"])).arg(bins::agent()).args([
        "iptables",
        "pod",
        "install",
        "--agent-gid",
        AGENT_GID,
    ]);
    let out = run(&mut install);
    assert!(out.status.success(), "{}", text(&out));

    // The sidecar: root, in the agent's group (it keeps its capabilities).
    let mut opts = AgentOptions::new("iptables").arg("--iptables-external");
    opts.wrapper = Some(["setpriv", "--regid", AGENT_GID, "--clear-groups"].map(str::to_owned).to_vec());
    let agent = Agent::start(pod, opts).unwrap();

    let dst = server.v4_addr(7001);
    assert!(intercepted(pod, dst, &[]), "outbound not intercepted");
    assert!(intercepted(pod, dst, &["--mark", "0x4d45"]), "a workload with the agent's mark escaped");
    // Both went out through the agent, whose own upstream connections were not
    // sent back into itself.
    let records = eventually(Duration::from_secs(10), "a record of both connections", || {
        let records =
            agent.find_all(|v| v["message"] == "connection closed" && v["orig_dst"] == dst.to_string());
        (records.len() == 2).then_some(records)
    });
    assert!(records.iter().all(|r| r["error"].is_null()), "{records:?}");
    assert!(agent.find(|v| v["message"].as_str().unwrap_or_default().contains("refusing to loop")).is_none());
}
