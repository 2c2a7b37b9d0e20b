//! End to end, the agent's HTTP-aware proxying (`mesh-agent/src/l7`): per-request
//! balancing over one kept-alive client connection, retries across a backend that
//! dies, the circuit breaker, gRPC (real grpcio client and server), WebSocket
//! upgrades, trace context, and the receiving agent's `x-forwarded-for`,
//! method/path authorization and rate limit per calling identity on the meshed path.
//!
//! Lab: a control plane on host `control`, the workload and its agent on `client`,
//! backends on `b1`..`b3` (10.77.0.3..5). The meshed tests use `client` (or `c1`..`c3`)
//! and `server` agents with identities, as `mesh_tls.rs` does.

use std::{
    collections::BTreeMap,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, Cgroup, Control, Lab, agent::message, bins, eventually, process::LoggedChild, servers,
};
use serde_json::Value;

const VIP: &str = "10.96.0.50";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

fn backend_addr(name: &str) -> &'static str {
    match name {
        "b1" => "10.77.0.3",
        "b2" => "10.77.0.4",
        "b3" => "10.77.0.5",
        other => panic!("no backend {other}"),
    }
}

/// One service `web` at [`VIP`]:80 -> `target_port` on `backends`, with `policy`
/// (YAML lines indented for the `policy:` key, or empty).
fn registry(protocol: &str, target_port: u16, backends: &[&str], policy: &str) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("      - {{address: {}, workload: {b}}}\n", backend_addr(b)))
        .collect();
    let policy = if policy.is_empty() { String::new() } else { format!("    policy:\n{policy}") };
    format!(
        "services:\n  - name: web\n    namespace: shop\n    vips: [{VIP}]\n    ports: [{{port: 80, target_port: \
         {target_port}, protocol: {protocol}}}]\n{policy}    endpoints:\n{endpoints}"
    )
}

/// Control plane, one client agent (no identity: plain upstream connections), and
/// whatever backends the test started.
struct Mesh {
    lab: Lab,
    _dir: tempfile::TempDir,
    _control: Control,
    agent: Agent,
    workload: Cgroup,
    /// In-process backends by name; `None` once killed.
    backends: BTreeMap<String, Option<servers::Server>>,
    _processes: Vec<LoggedChild>,
}

impl Mesh {
    fn new(
        mode: &str,
        registry_yaml: &str,
        start: impl FnOnce(&Lab) -> (Vec<(&'static str, servers::Server)>, Vec<LoggedChild>),
    ) -> Self {
        let lab = Lab::new(&["control", "client", "b1", "b2", "b3"]).expect("lab");
        let (servers, processes) = start(&lab);
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = dir.path().join("registry.yaml");
        std::fs::write(&reg, registry_yaml).expect("write registry");
        let control = Control::start(lab.host("control"), &reg, &[]).expect("control plane starts");
        let workload = Cgroup::new("wl").expect("cgroup");
        let opts = control.discovery_options(mode, "client").cgroup(&workload);
        let agent = Agent::start(lab.host("client"), opts).expect("agent starts");
        agent.wait_log("first snapshot", |v| message(v) == "snapshot applied");
        Self {
            lab,
            _dir: dir,
            _control: control,
            agent,
            workload,
            backends: servers.into_iter().map(|(n, s)| (n.to_owned(), Some(s))).collect(),
            _processes: processes,
        }
    }

    /// A command run by the workload (in its cgroup, on host `client`), without proxies.
    fn workload_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd =
            self.lab.host("client").command(program, Some(self.workload.absolute())).expect("command");
        for var in
            ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "grpc_proxy"]
        {
            cmd.env_remove(var);
        }
        cmd
    }

    fn curl(&self, args: &[&str]) -> Output {
        self.workload_command("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .output()
            .expect("curl runs")
    }

    fn backend(&self, name: &str) -> &servers::Server {
        self.backends[name].as_ref().unwrap_or_else(|| panic!("{name} was killed"))
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\nagent log:\n{}", self.agent.log_text())
    }
}

/// What curl's `-w` prints after every response: `@@ <connects> <code> <endpoint>`.
const WRITE_OUT: &str = "\n@@ %{num_connects} %{http_code} %header{x-mesh-endpoint}\n";

/// One response of a multi-URL curl run.
#[derive(Debug)]
struct Reply {
    connects: u32,
    code: u16,
    endpoint: String,
    /// The backend named in the body (`server=<name>`), if any.
    server: Option<String>,
}

fn replies(out: &Output) -> Vec<Reply> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut result = Vec::new();
    let mut server = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("server=") {
            server = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("@@ ") {
            let mut f = rest.split_whitespace();
            result.push(Reply {
                connects: f.next().and_then(|v| v.parse().ok()).unwrap_or(u32::MAX),
                code: f.next().and_then(|v| v.parse().ok()).unwrap_or(0),
                endpoint: f.next().unwrap_or_default().to_owned(),
                server: server.take(),
            });
        }
    }
    result
}

fn urls(n: usize, path: &str) -> Vec<String> {
    (0..n).map(|i| format!("http://{VIP}{path}?i={i}")).collect()
}

fn echo_backends(lab: &Lab, statuses: &[(&'static str, u16)]) -> Vec<(&'static str, servers::Server)> {
    statuses
        .iter()
        .map(|(b, status)| (*b, servers::http_echo_headers(lab.host(b), 8080, b, *status).expect("backend")))
        .collect()
}

// 1. Round robin per request over one kept-alive connection, HTTP/1.1 and HTTP/2.
fn round_robin_per_request_over_one_connection(mode: &str) {
    let reg = registry("http", 8080, &BACKENDS, "      load_balancer: {algorithm: round-robin}\n");
    let m =
        Mesh::new(mode, &reg, |lab| (echo_backends(lab, &[("b1", 200), ("b2", 200), ("b3", 200)]), vec![]));
    const N: usize = 30;
    let want: BTreeMap<String, usize> = BACKENDS.iter().map(|b| (b.to_string(), N / 3)).collect();
    // HTTP/1.1: curl, N URLs on one kept-alive connection.
    let mut args = vec!["--http1.1", "-w", WRITE_OUT];
    let urls = urls(N, "/rr");
    args.extend(urls.iter().map(String::as_str));
    let out = m.curl(&args);
    let got = replies(&out);
    if !out.status.success() || got.len() != N {
        m.fail(&format!("curl {} with {} replies: {got:?} {}", out.status, got.len(), stderr(&out)));
    }
    let connects: u32 = got.iter().map(|r| r.connects).sum();
    assert_eq!(connects, 1, "all {N} requests on one connection: {got:?}");
    let mut per_backend = BTreeMap::new();
    for r in &got {
        assert_eq!(r.code, 200, "{r:?}");
        let server = r.server.clone().unwrap_or_default();
        assert_eq!(r.endpoint, format!("{}:8080", backend_addr(&server)), "x-mesh-endpoint names it");
        *per_backend.entry(server).or_insert(0) += 1;
    }
    assert_eq!(per_backend, want, "HTTP/1.1: round robin gives each backend N/3");
    // HTTP/2 (prior knowledge): mesh-probe's hyper client, N requests on its one
    // connection (curl 7.88 cannot reuse an h2c connection even without the mesh).
    let out = m
        .workload_command(bins::probe())
        .args([
            "--connect",
            &format!("{VIP}:80"),
            "http",
            "--http2",
            "--path",
            "/rr",
            "--count",
            &N.to_string(),
        ])
        .output()
        .expect("probe runs");
    if !out.status.success() {
        m.fail(&format!("HTTP/2 client failed: {} {}", out.status, stderr(&out)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    let mut per_backend = BTreeMap::new();
    for r in v["replies"].as_array().expect("replies") {
        assert_eq!(r["status"], 200, "{r}");
        let server = r["server"].as_str().unwrap_or_default().to_owned();
        assert_eq!(r["endpoint"], format!("{}:8080", backend_addr(&server)), "{r}");
        *per_backend.entry(server).or_insert(0) += 1;
    }
    assert_eq!(per_backend, want, "HTTP/2: round robin gives each backend N/3");
    // Access records are written in batches (every 50 ms): wait for all of them.
    eventually(Duration::from_secs(10), "one HTTP/2 access record per request", || {
        (m.agent.find_all(|v| v["protocol"] == "http2").len() == N).then_some(())
    });
}

// 2. A backend killed in the middle of a request stream: retries and outlier
//    detection hide it completely.
fn backend_killed_mid_stream_costs_no_request(mode: &str) {
    let policy = "      load_balancer: {algorithm: round-robin}
      retries: {attempts: 3, retry_on: [connect-failure, reset, \"503\"]}
      outlier_detection: {consecutive_failures: 2, base_ejection: 30s}
";
    let reg = registry("http", 8080, &BACKENDS, policy);
    let mut m =
        Mesh::new(mode, &reg, |lab| (echo_backends(lab, &[("b1", 200), ("b2", 200), ("b3", 200)]), vec![]));
    const N: usize = 600;
    let urls = urls(N, "/stream");
    let mut curl = m
        .workload_command("curl")
        .args(["-sS", "--max-time", "60", "--http1.1", "-w", WRITE_OUT])
        .args(&urls)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    eventually(Duration::from_secs(10), "b2 serves part of the stream", || {
        (m.backend("b2").seen().len() >= 10).then_some(())
    });
    let b2 = m.backends.get_mut("b2").and_then(Option::take).expect("b2");
    // Stops listening and closes its connections; counted once stopped, so requests
    // that reached b2 while it was going down are included.
    let served_by_b2 = b2.stop().len();
    let killed_at = Instant::now();
    let still_running = curl.try_wait().expect("try_wait").is_none();
    let out = curl.wait_with_output().expect("curl finishes");
    let got = replies(&out);
    assert!(still_running, "b2 was killed only after the stream ended; make N larger");
    let failures: Vec<&Reply> = got.iter().filter(|r| r.code != 200).collect();
    if !out.status.success() || got.len() != N || !failures.is_empty() {
        m.fail(&format!(
            "curl {}; {} replies of {N}; failures: {failures:?}; {}",
            out.status,
            got.len(),
            stderr(&out)
        ));
    }
    let after_kill_b2 =
        got.iter().skip(served_by_b2 * 3 + 3).filter(|r| r.server.as_deref() == Some("b2")).count();
    assert_eq!(after_kill_b2, 0, "no reply from b2 once it was gone");
    let by_others = got.iter().filter(|r| r.server.as_deref() != Some("b2")).count();
    assert!(by_others >= N - served_by_b2, "the other backends took the rest");
    // The agent noticed: it retried and ejected b2.
    m.agent.wait_log("b2 ejected", |v| message(v) == "endpoint ejected as an outlier");
    eprintln!("b2 served {served_by_b2} requests, killed {:?} before the stream ended", killed_at.elapsed());
}

// 3. Circuit breaker: a backend answering 503 opens its breaker; it then gets nothing
//    for the reset timeout while requests keep flowing, and is probed again after.
fn circuit_breaker_stops_and_resumes_traffic_to_a_failing_endpoint(mode: &str) {
    const WINDOW: usize = 4;
    const RESET: Duration = Duration::from_millis(1500);
    let policy = format!(
        "      load_balancer: {{algorithm: round-robin}}
      circuit_breaker: {{window: {WINDOW}, failure_rate: 0.5, reset_timeout: {}ms, half_open_probes: 1, \
         close_after_successes: 1}}
",
        RESET.as_millis()
    );
    let reg = registry("http", 8080, &["b1", "b2"], &policy);
    let m = Mesh::new(mode, &reg, |lab| (echo_backends(lab, &[("b1", 200), ("b2", 503)]), vec![]));
    // Batches of requests on one connection until b2 was probed after a quiet spell.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut all = Vec::new();
    let gap_index = loop {
        let urls = urls(10, "/cb");
        let mut args = vec!["--http1.1", "-w", WRITE_OUT];
        args.extend(urls.iter().map(String::as_str));
        let out = m.curl(&args);
        let got = replies(&out);
        if got.len() != 10 {
            m.fail(&format!("curl {}: {got:?} {}", out.status, stderr(&out)));
        }
        all.extend(got);
        let times: Vec<Instant> = m.backend("b2").seen().iter().filter_map(|s| s.at).collect();
        if let Some(i) = times.windows(2).position(|w| w[1] - w[0] >= RESET.mul_f64(0.5)) {
            break i;
        }
        if Instant::now() > deadline {
            m.fail(&format!(
                "b2 never had a quiet spell and a probe after it: {} requests to it",
                times.len()
            ));
        }
    };
    let b2_seen = m.backend("b2").seen();
    let b1_seen = m.backend("b1").seen();
    let open_from = b2_seen[gap_index].at.expect("time");
    let probe_at = b2_seen[gap_index + 1].at.expect("time");
    let quiet = probe_at - open_from;
    assert_eq!(gap_index + 1, WINDOW, "the breaker opened after {WINDOW} failed requests: {b2_seen:?}");
    assert!(
        quiet >= RESET.mul_f64(0.9),
        "b2 got a request {quiet:?} after the breaker opened, before the reset timeout {RESET:?} (-10% jitter)"
    );
    assert!(quiet <= RESET.mul_f64(1.1) + Duration::from_secs(1), "the probe came {quiet:?} after opening");
    let b1_during = b1_seen.iter().filter(|s| s.at.is_some_and(|t| t > open_from && t < probe_at)).count();
    assert!(b1_during >= 10, "requests kept flowing to b1 while b2's breaker was open: {b1_during}");
    // Clients saw b2's own 503s (no retries configured), never an agent error.
    for r in &all {
        match r.server.as_deref() {
            Some("b1") => assert_eq!(r.code, 200, "{r:?}"),
            Some("b2") => assert_eq!(r.code, 503, "{r:?}"),
            _ => m.fail(&format!("a reply from no backend: {r:?}")),
        }
    }
    m.agent.wait_log("breaker opened", |v| message(v) == "circuit breaker opened");
}

// 4. gRPC, unary and server streaming, real grpcio client and servers.
fn grpc_unary_and_server_streaming(mode: &str) {
    let Some(python) = mesh_tests::grpc::python() else { return };
    let script_dir = tempfile::tempdir().expect("tempdir");
    let script = script_dir.path().join("grpc_echo.py");
    std::fs::write(&script, mesh_tests::grpc::ECHO_SCRIPT).expect("script");
    let reg = registry("grpc", 50051, &BACKENDS, "      load_balancer: {algorithm: round-robin}\n");
    let m = Mesh::new(mode, &reg, |lab| {
        let procs = BACKENDS
            .iter()
            .map(|b| {
                let mut cmd = lab.host(b).command(&python, None).expect("command");
                cmd.arg(&script).args(["server", "50051", b]);
                let mut p = LoggedChild::spawn("grpc-server", cmd).expect("grpc server");
                p.wait_ready("grpc server ready", Duration::from_secs(30)).expect("grpc server ready");
                p
            })
            .collect();
        (vec![], procs)
    });
    let out = m
        .workload_command(&python)
        .arg(&script)
        .args(["client", &format!("{VIP}:80"), "6", "5"])
        .output()
        .expect("grpc client runs");
    if !out.status.success() {
        m.fail(&format!("grpc client failed: {} {}", out.status, stderr(&out)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");
    // Unary calls share the channel's one HTTP/2 connection; each is balanced on its own.
    let mut per_backend = BTreeMap::new();
    for (i, reply) in v["unary"].as_array().expect("unary").iter().enumerate() {
        let reply = reply.as_str().unwrap_or_default();
        let server =
            reply.strip_prefix("server=").and_then(|r| r.split_whitespace().next()).unwrap_or_default();
        assert!(reply.ends_with(&format!("hello n{i}")), "{reply}");
        *per_backend.entry(server.to_owned()).or_insert(0) += 1;
    }
    let want: BTreeMap<String, usize> = BACKENDS.iter().map(|b| (b.to_string(), 2)).collect();
    assert_eq!(per_backend, want, "6 unary calls over one connection, round robin: {v}");
    // The stream comes whole and in order from one backend.
    let stream: Vec<&str> =
        v["stream"].as_array().expect("stream").iter().filter_map(Value::as_str).collect();
    assert_eq!(stream.len(), 5, "{v}");
    let server = stream[0].split_whitespace().next().unwrap_or_default();
    for (i, msg) in stream.iter().enumerate() {
        assert_eq!(*msg, format!("{server} message {i}"), "{v}");
    }
    // A gRPC error status passes through as such (trailers intact).
    assert_eq!(v["missing"], "UNIMPLEMENTED", "{v}");
    m.agent.wait_log("gRPC access record", |v| v["protocol"] == "grpc");
}

// 5. WebSocket: the HTTP/1.1 Upgrade goes through and frames are echoed both ways.
fn websocket_upgrade_echoes_frames(mode: &str) {
    let reg = registry("http", 8080, &["b1"], "");
    let m = Mesh::new(mode, &reg, |lab| {
        (vec![("b1", servers::websocket_echo(lab.host("b1"), 8080).unwrap())], vec![])
    });
    let out = m
        .workload_command(bins::probe())
        .args(["--connect", &format!("{VIP}:80"), "--timeout", "10s", "websocket", "--path", "/chat"])
        .args(["--message", "hello mesh", "--count", "3"])
        .output()
        .expect("probe runs");
    if !out.status.success() {
        m.fail(&format!("websocket client failed: {} {}", out.status, stderr(&out)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("probe prints JSON");
    assert!(v["status"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 101")), "{v}");
    assert_eq!(v["accept_ok"], true, "the accept key survived the proxy: {v}");
    assert_eq!(v["headers"]["x-mesh-endpoint"], "10.77.0.3:8080", "went through the L7 proxy: {v}");
    assert_eq!(
        v["headers"]["upgrade"].as_str().map(str::to_ascii_lowercase).as_deref(),
        Some("websocket"),
        "{v}"
    );
    let frames = v["frames"].as_array().expect("frames");
    assert_eq!(frames.len(), 4, "{v}");
    for (i, f) in frames[..3].iter().enumerate() {
        assert_eq!(f["opcode"], 1, "{v}");
        assert_eq!(f["text"], format!("hello mesh {i}"), "{v}");
    }
    assert_eq!(frames[3]["opcode"], 8, "close answered: {v}");
    let seen = m.backend("b1").seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].request.as_deref(), Some("GET /chat HTTP/1.1"));
}

// 6. Trace context: continued (same trace id, new parent id) or started.
fn trace_context_is_continued_or_started(mode: &str) {
    let reg = registry("http", 8080, &["b1"], "");
    let m = Mesh::new(mode, &reg, |lab| (echo_backends(lab, &[("b1", 200)]), vec![]));
    let header = |body: &str, name: &str| -> Option<String> {
        body.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
    };
    let parse = |tp: &str| -> (String, String, String) {
        let f: Vec<&str> = tp.split('-').collect();
        assert_eq!(f.len(), 4, "traceparent {tp}");
        assert_eq!(f[0], "00", "{tp}");
        assert_eq!(f[1].len(), 32, "{tp}");
        assert_eq!(f[2].len(), 16, "{tp}");
        assert!(tp.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{tp}");
        (f[1].to_owned(), f[2].to_owned(), f[3].to_owned())
    };
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let out =
        m.curl(&["-H", &format!("traceparent: 00-{TRACE}-{PARENT}-01"), &format!("http://{VIP}/traced")]);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(tp) = header(&body, "traceparent") else {
        m.fail(&format!("no traceparent reached b1: {body}"))
    };
    let (trace, parent, flags) = parse(&tp);
    assert_eq!(trace, TRACE, "same trace id");
    assert_ne!(parent, PARENT, "the agent's hop is the new parent");
    assert_ne!(parent, "0000000000000000");
    assert_eq!(flags, "01", "sampled flag kept");

    let out = m.curl(&[&format!("http://{VIP}/untraced")]);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(tp) = header(&body, "traceparent") else { m.fail(&format!("no traceparent started: {body}")) };
    let (trace, _, _) = parse(&tp);
    assert_ne!(trace, "0".repeat(32));
    assert_ne!(trace, TRACE);
    let rid = header(&body, "x-request-id").unwrap_or_default();
    assert!(!rid.is_empty(), "x-request-id added: {body}");
    assert!(
        header(&body, "x-mesh-client-addr").is_none(),
        "the agents' internal header stays in the mesh: {body}"
    );
}

// 7. Meshed path: x-forwarded-for from the receiving agent; method/path rules.
const MESH_VIP: &str = "10.96.0.60";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn meshed_registry() -> String {
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{MESH_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      authorization: [{{principals: [\"{FRONTEND}\"], methods: [GET], path_prefixes: [/api]}}]
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

fn meshed_request_gets_forwarded_for_and_method_path_authorization(mode: &str) {
    let lab = Lab::new(&["control", "client", "server"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.yaml");
    std::fs::write(&reg, meshed_registry()).unwrap();
    let control = Control::start_with_ca(lab.host("control"), &reg, dir.path(), &["client", "server"], &[])
        .expect("control");
    let api = servers::http_echo_headers(lab.host("server"), 8080, "api", 200).unwrap();
    let workload = Cgroup::new("wl").unwrap();
    let server_cg = Cgroup::new("srv").unwrap();
    let agent = |host: &str, cg: &Cgroup, identity: &str| {
        let opts = control.agent_options(mode, host, identity).cgroup(cg);
        let a = Agent::start(lab.host(host), opts).expect("agent starts");
        a.wait_enrolled();
        a
    };
    let client_agent = agent("client", &workload, "shop/frontend");
    let server_agent = agent("server", &server_cg, "shop/api");
    let logs =
        || format!("client agent:\n{}\nserver agent:\n{}", client_agent.log_text(), server_agent.log_text());
    let curl = |args: &[&str]| -> (u16, String, String) {
        let out = lab
            .host("client")
            .command("curl", Some(workload.absolute()))
            .unwrap()
            .args(["-sS", "--max-time", "10", "-D", "/dev/stderr", "-w", "\n@@ %{http_code}\n"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = text.lines().find_map(|l| l.strip_prefix("@@ ")).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, text, String::from_utf8_lossy(&out.stderr).to_ascii_lowercase())
    };

    let (code, body, _) = curl(&[&format!("http://{MESH_VIP}/api/x")]);
    if code != 200 {
        panic!("GET /api/x: {code} {body}\n{}", logs());
    }
    assert!(body.starts_with("server=api HTTP/1.1 GET /api/x"), "{body}");
    assert!(body.lines().any(|l| l == "x-forwarded-for: 10.77.0.2"), "x-forwarded-for is the client: {body}");
    assert!(body.lines().any(|l| l == "x-forwarded-proto: http"), "{body}");
    assert!(
        !body.contains("x-mesh-client-addr"),
        "the agents' internal header does not reach the app: {body}"
    );
    // A forged x-forwarded-for is appended to, never replaced: the real client is last.
    let (_, body, _) = curl(&["-H", "x-forwarded-for: 192.0.2.9", &format!("http://{MESH_VIP}/api/y")]);
    assert!(body.lines().any(|l| l == "x-forwarded-for: 192.0.2.9, 10.77.0.2"), "{body}");

    let requests_before = api.seen().len();
    for (args, what) in [(vec!["-X", "POST", "-d", "x=1"], "POST /api/x"), (vec![], "GET /other")] {
        let path = if what.ends_with("/other") { "/other" } else { "/api/x" };
        let url = format!("http://{MESH_VIP}{path}");
        let mut all: Vec<&str> = args.clone();
        all.push(&url);
        let (code, body, head) = curl(&all);
        if code != 403 {
            panic!("{what}: want 403, got {code} {body}\n{}", logs());
        }
        assert!(head.contains("x-mesh-error: agent"), "{what}: the agent refused it: {head}");
    }
    assert_eq!(api.seen().len(), requests_before, "denied requests never reached the app");
    let denied = || server_agent.find_all(|v| v["direction"] == "inbound" && v["response_code"] == 403);
    eventually(Duration::from_secs(10), "the receiving agent logged the denials", || {
        (denied().len() >= 2).then_some(())
    });
}

// 8. Meshed path: the service's rate limit, kept by the receiving agent per calling
// identity.
const LIMITED_VIP: &str = "10.96.0.61";
const BURST: usize = 10;
/// Requests each caller sends at once: past the burst, with room for the tokens
/// that come back (1 a second) while they are sent.
const SENT: usize = 25;

/// `api` on `server` (10.77.0.5) limited to 1 request a second and a burst of
/// [`BURST`]; `frontend` running on `c1` and `c2`, `batch` on `c3`.
fn limited_registry() -> String {
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{LIMITED_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      rate_limit: {{requests_per_second: 1, burst: {BURST}}}
    endpoints:
      - {{address: 10.77.0.5, node: server, service_account: api, agent_address: \"10.77.0.5:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: c1, service_account: frontend}}
      - {{address: 10.77.0.3, node: c2, service_account: frontend}}
  - name: batch
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.4, node: c3, service_account: batch}}
"
    )
}

/// The attacker's way around a limit kept by the calling agent is more calling
/// nodes: `frontend` on two nodes would get twice the burst. Kept at the
/// destination per identity, both together get one burst (plus what refills while
/// they send), another identity (`batch`) still gets its own, and a refused request
/// gets 429 with Retry-After from the receiving agent, never reaching the app.
fn rate_limit_is_kept_at_the_destination_per_calling_identity(mode: &str) {
    let lab = Lab::new(&["control", "c1", "c2", "c3", "server"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.yaml");
    std::fs::write(&reg, limited_registry()).unwrap();
    let nodes = ["c1", "c2", "c3", "server"];
    let control =
        Control::start_with_ca(lab.host("control"), &reg, dir.path(), &nodes, &[]).expect("control");
    let api = servers::http_echo_headers(lab.host("server"), 8080, "api", 200).unwrap();
    let agent = |host: &str, identity: &str| {
        let cg = Cgroup::new(host).unwrap();
        let opts = control.agent_options(mode, host, identity).cgroup(&cg);
        let a = Agent::start(lab.host(host), opts).expect("agent starts");
        a.wait_enrolled();
        (a, cg)
    };
    let callers = [
        ("c1", agent("c1", "shop/frontend")),
        ("c2", agent("c2", "shop/frontend")),
        ("c3", agent("c3", "shop/batch")),
    ];
    let (server_agent, _server_cg) = agent("server", "shop/api");
    let logs = || {
        let mut all = format!("server agent:\n{}\n", server_agent.log_text());
        for (host, (a, _)) in &callers {
            all.push_str(&format!("{host} agent:\n{}\n", a.log_text()));
        }
        all
    };
    // SENT requests from `host`'s workload over one connection, in one curl: the
    // status and Retry-After of each.
    let burst_from = |host: &str| -> Vec<(u16, String)> {
        let (_, (_, cg)) = callers.iter().find(|(h, _)| *h == host).unwrap();
        let out = lab
            .host(host)
            .command("curl", Some(cg.absolute()))
            .unwrap()
            .args(["-sS", "--max-time", "30", "-w", "\n@@ %{http_code} %header{retry-after}\n"])
            .arg(format!("http://{LIMITED_VIP}/api/[1-{SENT}]"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let results: Vec<(u16, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("@@ "))
            .map(|l| {
                let (code, retry_after) = l.split_once(' ').unwrap_or((l, ""));
                (code.parse().unwrap_or(0), retry_after.trim().to_owned())
            })
            .collect();
        if results.len() != SENT || results.iter().any(|(code, _)| ![200, 429].contains(code)) {
            panic!(
                "{host}: want {SENT} answers, each 200 or 429: {results:?}\n{text}\n{}\n{}",
                stderr(&out),
                logs()
            );
        }
        results
    };
    let ok = |results: &[(u16, String)]| results.iter().filter(|(code, _)| *code == 200).count();

    let start = Instant::now();
    let c1 = burst_from("c1");
    let c2 = burst_from("c2");
    let elapsed = start.elapsed();
    let (ok1, ok2) = (ok(&c1), ok(&c2));
    // What a token bucket admits in `elapsed`, at 1 a second.
    let admissible = BURST + elapsed.as_secs_f64().ceil() as usize;
    assert!(ok1 >= BURST, "c1 gets frontend's whole burst: {ok1} of {c1:?}");
    assert!(
        ok1 + ok2 <= admissible,
        "frontend from two nodes gets one identity's limit: {ok1} + {ok2} in {elapsed:?}, at most {admissible}"
    );
    assert!(ok2 < BURST, "c2 shares c1's bucket, not a burst of its own: {ok2} of {c2:?}");
    let (code, retry_after) =
        c1.iter().find(|(code, _)| *code == 429).unwrap_or_else(|| panic!("c1 limited: {c1:?}"));
    assert_eq!((*code, retry_after.as_str()), (429, "1"), "429 with Retry-After");

    let c3 = burst_from("c3");
    let ok3 = ok(&c3);
    assert!(ok3 >= BURST, "batch has its own bucket: {ok3} of {c3:?}");
    assert!(c3.iter().any(|(code, _)| *code == 429), "and its own limit: {c3:?}");

    eprintln!(
        "admitted of {SENT} each: frontend on c1 {ok1}, on c2 {ok2} (in {elapsed:?}), batch on c3 {ok3}"
    );
    assert_eq!(api.seen().len(), ok1 + ok2 + ok3, "limited requests never reached the app");
    // Refused by the receiving agent, as each caller's identity.
    for (who, want) in [("frontend", SENT * 2 - ok1 - ok2), ("batch", SENT - ok3)] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{who}");
        let limited = || {
            server_agent.find_all(|v| {
                v["direction"] == "inbound"
                    && v["response_code"] == 429
                    && v["source_identity"] == id.as_str()
            })
        };
        eventually(
            Duration::from_secs(10),
            &format!("the receiving agent logged {want} 429s for {who}"),
            || (limited().len() == want).then_some(()),
        );
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

mesh_tests::both_modes!(
    round_robin_per_request_over_one_connection,
    backend_killed_mid_stream_costs_no_request,
    circuit_breaker_stops_and_resumes_traffic_to_a_failing_endpoint,
    grpc_unary_and_server_streaming,
    websocket_upgrade_echoes_frames,
    trace_context_is_continued_or_started,
    meshed_request_gets_forwarded_for_and_method_path_authorization,
    rate_limit_is_kept_at_the_destination_per_calling_identity,
);
