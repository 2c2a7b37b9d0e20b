//! How the agent picks its interception mode, what it says when it cannot, and the
//! iptables-only flows: the pod init container and inbound redirection.

use std::process::{Command, Output};

use mesh_tests::{Agent, AgentOptions, Cgroup, Lab, bins, require_root, servers};

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
