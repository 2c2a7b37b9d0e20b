//! `cargo xtask demo`: the mesh running for real on this machine.
//!
//! Two test hosts (network namespaces on a bridge): `frontend` runs the agent and a
//! workload in an enrolled cgroup that keeps calling `backend` over HTTP/1.1, HTTP/2,
//! TLS and raw TCP; `backend` runs the servers. The terminal shows, live, each
//! intercepted flow with its protocol, request count, errors, latency percentiles and
//! bytes, and the interception mode. Ctrl-C or `--duration` tears everything down
//! and checks nothing was left behind.

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
use mesh_tests::{Agent, AgentOptions, Cgroup, Lab, servers};
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
    println!("[2/4] building release binaries (mesh-agent, mesh-probe)");
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
    }

    println!("[3/4] creating hosts `frontend` and `backend`, servers, agent ({} mode)", opts.mode);
    let lab = Lab::new(&["frontend", "backend"])?;
    let backend = lab.host("backend");
    let _v1 = servers::http(backend, 8080, "backend-v1")?;
    let _v2 = servers::http(backend, 8081, "backend-v2")?;
    let _tls = servers::https(backend, 8443, "backend-tls")?;
    let _tcp = servers::echo(backend, 7000)?;
    let workload = Cgroup::new("frontend")?;
    let agent = Agent::start(
        lab.host("frontend"),
        AgentOptions { log: Some("info".into()), ..AgentOptions::new(&opts.mode).cgroup(&workload) },
    )?;
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
                format!("http://{b}:8080/api"),
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
                format!("http://{b}:8081/api"),
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
        println!("  nsenter --net={frontend_ns} curl -s http://{b}:8080/hello");
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
            draw(&agent, &mode, &reason, started.elapsed());
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

fn draw(agent: &Agent, mode: &str, reason: &str, elapsed: Duration) {
    let mut flows: BTreeMap<String, Flow> = BTreeMap::new();
    for v in agent.connections() {
        let key = v["orig_dst"].as_str().unwrap_or("?").to_owned();
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
    out.push_str(&format!(
        "mesh demo: {:.0}s  interception: {mode} ({reason})\n\nfrontend (enrolled cgroup) -> backend, through mesh-agent on frontend\n\n",
        elapsed.as_secs_f64()
    ));
    out.push_str(&format!(
        "{:<22} {:<28} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10}\n",
        "destination", "protocol", "conns", "conn/s", "errors", "p50 ms", "p99 ms", "bytes"
    ));
    for (dst, f) in &mut flows {
        f.durations_ms.sort_by(f64::total_cmp);
        let pct = |p: f64| f.durations_ms[((f.durations_ms.len() - 1) as f64 * p).round() as usize];
        out.push_str(&format!(
            "{:<22} {:<28} {:>7} {:>7.1} {:>7} {:>9.2} {:>9.2} {:>10}\n",
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
