//! `cargo xtask bench l7`: HTTP/1.1 and HTTP/2 requests through the whole mesh
//! (client agent -> mTLS tunnel -> server agent -> server) against the same server
//! reached directly, in one run: at fixed 1k and 10k requests/s (open loop,
//! latency from each request's due time) and at the maximum rate (closed loop).
//!
//! Hosts are network namespaces on one bridge: `control` (control plane with the
//! YAML registry and CA), `client` (agent in eBPF mode, workload cgroup),
//! `server` (agent, nginx), `direct` (a client with no agent). Each load
//! point runs direct and meshed back to back so drift hits both alike.
//!
//! As a reference for what two proxy hops cost on the same machine, each point
//! also runs through HAProxy in the same topology: one HAProxy on `client`, one on
//! `server`, mutual TLS and HTTP/2 between them, kept-alive connections to nginx
//! (one thread each, like the agents). The load generator reaches it from `direct`
//! (nothing intercepts it).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use mesh_tests::{Agent, AgentOptions, Cgroup, Control, Lab};
use serde::Serialize;
use serde_json::Value;

pub struct Options {
    pub duration: Duration,
    pub connections: u32,
    /// Rounds of every point; figures are medians over rounds.
    pub rounds: usize,
    /// Only these protocols (`http1`, `http2`); empty: both.
    pub protocols: Vec<String>,
    /// Only these load points (`1k`, `10k`, `max`); empty: all.
    pub loads: Vec<String>,
}

impl Options {
    /// The load points to run, in requests/s (0: the maximum rate).
    fn loads(&self) -> Result<Vec<u32>> {
        if self.loads.is_empty() {
            return Ok(vec![1_000, 10_000, 0]);
        }
        self.loads
            .iter()
            .map(|l| match l.as_str() {
                "1k" => Ok(1_000),
                "10k" => Ok(10_000),
                "max" => Ok(0),
                other => anyhow::bail!("--loads: unknown load point {other:?} (1k, 10k or max)"),
            })
            .collect()
    }

    /// The protocols to run: `false` for HTTP/1.1, `true` for HTTP/2.
    fn protocols(&self) -> Result<Vec<bool>> {
        if self.protocols.is_empty() {
            return Ok(vec![false, true]);
        }
        self.protocols
            .iter()
            .map(|p| match p.as_str() {
                "http1" => Ok(false),
                "http2" => Ok(true),
                other => anyhow::bail!("--protocols: unknown protocol {other:?} (http1 or http2)"),
            })
            .collect()
    }
}

const VIP: &str = "10.96.0.50";
/// nginx on the server host: HTTP/1.1 here, HTTP/2 (prior knowledge) on `H2`.
const HTTP: u16 = 8080;
const H2: u16 = 8081;

#[derive(Serialize, Clone, Debug)]
struct Point {
    protocol: &'static str,
    load: String,
    direct: Value,
    mesh: Value,
    /// The same load through two HAProxy hops (mTLS between them).
    haproxy: Value,
    /// At the maximum rate only: the same load through two relays that only copy
    /// bytes (no TLS, no HTTP): what the two extra hops cost by themselves.
    relay: Option<Value>,
    /// CPU time per request (microseconds), from /proc, over each run.
    cpu: CpuPerRequest,
}

/// Where the CPU went, per request: the whole machine for the direct and mesh runs,
/// and each agent's share of the mesh run.
#[derive(Serialize, Clone, Copy, Debug, Default)]
struct CpuPerRequest {
    direct_machine_us: f64,
    mesh_machine_us: f64,
    haproxy_machine_us: f64,
    client_agent_us: f64,
    server_agent_us: f64,
    /// Each HAProxy's share of the HAProxy run, for a per-hop comparison.
    client_haproxy_us: f64,
    server_haproxy_us: f64,
}

/// CPU time used so far (user + system), in clock ticks: of the whole machine
/// (`/proc/stat`, every CPU's non-idle time) and of each of `pids`.
#[derive(Clone, Debug)]
struct CpuSample {
    machine: u64,
    pids: Vec<u64>,
}

impl CpuSample {
    fn now(pids: &[u32]) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
        let busy = fields.iter().take(8).sum::<u64>()
            - fields.get(3).copied().unwrap_or(0)
            - fields.get(4).copied().unwrap_or(0);
        let pids = pids
            .iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Fields after the command name (which may hold spaces): state is the
                // 3rd field, utime and stime the 14th and 15th.
                let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
                let f: Vec<u64> =
                    rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
                f.iter().sum()
            })
            .collect();
        Self { machine: busy, pids }
    }

    /// Microseconds per request between `self` and `later` for `requests` requests.
    fn per_request(&self, later: &Self, requests: f64) -> (f64, Vec<f64>) {
        let tick_us =
            1e6 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        let per = |d: u64| d as f64 * tick_us / requests.max(1.0);
        let pids = self.pids.iter().zip(&later.pids).map(|(a, b)| per(b.saturating_sub(*a))).collect();
        (per(later.machine.saturating_sub(self.machine)), pids)
    }
}

fn registry() -> String {
    format!(
        "services:
  - name: bench
    namespace: shop
    vips: [{VIP}]
    ports: [{{name: h1, port: 80, target_port: {HTTP}, protocol: http}}, {{name: h2, port: 81, target_port: {H2}, protocol: http2}}]
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

/// Starts an agent in eBPF mode with an identity, log level info and `extra` flags
/// (default: access log off), and waits for its certificate and first snapshot.
fn start_agent(
    lab: &Lab,
    host: &str,
    cg: &Cgroup,
    control: &Control,
    identity: &str,
    extra: &[String],
) -> Result<Agent> {
    let mut opts = control.agent_options("ebpf", host, identity).cgroup(cg);
    if !extra.iter().any(|a| a == "--access-log") {
        opts = opts.arg("--access-log").arg("off");
    }
    for a in extra {
        opts = opts.arg(a.clone());
    }
    let a = Agent::start(lab.host(host), AgentOptions { log: Some("info".into()), ..opts })?;
    a.wait_enrolled();
    Ok(a)
}

/// The benchmark lab: control plane (registry, CA), nginx on `server`, the
/// workload cgroups; agents are started separately so a benchmark can restart them
/// with different flags.
/// Fields drop in declaration order: processes first, then their files and hosts.
pub(crate) struct Bench {
    _server: KillOnDrop,
    pub control: Control,
    pub workload: Cgroup,
    pub server_cg: Cgroup,
    pub direct_cg: Cgroup,
    pub dir: tempfile::TempDir,
    pub lab: Lab,
}

/// The client and server agents of one configuration.
pub(crate) struct Agents {
    pub client: Agent,
    pub server: Agent,
}

impl Agents {
    pub fn terminate(self) -> Result<()> {
        self.client.terminate()?;
        self.server.terminate()?;
        Ok(())
    }
}

impl Bench {
    pub fn start(name: &str) -> Result<Self> {
        let lab = Lab::new(&["control", "client", "server", "direct"])?;
        let dir = tempfile::tempdir()?;
        let reg = dir.path().join("registry.yaml");
        std::fs::write(&reg, registry())?;
        let control =
            Control::start_with_ca(lab.host("control"), &reg, dir.path(), &["client", "server"], &[])?;
        let server = nginx(lab.host("server"), dir.path())?;
        let workload = Cgroup::new(name)?;
        let server_cg = Cgroup::new(&format!("{name}-srv"))?;
        let direct_cg = Cgroup::new(&format!("{name}-direct"))?;
        Ok(Self { lab, dir, control, _server: server, workload, server_cg, direct_cg })
    }

    /// Both agents, each with `extra(host)` flags.
    pub fn agents(&self, extra: impl Fn(&str) -> Vec<String>) -> Result<Agents> {
        let client = start_agent(
            &self.lab,
            "client",
            &self.workload,
            &self.control,
            "shop/frontend",
            &extra("client"),
        )?;
        let server =
            start_agent(&self.lab, "server", &self.server_cg, &self.control, "shop/api", &extra("server"))?;
        Ok(Agents { client, server })
    }

    /// `mesh-probe load` from `host` (`client`: through the mesh to the VIP; `direct`:
    /// straight to nginx) at `rps` (0: as fast as possible); its JSON report.
    pub fn load(
        &self,
        host: &str,
        http2: bool,
        rps: u32,
        duration: Duration,
        connections: u32,
    ) -> Result<Value> {
        let probe = PathBuf::from(std::env::var_os("MESH_MESH_PROBE_BIN").context("probe path")?);
        let cg = if host == "client" { &self.workload } else { &self.direct_cg };
        let target = match (host, http2) {
            ("direct", false) => self.lab.host("server").v4_addr(HTTP).to_string(),
            ("direct", true) => self.lab.host("server").v4_addr(H2).to_string(),
            // From `direct` to the HAProxy on `client`.
            ("haproxy", false) => self.lab.host("client").v4_addr(HAPROXY_H1).to_string(),
            ("haproxy", true) => self.lab.host("client").v4_addr(HAPROXY_H2).to_string(),
            ("relay", false) => self.lab.host("client").v4_addr(RELAY_H1).to_string(),
            ("relay", true) => self.lab.host("client").v4_addr(RELAY_H2).to_string(),
            (_, false) => format!("{VIP}:80"),
            (_, true) => format!("{VIP}:81"),
        };
        let host = if matches!(host, "haproxy" | "relay") { "direct" } else { host };
        let target = target.as_str();
        let mut cmd = self.lab.host(host).command(&probe, Some(cg.absolute()))?;
        cmd.args([
            "--connect",
            target,
            "--timeout",
            "60s",
            "load",
            "--rps",
            &rps.to_string(),
            "--streams",
            "16",
        ])
        .args(["--duration", &format!("{}ms", duration.as_millis())])
        .args(["--connections", &if http2 { (connections / 16).max(1) } else { connections }.to_string()]);
        if http2 {
            cmd.arg("--http2");
        }
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    let protocols = opts.protocols()?;
    let loads = opts.loads()?;
    crate::setup::system_packages()?;
    println!("[1/3] building release binaries");
    let _bins = crate::release::build_aside(root)?;

    println!("[2/3] starting the control plane, two agents (eBPF mode, mTLS) and the server");
    let bench = Bench::start("l7bench")?;
    let agents = bench.agents(|_| Vec::new())?;
    let haproxies = haproxies(&bench.lab, bench.dir.path(), None)?;
    let load = |host: &str, http2: bool, rps: u32, duration: Duration| {
        bench.load(host, http2, rps, duration, opts.connections)
    };

    println!(
        "[3/3] measuring {:?} per point, direct then mesh then HAProxy, {} round(s)",
        opts.duration, opts.rounds
    );
    let mut points = Vec::new();
    let rounds = opts.rounds.max(1);
    for round in 0..rounds * protocols.len() {
        let http2 = protocols[round % protocols.len()];
        let protocol = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        // Warm-up: connections, pools, tunnel, page cache.
        load("direct", http2, 0, Duration::from_secs(1))?;
        load("client", http2, 0, Duration::from_secs(1))?;
        load("haproxy", http2, 0, Duration::from_secs(1))?;
        if loads.contains(&0) {
            load("relay", http2, 0, Duration::from_secs(1))?;
        }
        for &rps in &loads {
            let pids = [agents.client.pid(), agents.server.pid(), haproxies.0.0.id(), haproxies.1.0.id()];
            let before = CpuSample::now(&pids);
            let direct = load("direct", http2, rps, opts.duration)?;
            let between = CpuSample::now(&pids);
            let mesh = load("client", http2, rps, opts.duration)?;
            let after = CpuSample::now(&pids);
            let haproxy = load("haproxy", http2, rps, opts.duration)?;
            let after_haproxy = CpuSample::now(&pids);
            // The hops' own cost matters where the machine is the limit: at the maximum rate.
            let relay = if rps == 0 { Some(load("relay", http2, rps, opts.duration)?) } else { None };
            let requests = |v: &Value| f(v, "rps") * opts.duration.as_secs_f64();
            let (direct_machine_us, _) = before.per_request(&between, requests(&direct));
            let (mesh_machine_us, agents_us) = between.per_request(&after, requests(&mesh));
            let (haproxy_machine_us, haproxies_us) = after.per_request(&after_haproxy, requests(&haproxy));
            let cpu = CpuPerRequest {
                direct_machine_us,
                mesh_machine_us,
                haproxy_machine_us,
                client_agent_us: agents_us[0],
                server_agent_us: agents_us[1],
                client_haproxy_us: haproxies_us[2],
                server_haproxy_us: haproxies_us[3],
            };
            let label = if rps == 0 { "max".to_owned() } else { format!("{}k rps", rps / 1000) };
            println!(
                "      {protocol:<8} {label:<7} direct {:>7.0} req/s p50 {:>6.0} us p99 {:>7.0} us errors {} | mesh {:>7.0} req/s p50 {:>6.0} us p99 {:>7.0} us errors {}",
                f(&direct, "rps"),
                f(&direct, "p50_us"),
                f(&direct, "p99_us"),
                direct["errors"],
                f(&mesh, "rps"),
                f(&mesh, "p50_us"),
                f(&mesh, "p99_us"),
                mesh["errors"],
            );
            println!(
                "      {:<17} haproxy x2 {:>7.0} req/s p50 {:>6.0} us p99 {:>7.0} us errors {}",
                "",
                f(&haproxy, "rps"),
                f(&haproxy, "p50_us"),
                f(&haproxy, "p99_us"),
                haproxy["errors"],
            );
            println!(
                "      {:<17} CPU per request: direct {direct_machine_us:.1} us | mesh {mesh_machine_us:.1} us, of which client agent {:.1} us, server agent {:.1} us | haproxy x2 {haproxy_machine_us:.1} us, of which {:.1} us and {:.1} us",
                "", cpu.client_agent_us, cpu.server_agent_us, cpu.client_haproxy_us, cpu.server_haproxy_us
            );
            if let Some(r) = &relay {
                println!(
                    "      {:<17} tcp relay x2 {:>7.0} req/s p50 {:>6.0} us p99 {:>7.0} us errors {}",
                    "",
                    f(r, "rps"),
                    f(r, "p50_us"),
                    f(r, "p99_us"),
                    r["errors"],
                );
            }
            points.push(Point { protocol, load: label, direct, mesh, haproxy, relay, cpu });
        }
    }
    let points = medians(&points);
    agents.terminate()?;
    bench.control.terminate()?;

    let report = render(&points, opts);
    println!("\n{report}");
    if !opts.protocols.is_empty() || !opts.loads.is_empty() {
        println!("(a partial run: bench-results/l7.md keeps the last full run)");
        return Ok(());
    }
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("l7.md"), &report)?;
    std::fs::write(out.join("l7.json"), serde_json::to_string_pretty(&points)?)?;
    println!("wrote bench-results/l7.md and bench-results/l7.json");
    Ok(())
}

/// One point per protocol and load: the median of each figure over its rounds
/// (errors summed), in first-seen order.
fn medians(points: &[Point]) -> Vec<Point> {
    use crate::bench_observe::median;
    let run = |group: &[&Point], pick: fn(&Point) -> &Value| {
        let m = |k: &str| median(group.iter().map(|p| f(pick(p), k)).collect());
        let errors: u64 = group.iter().map(|p| pick(p)["errors"].as_u64().unwrap_or(0)).sum();
        serde_json::json!({ "rps": m("rps"), "p50_us": m("p50_us"), "p99_us": m("p99_us"), "errors": errors })
    };
    let mut out: Vec<Point> = Vec::new();
    for p in points {
        if out.iter().any(|o| o.protocol == p.protocol && o.load == p.load) {
            continue;
        }
        let group: Vec<&Point> =
            points.iter().filter(|q| q.protocol == p.protocol && q.load == p.load).collect();
        let cpu = |pick: fn(&CpuPerRequest) -> f64| median(group.iter().map(|q| pick(&q.cpu)).collect());
        out.push(Point {
            protocol: p.protocol,
            load: p.load.clone(),
            direct: run(&group, |p| &p.direct),
            mesh: run(&group, |p| &p.mesh),
            haproxy: run(&group, |p| &p.haproxy),
            relay: p.relay.as_ref().map(|_| run(&group, |p| p.relay.as_ref().unwrap_or(&Value::Null))),
            cpu: CpuPerRequest {
                direct_machine_us: cpu(|c| c.direct_machine_us),
                mesh_machine_us: cpu(|c| c.mesh_machine_us),
                haproxy_machine_us: cpu(|c| c.haproxy_machine_us),
                client_agent_us: cpu(|c| c.client_agent_us),
                server_agent_us: cpu(|c| c.server_agent_us),
                client_haproxy_us: cpu(|c| c.client_haproxy_us),
                server_haproxy_us: cpu(|c| c.server_haproxy_us),
            },
        });
    }
    out
}

/// HAProxy's listeners on `client`: HTTP/1.1 and HTTP/2 (prior knowledge).
const HAPROXY_H1: u16 = 18080;
const HAPROXY_H2: u16 = 18081;
/// HAProxy's mutual-TLS listeners on `server` (this port for nginx's HTTP/1.1, the
/// next for its HTTP/2).
pub(crate) const HAPROXY_TLS: u16 = 18443;
/// The plain TCP relays' listeners on `client` (to nginx's HTTP/1.1 and HTTP/2),
/// and on `server` (this port and the next).
const RELAY_H1: u16 = 19080;
const RELAY_H2: u16 = 19081;
const RELAY_SERVER: u16 = 19443;

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output().context("running openssl")?;
    ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A CA and a certificate for each HAProxy (P-256, like the mesh's), as PEM
/// bundles `client.pem` / `server.pem` and `ca.crt` in `dir`.
fn haproxy_certs(dir: &Path) -> Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=bench-ca", "-days", "2"]);
    openssl(dir, &ca)?;
    for name in ["client", "server"] {
        let (key, csr, crt, subj) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("/CN={name}"));
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
            ],
        )?;
        let pem = std::fs::read_to_string(dir.join(&crt))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    Ok(())
}

/// Plain TCP relays (`mode tcp`: no TLS, no HTTP parsing), each listening port to
/// its address, named `name_<port>`.
fn relay_conf(name: &str, routes: [(u16, String); 2]) -> String {
    routes
        .iter()
        .map(|(port, to)| {
            format!(
                "frontend {name}_{port}\n  mode tcp\n  bind :{port}\n  default_backend {name}_{port}_to\n\n\
                 backend {name}_{port}_to\n  mode tcp\n  server s {to}\n\n"
            )
        })
        .collect()
}

/// The two HAProxy hops: `client` listens for the load generator and sends to
/// `server` over mutual TLS with HTTP/2; `server` sends to nginx over kept-alive
/// connections in the client's HTTP version. One thread each, no logs. The same
/// processes also relay plain TCP on the `RELAY_*` ports: the hops' own cost.
/// `handshake_timeout`: the `server` side's `timeout client` on its mutual-TLS
/// listeners (HAProxy 2.6 bounds a TLS handshake by it; default 60 s).
pub(crate) fn haproxies(
    lab: &Lab,
    dir: &Path,
    handshake_timeout: Option<Duration>,
) -> Result<(KillOnDrop, KillOnDrop)> {
    let dir = dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    haproxy_certs(&dir)?;
    let d = dir.display();
    let common = "global\n  nbthread 1\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\n";
    let server_host = lab.host("server");
    let (tls_h1, tls_h2) = (server_host.v4_addr(HAPROXY_TLS), server_host.v4_addr(HAPROXY_TLS + 1));
    let (relay_h1, relay_h2) = (server_host.v4_addr(RELAY_SERVER), server_host.v4_addr(RELAY_SERVER + 1));
    // HTTP/2 clients reach nginx's HTTP/2 port, HTTP/1.1 clients its HTTP/1.1 one, as
    // through the mesh (which keeps the client's version end to end).
    let client_conf = format!(
        "{common}frontend h1\n  bind :{HAPROXY_H1}\n  default_backend peer_h1\n\nfrontend h2\n  bind :{HAPROXY_H2} proto h2\n  default_backend peer_h2\n\n\
         backend peer_h1\n  server s {tls_h1} ssl crt {d}/client.pem ca-file {d}/ca.crt verify required alpn h2\n\n\
         backend peer_h2\n  server s {tls_h2} ssl crt {d}/client.pem ca-file {d}/ca.crt verify required alpn h2\n\n\
         {}",
        relay_conf("relay_out", [(RELAY_H1, relay_h1.to_string()), (RELAY_H2, relay_h2.to_string())])
    );
    let tunnel_timeout =
        handshake_timeout.map(|t| format!("  timeout client {}ms\n", t.as_millis())).unwrap_or_default();
    let server_conf = format!(
        "{common}frontend tunnel_h1\n  bind :{HAPROXY_TLS} ssl crt {d}/server.pem ca-file {d}/ca.crt verify required alpn h2\n{tunnel_timeout}  default_backend app_h1\n\n\
         frontend tunnel_h2\n  bind :{} ssl crt {d}/server.pem ca-file {d}/ca.crt verify required alpn h2\n{tunnel_timeout}  default_backend app_h2\n\n\
         backend app_h1\n  server nginx 127.0.0.1:{HTTP}\n\n\
         backend app_h2\n  server nginx 127.0.0.1:{H2} proto h2\n\n\
         {}",
        HAPROXY_TLS + 1,
        relay_conf(
            "relay_in",
            [(RELAY_SERVER, format!("127.0.0.1:{HTTP}")), (RELAY_SERVER + 1, format!("127.0.0.1:{H2}"))]
        )
    );
    let start = |host: &str, conf: &str, port: u16| -> Result<KillOnDrop> {
        let path = dir.join(format!("{host}.cfg"));
        std::fs::write(&path, conf)?;
        let h = lab.host(host);
        let child = h
            .command("haproxy", None)?
            .args(["-db", "-q", "-f", &path.display().to_string()])
            .spawn()
            .context("starting haproxy")?;
        let guard = KillOnDrop(child);
        let addr = h.v4_addr(port);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.run_in(move || std::net::TcpStream::connect(addr).is_err())? {
            ensure!(std::time::Instant::now() < deadline, "haproxy did not listen on {addr} within 10s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(guard)
    };
    let server = start("server", &server_conf, HAPROXY_TLS)?;
    let client = start("client", &client_conf, HAPROXY_H1)?;
    Ok((client, server))
}

/// nginx answering every request with a 6-byte body: one worker, no access log.
fn nginx(host: &mesh_tests::Host, dir: &Path) -> Result<KillOnDrop> {
    start_nginx(
        host,
        dir,
        &format!("listen {HTTP}; listen {H2} http2; location / {{ return 200 \"bench\\n\"; }}"),
        HTTP,
    )
}

/// nginx in `host`, one worker, with one `server { .. }` block of `server` (its
/// pid and temp files in `dir`); returns once it accepts on `port`.
pub(crate) fn start_nginx(
    host: &mesh_tests::Host,
    dir: &Path,
    server: &str,
    port: u16,
) -> Result<KillOnDrop> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {pid};\nerror_log stderr warn;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {tmp};\n  \
             server {{ {server} }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            tmp = dir.display(),
        ),
    )?;
    let child = host
        .command("nginx", None)?
        .args(["-c", &conf.display().to_string(), "-e", "stderr"])
        .spawn()
        .context("starting nginx")?;
    let guard = KillOnDrop(child);
    let addr = host.v4_addr(port);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while host.run_in(move || std::net::TcpStream::connect(addr).is_err())? {
        ensure!(std::time::Instant::now() < deadline, "nginx did not listen on {addr} within 10s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(guard)
}

/// A child process killed when the benchmark ends, however it ends.
pub(crate) struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers on TERM, while a SIGKILLed
        // master leaves them running (orphaned, in a namespace that is gone).
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_default()
}

/// `run`'s request rate as a multiple of `direct`'s.
fn ratio(run: &Value, direct: &Value) -> f64 {
    f(run, "rps") / f(direct, "rps").max(1e-9)
}

fn render(points: &[Point], opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# L7 benchmark: through the mesh (client agent -> mTLS tunnel -> server agent) vs direct\n"
    );
    let _ = writeln!(
        s,
        "`cargo xtask bench l7 --duration {}s --connections {} --rounds {}` on {} ({} CPUs); each figure is the median over the rounds. Both agents in eBPF mode, one worker thread each, log level info, access log off; the load generator (`mesh-probe load`), agents and server share the machine. Fixed rates are open loop: latency counts from each request's due time.\n",
        opts.duration.as_secs(),
        opts.connections,
        opts.rounds.max(1),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        s,
        "| protocol | load | direct req/s | mesh req/s | ratio | direct p50 | mesh p50 | direct p99 | mesh p99 | p99 added | errors (direct/mesh) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.2}x | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.2} ms | {}/{} |",
            p.protocol,
            p.load,
            f(&p.direct, "rps"),
            f(&p.mesh, "rps"),
            ratio(&p.mesh, &p.direct),
            f(&p.direct, "p50_us"),
            f(&p.mesh, "p50_us"),
            f(&p.direct, "p99_us"),
            f(&p.mesh, "p99_us"),
            (f(&p.mesh, "p99_us") - f(&p.direct, "p99_us")) / 1000.0,
            p.direct["errors"],
            p.mesh["errors"],
        );
    }
    let _ = writeln!(
        s,
        "\nReference: the same load through two HAProxy 2.6 hops in the same topology (one thread each, mutual TLS and HTTP/2 between them, kept-alive to nginx in the client's HTTP version), measured in the same run right after the mesh:\n"
    );
    let _ = writeln!(
        s,
        "| protocol | load | haproxy x2 req/s | ratio to direct | p50 | p99 | p99 added | errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2}x | {:.0} us | {:.0} us | {:.2} ms | {} |",
            p.protocol,
            p.load,
            f(&p.haproxy, "rps"),
            ratio(&p.haproxy, &p.direct),
            f(&p.haproxy, "p50_us"),
            f(&p.haproxy, "p99_us"),
            (f(&p.haproxy, "p99_us") - f(&p.direct, "p99_us")) / 1000.0,
            p.haproxy["errors"],
        );
    }
    // Only at the maximum rate: a run without that point has no relay figures.
    if points.iter().any(|p| p.relay.is_some()) {
        let _ = writeln!(
            s,
            "\nThe hops' own cost at the maximum rate: the same load through two relays that only copy bytes (the same HAProxy processes in `mode tcp`: no TLS, no HTTP parsing, each client connection carried end to end), in the same run. What they lose to direct is the kernel's work for the two extra TCP connections per request on CPUs that the load generator and nginx share; an HTTP proxy can beat it only by multiplexing the middle hop:\n"
        );
        let _ = writeln!(
            s,
            "| protocol | tcp relay x2 req/s | ratio to direct | mesh ratio | haproxy x2 ratio | errors |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for p in points {
            let Some(r) = &p.relay else { continue };
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {} |",
                p.protocol,
                f(r, "rps"),
                ratio(r, &p.direct),
                ratio(&p.mesh, &p.direct),
                ratio(&p.haproxy, &p.direct),
                r["errors"],
            );
        }
    }
    let _ = writeln!(
        s,
        "\nCPU time per request (user + system, from `/proc`; machine = every process and the kernel's softirq work on all CPUs):\n"
    );
    let _ = writeln!(
        s,
        "| protocol | load | direct, machine | mesh, machine | mesh: client agent | mesh: server agent | haproxy x2, machine | client haproxy | server haproxy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let c = p.cpu;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} us | {:.1} us | {:.1} us | {:.1} us | {:.1} us | {:.1} us | {:.1} us |",
            p.protocol,
            p.load,
            c.direct_machine_us,
            c.mesh_machine_us,
            c.client_agent_us,
            c.server_agent_us,
            c.haproxy_machine_us,
            c.client_haproxy_us,
            c.server_haproxy_us
        );
    }
    s
}
