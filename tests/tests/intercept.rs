//! End to end: a workload process in an enrolled cgroup on host `client` connects to
//! servers on host `server`; the real agent intercepts (eBPF or iptables), recovers
//! the original destination, classifies the protocol and forwards. Every scenario runs
//! in both modes.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    time::Duration,
};

use mesh_tests::{
    Agent, AgentOptions, Cgroup, Lab, MeshLab, Pins, agent::message, bins, eventually, servers,
};
use serde_json::Value;

const HTTP: u16 = 8080;
const HTTPS: u16 = 8443;
const ECHO: u16 = 7000;
const WHOAMI: u16 = 7001;
const BANNER: u16 = 7002;
const RECORD: u16 = 7003;
/// In the agent's default opaque (server-first) port list.
const MYSQL: u16 = 3306;

/// A client host with a workload cgroup, a server host, and an agent on the client.
struct Setup {
    lab: Lab,
    workload: Cgroup,
    agent: Agent,
}

impl Setup {
    fn new(mode: &str, extra: &[&str]) -> Self {
        let lab = Lab::new(&["client", "server"]).expect("lab");
        let workload = Cgroup::new("wl").expect("cgroup");
        let mut opts = AgentOptions::new(mode).cgroup(&workload);
        for a in extra {
            opts = opts.arg(*a);
        }
        let agent = Agent::start(lab.host("client"), opts).expect("agent starts");
        assert_eq!(agent.mode(), mode, "agent runs in the requested mode");
        Self { lab, workload, agent }
    }

    fn server(&self) -> &mesh_tests::Host {
        self.lab.host("server")
    }

    /// Runs a command as a workload (client host, enrolled cgroup).
    fn workload(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        run(self.lab.host("client").command(program, Some(self.workload.absolute())).unwrap().args(args))
    }

    fn probe(&self, dst: SocketAddr, args: &[&str]) -> Value {
        let mut full = vec!["--connect".to_owned(), dst.to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        json_out(&self.workload(bins::probe(), &full))
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_str(stdout(out).trim()).expect("probe prints JSON")
}

fn curl(args: &[&str]) -> Vec<String> {
    let mut v = vec!["-sS".to_owned(), "--max-time".to_owned(), "10".to_owned()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

mesh_tests::both_modes!(
    http1_is_intercepted_classified_and_answered,
    http2_prior_knowledge_passes_through,
    tls_client_hello_is_classified_and_passed_through,
    unknown_binary_protocol_is_byte_exact,
    server_first_protocol_passes_through,
    ipv6_destination_is_intercepted,
    non_enrolled_process_is_not_intercepted,
    agent_in_enrolled_cgroup_does_not_loop,
    bad_input_is_passed_through_or_closed_without_harm,
    graceful_shutdown_and_kill_fail_closed_until_cleanup,
    workload_setting_the_agents_mark_is_still_intercepted,
    admin_requests_from_a_workload_change_nothing,
    an_upgrade_under_load_loses_no_connection,
    new_connections_to_another_port_wait_for_no_dropped_syn,
);

/// A workload shares the node's network namespace, so it reaches the admin port:
/// every request there that would change the agent is refused, and afterwards the
/// agent still runs, at its log level, with the workload still intercepted.
fn admin_requests_from_a_workload_change_nothing(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _http = servers::http(s.server(), HTTP, "s1").unwrap();
    let admin = s.agent.admin;
    let cgroup = s.workload.relative().to_owned();
    for path in [
        "/quitquitquit".to_owned(),
        format!("/unenroll?cgroup={cgroup}"),
        "/enroll?cgroup=/mesh-test/elsewhere&create=true".to_owned(),
        "/logging?level=off".to_owned(),
    ] {
        let args =
            curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &format!("http://{admin}{path}")]);
        let code = stdout(&s.workload("curl", &as_strs(&args)));
        assert!(code.trim().starts_with('4'), "POST {path} from a workload answered {code}");
    }
    assert!(!cgroup_exists("mesh-test/elsewhere"), "an admin request from a workload created a cgroup");
    let (status, level) = s.agent.socket_request("GET", "/logging").expect("admin socket");
    assert_eq!(status, 200);
    assert!(!level.contains("off"), "the log level changed: {level}");
    let dst = s.server().v4_addr(HTTP);
    let body = stdout(&s.workload("curl", &as_strs(&curl(&[&format!("http://{dst}/still")]))));
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /still");
    let rec = s.agent.wait_conn(dst);
    assert_eq!(rec["direction"], "outbound", "the workload is still intercepted: {rec}");
}

/// A new agent started beside the running one (as a DaemonSet with maxSurge 1 does),
/// then the old one stopped: a workload calling all the while sees every connection
/// answered, through the old agent, both, then the new one. Both intercept the whole
/// namespace, as in a pod's, so the draining agent's own connections are at stake too.
/// Workload processes calling at once during [`an_upgrade_under_load_loses_no_connection`].
const UPGRADE_CALLERS: usize = 4;

fn an_upgrade_under_load_loses_no_connection(mode: &str) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    let Setup { lab, workload, agent: old } = Setup::new(mode, &["--intercept-all"]);
    let _http = servers::http(lab.host("server"), HTTP, "s1").unwrap();
    let dst = lab.host("server").v4_addr(HTTP);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Several callers at once, so connections keep arriving while the old agent
    // closes its listeners (the moment an upgrade is most likely to drop one).
    let load: Vec<_> = (0..UPGRADE_CALLERS)
        .map(|_| {
            let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            let mut curl = lab.host("client").command("curl", Some(workload.absolute())).unwrap();
            curl.args(["-sS", "--max-time", "5", &format!("http://{dst}/load")]);
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let out = curl.output().expect("curl runs");
                    if String::from_utf8_lossy(&out.stdout).trim() == "server=s1 HTTP/1.1 GET /load" {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.lock().unwrap().push(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                }
            })
        })
        .collect();
    let progress = |what: &str| {
        let before = ok.load(Ordering::SeqCst);
        eventually(Duration::from_secs(20), what, || {
            (ok.load(Ordering::SeqCst) >= before + 20).then_some(())
        });
    };
    progress("calls through the old agent");

    let opts = AgentOptions::new(mode).cgroup(&workload).pins(old.pins()).arg("--intercept-all");
    let new = Agent::start(lab.host("client"), opts).expect("the new agent starts beside the old one");
    progress("calls with both agents running");
    let (status, old_log) = old.terminate_with_log().expect("the old agent stops");
    assert!(status.success(), "the old agent exited with {status}");
    progress("calls through the new agent alone");
    stop.store(true, Ordering::SeqCst);
    for caller in load {
        caller.join().unwrap();
    }

    // A failed call has no record either: say so first, with what curl saw.
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "calls failed during the upgrade ({} answered): {:?}\nold agent:\n{}\nnew agent:\n{}",
        ok.load(Ordering::SeqCst),
        errors.lock().unwrap(),
        old_log.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
        new.log_text()
    );

    // Each call is one connection, carried by one agent: an agent's own upstream
    // connection taken again by interception (the old agent's, once the new one
    // configured it) would show as a second record of the same call, and a call
    // neither agent carried would show as a missing one.
    let calls = ok.load(Ordering::SeqCst);
    let carried = |log: &[Value]| {
        log.iter()
            .filter(|v| message(v) == "connection closed" && v["orig_dst"] == dst.to_string().as_str())
            .count()
    };
    let by_old = carried(&old_log);
    let records = || by_old + carried(&new.connections());
    mesh_tests::wait_until(Duration::from_secs(10), || records() >= calls);
    assert_eq!(
        records(),
        calls,
        "records of {calls} calls: {by_old} by the old agent, {} by the new one\nold agent:\n{}\nnew agent:\n{}",
        records() - by_old,
        old_log.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"),
        new.log_text()
    );

    assert_eq!(new.wait_conn(dst)["direction"], "outbound", "the new agent carries the workload's calls");
}

fn cgroup_exists(relative: &str) -> bool {
    mesh_tests::cgroup::mount().map(|m| m.join(relative).exists()).unwrap_or(false)
}

fn http1_is_intercepted_classified_and_answered(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _http = servers::http(s.server(), HTTP, "s1").unwrap();
    let dst = s.server().v4_addr(HTTP);
    let body = stdout(&s.workload("curl", &as_strs(&curl(&[&format!("http://{dst}/hello")]))));
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /hello");
    let rec = s.agent.wait_conn(dst);
    assert_eq!(rec["protocol"], "http1", "{rec}");
    assert_eq!(rec["mode"], mode);
    assert_eq!(rec["direction"], "outbound");
    assert!(rec["bytes_sent"].as_u64().unwrap() > 0 && rec["bytes_received"].as_u64().unwrap() > 0, "{rec}");
    assert!(rec["error"].is_null(), "{rec}");
}

fn http2_prior_knowledge_passes_through(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _http = servers::http(s.server(), HTTP, "s1").unwrap();
    let dst = s.server().v4_addr(HTTP);
    let args = curl(&["--http2-prior-knowledge", &format!("http://{dst}/h2")]);
    let body = stdout(&s.workload("curl", &as_strs(&args)));
    assert_eq!(body.trim(), "server=s1 HTTP/2.0 GET /h2");
    assert_eq!(s.agent.wait_conn(dst)["protocol"], "http2");
}

fn tls_client_hello_is_classified_and_passed_through(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _https = servers::https(s.server(), HTTPS, "s1").unwrap();
    let dst = s.server().v4_addr(HTTPS);
    let resolve = format!("svc.test:{HTTPS}:{}", s.server().v4);
    let args = curl(&["-k", "--http1.1", "--resolve", &resolve, &format!("https://svc.test:{HTTPS}/tls")]);
    let body = stdout(&s.workload("curl", &as_strs(&args)));
    // The server terminated TLS itself: the agent passed the handshake through untouched.
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /tls");
    let rec = s.agent.wait_conn(dst);
    assert_eq!(rec["protocol"], "tls", "{rec}");
    assert_eq!(rec["sni"], "svc.test", "{rec}");
    assert!(rec["alpn"].as_str().unwrap_or_default().contains("http/1.1"), "{rec}");
}

fn unknown_binary_protocol_is_byte_exact(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _echo = servers::echo(s.server(), ECHO).unwrap();
    let dst = s.server().v4_addr(ECHO);
    let size = 4 * 1024 * 1024;
    let out = s.probe(dst, &["echo", "--bytes", &size.to_string(), "--seed", "7"]);
    assert_eq!(out["ok"], true, "{out}");
    let rec = s.agent.wait_conn(dst);
    assert_eq!(rec["protocol"], "opaque", "{rec}");
    assert_eq!(rec["bytes_sent"], size, "{rec}");
    assert_eq!(rec["bytes_received"], size, "{rec}");
}

fn server_first_protocol_passes_through(mode: &str) {
    // A detection timeout far beyond the probe's own 10 s limit: the banner can only
    // arrive if the agent stops sniffing as soon as the server speaks.
    let s = Setup::new(mode, &["--detect-timeout", "60s"]);
    let _banner = servers::banner(s.server(), BANNER).unwrap();
    let _mysql = servers::banner(s.server(), MYSQL).unwrap();

    let dst = s.server().v4_addr(BANNER);
    let out = s.probe(dst, &["banner"]);
    assert_eq!(out["banner"], "220 mesh-test ready", "{out}");
    assert_eq!(out["echo"], "ping", "{out}");
    let rec = s.agent.wait_conn(dst);
    assert_eq!(rec["protocol"], "opaque");
    assert_eq!(rec["opaque_reason"], "server_first", "{rec}");

    // A configured opaque port skips detection altogether.
    let dst = s.server().v4_addr(MYSQL);
    let out = s.probe(dst, &["banner"]);
    assert_eq!(out["banner"], "220 mesh-test ready", "{out}");
    assert_eq!(s.agent.wait_conn(dst)["opaque_reason"], "opaque_port");
}

fn ipv6_destination_is_intercepted(mode: &str) {
    let s = Setup::new(mode, &[]);
    let _echo = servers::echo(s.server(), ECHO).unwrap();
    let _http = servers::http(s.server(), HTTP, "s1").unwrap();
    let dst = s.server().v6_addr(ECHO);
    let out = s.probe(dst, &["echo", "--bytes", "100000"]);
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(s.agent.wait_conn(dst)["orig_dst"], dst.to_string());

    let dst = s.server().v6_addr(HTTP);
    let body = stdout(&s.workload("curl", &as_strs(&curl(&[&format!("http://{dst}/v6")]))));
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /v6");
    assert_eq!(s.agent.wait_conn(dst)["protocol"], "http1");
}

/// A workload that has just opened thousands of connections to one port of a
/// service opens new ones to another port of it: none of their SYNs is dropped and
/// resent (each would have waited a second).
///
/// iptables mode used to drop them: `REDIRECT` maps every connection onto the reply
/// tuple `listener <- workload:port`, the workload's kernel picks a source port
/// knowing only the original destination, and a port whose connection to the first
/// port still had a conntrack entry (TIME_WAIT: 120 s) clashed and waited for its
/// retransmit. The outbound listener now spans several ports, and NAT takes a free
/// one of them. (Through the mesh, as a user calls a service: the client agent's
/// own connections go to the server agent's tunnel port, never to the ports the
/// workload calls.)
fn new_connections_to_another_port_wait_for_no_dropped_syn(mode: &str) {
    const VIP: &str = "10.96.0.91";
    if mesh_tests::require_tool("wrk", "wrk", "new_connections_to_another_port_wait_for_no_dropped_syn")
        .is_none()
    {
        return;
    }
    let registry = format!(
        "services:
  - name: web
    namespace: shop
    vips: [{VIP}]
    ports:
      - {{name: http, port: 80, target_port: {HTTP}, protocol: http}}
      - {{name: tcp, port: 81, target_port: {HTTP}, protocol: tcp}}
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
"
    );
    let m = MeshLab::builder(mode, registry).start();
    let _web = servers::http(m.host("server"), HTTP, "web").unwrap();
    let client = m.host("client");
    // Few ephemeral ports, so that the first burst leaves a conntrack entry on most.
    let range = ["-w", "net.ipv4.ip_local_port_range=41000 41999"];
    stdout(&run(client.command("sysctl", None).unwrap().args(range)));
    let syn_retransmits = || {
        let out = stdout(&run(client.command("nstat", None).unwrap().args(["-az", "TcpExtTCPSynRetrans"])));
        out.lines()
            .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("nstat printed no TcpExtTCPSynRetrans: {out}"))
    };
    // A new connection per request, 16 at a time, for two seconds.
    let burst = |port: u16| -> String {
        let url = format!("http://{VIP}:{port}/");
        stdout(&run(m.workload_command("wrk").args(["-t1", "-c16", "-d2s", "-H", "Connection: close", &url])))
    };
    let first = burst(80);
    let before = syn_retransmits();
    let second = burst(81);
    let retransmitted = syn_retransmits() - before;
    assert_eq!(
        retransmitted, 0,
        "{retransmitted} SYNs to the second port were dropped and resent\nfirst port:\n{first}\nsecond port:\n{second}"
    );
}

fn non_enrolled_process_is_not_intercepted(mode: &str) {
    let s = Setup::new(mode, &[]);
    let whoami = servers::whoami(s.server(), WHOAMI).unwrap();
    let dst = s.server().v4_addr(WHOAMI);
    let outsider = Cgroup::new("outsider").unwrap();

    let out = json_out(&run(s
        .lab
        .host("client")
        .command(bins::probe(), Some(outsider.absolute()))
        .unwrap()
        .args(["--connect", &dst.to_string(), "whoami"])));
    // The server saw the workload's own socket: nothing sat in between.
    assert_eq!(out["server_saw"], out["local"], "non-enrolled connection was intercepted: {out}");

    let out = s.probe(dst, &["whoami"]);
    assert_ne!(out["server_saw"], out["local"], "enrolled connection was not intercepted: {out}");
    s.agent.wait_conn(dst);
    assert_eq!(whoami.seen().len(), 2);
    let records = s.agent.find_all(|v| message(v) == "connection closed" && v["orig_dst"] == dst.to_string());
    assert_eq!(records.len(), 1, "only the enrolled connection went through the agent: {records:?}");
}

/// A root workload puts the agent's mark on its socket (as `setsockopt(SOL_SOCKET,
/// SO_MARK, 0x4d45)` would), hoping to pass for the agent and skip interception: it
/// is intercepted all the same, over IPv4 and IPv6.
fn workload_setting_the_agents_mark_is_still_intercepted(mode: &str) {
    let s = Setup::new(mode, &[]);
    let whoami = servers::whoami(s.server(), WHOAMI).unwrap();
    for dst in [s.server().v4_addr(WHOAMI), s.server().v6_addr(WHOAMI)] {
        let out = s.probe(dst, &["--mark", "0x4d45", "whoami"]);
        assert_ne!(out["server_saw"], out["local"], "a workload socket with the agent's mark escaped: {out}");
        assert_eq!(s.agent.wait_conn(dst)["orig_dst"], dst.to_string());
    }
    assert_eq!(whoami.seen().len(), 2);
}

/// The agent runs inside an enrolled cgroup's subtree (a host where it was started
/// under the workloads' slice): its own upstream connections are told apart by its
/// cgroup and never intercepted again, while the workload beside it is.
fn agent_in_enrolled_cgroup_does_not_loop(mode: &str) {
    let lab = Lab::new(&["client", "server"]).unwrap();
    let workload = Cgroup::new("wl").unwrap();
    let agent_cg = workload.child("agent").unwrap();
    let opts = AgentOptions {
        in_cgroup: Some(agent_cg.relative().to_owned()),
        ..AgentOptions::new(mode).cgroup(&workload)
    };
    let agent = Agent::start(lab.host("client"), opts).unwrap();
    let _http = servers::http(lab.host("server"), HTTP, "s1").unwrap();
    let dst = lab.host("server").v4_addr(HTTP);
    let body = stdout(&run(lab
        .host("client")
        .command("curl", Some(workload.absolute()))
        .unwrap()
        .args(curl(&[&format!("http://{dst}/loop")]))));
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /loop");
    agent.wait_conn(dst);
    let records = agent.connections();
    assert_eq!(records.len(), 1, "the agent's upstream connection was intercepted again: {records:?}");
    assert!(agent.find(|v| message(v).contains("refusing to loop")).is_none());
    drop(agent);
    drop(agent_cg);
}

fn bad_input_is_passed_through_or_closed_without_harm(mode: &str) {
    let s = Setup::new(mode, &["--detect-timeout", "300ms"]);
    let rec_server = servers::recorder(s.server(), RECORD).unwrap();
    let _http = servers::http(s.server(), HTTP, "s1").unwrap();
    let dst = s.server().v4_addr(RECORD);

    let cases: &[(&str, &str, &[&str])] = &[
        ("garbage", "00ff13370a0d0000deadbeef", &[]),
        // A TLS record header and the start of a ClientHello, then EOF.
        ("truncated ClientHello", "16030100c8010000c40303", &[]),
        ("half an HTTP request line", "474554202f", &[]),
        ("nothing at all", "", &[]),
        // Silent past the detection timeout, then EOF.
        ("silent client", "", &["--linger", "600ms"]),
    ];
    for (i, (what, hex, extra)) in cases.iter().enumerate() {
        let mut args = vec!["send", "--hex", hex];
        args.extend_from_slice(extra);
        s.probe(dst, &args);
        let seen = eventually(Duration::from_secs(10), "recorder saw the connection", || {
            rec_server.seen().get(i).cloned()
        });
        let expected: Vec<u8> =
            (0..hex.len()).step_by(2).map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap()).collect();
        assert_eq!(seen.bytes, expected, "{what}: upstream must receive exactly the client's bytes");
    }
    let records = eventually(Duration::from_secs(10), "records for every case", || {
        let r = s.agent.find_all(|v| message(v) == "connection closed" && v["orig_dst"] == dst.to_string());
        (r.len() >= cases.len()).then_some(r)
    });
    for r in &records {
        assert_eq!(r["protocol"], "opaque", "{r}");
    }
    assert!(records.iter().any(|r| r["opaque_reason"] == "no_client_data"), "{records:?}");
    assert!(records.iter().any(|r| r["opaque_reason"] == "client_closed"), "{records:?}");

    // Clients that reset mid-request, often before the agent has even accepted: the
    // original destination must still be found for every one (a reset socket's local
    // port reads 0 in the kernel by then).
    const RESETS: usize = 10;
    for _ in 0..RESETS {
        s.probe(dst, &["send", "--hex", "474554202f", "--reset"]);
    }
    eventually(Duration::from_secs(15), "a record for every reset connection", || {
        let reset = s.agent.find_all(|v| {
            message(v) == "connection closed" && v["orig_dst"] == dst.to_string() && !v["error"].is_null()
        });
        (reset.len() == RESETS).then_some(())
    });
    assert!(
        s.agent.find(|v| message(v).starts_with("no original destination")).is_none(),
        "{}",
        s.agent.log_text()
    );

    // The agent is unharmed: a normal request still works.
    let dst = s.server().v4_addr(HTTP);
    let body = stdout(&s.workload("curl", &as_strs(&curl(&[&format!("http://{dst}/after")]))));
    assert_eq!(body.trim(), "server=s1 HTTP/1.1 GET /after");
    assert!(s.agent.find(|v| v["level"] == "ERROR").is_none(), "{}", s.agent.log_text());
}

/// Programs attached to a cgroup, from bpftool.
fn attached_programs(cgroup: &std::path::Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool (install the bpftool package)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Array(vec![]));
    v.as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect()
}

fn nat_rules(lab: &Lab) -> String {
    lab.host("client").nat_tables().unwrap()
}

/// Whether this agent's interception is in place: its pinned links (eBPF) or its
/// chains (iptables).
fn interception_in_place(mode: &str, lab: &Lab, pins: &Pins) -> bool {
    match mode {
        "ebpf" => std::fs::read_dir(pins.path()).is_ok_and(|mut d| d.next().is_some()),
        _ => nat_rules(lab).contains("MESH_OUTPUT"),
    }
}

/// Interception fails closed: once the agent is gone (stopped or killed), the
/// workload's connections are refused and nothing reaches the server around the
/// agent; a new agent adopts the interception and serves them again; `mesh-agent
/// cleanup` removes it, after which they go direct.
fn graceful_shutdown_and_kill_fail_closed_until_cleanup(mode: &str) {
    let s = Setup::new(mode, &[]);
    let whoami = servers::whoami(s.server(), WHOAMI).unwrap();
    let dst = s.server().v4_addr(WHOAMI);
    let pins = s.agent.pins().clone();
    assert!(interception_in_place(mode, &s.lab, &pins), "interception in place while running");
    if mode == "ebpf" {
        let root = mesh_tests::cgroup::mount().unwrap();
        assert!(attached_programs(&root).iter().any(|p| p == "mesh_connect4"), "connect4 at the cgroup root");
    }
    let out = s.probe(dst, &["whoami"]);
    assert_ne!(out["server_saw"], out["local"], "intercepted while the agent runs: {out}");

    // Graceful stop: interception stays, so the workload's connection is refused.
    let Setup { lab, workload, agent } = s;
    let status = agent.terminate().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(interception_in_place(mode, &lab, &pins), "interception left in place after SIGTERM");
    let seen = whoami.seen().len();
    let refused = |lab: &Lab| {
        let out = run(lab.host("client").command(bins::probe(), Some(workload.absolute())).unwrap().args([
            "--connect",
            &dst.to_string(),
            "whoami",
        ]));
        (!out.status.success()).then_some(())
    };
    eventually(Duration::from_secs(5), "workload refused while no agent runs", || refused(&lab));
    assert_eq!(whoami.seen().len(), seen, "a connection reached the server around the stopped agent");

    // A new agent adopts it and serves the workload again.
    let agent =
        Agent::start(lab.host("client"), AgentOptions::new(mode).cgroup(&workload).pins(&pins)).unwrap();
    let out = json_out(&run(lab
        .host("client")
        .command(bins::probe(), Some(workload.absolute()))
        .unwrap()
        .args(["--connect", &dst.to_string(), "whoami"])));
    assert_ne!(out["server_saw"], out["local"], "intercepted by the restarted agent: {out}");

    // Killed: the same (nothing runs after SIGKILL, and nothing needs to).
    agent.kill().unwrap();
    let seen = whoami.seen().len();
    eventually(Duration::from_secs(5), "workload refused after SIGKILL", || refused(&lab));
    assert_eq!(whoami.seen().len(), seen, "a connection reached the server around the killed agent");

    // `mesh-agent cleanup` removes interception: connections go direct again.
    let out = run(lab
        .host("client")
        .command(bins::agent(), None)
        .unwrap()
        .arg("cleanup")
        .arg("--bpffs-dir")
        .arg(pins.path()));
    stdout(&out);
    assert!(
        !interception_in_place(mode, &lab, &pins),
        "interception left after cleanup: {}",
        nat_rules(&lab)
    );
    // Links are released asynchronously once their last pin is gone.
    eventually(Duration::from_secs(5), "direct connection after cleanup", || {
        let out = run(lab.host("client").command(bins::probe(), Some(workload.absolute())).unwrap().args([
            "--connect",
            &dst.to_string(),
            "whoami",
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (out.status.success() && v["server_saw"] == v["local"]).then_some(())
    });
}
