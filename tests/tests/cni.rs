//! `mesh-cni` as a container runtime runs it: chained after Debian's real `bridge` and
//! `host-local` plugins, each plugin its own process with the `CNI_*` environment and
//! its configuration on stdin, `prevResult` threaded through, in a node network
//! namespace and for pod namespaces the test creates. The agent end is the agent's
//! real CNI routes and bookkeeping (`mesh_agent::workload`) on a temporary unix
//! socket, with a recording sink standing in for the workload model: it serves pods
//! of namespace `shop` (after checking their netns is a real one) and refuses others
//! as unknown to the control plane.
//!
//! The installer test needs no root: it runs `mesh-cni install` on temporary dirs.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_agent::workload::{
    cni::{CniError, CniLimits, CniPods, PodAnnounce, PodRef, PodServed, PodSink, code},
    cni_http,
    store::{WorkloadStore, netns_exists},
};
use mesh_tests::{
    bins,
    cni::{CniChain, DEBIAN_PLUGINS, Sandbox, bridge_conflist, require_debian_plugins},
    eventually,
    netns::Netns,
    require_root,
};
use serde_json::{Value, json};

/// Stands in for the agent's workload model; records every call.
#[derive(Debug, Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    serving: Mutex<BTreeSet<String>>,
}

impl Recorder {
    fn note(&self, call: &str, pod: &PodAnnounce) {
        self.calls.lock().unwrap().push(format!("{call} {}", pod.container_id));
    }
}

impl PodSink for Recorder {
    async fn add(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        self.note("add", pod);
        if !netns_exists(&pod.netns) {
            return Err(CniError::new(
                code::AGENT_FAILED,
                format!("{} is not a network namespace", pod.netns),
            ));
        }
        match &pod.pod {
            Some(PodRef { namespace, name, .. }) if namespace == "shop" => {
                if name == "slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                self.serving.lock().unwrap().insert(pod.container_id.clone());
                Ok(PodServed {
                    identity: Some(format!("spiffe://cluster.local/ns/shop/sa/{name}")),
                    detail: String::new(),
                })
            }
            _ => Err(CniError::pod_unknown(pod)),
        }
    }

    async fn remove(&self, pod: &PodAnnounce) -> Result<(), CniError> {
        self.note("remove", pod);
        self.serving.lock().unwrap().remove(&pod.container_id);
        Ok(())
    }

    async fn check(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        self.note("check", pod);
        Ok(PodServed::default())
    }
}

/// The agent's CNI routes on a unix socket, served by a runtime of their own.
struct FakeAgent {
    socket: PathBuf,
    pods: Arc<CniPods<Recorder>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeAgent {
    /// Serves at `dir/agent.sock`, recording pods in `dir/workloads.json`, after
    /// restoring what that file holds.
    fn start(dir: &Path) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let store = WorkloadStore::new(dir.join("workloads.json"), 64);
        let pods = Arc::new(CniPods::new(Recorder::default(), Some(store), CniLimits::default()));
        runtime.block_on(pods.restore(netns_exists));
        let listener = {
            let _enter = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let served = pods.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let pods = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let pods = pods.clone();
                        async move { Ok::<_, Infallible>(cni_http::handle(&pods, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { socket, pods, runtime: Some(runtime) }
    }

    fn calls(&self) -> Vec<String> {
        self.pods.sink().calls.lock().unwrap().clone()
    }

    fn calls_for(&self, container: &str) -> Vec<String> {
        self.calls().into_iter().filter(|c| c.ends_with(&format!(" {container}"))).collect()
    }

    fn serving(&self) -> Vec<String> {
        self.pods.sink().serving.lock().unwrap().iter().cloned().collect()
    }

    /// Stops serving and removes the socket, as an agent that exits.
    fn stop(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A node namespace with the pod network (bridge + host-local) and mesh-cni chained.
struct Node {
    /// The node's namespace: the bridge lives here, and goes with it.
    _ns: Netns,
    dir: tempfile::TempDir,
    chain: CniChain,
}

impl Node {
    fn new(agent_dir: &Path) -> Self {
        require_debian_plugins().unwrap();
        let ns = Netns::new("cninode").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mesh =
            json!({"type": "mesh-cni", "agentSocket": agent_dir.join("agent.sock"), "timeoutSeconds": 2});
        let conflist = bridge_conflist("meshnet", "cni0", "10.88.0.0/24", &dir.path().join("ipam"), &[mesh]);
        let plugin_dir = bins::cni().parent().unwrap().to_owned();
        let chain = CniChain::new(conflist, vec![PathBuf::from(DEBIAN_PLUGINS), plugin_dir], Some(ns.path()));
        Self { _ns: ns, dir, chain }
    }

    /// ADD through the whole chain; panics with every plugin's output on failure.
    fn add(&self, sandbox: &Sandbox) -> Value {
        let run = self.chain.add(sandbox).unwrap();
        assert!(run.succeeded(), "chain ADD failed: {:#?}", run.runs);
        run.result()
    }

    /// mesh-cni alone with a configuration changed by `edit` (as the list's last plugin).
    fn mesh_cni(
        &self,
        command: &str,
        sandbox: &Sandbox,
        prev: Option<&Value>,
        edit: impl FnOnce(&mut Value),
    ) -> mesh_tests::cni::PluginRun {
        let entry = self.chain.plugins().into_iter().find(|p| p["type"] == "mesh-cni").unwrap();
        let mut conf = self.chain.plugin_config(&entry, prev);
        edit(&mut conf);
        self.chain.exec_raw("mesh-cni", command, sandbox, conf.to_string().as_bytes()).unwrap()
    }
}

/// The IPv4 addresses (with prefix) on `dev` in `ns`.
fn addresses(ns: &Netns, dev: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-n", ns.name(), "-j", "addr", "show", "dev", dev]).output().unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn announce(id: &str, ns: &Netns, namespace: &str, name: &str, uid: &str, ip: &str) -> PodAnnounce {
    PodAnnounce {
        container_id: id.into(),
        netns: ns.path(),
        ifname: "eth0".into(),
        pod: Some(PodRef { namespace: namespace.into(), name: name.into(), uid: Some(uid.into()) }),
        ips: vec![ip.parse().unwrap()],
    }
}

#[test]
fn a_runtime_chain_adds_checks_and_deletes_a_pod() {
    if !require_root("a_runtime_chain_adds_checks_and_deletes_a_pod") {
        return;
    }
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start(agent_dir.path());
    let node = Node::new(agent_dir.path());
    let pod = Netns::new("pod").unwrap();
    let sandbox = Sandbox::k8s("c0ffee01", &pod.path(), "shop", "web-0", "uid-1");

    let run = node.chain.add(&sandbox).unwrap();
    assert!(run.succeeded(), "{:#?}", run.runs);
    let (bridge, mesh) = (run.of("bridge").unwrap(), run.of("mesh-cni").unwrap());
    // The runtime threaded bridge's result into mesh-cni, which passed it on unchanged.
    assert_eq!(mesh.stdin["prevResult"], bridge.json());
    assert_eq!(mesh.stdout, bridge.json().to_string(), "prevResult printed byte for byte");
    let result = run.result();
    let address = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(address.starts_with("10.88.0."), "{result}");
    assert_eq!(addresses(&pod, "eth0"), [address.as_str()], "the pod really got the address");
    let ip = address.split('/').next().unwrap();
    assert_eq!(agent.pods.pods(), [announce("c0ffee01", &pod, "shop", "web-0", "uid-1", ip)]);
    assert!(mesh.stderr.contains("served as spiffe://cluster.local/ns/shop/sa/web-0"), "{}", mesh.stderr);

    let check = node.chain.check(&sandbox, &result).unwrap();
    assert!(check.succeeded(), "{:#?}", check.runs);
    // A runtime retrying the ADD gets the same answer; the pod is not served twice.
    let again = node.mesh_cni("ADD", &sandbox, Some(&result), |_| {});
    assert!(again.succeeded(), "{again:#?}");
    assert_eq!(again.json(), result);
    assert_eq!(agent.calls(), ["add c0ffee01", "check c0ffee01"]);

    let del = node.chain.del(&sandbox, Some(&result)).unwrap();
    assert!(del.succeeded(), "{:#?}", del.runs);
    assert_eq!(del.runs.iter().map(|r| r.plugin.as_str()).collect::<Vec<_>>(), ["mesh-cni", "bridge"]);
    assert!(agent.pods.pods().is_empty() && agent.serving().is_empty());
    assert!(addresses(&pod, "eth0").is_empty(), "bridge removed the pod's interface");
    // DEL is repeatable, and succeeds once the agent is gone too.
    assert!(node.chain.del(&sandbox, Some(&result)).unwrap().succeeded());
    agent.stop();
    let gone = node.chain.del(&sandbox, None).unwrap();
    assert!(gone.succeeded(), "{:#?}", gone.runs);
    assert!(gone.of("mesh-cni").unwrap().stderr.contains("nothing to release"));

    let version = node.chain.exec_raw("mesh-cni", "VERSION", &sandbox, br#"{"cniVersion":"1.0.0"}"#).unwrap();
    assert_eq!(version.json()["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
    drop(node.dir);
}

#[test]
fn bad_input_gets_cni_errors_and_disturbs_no_other_pod() {
    if !require_root("bad_input_gets_cni_errors_and_disturbs_no_other_pod") {
        return;
    }
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start(agent_dir.path());
    let node = Node::new(agent_dir.path());
    let served_ns = Netns::new("pod").unwrap();
    let served = Sandbox::k8s("served01", &served_ns.path(), "shop", "web-0", "uid-1");
    let served_result = node.add(&served);

    // Missing netns: the runtime's chain stops at the first plugin; mesh-cni alone names it.
    let mut no_netns = Sandbox::k8s("nonetns1", "/unused", "shop", "api-0", "uid-2");
    no_netns.netns = None;
    let run = node.chain.add(&no_netns).unwrap();
    let failed = run.failure().expect("ADD without CNI_NETNS fails");
    assert_eq!((failed.plugin.as_str(), failed.code()), ("bridge", Some(4)), "{failed:#?}");
    let alone = node.mesh_cni("ADD", &no_netns, Some(&served_result), |_| {});
    assert_eq!(alone.code(), Some(code::INVALID_ENV as u64), "{alone:#?}");
    assert!(alone.msg().starts_with("CNI_NETNS: not set"), "{}", alone.msg());
    let vanished = Sandbox::k8s("nonetns2", "/var/run/netns/mesh-test-vanished", "shop", "api-0", "uid-2");
    let alone = node.mesh_cni("ADD", &vanished, Some(&served_result), |_| {});
    assert_eq!(alone.msg(), "CNI_NETNS: /var/run/netns/mesh-test-vanished does not exist");

    // A pod the control plane does not know: mesh-cni fails the ADD after the pod
    // network wired it; the runtime's DEL then undoes the chain.
    let stranger_ns = Netns::new("pod").unwrap();
    let stranger = Sandbox::k8s("stranger", &stranger_ns.path(), "elsewhere", "x-0", "uid-3");
    let run = node.chain.add(&stranger).unwrap();
    let failed = run.failure().expect("an unknown pod is refused");
    assert_eq!(failed.plugin, "mesh-cni");
    assert_eq!(failed.code(), Some(code::POD_UNKNOWN as u64));
    assert_eq!(failed.msg(), "pod elsewhere/x-0 is unknown to the control plane");
    assert_eq!(failed.json()["cniVersion"], "1.0.0");
    assert!(node.chain.del(&stranger, None).unwrap().succeeded());
    assert!(addresses(&stranger_ns, "eth0").is_empty());

    // Malformed configuration: not JSON, and a bad field named.
    let bad_json = node.chain.exec_raw("mesh-cni", "ADD", &served, b"{\"cniVersion\": \"1.0.0\", ").unwrap();
    assert_eq!(bad_json.code(), Some(code::DECODE as u64), "{bad_json:#?}");
    let bad_field =
        node.mesh_cni("ADD", &served, Some(&served_result), |c| c["timeoutSeconds"] = json!("soon"));
    assert_eq!(bad_field.code(), Some(code::INVALID_CONFIG as u64));
    assert!(bad_field.msg().contains("field timeoutSeconds"), "{}", bad_field.msg());

    // A second ADD for the served container, from another sandbox's view.
    let other_ns = Netns::new("pod").unwrap();
    let mut second = served.clone();
    second.netns = Some(other_ns.path());
    second.args = second.args.replace("web-0", "web-1");
    let conflict = node.mesh_cni("ADD", &second, Some(&served_result), |_| {});
    assert_eq!(conflict.code(), Some(code::CONFLICT as u64), "{conflict:#?}");
    assert!(
        conflict
            .msg()
            .contains("container served01 is already served as pod shop/web-0 with a different netns, pod"),
        "{}",
        conflict.msg()
    );

    // No agent listening: try again later.
    let nowhere = node.mesh_cni("ADD", &second, Some(&served_result), |c| {
        c["agentSocket"] = json!("/run/mesh-test-none.sock")
    });
    assert_eq!(nowhere.code(), Some(code::TRY_AGAIN_LATER as u64));
    assert!(nowhere.msg().contains("unreachable"), "{}", nowhere.msg());

    // An agent slower than timeoutSeconds: the plugin gives up in time.
    let slow_ns = Netns::new("pod").unwrap();
    let slow = Sandbox::k8s("slowpod1", &slow_ns.path(), "shop", "slow", "uid-4");
    let start = Instant::now();
    let late = node.mesh_cni("ADD", &slow, Some(&served_result), |c| c["timeoutSeconds"] = json!(1));
    assert_eq!(late.code(), Some(code::TRY_AGAIN_LATER as u64), "{late:#?}");
    assert!(start.elapsed() < Duration::from_millis(2500), "{:?}", start.elapsed());
    // The runtime's DEL waits for the agent's ADD and releases it.
    assert!(node.mesh_cni("DEL", &slow, None, |_| {}).succeeded());
    assert!(!agent.serving().contains(&"slowpod1".to_owned()));

    // Through all of it the served pod was never touched, and is still served.
    assert_eq!(agent.serving(), ["served01"]);
    assert!(node.chain.check(&served, &served_result).unwrap().succeeded());
    assert_eq!(agent.calls_for("served01"), ["add served01", "check served01"]);
    assert_eq!(addresses(&served_ns, "eth0").len(), 1);
}

#[test]
fn a_restarted_agent_serves_the_pods_whose_netns_remain() {
    if !require_root("a_restarted_agent_serves_the_pods_whose_netns_remain") {
        return;
    }
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start(agent_dir.path());
    let node = Node::new(agent_dir.path());
    let (ns_a, ns_b) = (Netns::new("pod").unwrap(), Netns::new("pod").unwrap());
    node.add(&Sandbox::k8s("keep0001", &ns_a.path(), "shop", "web-0", "uid-1"));
    node.add(&Sandbox::k8s("gone0001", &ns_b.path(), "shop", "web-1", "uid-2"));
    agent.stop();
    // While the agent is down, one pod's sandbox goes away without a DEL reaching it.
    drop(ns_b);

    let agent = FakeAgent::start(agent_dir.path());
    assert_eq!(agent.calls(), ["add keep0001"], "restored through the sink, without any CNI call");
    assert_eq!(agent.serving(), ["keep0001"]);
    let state = std::fs::read_to_string(agent_dir.path().join("workloads.json")).unwrap();
    assert!(state.contains("keep0001") && !state.contains("gone0001"), "{state}");
}

#[test]
fn the_installer_chains_itself_last_keeps_it_there_and_leaves_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf) = (dir.path().join("opt/cni/bin"), dir.path().join("etc/cni/net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let original = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]});
    let path = conf.join("10-pods.conflist");
    let read = || serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap()).unwrap();
    let mut child = Command::new(bins::cni())
        .args(["install", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .args(["--agent-socket", "/run/mesh/agent.sock", "--exclude-namespaces", "kube-system,mesh-system"])
        .args(["--interval-seconds", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The binary goes in at once; the conflist is chained once the pod network writes it.
    eventually(Duration::from_secs(10), "binary installed", || bin.join("mesh-cni").is_file().then_some(()));
    std::fs::write(&path, original.to_string()).unwrap();
    let types = |v: &Value| -> Vec<String> {
        v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap().to_owned()).collect()
    };
    eventually(Duration::from_secs(10), "mesh-cni chained", || {
        (types(&read()) == ["bridge", "portmap", "mesh-cni"]).then_some(())
    });
    let entry = read()["plugins"][2].clone();
    assert_eq!(entry["agentSocket"], "/run/mesh/agent.sock");
    assert_eq!(entry["excludeNamespaces"], json!(["kube-system", "mesh-system"]));
    // The installed copy is a working plugin.
    let out = Command::new(bin.join("mesh-cni")).env("CNI_COMMAND", "VERSION").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    // The pod network's daemon rewrites its conflist: the installer chains it again.
    std::fs::write(&path, original.to_string()).unwrap();
    eventually(Duration::from_secs(10), "mesh-cni chained again", || {
        (types(&read()).len() == 3).then_some(())
    });

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let status = eventually(Duration::from_secs(10), "installer exit", || child.try_wait().unwrap());
    assert!(status.success(), "{status}");
    assert_eq!(read(), original, "the conflist is as the pod network wrote it");
    assert!(!bin.join("mesh-cni").exists());
}
