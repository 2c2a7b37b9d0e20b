//! `cargo xtask bench connrate`: new connections per second through an agent pair in
//! eBPF mode beside the same pair in iptables mode, in one run, with the SYN
//! retransmits and listen-queue drops each path caused, and each agent's memory.
//!
//! Why: the performance issue's target is "new connections per second through the
//! pair, eBPF mode ÷ iptables mode ≥ 1.5x, with no extra SYN retransmits; agent RSS
//! ≤ 15 MB idle in both modes". This bench measures exactly those figures.
//!
//! One lab, one control plane (YAML registry, CA) serving two pairs:
//! - `ebpf-client` -> `ebpf-server`, both agents in eBPF mode;
//! - `ipt-client` -> `ipt-server`, both agents in iptables mode;
//! - `direct`, no agent, straight to `ebpf-server`'s nginx.
//!
//! Each server host runs nginx; each pair has a service with its own VIP, a `tcp`
//! port (L4: bytes over the mTLS tunnel) and an `http` port (L7). The load is
//! `wrk -t1 -H 'Connection: close'` from the client's workload cgroup, so every
//! request is a new connection. Around each run `nstat` reads the TCP counters of the
//! client's and the server's network namespaces, where the agents' sockets live (the
//! bench checks that each agent runs in its host's namespace). Rounds interleave the
//! paths so drift on the shared machine hits all alike; medians are reported.

use std::{fmt::Write as _, os::unix::fs::MetadataExt, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use mesh_tests::{Agent, AgentOptions, Cgroup, Control, Host, Lab};
use serde::Serialize;

use crate::bench::{wrk_latency, wrk_value};
use crate::bench_l7::{KillOnDrop, start_nginx};
use crate::bench_observe::median;
use crate::bench_peers::{SETTLE, rss};

pub struct Options {
    pub rounds: usize,
    pub duration: Duration,
    /// wrk's concurrent connections (each closed after its one request).
    pub connections: u32,
    /// The eBPF pair's agents run with `--sockmap on`.
    pub sockmap: bool,
}

impl Options {
    /// wrk's `-d`, in whole seconds.
    fn secs(&self) -> u64 {
        self.duration.as_secs().max(1)
    }
}

/// The service's ports: L7 (HTTP/1.1 parsed) and L4 (bytes only); nginx behind both.
const L7_PORT: u16 = 80;
const L4_PORT: u16 = 82;
const NGINX: u16 = 8080;
/// The targets.
const TARGET_RATIO: f64 = 1.5;
const TARGET_IDLE_MIB: f64 = 15.0;

/// One agent pair: both agents' `--mode`, its hosts, its service's VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct PairSpec {
    mode: &'static str,
    client: &'static str,
    server: &'static str,
    vip: &'static str,
}

const EBPF: PairSpec =
    PairSpec { mode: "ebpf", client: "ebpf-client", server: "ebpf-server", vip: "10.96.0.70" };
const IPTABLES: PairSpec =
    PairSpec { mode: "iptables", client: "ipt-client", server: "ipt-server", vip: "10.96.0.71" };
const PAIRS: [PairSpec; 2] = [EBPF, IPTABLES];

/// One measured path.
#[derive(Clone, Copy, Debug, Serialize)]
struct Route {
    key: &'static str,
    label: &'static str,
    /// The pair it goes through; `None`: direct.
    pair: Option<PairSpec>,
    port: u16,
}

const fn route(key: &'static str, label: &'static str, pair: Option<PairSpec>, port: u16) -> Route {
    Route { key, label, pair, port }
}

/// The paths, in the order of each round: each mode right after the other.
const ROUTES: [Route; 5] = [
    route("direct", "direct (no agent)", None, NGINX),
    route("ebpf-l4", "eBPF pair, tcp port (L4)", Some(EBPF), L4_PORT),
    route("iptables-l4", "iptables pair, tcp port (L4)", Some(IPTABLES), L4_PORT),
    route("ebpf-l7", "eBPF pair, http port (L7)", Some(EBPF), L7_PORT),
    route("iptables-l7", "iptables pair, http port (L7)", Some(IPTABLES), L7_PORT),
];

/// TCP counters of one or more network namespaces (`nstat`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Tcp {
    syn_retrans: u64,
    listen_overflows: u64,
    listen_drops: u64,
}

impl Tcp {
    fn zip(self, o: Tcp, f: fn(u64, u64) -> u64) -> Tcp {
        Tcp {
            syn_retrans: f(self.syn_retrans, o.syn_retrans),
            listen_overflows: f(self.listen_overflows, o.listen_overflows),
            listen_drops: f(self.listen_drops, o.listen_drops),
        }
    }

    fn plus(self, o: Tcp) -> Tcp {
        self.zip(o, |a, b| a + b)
    }

    fn since(self, before: Tcp) -> Tcp {
        self.zip(before, u64::saturating_sub)
    }
}

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Run {
    /// Requests per second: new connections per second.
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// wrk's socket errors and non-2xx answers.
    errors: u64,
    /// Counter deltas over the run: the client's and the server's namespaces summed,
    /// then each.
    tcp: Tcp,
    client_tcp: Tcp,
    server_tcp: Tcp,
}

#[derive(Clone, Debug, Serialize)]
struct PathResult {
    route: Route,
    runs: Vec<Run>,
    /// Medians of rps, p50 and p99; errors and counters summed over the rounds.
    median: Run,
}

#[derive(Clone, Debug, Default, Serialize)]
struct MemoryRow {
    agent: String,
    idle_kib: u64,
    after_load_kib: u64,
}

/// One pair's agents. Fields drop in declaration order: agents before their cgroups.
struct Pair {
    spec: PairSpec,
    client: Agent,
    server: Agent,
    workload: Cgroup,
    _server_cg: Cgroup,
}

/// Everything the bench starts; fields drop in declaration order, so processes stop
/// before their files go, and the namespaces go last.
struct ConnLab {
    pairs: Vec<Pair>,
    _control: Control,
    _nginx: Vec<KillOnDrop>,
    _dir: tempfile::TempDir,
    lab: Lab,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    crate::setup::system_packages()?;
    println!("[1/3] building release binaries");
    let _bins = crate::release::build_aside(root)?;
    let load_at_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!("[2/3] starting the lab: control plane, an eBPF pair, an iptables pair, nginx");
    let lab = ConnLab::start(opts.sockmap)?;
    let agents = lab.agents();
    // Idle: enrolled, one request through each path, then as long as the agents take
    // to hand back what that cost.
    for route in &ROUTES {
        lab.curl(route)?;
    }
    std::thread::sleep(SETTLE);
    let mut memory: Vec<MemoryRow> = agents
        .iter()
        .map(|(agent, pid)| MemoryRow { agent: agent.clone(), idle_kib: rss(*pid), ..Default::default() })
        .collect();

    println!(
        "[3/3] measuring: {} round(s) x {} paths, wrk -t1 -c{} -d{}s, Connection: close",
        opts.rounds,
        ROUTES.len(),
        opts.connections,
        opts.secs()
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); ROUTES.len()];
    for round in 1..=opts.rounds.max(1) {
        for (i, route) in ROUTES.iter().enumerate() {
            let r = lab.wrk(route, opts)?;
            println!(
                "      round {round} | {:<30} {:>7.0} conn/s p50 {:>7.3} ms p99 {:>8.3} ms | SYN retrans {} (client {}, server {}) listen overflows {} drops {} | errors {}",
                route.label,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.tcp.syn_retrans,
                r.client_tcp.syn_retrans,
                r.server_tcp.syn_retrans,
                r.tcp.listen_overflows,
                r.tcp.listen_drops,
                r.errors
            );
            runs[i].push(r);
        }
    }
    for (row, (_, pid)) in memory.iter_mut().zip(&agents) {
        row.after_load_kib = rss(*pid);
    }

    drop(lab);
    let results: Vec<PathResult> = ROUTES
        .iter()
        .zip(runs)
        .map(|(r, runs)| PathResult { route: *r, median: summary(&runs), runs })
        .collect();
    let report = render(&results, &memory, opts, load_at_start.trim());
    println!("\n{report}");
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out)?;
    // An A/B run with `--sockmap` keeps its own files beside the plain run's.
    let name = if opts.sockmap { "connrate-sockmap" } else { "connrate" };
    std::fs::write(out.join(format!("{name}.md")), &report)?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(&serde_json::json!({
            "rounds": opts.rounds,
            "duration_s": opts.secs(),
            "connections": opts.connections,
            "sockmap": opts.sockmap,
            "paths": results,
            "memory": memory,
        }))?,
    )?;
    println!("wrote bench-results/{name}.md and bench-results/{name}.json");
    Ok(())
}

impl ConnLab {
    fn start(sockmap: bool) -> Result<Self> {
        let lab = Lab::new(&["control", "direct", "ebpf-client", "ebpf-server", "ipt-client", "ipt-server"])?;
        let dir = tempfile::tempdir()?;
        let mut nginx = Vec::new();
        for spec in PAIRS {
            let server = spec.server;
            let d = dir.path().join(server);
            std::fs::create_dir_all(&d)?;
            let conf = format!("listen {NGINX}; location = / {{ return 200 \"hello from {server}\\n\"; }}");
            nginx.push(start_nginx(lab.host(server), &d, &conf, NGINX)?);
        }
        let reg = dir.path().join("registry.yaml");
        std::fs::write(&reg, registry(&lab))?;
        let nodes: Vec<&str> = PAIRS.iter().flat_map(|m| [m.client, m.server]).collect();
        let control = Control::start_with_ca(lab.host("control"), &reg, dir.path(), &nodes, &[])?;
        let mut pairs = Vec::new();
        for spec in PAIRS {
            let workload = Cgroup::new(&format!("connrate-{}", spec.mode))?;
            let server_cg = Cgroup::new(&format!("connrate-{}-srv", spec.mode))?;
            let accel = sockmap && spec.mode == "ebpf";
            let client =
                start_agent(&lab, &control, spec.mode, spec.client, &workload, "shop/frontend", accel)?;
            let server = start_agent(&lab, &control, spec.mode, spec.server, &server_cg, "shop/api", accel)?;
            pairs.push(Pair { spec, client, server, workload, _server_cg: server_cg });
        }
        Ok(Self { pairs, _control: control, _nginx: nginx, _dir: dir, lab })
    }

    /// Each agent's name and process id.
    fn agents(&self) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        for p in &self.pairs {
            let m = p.spec;
            v.push((format!("{} client ({})", m.mode, m.client), p.client.pid()));
            v.push((format!("{} server ({})", m.mode, m.server), p.server.pid()));
        }
        v
    }

    /// Where `route`'s load runs from (host, cgroup), the server host at its other
    /// end, and the URL.
    fn target(&self, route: &Route) -> (&Host, Option<&Path>, &Host, String) {
        match route.pair {
            None => {
                let server = self.lab.host("ebpf-server");
                (self.lab.host("direct"), None, server, format!("http://{}/", server.v4_addr(NGINX)))
            }
            Some(spec) => {
                let pair = self.pairs.iter().find(|p| p.spec == spec).expect("a pair per spec");
                let url = format!("http://{}:{}/", spec.vip, route.port);
                (self.lab.host(spec.client), Some(pair.workload.absolute()), self.lab.host(spec.server), url)
            }
        }
    }

    /// One request through `route`: the path works before it is measured.
    fn curl(&self, route: &Route) -> Result<()> {
        let (client, cg, _, url) = self.target(route);
        let out = client
            .command("curl", cg)?
            .args(["-fsS", "-o", "/dev/null", "--max-time", "10", &url])
            .output()
            .context("running curl")?;
        ensure!(out.status.success(), "{}: {}", route.label, String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    fn wrk(&self, route: &Route, opts: &Options) -> Result<Run> {
        let (client, cg, server, url) = self.target(route);
        let before = (nstat(client)?, nstat(server)?);
        let mut cmd = client.command("wrk", cg)?;
        let (c, d) = (format!("-c{}", opts.connections), format!("-d{}s", opts.secs()));
        cmd.args(["-t1", &c, &d, "--latency", "-H", "Connection: close", &url]);
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        let (client_tcp, server_tcp) = (nstat(client)?.since(before.0), nstat(server)?.since(before.1));
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(Run {
            rps: wrk_value(&text, "Requests/sec:").context("wrk requests/sec")?,
            p50_ms: wrk_latency(&text, "50%").context("wrk p50")?,
            p99_ms: wrk_latency(&text, "99%").context("wrk p99")?,
            errors: wrk_errors(&text),
            tcp: client_tcp.plus(server_tcp),
            client_tcp,
            server_tcp,
        })
    }
}

fn start_agent(
    lab: &Lab,
    control: &Control,
    mode: &str,
    host: &str,
    cg: &Cgroup,
    id: &str,
    sockmap: bool,
) -> Result<Agent> {
    let opts = control.agent_options(mode, host, id).cgroup(cg).arg("--access-log").arg("off");
    let opts = if sockmap { opts.arg("--sockmap").arg("on") } else { opts };
    let agent = Agent::start(lab.host(host), AgentOptions { log: Some("info".into()), ..opts })?;
    agent.wait_enrolled();
    let got = agent.mode();
    ensure!(got == mode, "the agent on {host} runs in {got:?} mode, not {mode}");
    // nstat reads the host's namespace: the agent's sockets must be there.
    let ns = |p: String| std::fs::metadata(&p).map(|m| (m.dev(), m.ino())).with_context(|| p);
    ensure!(
        ns(format!("/proc/{}/ns/net", agent.pid()))? == ns(lab.host(host).ns.path())?,
        "the agent on {host} is not in the host's network namespace"
    );
    Ok(agent)
}

fn registry(lab: &Lab) -> String {
    let mut s = String::from("services:\n");
    let mut clients = String::new();
    for spec in PAIRS {
        let (c, srv) = (spec.client, spec.server);
        let (c_ip, s_ip) = (lab.host(c).v4, lab.host(srv).v4);
        let _ = write!(
            s,
            "  - name: bench-{m}
    namespace: shop
    vips: [{vip}]
    ports:
      - {{name: http, port: {L7_PORT}, target_port: {NGINX}, protocol: http}}
      - {{name: tcp, port: {L4_PORT}, target_port: {NGINX}, protocol: tcp}}
    endpoints:
      - {{address: {s_ip}, node: {srv}, service_account: api, agent_address: \"{s_ip}:15008\"}}
",
            m = spec.mode,
            vip = spec.vip,
        );
        let _ = writeln!(clients, "      - {{address: {c_ip}, node: {c}, service_account: frontend}}");
    }
    let _ = write!(
        s,
        "  - name: frontend\n    namespace: shop\n    ports: [{{port: 80}}]\n    endpoints:\n{clients}"
    );
    s
}

/// The TCP counters of `host`'s network namespace (`nstat -a`: absolute values;
/// `-s`: leave the shared history file alone).
fn nstat(host: &Host) -> Result<Tcp> {
    let out = host.command("nstat", None)?.args(["-asz"]).output().context("running nstat")?;
    ensure!(out.status.success(), "nstat in {}: {}", host.name, String::from_utf8_lossy(&out.stderr));
    parse_nstat(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nstat(text: &str) -> Result<Tcp> {
    let get = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == name).then(|| w.next()?.parse().ok())?
            })
            .with_context(|| format!("nstat shows no {name}"))
    };
    Ok(Tcp {
        syn_retrans: get("TcpExtTCPSynRetrans")?,
        listen_overflows: get("TcpExtListenOverflows")?,
        listen_drops: get("TcpExtListenDrops")?,
    })
}

/// wrk's failures: `Socket errors: connect 0, read 1, write 0, timeout 2` and
/// `Non-2xx or 3xx responses: 3`.
fn wrk_errors(out: &str) -> u64 {
    let socket: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|v| v.split(',').filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    socket + wrk_value(out, "Non-2xx or 3xx responses:").map_or(0, |v| v as u64)
}

fn summary(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Run {
        rps: m(|r| r.rps),
        p50_ms: m(|r| r.p50_ms),
        p99_ms: m(|r| r.p99_ms),
        errors: runs.iter().map(|r| r.errors).sum(),
        tcp: runs.iter().fold(Tcp::default(), |a, r| a.plus(r.tcp)),
        client_tcp: runs.iter().fold(Tcp::default(), |a, r| a.plus(r.client_tcp)),
        server_tcp: runs.iter().fold(Tcp::default(), |a, r| a.plus(r.server_tcp)),
    }
}

fn render(results: &[PathResult], memory: &[MemoryRow], opts: &Options, load: &str) -> String {
    let get = |key: &str| results.iter().find(|r| r.route.key == key).map(|r| r.median).unwrap_or_default();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let direct = get("direct");
    let mut s = String::new();
    let _ = writeln!(s, "# New connections per second: eBPF pair beside iptables pair\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench connrate --rounds {r} --duration {d}s --connections {c}{sm}`: one run, {r} round(s), \
         medians reported. Both pairs, the direct path, the control plane and the load generator share one \
         machine's 2 cores; within a round the paths run one after another (direct, eBPF L4, iptables L4, \
         eBPF L7, iptables L7), so drift hits them alike. Load: `wrk -t1 -c{c} -d{d}s -H 'Connection: close'` \
         from the client's workload cgroup against the pair's service VIP (direct: nginx on `ebpf-server`), so \
         requests per second are new connections per second. Load average at start: {load}.\n",
        r = opts.rounds,
        sm = if opts.sockmap { " --sockmap" } else { "" },
        d = opts.secs(),
        c = opts.connections,
    );
    let _ = writeln!(
        s,
        "| path | new conn/s | p50 | p99 | ÷ direct | SYN retransmits (client + server) | listen overflows / drops | wrk errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for r in results {
        let m = r.median;
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {} ({} + {}) | {} / {} | {} |",
            r.route.label,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            ratio(m.rps, direct.rps),
            m.tcp.syn_retrans,
            m.client_tcp.syn_retrans,
            m.server_tcp.syn_retrans,
            m.tcp.listen_overflows,
            m.tcp.listen_drops,
            m.errors
        );
    }
    let (l4, l7) = (
        ratio(get("ebpf-l4").rps, get("iptables-l4").rps),
        ratio(get("ebpf-l7").rps, get("iptables-l7").rps),
    );
    let _ = writeln!(s, "\neBPF ÷ iptables: L4 {l4:.2}x, L7 {l7:.2}x\n");
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let syn = |keys: [&str; 2]| keys.iter().map(|k| get(k).tcp.syn_retrans).sum::<u64>();
    let (syn_ebpf, syn_ipt) = (syn(["ebpf-l4", "ebpf-l7"]), syn(["iptables-l4", "iptables-l7"]));
    let _ = writeln!(
        s,
        "Ratios of the median req/s. Target ≥ {TARGET_RATIO}x: L4 {}, L7 {}; no extra SYN retransmits \
         (eBPF pair {syn_ebpf}, iptables pair {syn_ipt}): {}. SYN retransmits and listen \
         overflows/drops are summed over the rounds and over the client's and the server's network namespaces \
         (each agent's sockets are in its host's namespace; the direct path counts `direct` and `ebpf-server`); \
         wrk errors are socket errors and non-2xx answers, summed.\n",
        verdict(l4 >= TARGET_RATIO),
        verdict(l7 >= TARGET_RATIO),
        verdict(syn_ebpf <= syn_ipt),
    );
    let _ = writeln!(s, "## Agent resident memory (VmRSS)\n");
    let _ = writeln!(s, "| agent | idle | after the load |");
    let _ = writeln!(s, "|---|---|---|");
    let mib = |k: u64| k as f64 / 1024.0;
    for m in memory {
        let _ =
            writeln!(s, "| {} | {:.1} MiB | {:.1} MiB |", m.agent, mib(m.idle_kib), mib(m.after_load_kib));
    }
    let idle_ok = memory.iter().all(|m| mib(m.idle_kib) <= TARGET_IDLE_MIB);
    let _ = writeln!(
        s,
        "\nIdle: enrolled, one request through each path, then {} s for the agents to hand memory back. After \
         the load: read as the last round ends. Target ≤ {TARGET_IDLE_MIB} MiB idle in both modes: {}.",
        SETTLE.as_secs(),
        verdict(idle_ok)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nstat_and_wrk_errors() {
        let out = "#kernel\nTcpExtListenOverflows           3                  0.0\n\
                   TcpExtListenDrops               4                  0.0\nTcpExtTCPSynRetrans             12                 0.0\n";
        let t = parse_nstat(out).unwrap();
        assert_eq!((t.syn_retrans, t.listen_overflows, t.listen_drops), (12, 3, 4));
        assert!(parse_nstat("#kernel\n").is_err());
        let wrk = "  Socket errors: connect 0, read 2, write 0, timeout 5\n  Non-2xx or 3xx responses: 1\n";
        assert_eq!(wrk_errors(wrk), 8);
        assert_eq!(wrk_errors("Requests/sec: 1.0\n"), 0);
    }
}
