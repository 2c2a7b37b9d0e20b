//! `cargo xtask demo`: the mesh running for real on this machine.
//!
//! Three test hosts (network namespaces on a bridge): `control` runs the control
//! plane with the YAML registry (the embedded default) and its CA; `frontend` runs
//! the agent (which gets its workload certificate from the CA) and a workload in an
//! enrolled cgroup that keeps calling services by VIP over HTTP/1.1 and HTTP/2, plus
//! TLS and raw TCP to addresses the registry does not know (passed through);
//! `backend` runs the servers. The terminal shows, live, each intercepted flow with
//! its service, endpoints, protocol, request count, errors, latency percentiles and
//! bytes, the interception mode, the discovery version and the certificate.
//! Ctrl-C or `--duration` tears everything down and checks nothing was left behind.

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use mesh_tests::{Agent, AgentOptions, Cgroup, Control, Lab, servers};
use serde_json::Value;

pub struct Options {
    pub mode: String,
    pub duration: Option<Duration>,
    pub keep: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

#[derive(Default)]
struct Flow {
    protocol: String,
    count: u64,
    errors: u64,
    durations_ms: Vec<f64>,
    bytes: u64,
}

pub fn run(root: &std::path::Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo needs root (namespaces, cgroups, BPF or iptables)");
    install_signal_handlers()?;
    println!("[1/4] system packages");
    crate::setup::system_packages()?;
    println!("[2/4] building release binaries (mesh-agent, mesh-control, mesh-probe)");
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
            "-p",
            "control",
            "--bin",
            "mesh-control",
            "-p",
            "mesh-tests",
            "--bin",
            "mesh-probe",
        ])
        .status()?;
    ensure!(status.success(), "build failed");
    let release = root.join("target/release");
    // SAFETY (of set_var): no other thread reads the environment yet.
    unsafe {
        std::env::set_var("MESH_MESH_AGENT_BIN", release.join("mesh-agent"));
        std::env::set_var("MESH_MESH_PROBE_BIN", release.join("mesh-probe"));
        std::env::set_var("MESH_MESH_CONTROL_BIN", release.join("mesh-control"));
    }

    println!(
        "[3/4] creating hosts `control`, `frontend` and `backend`; control plane, servers, agent ({} mode)",
        opts.mode
    );
    let lab = Lab::new(&["control", "frontend", "backend"])?;
    let backend = lab.host("backend");
    let dir = tempfile::tempdir()?;
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, REGISTRY.replace("BACKEND", &backend.v4.to_string()))?;
    std::fs::write(dir.path().join("tokens"), "demo-frontend-token frontend\n")?;
    let token_file = dir.path().join("frontend.token");
    std::fs::write(&token_file, "demo-frontend-token\n")?;
    let ca_dir = dir.path().join("ca");
    let control = Control::start(
        lab.host("control"),
        &registry,
        &[
            "--bootstrap-tokens",
            &dir.path().join("tokens").display().to_string(),
            "--ca-dir",
            &ca_dir.display().to_string(),
        ],
    )?;
    let _v1 = servers::http(backend, 8080, "backend-v1")?;
    let _v2 = servers::http(backend, 8081, "backend-v2")?;
    let _tls = servers::https(backend, 8443, "backend-tls")?;
    let _tcp = servers::echo(backend, 7000)?;
    let workload = Cgroup::new("frontend")?;
    let agent_opts = AgentOptions::new(&opts.mode)
        .cgroup(&workload)
        .arg("--control-plane")
        .arg(control.url.clone())
        .arg("--node")
        .arg("frontend")
        .arg("--identity")
        .arg("shop/frontend")
        .arg("--bootstrap-token-file")
        .arg(token_file.display().to_string());
    let agent = Agent::start(lab.host("frontend"), AgentOptions { log: Some("info".into()), ..agent_opts })?;
    agent.wait_log("first discovery snapshot", |v| v["message"] == "snapshot applied");
    let mode = agent.mode();
    let reason = agent
        .find(|v| v["message"] == "interception mode selected")
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_default();

    let b = backend.v4;
    let probe = release.join("mesh-probe");
    let calls: Vec<(&str, Vec<String>)> = vec![
        (
            "curl",
            vec![
                "-sS".into(),
                "--max-time".into(),
                "5".into(),
                "-o".into(),
                "/dev/null".into(),
                "http://10.96.0.20/api".into(),
            ],
        ),
        (
            "curl",
            vec![
                "-sS".into(),
                "--max-time".into(),
                "5".into(),
                "-o".into(),
                "/dev/null".into(),
                "--http2-prior-knowledge".into(),
                "http://10.96.0.21/api".into(),
            ],
        ),
        (
            "curl",
            vec![
                "-sSk".into(),
                "--max-time".into(),
                "5".into(),
                "-o".into(),
                "/dev/null".into(),
                "--resolve".into(),
                format!("backend.demo:8443:{b}"),
                "https://backend.demo:8443/secure".into(),
            ],
        ),
        (
            probe.to_str().context("utf-8 path")?,
            vec!["--connect".into(), format!("{b}:7000"), "echo".into(), "--bytes".into(), "20000".into()],
        ),
    ];

    let frontend_ns = lab.host("frontend").ns.path();
    println!(
        "[4/4] traffic flowing; {}",
        match (opts.duration, opts.keep) {
            (_, true) => "running until Ctrl-C".to_owned(),
            (Some(d), _) => format!("running for {d:?} (Ctrl-C to stop early)"),
            (None, _) => "running until Ctrl-C".to_owned(),
        }
    );
    if opts.keep {
        println!("\nTry it yourself (from another terminal):");
        println!("  echo $$ > {}/cgroup.procs   # enroll your shell, then:", workload.absolute().display());
        println!(
            "  nsenter --net={frontend_ns} curl -s http://10.96.0.20/hello   # service VIP, round robin"
        );
        println!("  edit {}   # the control plane pushes changes within a second", registry.display());
        println!("  nsenter --net={frontend_ns} curl -s http://127.0.0.1:15000/stats");
        println!("  nsenter --net={frontend_ns} curl -s http://127.0.0.1:15000/config_dump\n");
    }

    let started = Instant::now();
    let stop_workload = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop_workload.clone();
        let frontend = lab.host("frontend");
        let mut prepared = Vec::new();
        for (prog, args) in &calls {
            let mut c = frontend.command(prog, Some(workload.absolute()))?;
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

    let mut last_draw = Instant::now() - Duration::from_secs(1);
    loop {
        let expired = opts.duration.is_some_and(|d| !opts.keep && started.elapsed() >= d);
        if STOP.load(Ordering::SeqCst) || expired {
            break;
        }
        if last_draw.elapsed() >= Duration::from_secs(1) {
            draw(&lab, &agent, &mode, &reason, started.elapsed());
            last_draw = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    println!("\nstopping: workload, agent, servers, hosts");
    stop_workload.store(true, Ordering::SeqCst);
    let _ = driver.join();
    let flows = agent.connections().len();
    let status = agent.terminate()?;
    ensure!(status.success(), "agent exited with {status}");
    let status = control.terminate()?;
    ensure!(status.success(), "control plane exited with {status}");
    let workload_path = workload.absolute().to_path_buf();
    let ns_names: Vec<String> = lab.hosts.iter().map(|h| h.ns.name().to_owned()).collect();
    drop(workload);
    drop(lab);
    let leftover_ns: Vec<&String> =
        ns_names.iter().filter(|n| std::path::Path::new(&format!("/var/run/netns/{n}")).exists()).collect();
    ensure!(leftover_ns.is_empty(), "namespaces left behind: {leftover_ns:?}");
    ensure!(!workload_path.exists(), "cgroup left behind: {}", workload_path.display());
    println!(
        "done: {flows} intercepted connections; teardown left no namespaces, cgroups, iptables rules or BPF programs"
    );
    Ok(())
}

/// The demo's registry: two services by VIP (`BACKEND` is replaced by the backend
/// host's address). TLS on 8443 and TCP on 7000 are not registered: passed through.
const REGISTRY: &str = "services:
  - name: catalog
    namespace: shop
    vips: [10.96.0.20]
    hostnames: [catalog.shop.svc.cluster.local]
    ports: [{port: 80, protocol: http}]
    health_check: {interval: 2s, timeout: 1s}
    endpoints:
      - {address: BACKEND, port: 8080, workload: backend-v1, service_account: catalog}
      - {address: BACKEND, port: 8081, workload: backend-v2, service_account: catalog}
  - name: reviews
    namespace: shop
    vips: [10.96.0.21]
    ports: [{port: 80, protocol: http2}]
    endpoints:
      - {address: BACKEND, port: 8081, workload: backend-v2, service_account: reviews}
  - name: frontend
    namespace: shop
    vips: [10.96.0.30]
    ports: [{port: 80}]
    endpoints:
      - {address: 10.77.0.2, port: 8080, node: frontend, service_account: frontend}
";

fn draw(lab: &Lab, agent: &Agent, mode: &str, reason: &str, elapsed: Duration) {
    let dump: Value = lab
        .host("frontend")
        .http("GET", agent.admin, "/config_dump")
        .ok()
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default();
    let mut flows: BTreeMap<String, Flow> = BTreeMap::new();
    for v in agent.connections() {
        let key = match (v["service"].as_str(), v["endpoint"].as_str()) {
            (Some(svc), Some(ep)) => format!("{svc} -> {ep}"),
            _ => format!("{} (passthrough)", v["orig_dst"].as_str().unwrap_or("?")),
        };
        let f = flows.entry(key).or_default();
        f.protocol = protocol(&v);
        f.count += 1;
        if !v["error"].is_null() {
            f.errors += 1;
        }
        f.durations_ms.push(v["duration_ms"].as_f64().unwrap_or_default());
        f.bytes +=
            v["bytes_sent"].as_u64().unwrap_or_default() + v["bytes_received"].as_u64().unwrap_or_default();
    }
    let secs = elapsed.as_secs_f64().max(1.0);
    let mut out = String::new();
    out.push_str("\x1b[2J\x1b[H");
    let d = &dump["discovery"];
    let cert = &dump["certificates"][0];
    out.push_str(&format!(
        "mesh demo: {:.0}s  interception: {mode} ({reason})\n\
         control plane: {} connected={} snapshot version={} staleness={}s\n\
         workload certificate: {} (expires in {}s)\n\n\
         frontend (enrolled cgroup) -> services by VIP, through mesh-agent on frontend\n\n",
        elapsed.as_secs_f64(),
        d["control_plane"].as_str().unwrap_or("-"),
        d["connected"],
        d["applied_version"],
        d["staleness_seconds"],
        cert["identity"].as_str().unwrap_or("(not issued yet)"),
        cert["expires_in_seconds"],
    ));
    out.push_str(&format!(
        "{:<38} {:<24} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10}\n",
        "destination", "protocol", "conns", "conn/s", "errors", "p50 ms", "p99 ms", "bytes"
    ));
    for (dst, f) in &mut flows {
        f.durations_ms.sort_by(f64::total_cmp);
        let pct = |p: f64| f.durations_ms[((f.durations_ms.len() - 1) as f64 * p).round() as usize];
        out.push_str(&format!(
            "{:<38} {:<24} {:>7} {:>7.1} {:>7} {:>9.2} {:>9.2} {:>10}\n",
            dst,
            f.protocol,
            f.count,
            f.count as f64 / secs,
            f.errors,
            pct(0.5),
            pct(0.99),
            f.bytes
        ));
    }
    out.push_str("\nCtrl-C to stop (everything is torn down).\n");
    print!("{out}");
    let _ = std::io::stdout().flush();
}

fn protocol(v: &Value) -> String {
    let p = v["protocol"].as_str().unwrap_or("?");
    match p {
        "tls" => format!("tls sni={}", v["sni"].as_str().unwrap_or("-")),
        "opaque" => format!("tcp ({})", v["opaque_reason"].as_str().unwrap_or("-")),
        other => other.to_owned(),
    }
}
