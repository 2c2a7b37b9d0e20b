//! End to end, the mesh's observability: a real Prometheus scraping the agent's
//! `/metrics` counts exactly the requests and connections driven through the mesh;
//! the access log (to a file) holds one parseable JSON line per HTTP request and per
//! TCP connection, with the fields operators need; the admin endpoint's readiness
//! waits for certificates and a discovery snapshot, the log filter changes at run
//! time and `/quitquitquit` drains open connections before exiting (both on the admin
//! socket only: the TCP port refuses them); both agents
//! export a span per request of a sampled trace to an OTLP collector, linked into
//! the applications' trace.
//!
//! Lab as in `mesh_tls.rs`: a control plane on `control`, workload A and its agent on
//! `client`, the `api` (HTTP) and `echo` (TCP) servers and their agent on `server`,
//! both agents with identities, in each interception mode.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use mesh_tests::{
    Agent, AgentOptions, Cgroup, Control, Lab, agent::message, bins, eventually, otlp, process::LoggedChild,
    servers,
};
use serde_json::Value;

const API_VIP: &str = "10.96.0.40";
const ECHO_VIP: &str = "10.96.0.41";
/// Each agent's scrape port (`--metrics-addr`), on its host's address.
const SCRAPE_PORT: u16 = 15020;
/// A service whose server answers every request 503 (started by the alert test only).
const FLAKY_VIP: &str = "10.96.0.42";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn registry() -> String {
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{API_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: echo
    namespace: shop
    vips: [{ECHO_VIP}]
    ports: [{{port: 7000, protocol: tcp}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: flaky
    namespace: shop
    vips: [{FLAKY_VIP}]
    ports: [{{port: 80, target_port: 8081, protocol: http}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
"
    )
}

/// Writes the registry into `dir`; returns its path.
fn write_config(dir: &Path) -> PathBuf {
    let reg = dir.join("registry.yaml");
    std::fs::write(&reg, registry()).unwrap();
    reg
}

fn start_control(lab: &Lab, dir: &Path) -> Control {
    let reg = write_config(dir);
    Control::start_with_ca(lab.host("control"), &reg, dir, &["client", "server"], &[]).expect("control plane")
}

fn agent_options(mode: &str, host: &str, cg: &Cgroup, control: &Control, identity: &str) -> AgentOptions {
    control.agent_options(mode, host, identity).cgroup(cg)
}

struct Mesh {
    lab: Lab,
    dir: tempfile::TempDir,
    control: Control,
    client_agent: Agent,
    server_agent: Agent,
    workload: Cgroup,
    _server_cg: Cgroup,
    _api: servers::Server,
    _echo: servers::Server,
    /// Both agents export spans here (on `control`, 10.77.0.1:4317).
    collector: otlp::Collector,
}

impl Mesh {
    /// Both agents write their access logs to `client.access.log` / `server.access.log`
    /// in the test's temporary directory.
    fn new(mode: &str) -> Self {
        let lab = Lab::new(&["control", "client", "server"]).expect("lab");
        let dir = tempfile::tempdir().unwrap();
        let control = start_control(&lab, dir.path());
        // Answers with the request headers it got, so tests see the trace context.
        let api = servers::http_echo_headers(lab.host("server"), 8080, "api", 200).unwrap();
        let collector = otlp::collector(lab.host("control"), 4317).unwrap();
        let echo = servers::echo(lab.host("server"), 7000).unwrap();
        let workload = Cgroup::new("obs-wl").unwrap();
        let server_cg = Cgroup::new("obs-srv").unwrap();
        let start = |host: &str, cg: &Cgroup, identity: &str| {
            let log = dir.path().join(format!("{host}.access.log"));
            let opts = agent_options(mode, host, cg, &control, identity)
                .arg("--access-log")
                .arg(log.display().to_string())
                .arg("--drain-timeout")
                .arg("10s")
                .arg("--otlp-endpoint")
                .arg("http://10.77.0.1:4317")
                .arg("--metrics-addr")
                .arg(format!("0.0.0.0:{SCRAPE_PORT}"));
            let a = Agent::start(lab.host(host), opts).expect("agent starts");
            a.wait_enrolled();
            a
        };
        let client_agent = start("client", &workload, "shop/frontend");
        let server_agent = start("server", &server_cg, "shop/api");
        Self {
            lab,
            dir,
            control,
            client_agent,
            server_agent,
            workload,
            _server_cg: server_cg,
            _api: api,
            _echo: echo,
            collector,
        }
    }

    /// Runs `program` in the workload's cgroup on `client`.
    fn workload(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        self.lab
            .host("client")
            .command(program, Some(self.workload.absolute()))
            .unwrap()
            .args(args)
            .output()
            .unwrap()
    }

    /// `n` GET requests to the api service over one kept-alive connection; returns
    /// their status codes.
    fn requests(&self, n: usize, path: &str, extra: &[&str]) -> Vec<String> {
        self.requests_to(API_VIP, n, path, extra)
    }

    /// `n` GET requests to the service at `vip` over one kept-alive connection.
    fn requests_to(&self, vip: &str, n: usize, path: &str, extra: &[&str]) -> Vec<String> {
        let url = format!("http://{vip}{path}");
        let mut args = vec!["-sS", "--max-time", "10", "-w", "%{http_code}\\n"];
        args.extend_from_slice(extra);
        for _ in 0..n {
            args.extend(["-o", "/dev/null", &url]);
        }
        let out = self.workload("curl", &args);
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// One TCP connection to the echo service sending `hello`; returns the reply.
    fn tcp_hello(&self) -> String {
        let out = self.workload(
            bins::probe(),
            &["--connect", &format!("{ECHO_VIP}:7000"), "send", "--hex", "68656c6c6f"],
        );
        assert!(out.status.success(), "probe: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
        v["reply_hex"].as_str().unwrap_or_default().to_owned()
    }

    fn access_log(&self, host: &str) -> Vec<Value> {
        read_access_log(&self.dir.path().join(format!("{host}.access.log")))
    }
}

/// Every line of an access log file, each parsed as JSON (a line that does not parse
/// fails the test).
fn read_access_log(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}")))
        .collect()
}

/// A Prometheus server in `host`'s namespace scraping `target` every second (job
/// `mesh-agent`), evaluating `rules` if given, with its storage in a temporary
/// directory; killed on drop.
struct Prometheus {
    _process: LoggedChild,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(
        binary: &Path,
        host: &mesh_tests::Host,
        target: std::net::SocketAddr,
        rules: Option<&Path>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let rule_files = rules.map(|r| format!("rule_files: ['{}']\n", r.display())).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n  - job_name: mesh-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:19090".parse().unwrap();
        let mut cmd = host.command(binary, None).unwrap();
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.format=json");
        let process = LoggedChild::spawn("prometheus", cmd).expect("prometheus starts");
        eventually(Duration::from_secs(30), "prometheus ready", || {
            host.http("GET", addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        Self { _process: process, addr, _dir: dir }
    }

    /// The value of an instant query returning one series, as a number.
    fn query(&self, host: &mesh_tests::Host, promql: &str) -> Option<f64> {
        let (status, body) =
            host.http("GET", self.addr, &format!("/api/v1/query?query={}", encode(promql))).ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        let [series] = result.as_slice() else { return None };
        series["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `promql` evaluates to exactly `want`.
    fn await_value(&self, host: &mesh_tests::Host, promql: &str, want: f64) {
        let mut last = None;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(Duration::from_secs(30), &format!("{promql} == {want}"), || {
                last = self.query(host, promql);
                (last == Some(want)).then_some(())
            })
        }));
        assert!(found.is_ok(), "{promql}: last value {last:?}, want {want}");
    }
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn prometheus_counts_requests_and_connections(mode: &str) {
    let Some(prometheus) =
        mesh_tests::require_tool("prometheus", "prometheus", "prometheus_counts_requests_and_connections")
    else {
        return;
    };
    let mesh = Mesh::new(mode);
    // Prometheus runs on another host, as a cluster's does, and scrapes the client
    // agent's scrape port on the node's address; that port shows no configuration.
    let control = mesh.lab.host("control");
    let scrape = std::net::SocketAddr::from((mesh.lab.host("client").v4, SCRAPE_PORT));
    let prom = Prometheus::start(&prometheus, control, scrape, None);
    // The scrape works before any traffic: the agent's own series are there.
    prom.await_value(control, "up{job=\"mesh-agent\"}", 1.0);
    for path in ["/config_dump", "/stats", "/workloads", "/logging"] {
        let (status, _) = control.http("GET", scrape, path).unwrap();
        assert_eq!(status, 404, "GET {path} on the scrape port");
    }
    assert_eq!(control.http("GET", scrape, "/ready").unwrap().0, 200, "GET /ready on the scrape port");

    const N: usize = 37;
    let codes = mesh.requests(N, "/counted", &[]);
    assert_eq!(codes.len(), N);
    assert!(codes.iter().all(|c| c == "200"), "{codes:?}");
    prom.await_value(
        control,
        "sum(mesh_requests_total{direction=\"outbound\",destination_service=\"shop/api\"})",
        N as f64,
    );
    prom.await_value(
        control,
        "sum(mesh_request_duration_seconds_count{direction=\"outbound\",destination_service=\"shop/api\",response_code=\"200\"})",
        N as f64,
    );

    // A raw TCP flow: one connection, 5 bytes each way.
    assert_eq!(mesh.tcp_hello(), "68656c6c6f");
    prom.await_value(
        control,
        "sum(mesh_tcp_connections_opened_total{direction=\"outbound\",destination_service=\"shop/echo\"})",
        1.0,
    );
    prom.await_value(
        control,
        "sum(mesh_tcp_connections_closed_total{direction=\"outbound\",destination_service=\"shop/echo\"})",
        1.0,
    );
    prom.await_value(
        control,
        "sum(mesh_tcp_sent_bytes_total{direction=\"outbound\",destination_service=\"shop/echo\"})",
        5.0,
    );
    prom.await_value(
        control,
        "sum(mesh_tcp_received_bytes_total{direction=\"outbound\",destination_service=\"shop/echo\"})",
        5.0,
    );
    // The receiving agent counted the same requests inbound (its /metrics, read directly).
    let (status, server_metrics) =
        mesh.lab.host("server").http("GET", mesh.server_agent.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        server_metrics.lines().any(|l| l.starts_with("mesh_requests_total{")
            && l.contains("direction=\"inbound\"")
            && l.contains(&format!("source_identity=\"{FRONTEND}\""))),
        "{server_metrics}"
    );

    // The control plane: connected agents and snapshot pushes.
    let (status, control_metrics) =
        mesh.lab.host("control").http("GET", mesh.control.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(control_metrics.lines().any(|l| l == "mesh_control_agents_connected 2"), "{control_metrics}");
    let pushes = control_metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_control_snapshots_sent_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no snapshots_sent_total in {control_metrics}"));
    assert!(pushes >= 2.0, "{control_metrics}");
    assert!(
        control_metrics.contains("mesh_control_snapshot_responses_total{result=\"ack\"}"),
        "{control_metrics}"
    );
}

/// The IP of a record's `source` (which must be an `address:port`).
fn source_ip(record: &Value) -> String {
    let source = record["source"].as_str().and_then(|s| s.parse::<std::net::SocketAddr>().ok());
    source.unwrap_or_else(|| panic!("source is not an address: {record}")).ip().to_string()
}

fn find(records: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    records.iter().find(|v| pred(v))
}

fn access_log_records_requests_and_connections(mode: &str) {
    let mesh = Mesh::new(mode);
    let traceparent = format!("traceparent: 00-{TRACE_ID}-00f067aa0ba902b7-01");
    let codes = mesh.requests(3, "/logged", &["-H", &traceparent]);
    assert_eq!(codes, ["200", "200", "200"]);
    assert_eq!(mesh.tcp_hello(), "68656c6c6f");

    let is_http = |v: &Value| v["kind"] == "http" && v["path"] == "/logged";
    let is_tcp = |v: &Value| v["kind"] == "tcp" && v["destination_service"] == "shop/echo";
    let client = eventually(Duration::from_secs(10), "client access log lines", || {
        let r = mesh.access_log("client");
        (r.iter().filter(|v| is_http(v)).count() == 3 && r.iter().any(is_tcp)).then_some(r)
    });
    let server = eventually(Duration::from_secs(10), "server access log lines", || {
        let r = mesh.access_log("server");
        (r.iter().filter(|v| is_http(v)).count() == 3 && r.iter().any(is_tcp)).then_some(r)
    });

    // Outbound HTTP, on the client's agent.
    let h = find(&client, is_http).unwrap();
    let ts = h["timestamp"].as_str().expect("timestamp");
    assert!(ts.ends_with('Z') && ts.len() >= 20, "{h}");
    assert_eq!(h["direction"], "outbound", "{h}");
    assert_eq!(h["mode"], mode, "{h}");
    // Both modes redirect the workload's connection to the agent (eBPF to its loopback
    // listener); the agent reports the address the workload would have used.
    assert_eq!(source_ip(h), "10.77.0.2", "{h}");
    assert_eq!(h["source_identity"], FRONTEND, "{h}");
    assert_eq!(h["destination_service"], "shop/api", "{h}");
    assert_eq!(h["destination_endpoint"], "10.77.0.3:8080", "{h}");
    assert_eq!(h["destination_identity"], API, "{h}");
    assert_eq!(h["original_destination"], format!("{API_VIP}:80"), "{h}");
    assert_eq!(h["protocol"], "http1", "{h}");
    assert_eq!(h["method"], "GET", "{h}");
    assert_eq!(h["response_code"], 200, "{h}");
    assert!(h["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "{h}");
    assert!(h["bytes_received"].as_u64().is_some_and(|b| b > 0), "{h}");
    assert!(h["bytes_sent"].is_u64(), "{h}");
    assert_eq!(h["trace_id"], TRACE_ID, "{h}");
    assert_eq!(h["retries"], 0, "{h}");

    // Inbound HTTP, on the server's agent: the same request seen from the other side.
    let h = find(&server, is_http).unwrap();
    assert_eq!(h["direction"], "inbound", "{h}");
    assert_eq!(h["source_identity"], FRONTEND, "{h}");
    assert_eq!(h["destination_service"], "shop/api", "{h}");
    assert_eq!(h["destination_endpoint"], "10.77.0.3:8080", "{h}");
    assert_eq!(h["method"], "GET", "{h}");
    assert_eq!(h["response_code"], 200, "{h}");
    assert_eq!(h["trace_id"], TRACE_ID, "{h}");
    assert!(h["latency_ms"].is_f64() && h["timestamp"].is_string() && h["protocol"] == "http1", "{h}");

    // The TCP connection, on both sides.
    let t = find(&client, is_tcp).unwrap();
    assert_eq!(t["direction"], "outbound", "{t}");
    assert_eq!(t["mode"], mode, "{t}");
    assert!(t["timestamp"].is_string() && t["protocol"].is_string(), "{t}");
    assert_eq!(source_ip(t), "10.77.0.2", "{t}");
    assert_eq!(t["source_identity"], FRONTEND, "{t}");
    assert_eq!(t["destination_identity"], API, "{t}");
    assert_eq!(t["destination_endpoint"], "10.77.0.3:7000", "{t}");
    assert_eq!(t["original_destination"], format!("{ECHO_VIP}:7000"), "{t}");
    assert_eq!(t["bytes_sent"], 5, "{t}");
    assert_eq!(t["bytes_received"], 5, "{t}");
    assert!(t["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{t}");
    assert!(t.get("error").is_none(), "{t}");
    let t = find(&server, is_tcp).unwrap();
    assert_eq!(t["direction"], "inbound", "{t}");
    assert_eq!(t["source_identity"], FRONTEND, "{t}");
    assert_eq!(t["destination_endpoint"], "10.77.0.3:7000", "{t}");
    assert_eq!(t["bytes_sent"], 5, "{t}");
    assert_eq!(t["bytes_received"], 5, "{t}");
}

fn ready_waits_for_certificate_and_snapshot(mode: &str) {
    let lab = Lab::new(&["control", "client"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let workload = Cgroup::new("obs-ready").unwrap();
    // The control plane has run once (its CA, the agent's anchor, exists) and is down:
    // interception is attached, but there is neither a certificate nor a snapshot.
    let first = start_control(&lab, dir.path());
    let opts = agent_options(mode, "client", &workload, &first, "shop/frontend")
        .arg("--discovery-backoff-max")
        .arg("300ms");
    first.terminate().expect("control plane stops");
    let agent = Agent::start(lab.host("client"), opts).expect("agent starts");
    let client = lab.host("client");
    let (status, body) = client.http("GET", agent.admin, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("certificate") && body.contains("discovery snapshot"), "{body}");
    assert_eq!(client.http("GET", agent.admin, "/live").unwrap().0, 200);
    let (_, dump) = client.http("GET", agent.admin, "/config_dump").unwrap();
    assert!(dump.contains("\"ready\": false"), "{dump}");

    let _control = start_control(&lab, dir.path());
    eventually(Duration::from_secs(20), "/ready 200 once the control plane answers", || {
        client.http("GET", agent.admin, "/ready").ok().filter(|(s, _)| *s == 200)
    });
    assert!(agent.find(|v| message(v) == "workload certificate issued").is_some());
    assert!(agent.find(|v| message(v) == "snapshot applied").is_some());
}

fn log_level_changes_at_run_time_and_quitquitquit_drains(mode: &str) {
    let mesh = Mesh::new(mode);
    let client = mesh.lab.host("client");
    let admin = mesh.client_agent.admin;
    // EnvFilter prints its directives in its own order.
    let same = |a: &str, b: &str| {
        let set = |s: &str| s.trim().split(',').map(str::to_owned).collect::<std::collections::BTreeSet<_>>();
        set(a) == set(b)
    };
    let agent = &mesh.client_agent;
    let (status, current) = client.http("GET", admin, "/logging").unwrap();
    assert!(status == 200 && same(&current, "info,mesh_agent=debug"), "{status} {current}");
    // Changes are refused on the TCP port (workloads reach it) and served on the socket.
    let (status, body) = client.http("POST", admin, "/logging?level=warn").unwrap();
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("--admin-socket"), "the refusal says where changes go: {body}");
    let (status, body) = agent.post("/logging?level=not%3D%3Da%20filter").unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = agent.post("/logging").unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = agent.socket_request("GET", "/logging").unwrap();
    assert!(status == 200 && same(&body, "info,mesh_agent=debug"), "{status} {body}");

    // At `warn`, a connection leaves its access record but no "connection closed" line.
    let (status, body) = agent.post("/logging?level=warn").unwrap();
    assert_eq!((status, body.trim()), (200, "warn"));
    assert_eq!(mesh.tcp_hello(), "68656c6c6f");
    eventually(Duration::from_secs(10), "access record of the quiet connection", || {
        (mesh.access_log("client").iter().filter(|v| v["kind"] == "tcp").count() == 1).then_some(())
    });
    let (status, body) = agent.post("/logging?level=info,mesh_agent%3Ddebug").unwrap();
    assert!(status == 200 && same(&body, "info,mesh_agent=debug"), "{status} {body}");
    mesh.client_agent.wait_log("log filter changed", |v| message(v) == "log filter changed");
    assert_eq!(mesh.tcp_hello(), "68656c6c6f");
    eventually(Duration::from_secs(10), "connection record after the level is back", || {
        (mesh
            .client_agent
            .find_all(|v| message(v) == "connection closed" && v["service"] == "shop/echo")
            .len()
            == 1)
            .then_some(())
    });
    assert!(
        mesh.client_agent.find(|v| message(v) == "log filter changed" && v["filter"] == "warn").is_none(),
        "the change to warn was itself logged at info, which warn hides"
    );

    // Drain: a connection open when /quitquitquit arrives still completes.
    let mut slow = mesh.lab.host("client").command(bins::probe(), Some(mesh.workload.absolute())).unwrap();
    slow.args([
        "--connect",
        &format!("{ECHO_VIP}:7000"),
        "send",
        "--hex",
        "647261696e",
        "--linger",
        "1500ms",
    ])
    .stdout(std::process::Stdio::piped());
    let slow = slow.spawn().unwrap();
    eventually(Duration::from_secs(10), "the slow connection is open", || {
        let (_, stats) = client.http("GET", admin, "/stats").ok()?;
        let v: Value = serde_json::from_str(&stats).ok()?;
        (v["connections"]["active"].as_u64() == Some(1)).then_some(())
    });
    let (status, body) = client.http("POST", admin, "/quitquitquit").unwrap();
    assert_eq!(status, 404, "the TCP port does not drain the agent: {body}");
    let socket = agent.admin_socket.clone();
    let (status, body) = agent.post("/quitquitquit").unwrap();
    assert_eq!((status, body.trim()), (200, "draining"));
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("probe JSON");
    assert_eq!(v["reply_hex"], "647261696e", "the drained connection completed: {v}");
    let done = mesh.client_agent.wait_log("shutdown complete", |v| message(v) == "shutdown complete");
    assert_eq!(done["drained"], 1, "{done}");
    let Mesh { client_agent, .. } = mesh;
    let status = client_agent.terminate().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the admin socket {} outlived the agent", socket.display());
}

/// `curl` from the workload; returns the body (the api server echoes the request
/// headers it received, one `name: value` per line).
fn curl_body(mesh: &Mesh, headers: &[&str], path: &str) -> String {
    let url = format!("http://{API_VIP}{path}");
    let mut args = vec!["-sS", "--max-time", "10"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = mesh.workload("curl", &args);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `traceparent` the server application received: (trace id, parent id, flags).
fn received_traceparent(body: &str) -> (String, String, String) {
    let line = body.lines().find_map(|l| l.strip_prefix("traceparent: ")).unwrap_or_else(|| panic!("{body}"));
    let parts: Vec<&str> = line.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "{line}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

fn spans_are_exported_over_otlp_and_linked_into_the_callers_trace(mode: &str) {
    let mesh = Mesh::new(mode);
    // Not sampled by the caller: neither agent exports it. Sent first, so that once
    // the later requests' spans have arrived, this one's would have too.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let body = curl_body(&mesh, &[&format!("traceparent: 00-{unsampled}-b7ad6b7169203331-00")], "/quiet");
    assert_eq!(received_traceparent(&body).0, unsampled, "{body}");

    // Sampled by the caller: a CLIENT span on the sending agent whose parent is the
    // caller's span, then a SERVER span on the receiving agent whose parent is the
    // CLIENT span, and the application's parent is the SERVER span.
    let app_parent = "00f067aa0ba902b7";
    let body = curl_body(&mesh, &[&format!("traceparent: 00-{TRACE_ID}-{app_parent}-01")], "/traced");
    let (trace, parent_seen_by_app, flags) = received_traceparent(&body);
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE_ID, "01"), "{body}");

    // No context: the sending agent starts a sampled trace and is its root.
    let body = curl_body(&mesh, &[], "/fresh");
    let (fresh, _, fresh_flags) = received_traceparent(&body);
    assert_eq!(fresh_flags, "01", "{body}");

    let spans = eventually(Duration::from_secs(15), "two spans of each sampled trace", || {
        let (a, b) = (mesh.collector.trace(TRACE_ID), mesh.collector.trace(&fresh));
        (a.len() == 2 && b.len() == 2).then_some((a, b))
    });
    let (traced, fresh_spans) = spans;
    let client = traced.iter().find(|s| s.kind == otlp::CLIENT).expect("client span");
    let server = traced.iter().find(|s| s.kind == otlp::SERVER).expect("server span");
    assert_eq!(client.instance, "client", "{client:?}");
    assert_eq!(server.instance, "server", "{server:?}");
    assert_eq!(client.parent_span_id, app_parent, "{client:?}");
    assert_eq!(server.parent_span_id, client.span_id, "{server:?}");
    assert_eq!(parent_seen_by_app, server.span_id, "the application's parent is the receiving agent's span");
    assert_eq!(client.name, "GET shop/api");
    for s in [client, server] {
        assert_eq!(s.attributes["http.request.method"], "GET", "{s:?}");
        assert_eq!(s.attributes["url.path"], "/traced", "{s:?}");
        assert_eq!(s.attributes["http.response.status_code"], "200", "{s:?}");
        assert_eq!(s.attributes["mesh.source.identity"], FRONTEND, "{s:?}");
        assert_eq!(s.attributes["mesh.destination.service"], "shop/api", "{s:?}");
        assert_eq!(s.attributes["mesh.interception_mode"], mode, "{s:?}");
        assert_eq!(s.status, 0, "unset: the request succeeded {s:?}");
        assert_eq!(s.flags & 0xff, 1, "sampled {s:?}");
        assert!(s.end_unix_nano > s.start_unix_nano, "{s:?}");
    }
    assert_eq!(client.attributes["mesh.destination.identity"], API, "{client:?}");
    assert_eq!(client.attributes["network.peer.address"], "10.77.0.3", "{client:?}");
    assert_eq!(client.attributes["client.address"], "10.77.0.2", "{client:?}");
    assert!(
        server.start_unix_nano >= client.start_unix_nano && server.end_unix_nano <= client.end_unix_nano,
        "the receiving agent's span lies within the sending agent's: {client:?} {server:?}"
    );

    let root = fresh_spans.iter().find(|s| s.kind == otlp::CLIENT).expect("client span");
    assert_eq!(root.parent_span_id, "", "the agent started this trace: {root:?}");
    let inner = fresh_spans.iter().find(|s| s.kind == otlp::SERVER).expect("server span");
    assert_eq!(inner.parent_span_id, root.span_id, "{inner:?}");

    assert!(mesh.collector.trace(unsampled).is_empty(), "an unsampled trace was exported");
}

/// The shipped alerting rules (`deploy/prometheus/mesh-alerts.rules.yml`), in a copy
/// whose `for:` durations are cut to zero (they are minutes, for production), and
/// otherwise as shipped.
fn alert_rules_firing_at_once(dir: &Path) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/mesh-alerts.rules.yml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let mut rules: Value = serde_yaml_ng::from_str(&text).unwrap();
    for group in rules["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            if let Some(rule) = rule.as_object_mut() {
                rule.insert("for".into(), Value::from("0s"));
            }
        }
    }
    let path = dir.join("mesh-alerts.rules.yml");
    std::fs::write(&path, serde_yaml_ng::to_string(&rules).unwrap()).unwrap();
    path
}

/// A real Prometheus scraping the calling agent with the shipped alerting rules:
/// a service answering every request 503 raises `MeshServiceErrorRateHigh`, and a
/// healthy one with as much traffic does not.
fn the_error_rate_alert_fires_for_a_failing_service_only(mode: &str) {
    let Some(prometheus) = mesh_tests::require_tool(
        "prometheus",
        "prometheus",
        "the_error_rate_alert_fires_for_a_failing_service_only",
    ) else {
        return;
    };
    let mesh = Mesh::new(mode);
    let _flaky = servers::http_echo_headers(mesh.lab.host("server"), 8081, "flaky", 503).unwrap();
    let client = mesh.lab.host("client");
    let rules = alert_rules_firing_at_once(mesh.dir.path());
    let prom = Prometheus::start(&prometheus, client, mesh.client_agent.admin, Some(&rules));
    prom.await_value(client, "up{job=\"mesh-agent\"}", 1.0);

    // Rounds of calls, each waited for in a scrape, so the counters have several
    // samples to take a rate over (a series' first sample gives none).
    const ROUND: usize = 25;
    let total = |service: &str| {
        format!("sum(mesh_requests_total{{direction=\"outbound\",destination_service=\"shop/{service}\"}})")
    };
    for round in 1..=4 {
        let failed = mesh.requests_to(FLAKY_VIP, ROUND, "/alerting", &[]);
        assert!(failed.iter().all(|c| c == "503"), "the failing service answered {failed:?}");
        let served = mesh.requests(ROUND, "/alerting", &[]);
        assert!(served.iter().all(|c| c == "200"), "the healthy service answered {served:?}");
        prom.await_value(client, &total("flaky"), (round * ROUND) as f64);
        prom.await_value(client, &total("api"), (round * ROUND) as f64);
    }

    let alert = |service: &str| {
        format!(
            "ALERTS{{alertname=\"MeshServiceErrorRateHigh\",alertstate=\"firing\",destination_service=\"shop/{service}\"}}"
        )
    };
    prom.await_value(client, &alert("flaky"), 1.0);
    // Evaluated on the same samples: the healthy service, as busy, raises nothing.
    assert_eq!(
        prom.query(client, &format!("count({})", alert("api"))),
        None,
        "an alert for the healthy service"
    );
    assert_eq!(
        prom.query(client, "count(ALERTS{alertstate=\"firing\"})"),
        Some(1.0),
        "only the failing service's alert fires"
    );
}

mesh_tests::both_modes!(
    the_error_rate_alert_fires_for_a_failing_service_only,
    prometheus_counts_requests_and_connections,
    access_log_records_requests_and_connections,
    ready_waits_for_certificate_and_snapshot,
    log_level_changes_at_run_time_and_quitquitquit_drains,
    spans_are_exported_over_otlp_and_linked_into_the_callers_trace,
);
