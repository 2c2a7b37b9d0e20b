//! The mesh running for real (`cargo xtask demo`, and `tests/tests/demo.rs` bounded).
//!
//! Three test hosts (network namespaces on a bridge): `control` runs the control
//! plane with the demo's YAML registry and its CA; `frontend` runs an agent with the
//! identity `shop/frontend` and a workload in an enrolled cgroup that keeps calling
//! services by VIP; `backend` runs the servers and an agent of its own with the
//! identity `shop/backend`, so every service endpoint is meshed: the frontend's agent
//! carries HTTP/1.1 (`catalog`, two versions balanced per request), HTTP/2
//! (`reviews`) and raw TCP (`echo`) through the mTLS tunnel to the backend's agent.
//! TLS to an address the registry does not know is passed through untouched.
//!
//! The table shows, per service and endpoint, requests (HTTP: one per request from
//! the access log; TCP: one per connection from the connection records), errors
//! (HTTP 5xx or a proxy error), latency percentiles, bytes and the SPIFFE identities
//! of both ends. The end of the run tears everything down and checks that nothing was
//! left behind; [`Summary`] (written with `--summary-json`) is what a test asserts on.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::{Agent, AgentOptions, Cgroup, Control, Lab, agent::message, bins, servers};

/// Set (e.g. by a signal handler) to end the demo early.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// How to run the demo.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Interception mode of both agents: `auto`, `ebpf` or `iptables`.
    pub mode: String,
    /// Stop after this long (`None`: until [`STOP`]).
    pub duration: Option<Duration>,
    /// Run until [`STOP`] and print commands to try by hand.
    pub keep: bool,
    /// Redraw the live table every second (off in tests).
    pub live: bool,
    /// Write the final [`Summary`] here as JSON.
    pub summary_json: Option<PathBuf>,
}

/// Service VIPs of the demo's registry.
pub const CATALOG_VIP: &str = "10.96.0.20";
pub const REVIEWS_VIP: &str = "10.96.0.21";
pub const ECHO_VIP: &str = "10.96.0.22";
/// The workload's identity and the backend's.
pub const FRONTEND_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const BACKEND_ID: &str = "spiffe://cluster.local/ns/shop/sa/backend";

/// The demo's registry (`BACKEND` is replaced by the backend host's address). Every
/// endpoint is on node `backend`, whose agent terminates the mTLS tunnel on 15008.
/// TLS on 8443 is not registered: passed through.
const REGISTRY: &str = "services:
  - name: catalog
    namespace: shop
    vips: [10.96.0.20]
    hostnames: [catalog.shop.svc.cluster.local]
    ports: [{port: 80, protocol: http}]
    endpoints:
      - {address: BACKEND, port: 8080, workload: catalog-v1, node: backend, service_account: backend, agent_address: \"BACKEND:15008\", labels: {version: v1}}
      - {address: BACKEND, port: 8081, workload: catalog-v2, node: backend, service_account: backend, agent_address: \"BACKEND:15008\", labels: {version: v2}}
    routes:
      - name: canary
        backends: [{subset: {version: v1}, weight: V1_WEIGHT}, {subset: {version: v2}, weight: V2_WEIGHT}]
  - name: reviews
    namespace: shop
    vips: [10.96.0.21]
    ports: [{port: 80, protocol: http2}]
    endpoints:
      - {address: BACKEND, port: 8082, workload: reviews-v1, node: backend, service_account: backend, agent_address: \"BACKEND:15008\"}
  - name: echo
    namespace: shop
    vips: [10.96.0.22]
    ports: [{port: 7000, protocol: tcp}]
    endpoints:
      - {address: BACKEND, port: 7000, workload: echo-v1, node: backend, service_account: backend, agent_address: \"BACKEND:15008\"}
  - name: frontend
    namespace: shop
    vips: [10.96.0.30]
    ports: [{port: 80}]
    endpoints:
      - {address: FRONTEND, port: 8080, node: frontend, service_account: frontend}
";

/// The canary shift the demo walks `catalog` through, v1's and v2's weights: it
/// starts at 90/10, goes to 50/50, and ends with every request on v2, each step an
/// edit of the registry file that the control plane pushes to the agents.
pub const CANARY_STEPS: [(u32, u32); 3] = [(90, 10), (50, 50), (0, 100)];

/// How long each canary step lasts when the demo runs until stopped.
const CANARY_STEP_UNBOUNDED: Duration = Duration::from_secs(20);

/// The registry with `catalog`'s canary route at `weights` (v1, v2).
fn registry_text(backend: std::net::Ipv4Addr, frontend: std::net::Ipv4Addr, weights: (u32, u32)) -> String {
    REGISTRY
        .replace("BACKEND", &backend.to_string())
        .replace("FRONTEND", &frontend.to_string())
        .replace("V1_WEIGHT", &weights.0.to_string())
        .replace("V2_WEIGHT", &weights.1.to_string())
}

/// One step of the canary shift and the requests each version got during it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CanaryStep {
    pub v1_weight: u32,
    pub v2_weight: u32,
    pub v1_requests: u64,
    pub v2_requests: u64,
}

/// One row of the table: a service endpoint (or a passed-through destination).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    /// `namespace/name`, or `None` for passthrough.
    pub service: Option<String>,
    /// The endpoint the balancer picked, or the original destination (passthrough).
    pub endpoint: String,
    /// The endpoint's workload name in the registry (`catalog-v1`).
    pub workload: Option<String>,
    /// `http` (counted per request) or `tcp` (per connection).
    pub kind: String,
    /// `http1`, `http2`, `tls sni=...`, `opaque`...
    pub protocol: String,
    pub requests: u64,
    pub errors: u64,
    /// Requests (or connections) whose record named a destination identity: carried
    /// over mTLS to the endpoint's agent.
    pub mtls: u64,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub bytes: u64,
    /// The first few distinct errors, to say what went wrong.
    pub error_samples: Vec<String>,
    #[serde(skip)]
    latencies_ms: Vec<f64>,
}

/// What the run did, for people and for tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Requested mode and the mode each agent selected.
    pub requested_mode: String,
    pub frontend_mode: String,
    pub backend_mode: String,
    pub duration_seconds: f64,
    /// Requests the backend's agent admitted from the frontend's identity over mTLS.
    pub inbound_mtls_requests: u64,
    pub rows: Vec<Row>,
    /// The canary shift of `catalog`, step by step (see [`CANARY_STEPS`]).
    pub canary: Vec<CanaryStep>,
    /// What teardown found left behind (empty: clean).
    pub leftovers: Vec<String>,
}

struct Running {
    lab: Lab,
    control: Control,
    frontend: Agent,
    backend: Agent,
    workload: Cgroup,
    backend_cg: Cgroup,
    registry: PathBuf,
    _servers: Vec<servers::Server>,
    _dir: tempfile::TempDir,
}

fn start(mode: &str) -> Result<Running> {
    let lab = Lab::new(&["control", "frontend", "backend"])?;
    let (fe, be) = (lab.host("frontend"), lab.host("backend"));
    let dir = tempfile::tempdir()?;
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, registry_text(be.v4, fe.v4, CANARY_STEPS[0]))?;
    let control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &["frontend", "backend"], &[])?;
    let servers = vec![
        servers::http(be, 8080, "catalog-v1")?,
        servers::http(be, 8081, "catalog-v2")?,
        servers::http(be, 8082, "reviews-v1")?,
        servers::echo(be, 7000)?,
        servers::https(be, 8443, "legacy-tls")?,
    ];
    let workload = Cgroup::new("frontend")?;
    let backend_cg = Cgroup::new("backend")?;
    let agent = |host: &str, cg: &Cgroup, identity: &str| -> Result<Agent> {
        let opts = control.agent_options(mode, host, identity).cgroup(cg);
        let a = Agent::start(lab.host(host), AgentOptions { log: Some("info".into()), ..opts })?;
        a.wait_enrolled();
        Ok(a)
    };
    let backend = agent("backend", &backend_cg, "shop/backend")?;
    let frontend = agent("frontend", &workload, "shop/frontend")?;
    Ok(Running {
        lab,
        control,
        frontend,
        backend,
        workload,
        backend_cg,
        registry,
        _servers: servers,
        _dir: dir,
    })
}

/// The workload's calls, run in turn inside the enrolled cgroup on `frontend`.
fn calls(backend: std::net::Ipv4Addr) -> Vec<(PathBuf, Vec<String>)> {
    let curl = PathBuf::from("curl");
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    vec![
        // Two requests on one keep-alive connection: balanced per request (v1, v2).
        (
            curl.clone(),
            s(&[
                "-fsS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                &format!("http://{CATALOG_VIP}/products"),
                &format!("http://{CATALOG_VIP}/products/7"),
            ]),
        ),
        (
            curl.clone(),
            s(&[
                "-fsS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                &format!("http://{REVIEWS_VIP}/reviews/7"),
            ]),
        ),
        (
            bins::probe().clone(),
            s(&["--connect", &format!("{ECHO_VIP}:7000"), "--timeout", "5s", "echo", "--bytes", "20000"]),
        ),
        // Not in the registry: passed through as TLS. HTTP/1.0, read to the end: the
        // client closes with nothing unread, so its close is a FIN, not a reset.
        (
            PathBuf::from("bash"),
            s(&[
                "-c",
                &format!(
                    "printf 'GET /secure HTTP/1.0\\r\\nHost: legacy.demo\\r\\n\\r\\n' | timeout 5 \
                     openssl s_client -quiet -connect {backend}:8443 -servername legacy.demo"
                ),
            ]),
        ),
    ]
}

/// Runs the demo: starts everything, drives traffic, tears down, checks the teardown.
pub fn run(opts: &Options) -> Result<Summary> {
    let say = |s: String| {
        if opts.live {
            println!("{s}");
        }
    };
    say(format!(
        "creating hosts `control`, `frontend` and `backend`; control plane, servers, two agents ({} mode)",
        opts.mode
    ));
    let m = start(&opts.mode)?;
    let workload_calls = calls(m.lab.host("backend").v4);

    let frontend_ns = m.lab.host("frontend").ns.path();
    say(format!(
        "traffic flowing; {}",
        match (opts.duration, opts.keep) {
            (Some(d), false) => format!("running for {d:?} (Ctrl-C to stop early)"),
            _ => "running until Ctrl-C".to_owned(),
        }
    ));
    if opts.keep {
        say(format!(
            "\nTry it yourself (from another terminal):\n  \
             echo $$ > {}/cgroup.procs   # enroll your shell, then:\n  \
             nsenter --net={frontend_ns} curl -s http://{CATALOG_VIP}/hello   # v1 or v2, over mTLS\n  \
             edit {}   # the control plane pushes changes within a second\n  \
             nsenter --net={frontend_ns} meshctl status   # also: services, endpoints, certs, explain\n  \
             nsenter --net={frontend_ns} curl -s http://127.0.0.1:15000/config_dump   # the admin port only reads\n  \
             meshctl agent --agent-socket {} log-level debug   # changes go over the agent's root-only socket\n",
            m.workload.absolute().display(),
            m.registry.display(),
            m.frontend.admin_socket.display(),
        ));
    }

    let started = Instant::now();
    let stop_workload = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop_workload.clone();
        let mut prepared = Vec::new();
        for (prog, args) in &workload_calls {
            let mut c = m.lab.host("frontend").command(prog, Some(m.workload.absolute()))?;
            c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
            prepared.push(c);
        }
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let n = prepared.len();
                let _ = prepared[i % n].status();
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let step_len = match opts.duration {
        Some(d) if !opts.keep => d / CANARY_STEPS.len() as u32,
        _ => CANARY_STEP_UNBOUNDED,
    };
    let mut canary = Canary::new(started);
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    loop {
        let expired = opts.duration.is_some_and(|d| !opts.keep && started.elapsed() >= d);
        if STOP.load(Ordering::SeqCst) || expired {
            break;
        }
        if canary.step + 1 < CANARY_STEPS.len() && canary.since.elapsed() >= step_len {
            canary.advance(&m, &rows(&m.frontend))?;
        }
        if opts.live && last_draw.elapsed() >= Duration::from_secs(1) {
            draw(&m, &rows(&m.frontend), started.elapsed(), &canary, step_len);
            last_draw = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    say("\nstopping: workload, agents, servers, control plane, hosts".into());
    stop_workload.store(true, Ordering::SeqCst);
    let _ = driver.join();
    let elapsed = started.elapsed();
    let final_rows = rows(&m.frontend);
    canary.finish(&final_rows);
    let mut summary = Summary {
        canary: canary.steps,
        requested_mode: opts.mode.clone(),
        frontend_mode: m.frontend.mode(),
        backend_mode: m.backend.mode(),
        duration_seconds: elapsed.as_secs_f64(),
        ..Default::default()
    };
    if opts.live {
        draw(&m, &final_rows, elapsed, &canary_view(&summary.canary), step_len);
    }
    let result = teardown(m, &mut summary);
    if let Some(path) = &opts.summary_json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    result?;
    ensure!(summary.leftovers.is_empty(), "teardown left things behind: {:?}", summary.leftovers);
    say(format!(
        "done: {} requests/connections over {} paths; teardown left no namespaces, cgroups, iptables \
         rules or BPF attachments",
        summary.rows.iter().map(|r| r.requests).sum::<u64>(),
        summary.rows.len()
    ));
    Ok(summary)
}

/// The canary shift as it goes: the step in force and the counts at its start.
struct Canary {
    step: usize,
    since: Instant,
    /// catalog-v1's and v2's requests when the step began.
    base: (u64, u64),
    steps: Vec<CanaryStep>,
}

impl Canary {
    fn new(now: Instant) -> Self {
        Canary { step: 0, since: now, base: (0, 0), steps: Vec::new() }
    }

    /// Closes the current step with what each version got, and writes the next
    /// step's weights into the registry.
    fn advance(&mut self, m: &Running, rows: &[Row]) -> Result<()> {
        self.close(rows);
        self.step += 1;
        self.since = Instant::now();
        let (fe, be) = (m.lab.host("frontend").v4, m.lab.host("backend").v4);
        std::fs::write(&m.registry, registry_text(be, fe, CANARY_STEPS[self.step]))
            .context("writing the registry for the next canary step")
    }

    fn finish(&mut self, rows: &[Row]) {
        self.close(rows);
    }

    fn close(&mut self, rows: &[Row]) {
        let now = catalog_counts(rows);
        let (v1_weight, v2_weight) = CANARY_STEPS[self.step];
        self.steps.push(CanaryStep {
            v1_weight,
            v2_weight,
            v1_requests: now.0.saturating_sub(self.base.0),
            v2_requests: now.1.saturating_sub(self.base.1),
        });
        self.base = now;
    }
}

/// A finished shift, for the last redraw.
fn canary_view(steps: &[CanaryStep]) -> Canary {
    Canary { step: steps.len().saturating_sub(1), since: Instant::now(), base: (0, 0), steps: steps.to_vec() }
}

/// Requests catalog-v1 and catalog-v2 have answered so far.
fn catalog_counts(rows: &[Row]) -> (u64, u64) {
    let of = |w: &str| rows.iter().filter(|r| r.workload.as_deref() == Some(w)).map(|r| r.requests).sum();
    (of("catalog-v1"), of("catalog-v2"))
}

/// Stops the agents (collecting their final records), runs `mesh-agent cleanup`,
/// checks their rules and BPF attachments are gone, removes hosts and cgroups and checks those are gone too.
fn teardown(m: Running, summary: &mut Summary) -> Result<()> {
    let Running { lab, control, frontend, backend, workload, backend_cg, _servers: servers, .. } = m;
    drop(servers);
    let pins = [("frontend", frontend.pins().clone()), ("backend", backend.pins().clone())];
    let fe_status = frontend.terminate_with_log()?;
    let be_status = backend.terminate_with_log()?;
    // Interception outlives a stopped agent on purpose (connections fail closed until
    // one serves again); the operator's `mesh-agent cleanup` removes it.
    for (host, pins) in &pins {
        let out = lab
            .host(host)
            .command(crate::bins::agent(), None)?
            .arg("cleanup")
            .arg("--bpffs-dir")
            .arg(pins.path())
            .output()
            .context("running mesh-agent cleanup")?;
        ensure!(
            out.status.success(),
            "mesh-agent cleanup in {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    summary.rows = rows_of(&fe_status.1);
    summary.inbound_mtls_requests = be_status
        .1
        .iter()
        .filter(|v| v["kind"] == "http" && v["direction"] == "inbound" && v["source_identity"] == FRONTEND_ID)
        .count() as u64;
    let cp_status = control.terminate()?;
    ensure!(fe_status.0.success(), "frontend agent exited with {}", fe_status.0);
    ensure!(be_status.0.success(), "backend agent exited with {}", be_status.0);
    ensure!(cp_status.success(), "control plane exited with {cp_status}");

    // The agents are gone: their iptables chains and BPF links must be too, before
    // the namespaces and cgroups (which would take them along) are removed.
    for host in &lab.hosts {
        for tool in ["iptables-save", "ip6tables-save"] {
            let out = host.command(tool, None)?.output().with_context(|| format!("running {tool}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            for l in text.lines().filter(|l| l.contains("MESH_")) {
                summary.leftovers.push(format!("{tool} in {}: {l}", host.name));
            }
        }
    }
    let own = format!("/mesh-test/{}-", std::process::id());
    summary.leftovers.extend(bpf_attachments(&own)?);

    let dirs = [workload.absolute().to_path_buf(), backend_cg.absolute().to_path_buf()];
    let ns_names: Vec<String> = lab.hosts.iter().map(|h| h.ns.name().to_owned()).collect();
    drop((workload, backend_cg, lab));
    for n in ns_names.iter().filter(|n| Path::new(&format!("/var/run/netns/{n}")).exists()) {
        summary.leftovers.push(format!("network namespace {n}"));
    }
    for d in dirs.iter().filter(|d| d.exists()) {
        summary.leftovers.push(format!("cgroup {}", d.display()));
    }
    // Any cgroup of this process under mesh-test (the agents' own included).
    if let Ok(mount) = crate::cgroup::mount()
        && let Ok(entries) = std::fs::read_dir(mount.join("mesh-test"))
    {
        let prefix = format!("{}-", std::process::id());
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                summary.leftovers.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    summary.leftovers.extend(bpf_attachments(&own)?);
    Ok(())
}

/// BPF programs attached to cgroups whose path contains `needle` (`bpftool cgroup tree`).
pub fn bpf_attachments(needle: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "tree"])
        .output()
        .context("running bpftool (install bpftool or linux-tools)")?;
    ensure!(out.status.success(), "bpftool cgroup tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut found = Vec::new();
    for group in tree.as_array().into_iter().flatten() {
        let path = group["cgroup"].as_str().unwrap_or_default();
        if path.contains(needle) {
            for p in group["programs"].as_array().into_iter().flatten() {
                found.push(format!("BPF {} {} on {path}", p["attach_type"], p["name"]));
            }
        }
    }
    Ok(found)
}

fn rows(agent: &Agent) -> Vec<Row> {
    rows_of(&agent.find_all(|v| v["kind"] == "http" || message(v) == "connection closed"))
}

fn workload_of(endpoint: &str) -> Option<String> {
    let port = endpoint.rsplit(':').next()?;
    Some(
        match port {
            "8080" => "catalog-v1",
            "8081" => "catalog-v2",
            "8082" => "reviews-v1",
            "7000" => "echo-v1",
            _ => return None,
        }
        .to_owned(),
    )
}

/// Rows from the frontend agent's log: outbound HTTP access records (one per request)
/// and "connection closed" records of connections not proxied per request.
pub fn rows_of(log: &[Value]) -> Vec<Row> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for v in log {
        let http = v["kind"] == "http";
        if http && v["direction"] != "outbound" {
            continue;
        }
        let conn = message(v) == "connection closed";
        if !http && !conn {
            continue;
        }
        let protocol = v["protocol"].as_str().unwrap_or("?");
        if conn && (protocol == "http1" || protocol == "http2") && !v["service"].is_null() {
            // Proxied per request: counted from the access records.
            continue;
        }
        let (service, endpoint) = if http {
            (s(&v["destination_service"]), s(&v["destination_endpoint"]).unwrap_or_else(|| "-".into()))
        } else {
            match (s(&v["service"]), s(&v["endpoint"])) {
                (Some(svc), Some(ep)) => (Some(svc), ep),
                _ => (None, s(&v["orig_dst"]).unwrap_or_else(|| "?".into())),
            }
        };
        let row =
            rows.entry((service.clone().unwrap_or_default(), endpoint.clone())).or_insert_with(|| Row {
                workload: service.as_ref().and_then(|_| workload_of(&endpoint)),
                service,
                endpoint,
                kind: if http { "http" } else { "tcp" }.into(),
                ..Default::default()
            });
        row.protocol = match protocol {
            "tls" => format!("tls sni={}", v["sni"].as_str().unwrap_or("-")),
            other => other.to_owned(),
        };
        row.requests += 1;
        let failed = !v["error"].is_null() || v["response_code"].as_u64().is_some_and(|c| c >= 500);
        row.errors += u64::from(failed);
        if failed && row.error_samples.len() < 3 {
            let e = match (&v["error"], &v["error_side"]) {
                (Value::String(e), Value::String(side)) => format!("{side}: {e}"),
                (Value::String(e), _) => e.clone(),
                _ => format!("HTTP {}", v["response_code"]),
            };
            if !row.error_samples.contains(&e) {
                row.error_samples.push(e);
            }
        }
        if let Some(id) = s(&v["destination_identity"]).filter(|i| !i.is_empty()) {
            row.mtls += 1;
            row.destination_identity = Some(id);
        }
        if let Some(id) = s(&v["source_identity"]).filter(|i| !i.is_empty()) {
            row.source_identity = Some(id);
        }
        let ms = if http { &v["latency_ms"] } else { &v["duration_ms"] };
        row.latencies_ms.push(ms.as_f64().unwrap_or_default());
        row.bytes +=
            v["bytes_sent"].as_u64().unwrap_or_default() + v["bytes_received"].as_u64().unwrap_or_default();
    }
    let mut out: Vec<Row> = rows.into_values().collect();
    for r in &mut out {
        r.latencies_ms.sort_by(f64::total_cmp);
        let pct = |p: f64| r.latencies_ms[((r.latencies_ms.len() - 1) as f64 * p).round() as usize];
        (r.p50_ms, r.p99_ms) = (pct(0.5), pct(0.99));
    }
    out
}

fn config_dump(m: &Running, host: &str, agent: &Agent) -> Value {
    m.lab
        .host(host)
        .http("GET", agent.admin, "/config_dump")
        .ok()
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

fn reason(agent: &Agent) -> String {
    agent
        .find(|v| message(v) == "interception mode selected")
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn draw(m: &Running, rows: &[Row], elapsed: Duration, canary: &Canary, step_len: Duration) {
    let (fe, be) = (config_dump(m, "frontend", &m.frontend), config_dump(m, "backend", &m.backend));
    let secs = elapsed.as_secs_f64().max(1.0);
    let d = &fe["discovery"];
    let cert = |dump: &Value| {
        let c = &dump["certificates"][0];
        format!(
            "{} (expires in {}s)",
            c["identity"].as_str().unwrap_or("(not issued yet)"),
            c["expires_in_seconds"]
        )
    };
    let mut out = String::from("\x1b[2J\x1b[H");
    out.push_str(&format!(
        "mesh demo: {:.0}s\n\
         interception: frontend {} ({}); backend {} ({})\n\
         control plane: {} connected={} snapshot version={} staleness={}s\n\
         certificates: frontend {}; backend {}\n\n\
         frontend workload (enrolled cgroup) -> services by VIP -> frontend agent -> mTLS tunnel -> backend agent\n\n",
        elapsed.as_secs_f64(),
        m.frontend.mode(),
        reason(&m.frontend),
        m.backend.mode(),
        reason(&m.backend),
        d["control_plane"].as_str().unwrap_or("-"),
        d["connected"],
        d["applied_version"],
        d["staleness_seconds"],
        cert(&fe),
        cert(&be),
    ));
    let (w1, w2) = CANARY_STEPS[canary.step];
    let next = if canary.step + 1 < CANARY_STEPS.len() {
        let (n1, n2) = CANARY_STEPS[canary.step + 1];
        format!("; {n1}/{n2} in {:.0}s", step_len.saturating_sub(canary.since.elapsed()).as_secs_f64())
    } else {
        "; shift complete".to_owned()
    };
    let done: Vec<String> = canary
        .steps
        .iter()
        .map(|s| format!("{}/{}: v1 {} v2 {}", s.v1_weight, s.v2_weight, s.v1_requests, s.v2_requests))
        .collect();
    out.push_str(&format!(
        "canary (route `canary` of shop/catalog): v1 {w1}% / v2 {w2}%{next}{}\n\n",
        if done.is_empty() { String::new() } else { format!("   [{}]", done.join(", ")) }
    ));
    out.push_str(&format!(
        "{:<44} {:<24} {:>7} {:>7} {:>6} {:>8} {:>8} {:>10}\n",
        "service -> endpoint (workload)", "protocol", "reqs", "req/s", "errors", "p50 ms", "p99 ms", "bytes"
    ));
    for r in rows {
        let dst = match (&r.service, &r.workload) {
            (Some(s), Some(w)) => format!("{s} -> {} ({w})", r.endpoint),
            (Some(s), None) => format!("{s} -> {}", r.endpoint),
            (None, _) => format!("{} (passthrough)", r.endpoint),
        };
        let unit = if r.kind == "http" { "" } else { " conn" };
        out.push_str(&format!(
            "{:<44} {:<24} {:>7} {:>7.1} {:>6} {:>8.2} {:>8.2} {:>10}\n",
            dst,
            format!("{}{unit}", r.protocol),
            r.requests,
            r.requests as f64 / secs,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            r.bytes
        ));
        out.push_str(&match (&r.source_identity, &r.destination_identity) {
            (Some(src), Some(dst)) => format!("    mTLS {src} -> {dst} ({}/{})\n", r.mtls, r.requests),
            _ => "    not meshed: no identity, passed through as is\n".to_owned(),
        });
    }
    out.push_str(&format!(
        "\nbackend agent: {} inbound requests admitted from {FRONTEND_ID}\n",
        m.backend
            .find_all(|v| v["kind"] == "http"
                && v["direction"] == "inbound"
                && v["source_identity"] == FRONTEND_ID)
            .len()
    ));
    out.push_str("Ctrl-C to stop (everything is torn down).\n");
    print!("{out}");
    let _ = std::io::stdout().flush();
}
