//! End to end: one node agent serving several pods, each in a network namespace of its
//! own wired by the real CNI plugins (Debian's `bridge` and `host-local`, with
//! `mesh-cni` chained after them, called as a container runtime calls them), each with
//! the identity the control plane gives it. Every scenario runs in both interception
//! modes.
//!
//! Hosts: `control` (control plane and CA), `node` (the agent under test and its
//! pods on `cni0`, 10.88.0.0/24), `server` (service `api` behind its own agent, which
//! only `shop/alpha` may call).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_tests::{
    Agent, Cgroup, Control, Lab,
    agent::message,
    capture::{Capture, contains},
    eventually,
    pods::{Pod, PodNode, pod_ip},
    servers,
};

const VIP: &str = "10.96.0.60";
const ALPHA: &str = "spiffe://cluster.local/ns/shop/sa/alpha";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// Service `alpha-web`: the alpha pod's own server (port 8080 in its namespace),
/// strict mTLS, only `shop/api` (the server host's workload) may call it.
const POD_VIP: &str = "10.96.0.61";

/// Pods get addresses in the order they are added: alpha .10, beta .11, gamma .12,
/// then .13 for one the registry does not list.
fn registry() -> String {
    let pod = |n: u8, sa: &str| {
        format!(
            "  - name: {sa}
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: {}, node: node, service_account: {sa}}}
",
            pod_ip(n)
        )
    };
    format!(
        "services:
  - name: alpha-web
    namespace: shop
    vips: [{POD_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      mtls: strict
      authorization: [{{principals: [\"{API}\"]}}]
    endpoints:
      - {{address: {alpha}, node: node, service_account: alpha, agent_address: \"{alpha}:15008\"}}
  - name: api
    namespace: shop
    vips: [{VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      authorization: [{{principals: [\"{ALPHA}\"]}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
{}{}{}",
        pod(0, "alpha"),
        pod(1, "beta"),
        pod(2, "gamma"),
        alpha = pod_ip(0),
    )
}

struct PodLab {
    lab: Lab,
    dir: tempfile::TempDir,
    control: Control,
    mode: String,
    node_agent: Option<Agent>,
    _server_agent: Agent,
    _server_cg: Cgroup,
    _api: servers::Server,
    cni: PodNode,
}

impl PodLab {
    fn new(mode: &str) -> Self {
        let lab = Lab::new(&["control", "node", "server"]).expect("lab");
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.yaml");
        std::fs::write(&reg, registry()).unwrap();
        let control = Control::start_with_ca(lab.host("control"), &reg, dir.path(), &["node", "server"], &[])
            .expect("control plane");
        let api = servers::http(lab.host("server"), 8080, "api").unwrap();
        let server_cg = Cgroup::new("srv").unwrap();
        let server_agent = Agent::start(
            lab.host("server"),
            control.agent_options(mode, "server", "shop/api").cgroup(&server_cg),
        )
        .expect("server agent");
        server_agent.wait_enrolled();
        let cni = PodNode::new(lab.host("node"), std::path::Path::new("/nonexistent")).expect("cni");
        let mut pl = Self {
            node_agent: None,
            cni,
            lab,
            dir,
            control,
            mode: mode.to_owned(),
            _server_agent: server_agent,
            _server_cg: server_cg,
            _api: api,
        };
        pl.start_node_agent(None);
        pl
    }

    /// Starts (or restarts, adopting `pins`) the node's agent.
    fn start_node_agent(&mut self, pins: Option<&Arc<mesh_tests::Pins>>) {
        let mut opts = self
            .control
            .discovery_options(&self.mode, "node")
            .arg("--pod-state")
            .arg(self.dir.path().join("pods.json").display().to_string())
            .arg("--pod-identity-patience")
            .arg("3s");
        if let Some(p) = pins {
            opts = opts.pins(p);
        }
        let agent = Agent::start(self.lab.host("node"), opts).expect("node agent");
        agent.wait_log("first discovery snapshot", |v| message(v) == "snapshot applied");
        self.cni.point_at(&agent.admin_socket);
        self.node_agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.node_agent.as_ref().expect("node agent running")
    }

    fn add(&self, name: &str) -> Pod {
        match self.cni.add("shop", name).expect("CNI chain runs") {
            Ok(pod) => pod,
            Err(run) => panic!("ADD of {name} failed: {run:?}\nagent:\n{}", self.agent().log_text()),
        }
    }
}

/// `curl http://VIP/path` from the pod: the status code, or the error.
fn call(pod: &Pod, path: &str) -> Result<u16, String> {
    let out = pod
        .command("curl")
        .unwrap()
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &format!("http://{VIP}{path}"),
        ])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    if out.status.success() && code != 0 {
        Ok(code)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Two pods of one node with different identities: the destination's policy tells
/// them apart (each connection carries its own pod's identity); a third pod comes
/// and goes while the first carries traffic, without a failed request.
fn pods_carry_their_own_identity(mode: &str) {
    let pl = PodLab::new(mode);
    let alpha = pl.add("alpha-pod");
    let beta = pl.add("beta-pod");
    assert_eq!((alpha.ip, beta.ip), (pod_ip(0), pod_ip(1)));

    eventually(Duration::from_secs(10), "alpha's certificate and call", || {
        (call(&alpha, "/a") == Ok(200)).then_some(())
    });
    assert_eq!(call(&beta, "/b"), Ok(403), "beta is not allowed by api's policy");
    let inbound = pl._server_agent.wait_log("inbound record of alpha", |v| {
        v["kind"] == "http" && v["direction"] == "inbound" && v["path"] == "/a"
    });
    assert_eq!(inbound["source_identity"], ALPHA);
    let out = pl.agent().wait_log("alpha's outbound record", |v| {
        v["kind"] == "http" && v["direction"] == "outbound" && v["path"] == "/a"
    });
    assert_eq!(out["source_identity"], ALPHA);

    // alpha keeps calling while gamma is added, used and removed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let cmd_ns = alpha.netns.path();
        std::thread::spawn(move || {
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let out = mesh_tests::netns::command_in(&cmd_ns, "curl", None)
                    .unwrap()
                    .args([
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "5",
                        &format!("http://{VIP}/loop"),
                    ])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).trim() == "200" {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    eventually(Duration::from_secs(10), "alpha's load running", || {
        (ok.load(Ordering::SeqCst) > 3).then_some(())
    });
    let gamma = pl.add("gamma-pod");
    assert_eq!(gamma.ip, pod_ip(2));
    assert_eq!(call(&gamma, "/g"), Ok(403), "gamma is served by the mesh (and refused by api's policy)");
    let del = pl.cni.remove(gamma).unwrap();
    assert!(del.succeeded(), "DEL: {del:?}");
    let before = ok.load(Ordering::SeqCst);
    eventually(Duration::from_secs(10), "alpha's load still running", || {
        (ok.load(Ordering::SeqCst) > before + 3).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "alpha's requests failed while gamma came and went");
    assert!(pl.agent().find(|v| v["level"] == "ERROR").is_none(), "{}", pl.agent().log_text());
}

/// A killed agent leaves its pods refused (never sent around the mesh); a restarted
/// one serves them again from its state file, without any CNI call.
fn restarted_agent_serves_its_pods_again(mode: &str) {
    let mut pl = PodLab::new(mode);
    let alpha = pl.add("alpha-pod");
    eventually(Duration::from_secs(10), "alpha's call", || {
        (call(&alpha, "/before") == Ok(200)).then_some(())
    });
    let agent = pl.node_agent.take().unwrap();
    let pins = agent.pins().clone();
    agent.kill().unwrap();
    eventually(Duration::from_secs(5), "alpha refused while no agent runs", || call(&alpha, "/down").err());

    pl.start_node_agent(Some(&pins));
    let restored =
        pl.agent().wait_log("pods served again", |v| message(v) == "pods from the state file served again");
    assert!(
        restored["restored"].as_str().unwrap_or_default().contains(&alpha.sandbox.container_id),
        "{restored}"
    );
    eventually(Duration::from_secs(10), "alpha served again", || {
        (call(&alpha, "/after") == Ok(200)).then_some(())
    });
}

/// Bad CNI calls get a CNI error naming the problem, and disturb no served pod.
fn bad_cni_calls_are_refused_and_harm_no_pod(mode: &str) {
    let pl = PodLab::new(mode);
    let alpha = pl.add("alpha-pod");
    eventually(Duration::from_secs(10), "alpha's call", || (call(&alpha, "/a") == Ok(200)).then_some(()));

    // A second, identical ADD for the same sandbox is answered as the first.
    let again = pl.cni.chain.exec("mesh-cni", "ADD", &alpha.sandbox, Some(&alpha.added)).unwrap();
    assert!(again.succeeded(), "repeated ADD: {again:?}");
    // The same sandbox announced with another address is a conflict.
    let mut other = alpha.added.clone();
    other["ips"][0]["address"] = "10.88.0.99/24".into();
    let conflict = pl.cni.chain.exec("mesh-cni", "ADD", &alpha.sandbox, Some(&other)).unwrap();
    assert!(!conflict.succeeded() && conflict.msg().contains("10.88.0.99"), "{conflict:?}");
    // No network namespace.
    let mut no_netns = alpha.sandbox.clone();
    no_netns.container_id = "no-netns".into();
    no_netns.netns = None;
    let run = pl.cni.chain.exec("mesh-cni", "ADD", &no_netns, Some(&alpha.added)).unwrap();
    assert!(!run.succeeded() && run.msg().to_lowercase().contains("netns"), "{run:?}");
    // A malformed configuration.
    let run = pl.cni.chain.exec_raw("mesh-cni", "ADD", &alpha.sandbox, b"{\"cniVersion\": 7").unwrap();
    assert!(!run.succeeded() && run.code().is_some(), "{run:?}");
    // A pod the control plane does not list (.11 is beta's: use a fourth address).
    let _beta = pl.add("beta-pod");
    let _gamma = pl.add("gamma-pod");
    let unknown = pl.cni.add("shop", "stranger").unwrap();
    let run = unknown.err().expect("an unknown pod is refused");
    let failure = run.failure().expect("a failed call");
    assert!(failure.msg().contains("unknown to the control plane"), "{run:?}");

    assert_eq!(call(&alpha, "/still"), Ok(200), "alpha disturbed by the bad calls");
}

/// A pod as the destination: its agent's tunnel listener in the pod's namespace
/// presents the pod's identity and applies its service's policy; plaintext from
/// outside the mesh to the pod's address is refused (strict), and while no agent runs
/// the pod is unreachable rather than open.
fn a_pod_serves_over_mtls_and_refuses_plaintext(mode: &str) {
    let mut pl = PodLab::new(mode);
    let alpha = pl.add("alpha-pod");
    let marker = "plaintext-marker-5d1e";
    let _server = PodServer::start(&alpha, 8080, &[&format!("{marker}-meshed")]);
    let server_host = pl.lab.host("server");
    let node_v4 = pl.lab.host("node").v4.to_string();
    let out = server_host
        .command("ip", None)
        .unwrap()
        .args(["route", "add", "10.88.0.0/24", "via", &node_v4])
        .output()
        .unwrap();
    assert!(out.status.success(), "route to the pods: {}", String::from_utf8_lossy(&out.stderr));
    let agent = pl.node_agent.take().unwrap();
    let pins = agent.pins().clone();

    // From the server host's enrolled workload (shop/api), through both agents.
    let meshed = |path: &str| {
        let out = server_host
            .command("curl", Some(pl._server_cg.absolute()))
            .unwrap()
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
            .arg(format!("http://{POD_VIP}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().unwrap_or(0)
    };
    eventually(Duration::from_secs(15), "the meshed call to the pod", || (meshed("/") == 200).then_some(()));
    let inbound = agent.wait_log("the pod's inbound record", |v| {
        v["kind"] == "http" && v["direction"] == "inbound" && v["source_identity"] == API
    });
    assert_eq!(inbound["destination_service"], "shop/alpha-web", "{inbound}");
    let sent = pl._server_agent.wait_log("the caller's record", |v| {
        v["kind"] == "http" && v["direction"] == "outbound" && v["destination_service"] == "shop/alpha-web"
    });
    assert_eq!(sent["destination_identity"], ALPHA, "the pod presented its own identity: {sent}");

    // Plaintext straight to the pod's address, from a process no agent intercepts.
    let plain = |path: &str| {
        let out = server_host
            .command("curl", None)
            .unwrap()
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3"])
            .arg(format!("http://{}:8080{path}", alpha.ip))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().unwrap_or(0)
    };
    assert_ne!(plain("/"), 200, "plaintext from outside the mesh reached the strict pod");
    agent.wait_log("the strict refusal", |v| message(v) == "plaintext inbound connection refused");

    // The pod's agent killed while calls are under way: no call reaches the pod's
    // server but through the mesh, and nothing crosses the node's link in clear. (Its
    // pins are kept, as on a node: interception outlives the agent.)
    let capture = Capture::start(pl.lab.host("node")).expect("capture");
    let answered = AtomicUsize::new(1);
    let (stop, refused) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..500 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match meshed(&format!("/{marker}-meshed")) {
                    200 => answered.fetch_add(1, Ordering::SeqCst),
                    _ => refused.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        eventually(Duration::from_secs(10), "calls under way", || {
            (answered.load(Ordering::SeqCst) > 3).then_some(())
        });
        agent.kill().unwrap();
        eventually(Duration::from_secs(10), "meshed calls fail while no agent runs", || {
            (refused.load(Ordering::SeqCst) > 3).then_some(())
        });
        for _ in 0..3 {
            assert_ne!(
                plain(&format!("/{marker}-plain")),
                200,
                "the pod was open to plaintext while its agent was down"
            );
        }
        stop.store(true, Ordering::SeqCst);
    });
    let wire = capture.stop();
    drop(pins);
    assert!(!contains(&wire, marker.as_bytes()), "a request crossed the node's link in plaintext");
    let requests = _server.requests();
    assert!(
        !requests.iter().any(|l| l.contains(&format!("{marker}-plain"))),
        "plaintext reached the pod's server while its agent was down: {requests:?}"
    );
    // The calls run one at a time: the one under way when the agent was killed may
    // have reached the server and lost its answer; no other call may be extra.
    let (served, answered) = (requests.len(), answered.load(Ordering::SeqCst));
    assert!(
        (answered..=answered + 1).contains(&served),
        "the pod's server answered {served} requests where the mesh admitted {answered}: {requests:?}"
    );
}

/// A `python3 -m http.server` in a pod's namespace (its containers' view), killed on drop.
struct PodServer {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl PodServer {
    /// Serves `files` (each holding its own name) from a fresh directory.
    fn start(pod: &Pod, port: u16, files: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        let log = dir.path().join("requests.log");
        let child = pod
            .command("python3")
            .unwrap()
            .args(["-m", "http.server", &port.to_string(), "--bind", "0.0.0.0", "--directory"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 http.server");
        eventually(Duration::from_secs(10), "the pod's server listening", || {
            let ok = pod
                .command("curl")
                .unwrap()
                .args(["-s", "-o", "/dev/null", "--max-time", "1", &format!("http://127.0.0.1:{port}/ready")])
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(())
        });
        Self { child, log, _dir: dir }
    }

    /// The log lines of the requests it answered, the readiness probes over
    /// loopback left out.
    fn requests(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains("\"GET ") && !l.contains("/ready")).map(str::to_owned).collect()
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mesh_tests::both_modes!(
    a_pod_serves_over_mtls_and_refuses_plaintext,
    pods_carry_their_own_identity,
    restarted_agent_serves_its_pods_again,
    bad_cni_calls_are_refused_and_harm_no_pod,
);
