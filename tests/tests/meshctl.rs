//! End to end: `meshctl` against a running mesh. The control plane (YAML registry and
//! CA) and the `client` node's agent share host `node`, where meshctl runs as an
//! operator on that node would; host `server` runs the servers and a second agent
//! whose admin endpoint listens on the bridge. Every command is run in text and in
//! JSON and checked against what the mesh really holds.

use std::{process::Output, time::Duration};

use mesh_tests::{Agent, Cgroup, Control, Lab, bins, eventually, require_root, servers};
use serde_json::Value;

const VIP: &str = "10.96.0.40";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// Hosts: node = 10.77.0.1 (control plane + client agent), server = 10.77.0.2.
const REGISTRY: &str = "services:
  - name: api
    namespace: shop
    vips: [10.96.0.40]
    hostnames: [api.shop.svc.cluster.local]
    ports: [{port: 80, target_port: 8080, protocol: http}]
    policy:
      authorization: [{principals: [\"spiffe://cluster.local/ns/shop/sa/frontend\"]}]
    endpoints:
      - {address: 10.77.0.2, node: server, service_account: api, agent_address: \"10.77.0.2:15008\"}
  - name: echo
    namespace: shop
    vips: [10.96.0.41]
    ports: [{port: 7000, protocol: tcp}]
    endpoints:
      - {address: 10.77.0.2, node: server, service_account: api, agent_address: \"10.77.0.2:15008\"}
  - name: frontend
    namespace: shop
    ports: [{port: 80}]
    endpoints:
      - {address: 10.77.0.1, node: node, service_account: frontend}
";

struct Mesh {
    lab: Lab,
    _dir: tempfile::TempDir,
    _control: Control,
    client: Agent,
    server: Agent,
    workload: Cgroup,
    _server_cg: Cgroup,
    _servers: Vec<servers::Server>,
}

impl Mesh {
    fn new(mode: &str) -> Self {
        let lab = Lab::new(&["node", "server"]).expect("lab");
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("registry.yaml");
        std::fs::write(&reg, REGISTRY).unwrap();
        let control = Control::start_with_ca(lab.host("node"), &reg, dir.path(), &["node", "server"], &[])
            .expect("control plane");
        let servers = vec![
            servers::http(lab.host("server"), 8080, "api").unwrap(),
            servers::echo(lab.host("server"), 7000).unwrap(),
        ];
        let workload = Cgroup::new("wl").unwrap();
        let server_cg = Cgroup::new("srv").unwrap();
        let agent = |host: &str, cg: &Cgroup, identity: &str, extra: &[&str]| {
            let mut opts = control.agent_options(mode, host, identity).cgroup(cg);
            for a in extra {
                opts = opts.arg(*a);
            }
            let a = Agent::start(lab.host(host), opts).expect("agent starts");
            a.wait_enrolled();
            a
        };
        let client = agent("node", &workload, "shop/frontend", &[]);
        let server = agent("server", &server_cg, "shop/api", &["--admin-addr", "0.0.0.0:15000"]);
        Self {
            lab,
            _dir: dir,
            _control: control,
            client,
            server,
            workload,
            _server_cg: server_cg,
            _servers: servers,
        }
    }

    /// meshctl on host `node`, as its operator would run it: the defaults reach the
    /// local control plane and agent; `--agent` adds the server's.
    fn meshctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.lab.host("node").command(bins::meshctl(), None).unwrap();
        for var in ["MESHCTL_CONTROL_PLANE", "MESHCTL_CONTROL_ADMIN", "MESHCTL_AGENTS"] {
            cmd.env_remove(var);
        }
        cmd.args(args).output().expect("meshctl runs")
    }

    fn text(&self, args: &[&str]) -> String {
        let out = self.meshctl(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "meshctl {args:?} failed ({}):\n{text}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("$ meshctl {}\n{text}", args.join(" "));
        text
    }

    fn json(&self, args: &[&str]) -> Value {
        let all = [args, &["-o", "json"]].concat();
        let text = self.text(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("meshctl {all:?}: not JSON ({e}):\n{text}"))
    }

    fn curl(&self, url: &str) -> bool {
        self.lab
            .host("node")
            .command("curl", Some(self.workload.absolute()))
            .unwrap()
            .args(["-fsS", "--max-time", "5", "-o", "/dev/null", url])
            .status()
            .unwrap()
            .success()
    }
}

const BOTH: &[&str] = &["--agent", "http://127.0.0.1:15000", "--agent", "http://10.77.0.2:15000"];

fn meshctl_reads_a_running_mesh(mode: &str) {
    let m = Mesh::new(mode);
    assert!(m.curl(&format!("http://{VIP}/hello")), "meshed call works");
    let with = |args: &[&'static str]| [args, BOTH].concat();

    // Both agents acknowledged the current version.
    let status = eventually(Duration::from_secs(10), "both agents in sync", || {
        let v = m.json(&with(&["status"]));
        let agents = v["control_plane"]["agents"].as_array()?.clone();
        (agents.len() == 2 && agents.iter().all(|a| a["state"] == "in sync")).then_some(v)
    });
    let cp = &status["control_plane"];
    assert_eq!((cp["ready"].as_bool(), cp["services"].as_u64()), (Some(true), Some(3)), "{status:#}");
    let version = cp["current_version"].as_u64().expect("version");
    let nodes: Vec<&str> =
        cp["agents"].as_array().unwrap().iter().filter_map(|a| a["node"].as_str()).collect();
    assert_eq!(nodes, ["node", "server"], "{status:#}");
    for a in cp["agents"].as_array().unwrap() {
        assert_eq!((a["mode"].as_str(), a["connected"].as_bool()), (Some(mode), Some(true)), "{status:#}");
        assert_eq!(a["acked_version"], version, "{status:#}");
    }
    for a in status["agents"].as_array().unwrap() {
        assert_eq!((a["mode"].as_str(), a["ready"].as_bool()), (Some(mode), Some(true)), "{status:#}");
        assert_eq!(a["discovery"]["applied_version"], version, "{status:#}");
        assert_eq!(a["discovery"]["connected"], true, "{status:#}");
    }
    let text = m.text(&with(&["status"]));
    assert!(text.contains("CONTROL PLANE  http://127.0.0.1:15011\n"), "{text}");
    for node in ["node", "server"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{node} ")) && l.contains(mode) && l.ends_with("in sync")),
            "{text}"
        );
    }
    for admin in ["http://127.0.0.1:15000", "http://10.77.0.2:15000"] {
        let line = text.lines().find(|l| l.starts_with(admin)).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("connected") && line.contains(&version.to_string()), "{line}");
    }

    // version: one release everywhere, as the real binaries report it; no skew.
    let versions = m.json(&with(&["version"]));
    let release = versions["client"].as_str().expect("meshctl's version");
    assert_eq!(versions["control_plane"], release, "{versions:#}");
    let agents = versions["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 4, "two from the control plane, two asked: {versions:#}");
    assert!(agents.iter().all(|a| a["version"] == release), "{versions:#}");
    assert_eq!(versions["warnings"], serde_json::json!([]), "{versions:#}");

    // services: the registry as the control plane serves it.
    let text = m.text(&["services"]);
    let api = text.lines().find(|l| l.starts_with("shop/api ")).unwrap_or_else(|| panic!("{text}"));
    for cell in [VIP, "api.shop.svc.cluster.local", "80/http1", "round-robin", "1/1 usable", "1 rule"] {
        assert!(api.contains(cell), "{cell} missing from {api:?}");
    }
    assert!(text.lines().any(|l| l.starts_with("shop/echo ") && l.contains("7000/tcp")), "{text}");
    let json = m.json(&["services"]);
    assert_eq!(json["version"], version);
    let api = json["services"].as_array().unwrap().iter().find(|s| s["name"] == "api").expect("api");
    assert_eq!(api["authorization"][0]["principals"][0], FRONTEND);
    assert_eq!(api["endpoints"][0]["identity"], API);
    assert_eq!(api["endpoints"][0]["agent_address"], "10.77.0.2:15008");

    // endpoints: what each agent's data path holds.
    let text = m.text(&with(&["endpoints", "api"]));
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("shop/api ")).collect();
    assert_eq!(rows.len(), 2, "one row per agent: {text}");
    for r in rows {
        for cell in ["80/http1", "10.77.0.2:8080", "healthy", API, "server"] {
            assert!(r.contains(cell), "{cell} missing from {r:?}");
        }
    }
    let json = m.json(&with(&["endpoints"]));
    for agent in json.as_array().unwrap() {
        assert_eq!(agent["applied_version"], version, "{json:#}");
        let echo = agent["routes"].as_array().unwrap().iter().find(|r| r["service"] == "shop/echo").unwrap();
        assert_eq!(echo["endpoints"][0]["addr"], "10.77.0.2:7000");
        assert_eq!(echo["endpoints"][0]["agent_address"], "10.77.0.2:15008");
    }
    let text = m.text(&["endpoints", "api", "--from", "control"]);
    assert!(text.lines().any(|l| l.starts_with("shop/api ") && l.contains("10.77.0.2:15008")), "{text}");
    let json = m.json(&["endpoints", "api", "--from", "control"]);
    assert_eq!(json["services"].as_array().map(Vec::len), Some(1), "{json:#}");
    assert_eq!(json["services"][0]["endpoints"][0]["health"], "HEALTH_HEALTHY");

    // certs: each agent's workload certificate from the CA.
    let text = m.text(&with(&["certs"]));
    for (admin, id) in [("http://127.0.0.1:15000", FRONTEND), ("http://10.77.0.2:15000", API)] {
        let line = text.lines().find(|l| l.starts_with(admin)).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains(id) && (line.contains("in 23h") || line.contains("in 1d")), "{line}");
    }
    let json = m.json(&with(&["certs"]));
    for (agent, id) in json.as_array().unwrap().iter().zip([FRONTEND, API]) {
        let cert = &agent["certificates"][0];
        assert_eq!(cert["identity"], id, "{json:#}");
        let left = cert["expires_in_seconds"].as_i64().unwrap();
        assert!((80_000..=86_400).contains(&left), "{json:#}");
    }

    // config-dump: the raw views of both components (the default agent only).
    let text = m.text(&["config-dump"]);
    let pretty: Value = serde_json::from_str(&text).expect("config-dump prints JSON");
    let json = m.json(&["config-dump"]);
    assert_eq!(json["control"]["version"], version);
    assert_eq!(json["control"]["connected_agents"], 2);
    let local = &json["agents"]["http://127.0.0.1:15000"];
    assert_eq!((local["mode"].as_str(), local["ready"].as_bool()), (Some(mode), Some(true)), "{json:#}");
    assert_eq!(local["certificates"][0]["identity"], FRONTEND);
    assert_eq!(pretty["control"]["snapshot"], json["control"]["snapshot"]);
    let only = m.json(&["config-dump", "agent"]);
    assert!(only.get("control").is_none() && only["agents"].is_object(), "{only:#}");

    // explain: by VIP, by hostname, a TCP service, and non-service addresses.
    let text = m.text(&["explain", "10.77.0.1", "10.96.0.40:80"]);
    for want in [
        "service      shop/api port 80 (http1), matched by VIP 10.96.0.40:80",
        "mTLS via agent 10.77.0.2:15008",
        &format!("authorization  allowed: rule 1 allows {FRONTEND}"),
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    let json = m.json(&["explain", "10.77.0.1", "api.shop.svc.cluster.local:80"]);
    assert_eq!(json["service"], "shop/api", "{json:#}");
    // A workload reaches the name through the VIP its agent's DNS answers.
    assert_eq!(
        json["matched_by"],
        "hostname api.shop.svc.cluster.local, which the agent's DNS answers with VIP 10.96.0.40:80"
    );
    assert_eq!(json["outcome"], "balanced");
    assert_eq!(json["candidates"], serde_json::json!(["10.77.0.2:8080"]));
    assert_eq!(json["source_identity"], FRONTEND);
    assert_eq!(json["authorization"]["decision"], "allowed");
    let json = m.json(&["explain", "10.77.0.2", "10.96.0.40:80"]);
    assert_eq!(json["authorization"]["decision"], "denied", "api's own identity is not allowed: {json:#}");
    let json = m.json(&["explain", "10.77.0.1", "10.96.0.41:7000"]);
    assert_eq!((json["service"].as_str(), json["protocol"].as_str()), (Some("shop/echo"), Some("tcp")));
    let json = m.json(&["explain", "10.77.0.1", "10.77.0.2:8080"]);
    assert_eq!(json["outcome"], "passthrough");
    assert!(json["summary"].as_str().unwrap().contains("is an endpoint of shop/api addressed directly"));
    let json = m.json(&["explain", "10.77.0.1", "10.77.0.2:9999"]);
    assert_eq!(json["outcome"], "passthrough");
    assert!(!json["summary"].as_str().unwrap().contains("is an endpoint of"), "{json:#}");

    // Pre-flight on this machine (root, BTF, cgroup v2): eBPF mode will work.
    let text = m.text(&["check"]);
    assert!(text.contains("eBPF mode:     will work"), "{text}");
    assert!(text.contains("--mode auto picks: ebpf"), "{text}");
    let json = m.json(&["check"]);
    assert_eq!((json["ebpf"].as_bool(), json["auto_picks"].as_str()), (Some(true), Some("ebpf")), "{json:#}");
    let backend = json["facts"].as_array().unwrap().iter().find(|f| f["name"] == "iptables backend").unwrap();
    assert_eq!(backend["value"], "nf_tables", "{json:#}");
    // The agents kept serving: the log shows the call made at the start went over mTLS.
    m.client.wait_log("access record", |v| v["kind"] == "http" && v["destination_identity"] == API);
    m.server.wait_log("inbound", |v| v["direction"] == "inbound" && v["source_identity"] == FRONTEND);
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { if super::require_root(stringify!($name)) { super::$name("ebpf") } } )*
        }
        mod iptables {
            $( #[test] fn $name() { if super::require_root(stringify!($name)) { super::$name("iptables") } } )*
        }
    };
}

both_modes!(meshctl_reads_a_running_mesh);
