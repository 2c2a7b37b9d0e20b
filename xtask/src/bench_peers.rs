//! `cargo xtask bench peers`: the mesh beside Istio's ztunnel in one run, each path
//! as a ratio to its own direct path, and every proxy's memory idle, after load and
//! holding many connections open.
//!
//! One bridge, two labs on it:
//! - the mesh: `control` (control plane, YAML registry, CA), `client` (agent in eBPF
//!   mode, the workload cgroup), `server` (agent, nginx), `direct` (no agent). The
//!   workload calls one service VIP on two ports: `tcp` (L4: bytes over the mTLS
//!   tunnel) and `http` (L7: requests parsed, pooled, balanced);
//! - ztunnel (when `ZTUNNEL_BIN` names a binary): `zt-client` and `zt-server`, each
//!   with a ztunnel in dedicated mode (in-process fake CA, workloads from a local
//!   file), `zt-client`'s outbound TCP redirected to it with iptables as ztunnel's
//!   own scripts do; the same nginx on `zt-server`, whose port 8081 is left out of
//!   the redirect for ztunnel's direct path.
//!
//! Every workload is `wrk -t1` against nginx: tiny answers over 32 kept-alive
//! connections, 1 MiB answers over 4, tiny answers with `Connection: close` over 16,
//! and 16 MiB answers over one connection. Rounds interleave the paths so drift on
//! the shared machine hits all alike; medians are reported.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{Agent, AgentOptions, Cgroup, Control, Host, Lab, process::LoggedChild, process::Memory};
use serde::Serialize;

use crate::bench::{wrk_latency, wrk_value};
use crate::bench_l7::{KillOnDrop, start_nginx};

pub struct Options {
    pub rounds: usize,
    pub duration: Duration,
    /// ztunnel's binary; `None`: the peer's columns are left out.
    pub ztunnel: Option<PathBuf>,
    /// Connection counts held open for the memory figures.
    pub held: Vec<usize>,
    /// Only these workloads (their keys); empty: all, and the results are written.
    pub workloads: Vec<String>,
    /// The mesh's agents run with `--sockmap on` (an A/B against a run without).
    pub sockmap: bool,
}

const VIP: &str = "10.96.0.60";
/// The service's ports: L7 (HTTP/1.1 parsed) and L4 (bytes only).
const L7_PORT: u16 = 80;
const L4_PORT: u16 = 82;
/// nginx on both server hosts; the second port is ztunnel's direct path.
const NGINX: u16 = 8080;
const BYPASS: u16 = 8081;
/// ztunnel's mark on its own sockets, left out of the redirect (its scripts' value).
const ZT_MARK: &str = "0x539";

/// One `wrk` workload.
#[derive(Clone, Copy, Debug, Serialize)]
struct Workload {
    /// What `--workloads` calls it.
    key: &'static str,
    name: &'static str,
    connections: u32,
    path: &'static str,
    close: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "keepalive",
        name: "keep-alive, 32 connections, 18 B answers",
        connections: 32,
        path: "/",
        close: false,
    },
    Workload { key: "bulk", name: "1 MiB answers, 4 connections", connections: 4, path: "/1m", close: false },
    Workload {
        key: "close",
        name: "Connection: close, 16 connections",
        connections: 16,
        path: "/",
        close: true,
    },
    Workload {
        key: "stream",
        name: "one 16 MiB stream at a time, 1 connection",
        connections: 1,
        path: "/16m",
        close: false,
    },
];

/// The paths measured, in the order of each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Route {
    Direct,
    MeshL4,
    MeshL7,
    ZtDirect,
    Ztunnel,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::MeshL4 => "mesh pair, tcp port (L4)",
            Route::MeshL7 => "mesh pair, http port (L7)",
            Route::ZtDirect => "direct (ztunnel's hosts)",
            Route::Ztunnel => "ztunnel pair (HBONE)",
        }
    }
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Figures {
    rps: f64,
    mib_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    workload: Workload,
    /// Medians per route, in [`Route`] order of the run.
    results: Vec<(Route, Figures)>,
}

/// A proxy's resident memory at each step, in KiB.
#[derive(Clone, Debug, Default, Serialize)]
struct MemoryRow {
    process: String,
    idle_kib: u64,
    after_load_kib: u64,
    /// (connections held, resident while held).
    held_kib: Vec<(usize, u64)>,
    after_release_kib: u64,
    /// Resident [`SETTLE`] after the release: what an idle proxy keeps.
    settled_kib: u64,
    peak_kib: u64,
}

/// How long after the release the settled figure is read: longer than the agent's
/// allocator takes to hand freed pages back (`memory::COLLECT_EVERY`, 5 s).
pub(crate) const SETTLE: Duration = Duration::from_secs(10);

/// The mesh's half of the lab.
struct Mesh {
    client: Agent,
    server: Agent,
    workload: Cgroup,
    _server_cg: Cgroup,
    control: Control,
}

/// ztunnel's half of the lab.
struct Ztunnel {
    client: LoggedChild,
    server: LoggedChild,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    for w in &opts.workloads {
        ensure!(
            WORKLOADS.iter().any(|k| k.key == w),
            "--workloads: unknown workload {w:?} (keepalive, bulk, close or stream)"
        );
    }
    let workloads: Vec<Workload> = WORKLOADS
        .into_iter()
        .filter(|w| opts.workloads.is_empty() || opts.workloads.iter().any(|k| k == w.key))
        .collect();
    crate::setup::system_packages()?;
    if let Some(bin) = &opts.ztunnel {
        ensure!(bin.is_file(), "ZTUNNEL_BIN={} is not a file", bin.display());
    } else {
        println!(
            "ZTUNNEL_BIN is not set: ztunnel's columns are left out (../shared/anchors/ztunnel/README.md builds it)"
        );
    }
    // Every held connection is a descriptor in the workload, in each proxy and in
    // nginx: the agents fit --max-connections to half their RLIMIT_NOFILE, and they,
    // nginx and the probe inherit this one.
    let held = held_counts(&opts.held)?;
    println!("[1/4] building release binaries");
    let _bins = crate::release::build_aside(root)?;

    println!("[2/4] starting the labs: control plane, two agents (eBPF mode), nginx; ztunnel pair");
    let lab = Lab::new(&["control", "client", "server", "direct", "zt-client", "zt-server"])?;
    let dir = tempfile::tempdir()?;
    let mut _nginx = Vec::new();
    for host in ["server", "zt-server"] {
        _nginx.push(nginx(lab.host(host), &dir.path().join(host))?);
    }
    let mesh = start_mesh(&lab, dir.path(), opts.sockmap)?;
    let ztunnel = opts.ztunnel.as_deref().map(|bin| start_ztunnel(&lab, dir.path(), bin)).transpose()?;
    let routes: Vec<Route> = [Route::Direct, Route::MeshL4, Route::MeshL7]
        .into_iter()
        .chain(ztunnel.is_some().then_some([Route::ZtDirect, Route::Ztunnel]).into_iter().flatten())
        .collect();
    let pids = |z: &Option<Ztunnel>| {
        let mut p = vec![("mesh client agent", mesh.client.pid()), ("mesh server agent", mesh.server.pid())];
        if let Some(z) = z {
            p.push(("ztunnel, client side", z.client.pid()));
            p.push(("ztunnel, server side", z.server.pid()));
        }
        p
    };
    // Idle: enrolled, configured, one request through each path (ztunnel fetches its
    // certificate on first use).
    for &route in &routes {
        wrk(&lab, &mesh, route, &WORKLOADS[0], Duration::from_secs(1))?;
    }
    let mut memory: Vec<MemoryRow> = pids(&ztunnel)
        .into_iter()
        .map(|(name, pid)| MemoryRow { process: name.to_owned(), idle_kib: rss(pid), ..Default::default() })
        .collect();

    println!(
        "[3/4] measuring: {} round(s) x {} workloads x {} paths, {:?} each (wrk -t1)",
        opts.rounds,
        workloads.len(),
        routes.len(),
        opts.duration
    );
    let mut samples: Vec<Vec<Vec<Figures>>> = vec![vec![Vec::new(); routes.len()]; workloads.len()];
    for round in 1..=opts.rounds.max(1) {
        for (w, workload) in workloads.iter().enumerate() {
            for (r, &route) in routes.iter().enumerate() {
                let fig = wrk(&lab, &mesh, route, workload, opts.duration)?;
                println!(
                    "      round {round} | {:<42} | {:<26} {:>8.0} req/s {:>8.1} MiB/s p50 {:>7.3} ms p99 {:>7.3} ms",
                    workload.name,
                    route.label(),
                    fig.rps,
                    fig.mib_s,
                    fig.p50_ms,
                    fig.p99_ms
                );
                samples[w][r].push(fig);
            }
        }
    }
    for (row, (_, pid)) in memory.iter_mut().zip(pids(&ztunnel)) {
        row.after_load_kib = rss(pid);
    }

    let held = within_agent_caps(&mesh, held);
    println!("[4/4] memory: holding {held:?} connections open through each pair (L4)");
    let servers: Vec<&str> = if ztunnel.is_some() { vec!["server", "zt-server"] } else { vec!["server"] };
    let baseline =
        servers.iter().map(|h| Ok((*h, nginx_connections(&lab, h)?))).collect::<Result<Vec<_>>>()?;
    for &count in &held {
        let mut holders = vec![hold(&lab, &mesh, Route::MeshL4, count)?];
        if ztunnel.is_some() {
            holders.push(hold(&lab, &mesh, Route::Ztunnel, count)?);
        }
        for (row, (_, pid)) in memory.iter_mut().zip(pids(&ztunnel)) {
            row.held_kib.push((count, rss(pid)));
        }
        for h in holders {
            h.release()?;
        }
    }
    wait_closed(&lab, &baseline)?;
    for (row, (_, pid)) in memory.iter_mut().zip(pids(&ztunnel)) {
        row.after_release_kib = rss(pid);
        row.peak_kib = Memory::of(pid).map_or(0, |m| m.peak_kib);
    }
    // Nothing to await: what an idle process keeps is read once the time it may
    // take to give memory back has passed.
    std::thread::sleep(SETTLE);
    for (row, (_, pid)) in memory.iter_mut().zip(pids(&ztunnel)) {
        row.settled_kib = rss(pid);
    }

    let rows: Vec<Row> = workloads
        .iter()
        .zip(&samples)
        .map(|(w, per_route)| Row {
            workload: *w,
            results: routes.iter().zip(per_route).map(|(r, s)| (*r, median(s))).collect(),
        })
        .collect();
    if let Some(z) = ztunnel {
        stop(z.client)?;
        stop(z.server)?;
    }
    mesh.client.terminate()?;
    mesh.server.terminate()?;
    mesh.control.terminate()?;
    drop(mesh.workload);

    let report = render(&rows, &memory, opts);
    println!("\n{report}");
    if !opts.workloads.is_empty() {
        println!("(a partial run: bench-results/peers.md keeps the last full run)");
        return Ok(());
    }
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out)?;
    // An A/B run with `--sockmap` keeps its own files beside the plain run's.
    let name = if opts.sockmap { "peers-sockmap" } else { "peers" };
    std::fs::write(out.join(format!("{name}.md")), &report)?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(
            &serde_json::json!({"rows": rows, "memory": memory, "sockmap": opts.sockmap}),
        )?,
    )?;
    println!("wrote bench-results/{name}.md and bench-results/{name}.json");
    Ok(())
}

/// Raises `RLIMIT_NOFILE` (inherited by the agents, nginx and the probe) for the
/// held connections, and returns the counts that fit: an agent fits its
/// `--max-connections` to half its descriptors, so where the hard limit cannot be
/// raised (no CAP_SYS_RESOURCE) a count above that is lowered, and says so.
fn held_counts(wanted: &[usize]) -> Result<Vec<usize>> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 65_536;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        want
    } else {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        hard
    };
    // Half for each agent's two sockets per connection, less its reserve and margin.
    let fits = usize::try_from(limit / 2).unwrap_or(usize::MAX).saturating_sub(1024);
    Ok(wanted
        .iter()
        .map(|&n| {
            if n > fits {
                println!(
                    "      RLIMIT_NOFILE is {limit} and cannot be raised here: holding {fits} instead of {n}"
                );
            }
            n.min(fits)
        })
        .collect())
}

pub(crate) fn rss(pid: u32) -> u64 {
    Memory::of(pid).map_or(0, |m| m.rss_kib)
}

fn stop(mut p: LoggedChild) -> Result<()> {
    p.stop(nix::sys::signal::Signal::SIGTERM)?;
    Ok(())
}

/// nginx on `host`: 18 bytes at `/`, files of 1 MiB and 16 MiB, on both ports.
fn nginx(host: &Host, dir: &Path) -> Result<KillOnDrop> {
    std::fs::create_dir_all(dir.join("www"))?;
    for (name, len) in [("1m", 1 << 20), ("16m", 16 << 20)] {
        std::fs::write(dir.join("www").join(name), mesh_tests::attacker::pseudo_random(len, 7))?;
    }
    start_nginx(
        host,
        dir,
        &format!(
            "listen {NGINX}; listen {BYPASS}; root {www}; location = / {{ return 200 \"hello from server\\n\"; }}",
            www = dir.join("www").display()
        ),
        NGINX,
    )
}

fn registry(server: &Host, client: &Host) -> String {
    format!(
        "services:
  - name: bench
    namespace: shop
    vips: [{VIP}]
    ports:
      - {{name: http, port: {L7_PORT}, target_port: {NGINX}, protocol: http}}
      - {{name: tcp, port: {L4_PORT}, target_port: {NGINX}, protocol: tcp}}
    endpoints:
      - {{address: {s}, node: server, service_account: api, agent_address: \"{s}:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: {c}, node: client, service_account: frontend}}
",
        s = server.v4,
        c = client.v4,
    )
}

fn start_mesh(lab: &Lab, dir: &Path, sockmap: bool) -> Result<Mesh> {
    let reg = dir.join("registry.yaml");
    std::fs::write(&reg, registry(lab.host("server"), lab.host("client")))?;
    let control = Control::start_with_ca(lab.host("control"), &reg, dir, &["client", "server"], &[])?;
    let workload = Cgroup::new("peers")?;
    let server_cg = Cgroup::new("peers-srv")?;
    let agent = |host: &str, cg: &Cgroup, identity: &str| -> Result<Agent> {
        let opts = control
            .agent_options("ebpf", host, identity)
            .cgroup(cg)
            .arg("--access-log")
            .arg("off")
            // The memory step holds up to 10,000 connections from one workload.
            .arg("--max-connections-per-source")
            .arg("16384")
            .arg("--sockmap")
            .arg(if sockmap { "on" } else { "off" });
        let a = Agent::start(lab.host(host), AgentOptions { log: Some("info".into()), ..opts })?;
        a.wait_enrolled();
        Ok(a)
    };
    let client = agent("client", &workload, "shop/frontend")?;
    let server = agent("server", &server_cg, "shop/api")?;
    Ok(Mesh { client, server, workload, _server_cg: server_cg, control })
}

/// ztunnel's local workload file: the two hosts' addresses as HBONE workloads.
fn ztunnel_workloads(client: &Host, server: &Host) -> String {
    let workload = |name: &str, ip: std::net::Ipv4Addr| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  \
             trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{name}\n  network: \"\"\n  services: {{}}\n"
        )
    };
    format!("workloads:\n{}{}", workload("client", client.v4), workload("server", server.v4))
}

fn start_ztunnel(lab: &Lab, dir: &Path, bin: &Path) -> Result<Ztunnel> {
    let (client, server) = (lab.host("zt-client"), lab.host("zt-server"));
    let file = dir.join("ztunnel-workloads.yaml");
    std::fs::write(&file, ztunnel_workloads(client, server))?;
    // The redirect ztunnel's own scripts install: the workload's outbound TCP to
    // port 15001, except ztunnel's marked sockets and the direct path's port.
    for rule in [
        vec!["-p", "tcp", "--dport", "8081", "-j", "RETURN"],
        vec!["-p", "tcp", "!", "-o", "lo", "-m", "mark", "!", "--mark", &format!("{ZT_MARK}/0xfff")],
    ] {
        let mut args = vec!["-w", "-t", "nat", "-A", "OUTPUT"];
        args.extend(rule.iter().copied());
        if args.contains(&"mark") {
            args.extend(["-j", "REDIRECT", "--to-ports", "15001"]);
        }
        let out = client.command("iptables", None)?.args(&args).output().context("running iptables")?;
        ensure!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let start = |host: &Host, name: &str| -> Result<LoggedChild> {
        let mut cmd = host.command(bin, None)?;
        cmd.arg("proxy")
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &file)
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("default/{name}/{name}"))
            .env("PACKET_MARK", "1337")
            .env("ENABLE_ORIG_SRC", "false")
            // One worker, as the agents' data path runs on one.
            .env("ZTUNNEL_WORKER_THREADS", "1")
            .env("RUST_LOG", "warn");
        let child = LoggedChild::spawn("ztunnel", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ztunnel_ready(host) {
            ensure!(
                Instant::now() < deadline,
                "ztunnel in {} not ready within 20 s:\n{}",
                host.name,
                child.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    };
    Ok(Ztunnel { server: start(server, "server")?, client: start(client, "client")? })
}

/// Whether ztunnel's readiness endpoint (port 15021) in `host` answers 200.
fn ztunnel_ready(host: &Host) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 15021));
    matches!(host.http("GET", addr, "/healthz/ready"), Ok((200, _)))
}

/// Where `route`'s load runs from, in which cgroup, against which URL.
fn target(lab: &Lab, mesh: &Mesh, route: Route) -> (String, Option<PathBuf>, String) {
    let (server, zt) = (lab.host("server"), lab.host("zt-server"));
    let wl = Some(mesh.workload.absolute().to_owned());
    match route {
        Route::Direct => ("direct".into(), None, format!("http://{}", server.v4_addr(NGINX))),
        Route::MeshL4 => ("client".into(), wl, format!("http://{VIP}:{L4_PORT}")),
        Route::MeshL7 => ("client".into(), wl, format!("http://{VIP}:{L7_PORT}")),
        Route::ZtDirect => ("zt-client".into(), None, format!("http://{}", zt.v4_addr(BYPASS))),
        Route::Ztunnel => ("zt-client".into(), None, format!("http://{}", zt.v4_addr(NGINX))),
    }
}

fn wrk(lab: &Lab, mesh: &Mesh, route: Route, w: &Workload, duration: Duration) -> Result<Figures> {
    let (host, cg, url) = target(lab, mesh, route);
    let mut cmd = lab.host(&host).command("wrk", cg.as_deref())?;
    cmd.args([
        "-t1",
        &format!("-c{}", w.connections),
        &format!("-d{}s", duration.as_secs().max(1)),
        "--latency",
    ]);
    if w.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("{url}{}", w.path));
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    // wrk counts failed answers apart from its rate: a path that fails is not fast.
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("{} {}: {}", route.label(), w.name, line.trim());
    }
    if let Some(line) = text.lines().find(|l| l.contains("Socket errors")) {
        println!("      {} {}: {}", route.label(), w.name, line.trim());
    }
    Ok(Figures {
        rps: wrk_value(&text, "Requests/sec:").context("wrk requests/sec")?,
        mib_s: wrk_transfer_mib(&text).context("wrk transfer/sec")?,
        p50_ms: wrk_latency(&text, "50%").context("wrk p50")?,
        p99_ms: wrk_latency(&text, "99%").context("wrk p99")?,
    })
}

/// wrk's `Transfer/sec:` line ("1.23GB", binary units) in MiB/s.
fn wrk_transfer_mib(out: &str) -> Option<f64> {
    let v = out.lines().find_map(|l| l.trim().strip_prefix("Transfer/sec:"))?.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "B" => n / 1048576.0,
        "KB" => n / 1024.0,
        "MB" => n,
        "GB" => n * 1024.0,
        _ => return None,
    })
}

/// The held counts, each lowered under the agents' connection caps: an agent fits
/// `--max-connections` to its descriptors itself (`mesh_agent::limits::fit_to_nofile`:
/// with splice on, an eighth of them kept for pipes) and logs the cap it chose, and
/// resets a connection past it. A run that asked for more than that measured the cap,
/// not memory (a run holding 8,976 failed at connection 8,303 this way).
fn within_agent_caps(mesh: &Mesh, held: Vec<usize>) -> Vec<usize> {
    // Room for the agent's own connections (tunnel, control plane) under the cap.
    const MARGIN: usize = 64;
    let lowered = |a: &Agent| {
        a.find(|v| mesh_tests::agent::message(v).starts_with("--max-connections lowered"))
            .and_then(|v| v["lowered_to"].as_u64())
            .and_then(|n| usize::try_from(n).ok())
    };
    let Some(cap) = [&mesh.client, &mesh.server].into_iter().filter_map(lowered).min() else { return held };
    let fits = cap.saturating_sub(MARGIN);
    held.into_iter()
        .map(|n| {
            if n > fits {
                println!(
                    "      the agents' connection cap is {cap} (RLIMIT_NOFILE): holding {fits} instead of {n}"
                );
            }
            n.min(fits)
        })
        .collect()
}

/// A `mesh-probe hold` holding connections open until released.
struct Holder(std::process::Child);

impl Holder {
    fn release(mut self) -> Result<()> {
        drop(self.0.stdin.take());
        let status = self.0.wait()?;
        ensure!(status.success(), "mesh-probe hold: {status}");
        Ok(())
    }
}

fn hold(lab: &Lab, mesh: &Mesh, route: Route, count: usize) -> Result<Holder> {
    let (host, cg, url) = target(lab, mesh, route);
    let addr = url.trim_start_matches("http://").to_owned();
    let probe = PathBuf::from(std::env::var_os("MESH_MESH_PROBE_BIN").context("probe path")?);
    let mut child = lab
        .host(&host)
        .command(&probe, cg.as_deref())?
        .args(["--connect", &addr, "--timeout", "30s", "hold", "--count", &count.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting mesh-probe hold")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("probe stdout")?).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("{}: holding {count} connections failed", route.label()))?;
    ensure!(v["held"].as_u64() == Some(count as u64), "{}: held {v}", route.label());
    println!(
        "      {} holds {count} connections (opened in {:.0} ms)",
        route.label(),
        v["open_ms"].as_f64().unwrap_or(0.0)
    );
    Ok(Holder(child))
}

/// Connections established to nginx on a server host.
fn nginx_connections(lab: &Lab, host: &str) -> Result<usize> {
    let out = lab
        .host(host)
        .command("ss", None)?
        .args(["-Htn", "state", "established", &format!("( sport = :{NGINX} )")])
        .output()
        .context("running ss")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// Waits until each server host's nginx is back to its `baseline` connections (the
/// agents' pooled ones): every released connection closed end to end. At most 30 s.
fn wait_closed(lab: &Lab, baseline: &[(&str, usize)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &(host, before) in baseline {
        loop {
            let open = nginx_connections(lab, host)?;
            if open <= before {
                break;
            }
            if Instant::now() > deadline {
                println!("      {host}: {open} connections to nginx after 30 s, {before} before holding");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn median(s: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| crate::bench_observe::median(s.iter().map(f).collect());
    Figures { rps: m(|f| f.rps), mib_s: m(|f| f.mib_s), p50_ms: m(|f| f.p50_ms), p99_ms: m(|f| f.p99_ms) }
}

fn render(rows: &[Row], memory: &[MemoryRow], opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# The mesh beside ztunnel\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench peers --rounds {} --duration {}s{}`: one run on this 2-core machine, every process \
         sharing both cores. Medians of {} rounds; within a round the paths run one after another, so drift \
         hits them alike. Load: `wrk -t1`. Both agents in eBPF mode with one data-path worker; ztunnel {} \
         with one worker (`ZTUNNEL_WORKER_THREADS=1`).\n",
        opts.rounds,
        opts.duration.as_secs(),
        if opts.sockmap { " --sockmap" } else { "" },
        opts.rounds,
        if opts.ztunnel.is_some() { "in dedicated mode, fake CA," } else { "not run (ZTUNNEL_BIN unset)," },
    );
    let get = |row: &Row, route: Route| row.results.iter().find(|(r, _)| *r == route).map(|(_, f)| *f);
    let ratio = |a: Option<Figures>, b: Option<Figures>, bulk: bool| match (a, b) {
        (Some(a), Some(b)) if bulk && b.mib_s > 0.0 => Some(a.mib_s / b.mib_s),
        (Some(a), Some(b)) if !bulk && b.rps > 0.0 => Some(a.rps / b.rps),
        _ => None,
    };
    let fmt = |f: Option<Figures>, bulk: bool| match f {
        Some(f) if bulk => format!("{:.0} MiB/s", f.mib_s),
        Some(f) => format!("{:.0} req/s, p99 {:.2} ms", f.rps, f.p99_ms),
        None => "–".into(),
    };
    let x = |r: Option<f64>| r.map_or("–".into(), |r| format!("{r:.2}x"));
    let _ = writeln!(s, "## Each path ÷ its own direct path\n");
    let _ = writeln!(
        s,
        "| workload | direct | mesh L4 | ÷ direct | mesh L7 | ÷ direct | direct (ztunnel's hosts) | ztunnel pair | ÷ direct | mesh L4 ÷ ztunnel | mesh L7 ÷ ztunnel |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let bulk = row.workload.path != "/";
        let (d, l4, l7, zd, zt) = (
            get(row, Route::Direct),
            get(row, Route::MeshL4),
            get(row, Route::MeshL7),
            get(row, Route::ZtDirect),
            get(row, Route::Ztunnel),
        );
        let (r4, r7, rz) = (ratio(l4, d, bulk), ratio(l7, d, bulk), ratio(zt, zd, bulk));
        let vs = |r: Option<f64>| match (r, rz) {
            (Some(a), Some(b)) if b > 0.0 => format!("**{:.2}x**", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.workload.name,
            fmt(d, bulk),
            fmt(l4, bulk),
            x(r4),
            fmt(l7, bulk),
            x(r7),
            fmt(zd, bulk),
            fmt(zt, bulk),
            x(rz),
            vs(r4),
            vs(r7),
        );
    }
    let _ = writeln!(
        s,
        "\nThe last two columns divide the mesh's ratio to its direct path by ztunnel's ratio to its own: \
         above 1 the mesh keeps more of what the path could carry. Bulk rows compare bytes per second, the \
         others requests per second.\n"
    );
    let _ = writeln!(s, "## Resident memory (RSS)\n");
    let held: Vec<usize> =
        memory.first().map(|m| m.held_kib.iter().map(|(n, _)| *n).collect()).unwrap_or_default();
    let _ = write!(s, "| process | idle | after the load |");
    for n in &held {
        let _ = write!(s, " holding {n} connections |");
    }
    let _ = writeln!(s, " after releasing them | {} s later | peak |", SETTLE.as_secs());
    let _ = writeln!(s, "|---|---|---|{}---|---|---|", "---|".repeat(held.len()));
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    for m in memory {
        let _ = write!(s, "| {} | {} | {} |", m.process, mib(m.idle_kib), mib(m.after_load_kib));
        for (_, k) in &m.held_kib {
            let _ = write!(s, " {} |", mib(*k));
        }
        let _ = writeln!(s, " {} | {} | {} |", mib(m.after_release_kib), mib(m.settled_kib), mib(m.peak_kib));
    }
    let _ = writeln!(
        s,
        "\nIdle: enrolled, configured, after one second of traffic through each path. Held connections go \
         through the L4 port (bytes over the tunnel, as ztunnel carries them), each with one answered \
         request, opened one after another by `mesh-probe hold`."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_transfer_rates_in_binary_units() {
        let out = "Requests/sec:   1234.56\nTransfer/sec:      1.50GB\n";
        assert_eq!(wrk_transfer_mib(out), Some(1536.0));
        assert_eq!(wrk_transfer_mib("Transfer/sec:    512.00KB\n"), Some(0.5));
        assert_eq!(wrk_transfer_mib("Transfer/sec:   3.2TB\n"), None);
    }
}
