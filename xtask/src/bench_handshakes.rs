//! `cargo xtask bench handshakes`: whether a flood of idle TLS handshakes on the
//! tunnel port starves established traffic. HTTP/1.1 through the whole mesh (the
//! `bench l7` lab: client agent -> mTLS tunnel -> server agent -> nginx) at a fixed
//! 1k requests/s and at the maximum rate, quiet against flooded: `--flood`
//! connections to the server agent's port 15008 from the `direct` host (no agent,
//! nothing intercepts it), each having sent a ClientHello and then nothing
//! ([`crate::handshake_flood`]). Two floods: from one source address (the
//! per-address cap holds it to 32 handshakes), and from 32 addresses (enough to
//! fill the 256 slots of the total cap and queue the rest). The same agents serve
//! every run; rounds rotate the order so drift hits all alike.
//!
//! Two controls in the same rotation, against the `bench l7` HAProxy pair (mutual
//! TLS and HTTP/2 between a HAProxy on `client` and one on `server`; OpenSSL, ECDSA
//! P-256 like the agents, its handshake bounded by 5 s like the agent's):
//! - a bystander: the same 32-address flood aimed at the server-side HAProxy's
//!   mutual-TLS port while the load still runs through the mesh. The machine pays
//!   for the flood, the agents do not: whatever p99 loses here is the machine's.
//! - a peer doing the same work: the load through the HAProxy pair, quiet and with
//!   that flood on the server-side HAProxy's port (the one carrying the load).
//!
//! HAProxy has no per-address handshake cap, so a one-address flood on it would be
//! the same work as the 32-address one: the controls use only the latter.
//!
//! Besides the workload's latency: a newcomer's wait for a handshake (a ClientHello
//! every 250 ms from the client host, time to the answer of the proxy carrying the
//! load), the server agent's `mesh_limit_hits_total`, its RSS before and after, and
//! the CPU time of the server agent and of the server-side HAProxy.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::{
    bench_l7::{Bench, HAPROXY_TLS, f},
    bench_observe::median,
    handshake_flood::{Flood, FloodStats, ProbeStats},
};

pub struct Options {
    pub duration: Duration,
    pub rounds: usize,
    /// Idle handshakes kept open during a flooded run.
    pub flood: usize,
}

/// HTTP/1.1 connections of the load (requests in flight at the maximum rate).
const CONNECTIONS: u32 = 64;
/// The agent's tunnel port.
const TUNNEL_PORT: u16 = 15008;
/// Source addresses of the many-address flood: 32 (the per-address cap) of them
/// admit 1,024 handshakes, beyond the 256 of the total cap.
const MANY_SOURCES: u8 = 32;
/// The first of them, on the attacker's interface (hosts use 10.77.0.1 up).
const FIRST_SOURCE: u8 = 100;
/// After a flood: the agent's handshake deadline and a second.
const SETTLE: Duration = Duration::from_secs(6);
/// The agent's gauge of TLS handshakes holding a slot.
const HANDSHAKES_IN_PROGRESS: &str = "mesh_tunnel_handshakes_in_progress";
/// Time for the flood to open its connections before the load starts.
const RAMP_UP: Duration = Duration::from_secs(3);
/// The server-side HAProxy's handshake deadline: the agent's default
/// `--tunnel-handshake-timeout`, so that both redo the flood's handshakes as often.
const HAPROXY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Config {
    Quiet,
    OneSource,
    ManySources,
    /// The 32-address flood on the server-side HAProxy; the load through the mesh.
    Bystander,
    /// The load through the HAProxy pair.
    HaproxyQuiet,
    /// The load through the HAProxy pair, the 32-address flood on the server-side one.
    HaproxyFlooded,
}

/// Every run, in the order of the first round (later rounds rotate it).
const CONFIGS: [Config; 6] = [
    Config::Quiet,
    Config::OneSource,
    Config::ManySources,
    Config::Bystander,
    Config::HaproxyQuiet,
    Config::HaproxyFlooded,
];

/// Which port a flood aims at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Agent,
    Haproxy,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Quiet => "mesh, quiet",
            Config::OneSource => "mesh, agent flooded, 1 source address",
            Config::ManySources => "mesh, agent flooded, 32 source addresses",
            Config::Bystander => "mesh, bystander flooded, 32 source addresses",
            Config::HaproxyQuiet => "HAProxy pair, quiet",
            Config::HaproxyFlooded => "HAProxy pair, HAProxy flooded, 32 source addresses",
        }
    }

    /// The load goes through the HAProxy pair (otherwise through the mesh).
    fn through_haproxy(self) -> bool {
        matches!(self, Config::HaproxyQuiet | Config::HaproxyFlooded)
    }

    /// The run the ratios of this one are taken against.
    fn baseline(self) -> Config {
        if self.through_haproxy() { Config::HaproxyQuiet } else { Config::Quiet }
    }

    fn flood_target(self) -> Option<Target> {
        match self {
            Config::Quiet | Config::HaproxyQuiet => None,
            Config::OneSource | Config::ManySources => Some(Target::Agent),
            Config::Bystander | Config::HaproxyFlooded => Some(Target::Haproxy),
        }
    }

    fn sources(self, attacker: Ipv4Addr) -> Vec<IpAddr> {
        match self {
            Config::Quiet | Config::HaproxyQuiet => Vec::new(),
            Config::OneSource => vec![IpAddr::V4(attacker)],
            Config::ManySources | Config::Bystander | Config::HaproxyFlooded => {
                (0..MANY_SOURCES).map(|i| IpAddr::V4(Ipv4Addr::new(10, 77, 0, FIRST_SOURCE + i))).collect()
            }
        }
    }
}

#[derive(Serialize, Debug)]
struct Sample {
    round: usize,
    config: Config,
    fixed_1k: Value,
    max: Value,
    /// The newcomer's handshakes during both load points.
    probe: ProbeStats,
    flood: Option<FloodStats>,
    /// `mesh_limit_hits_total` of the server agent during the sample, by limit.
    limit_hits: BTreeMap<String, u64>,
    /// `mesh_tunnel_handshakes_in_progress` of the server agent at the end of the load.
    handshakes_in_progress: Option<f64>,
    /// The server agent's CPU time (ms) in the seconds before the load, the flood
    /// (if any) alone.
    idle_cpu_ms: ThreadCpu,
    /// The server agent's CPU time during the sample (ms): its main thread (the data
    /// path's worker and the accept loops), its handshake threads, the rest.
    server_cpu_ms: ThreadCpu,
    /// The server-side HAProxy's CPU time during the sample (ms; one thread).
    haproxy_cpu_ms: f64,
    /// The server agent's VmRSS before and after the sample (KiB).
    rss_before_kib: u64,
    rss_after_kib: u64,
}

/// CPU time of a process by thread group, in ms.
#[derive(Serialize, Clone, Copy, Debug, Default)]
struct ThreadCpu {
    main: f64,
    handshake: f64,
    other: f64,
}

impl ThreadCpu {
    /// So far, from `/proc/PID/task/*/stat`: the thread whose id is the process's
    /// (the runtime's worker with one worker thread), `mesh-handshake` threads, the rest.
    fn now(pid: u32) -> ThreadCpu {
        let tick_ms =
            1e3 / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        let mut cpu = ThreadCpu::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return cpu };
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let comm = head.split_once('(').map_or("", |(_, c)| c);
            // After the command name: state is the 1st field, utime and stime the 12th and 13th.
            let ticks: u64 =
                rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse::<u64>().ok()).sum();
            let ms = ticks as f64 * tick_ms;
            if task.file_name().to_string_lossy() == pid.to_string() {
                cpu.main += ms;
            } else if comm.starts_with("mesh-handshake") {
                cpu.handshake += ms;
            } else {
                cpu.other += ms;
            }
        }
        cpu
    }

    fn total(self) -> f64 {
        self.main + self.handshake + self.other
    }

    fn since(self, earlier: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            // A thread that ended takes its time with it: no negative figures.
            main: (self.main - earlier.main).max(0.0),
            handshake: (self.handshake - earlier.handshake).max(0.0),
            other: (self.other - earlier.other).max(0.0),
        }
    }
}

/// The process's resident memory, read by the test crate's reader.
fn rss_kib(pid: u32) -> Result<u64> {
    mesh_tests::process::Memory::of(pid).map(|m| m.rss_kib).context("VmRSS in /proc/PID/status")
}

/// The server agent's `/metrics`: limit hits by limit, and the handshakes in progress.
fn server_metrics(
    bench: &Bench,
    admin: std::net::SocketAddr,
) -> Result<(BTreeMap<String, u64>, Option<f64>)> {
    let (status, body) = bench.lab.host("server").http("GET", admin, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    let mut hits = BTreeMap::new();
    let mut in_progress = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        if let Some(labels) = name.strip_prefix("mesh_limit_hits_total{") {
            let limit = labels.split("limit=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
            *hits.entry(limit.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0) as u64;
        } else if name == HANDSHAKES_IN_PROGRESS {
            in_progress = value.parse().ok();
        }
    }
    Ok((hits, in_progress))
}

/// Lets this process hold the flood's sockets (the usual soft limit is 1024).
fn raise_nofile() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    ensure!(opts.flood > 0, "--flood must be at least 1");
    raise_nofile()?;
    crate::setup::system_packages()?;
    println!("[1/3] building release binaries");
    let _bins = crate::release::build_aside(root)?;

    println!("[2/3] starting the control plane, the server and both agents (default handshake limits)");
    let bench = Bench::start("hsbench")?;
    let agents = bench.agents(|_| Vec::new())?;
    let attacker = bench.lab.host("direct");
    for i in 0..MANY_SOURCES {
        attacker.ip(&["addr", "add", &format!("10.77.0.{}/24", FIRST_SOURCE + i), "dev", "eth0"])?;
    }
    let server = bench.lab.host("server");
    let agent_port = server.v4_addr(TUNNEL_PORT);
    let haproxy_port = server.v4_addr(HAPROXY_TLS);
    let server_pid = agents.server.pid();
    let (haproxy_client, haproxy_server) =
        crate::bench_l7::haproxies(&bench.lab, bench.dir.path(), Some(HAPROXY_HANDSHAKE_TIMEOUT))?;
    let haproxy_pid = haproxy_server.id();
    // Warm-up: connections, pools, the tunnel connection the load then rides.
    bench.load("client", false, 0, Duration::from_secs(1), CONNECTIONS)?;
    bench.load("haproxy", false, 0, Duration::from_secs(1), CONNECTIONS)?;
    let rss_start = rss_kib(server_pid)?;

    println!(
        "[3/3] {} rounds of {} runs (floods of {} idle handshakes), {:?} per point",
        opts.rounds,
        CONFIGS.len(),
        opts.flood,
        opts.duration
    );
    let mut samples = Vec::new();
    for round in 0..opts.rounds {
        for k in 0..CONFIGS.len() {
            let config = CONFIGS[(round + k) % CONFIGS.len()];
            let (hits_before, _) = server_metrics(&bench, agents.server.admin)?;
            let rss_before_kib = rss_kib(server_pid)?;
            let cpu_before = ThreadCpu::now(server_pid);
            let haproxy_before = ThreadCpu::now(haproxy_pid);
            // Bounded: the flood and the probe stop by themselves if the loads hang.
            let until = Instant::now() + RAMP_UP + opts.duration * 2 + Duration::from_secs(60);
            let flood = match config.flood_target() {
                None => None,
                Some(to) => {
                    let target = if to == Target::Agent { agent_port } else { haproxy_port };
                    Some(Flood::start(attacker, target, config.sources(attacker.v4), opts.flood, until)?)
                }
            };
            // The flood alone (quiet: nothing): what it costs the agent without load.
            let idle_before = ThreadCpu::now(server_pid);
            std::thread::sleep(RAMP_UP);
            let idle_cpu_ms = ThreadCpu::now(server_pid).since(idle_before);
            // The newcomer asks the proxy that carries the load.
            let (route, probe_target) =
                if config.through_haproxy() { ("haproxy", haproxy_port) } else { ("client", agent_port) };
            let probe = crate::handshake_flood::probe(
                bench.lab.host("client"),
                probe_target,
                Duration::from_secs(6),
                until,
            )?;
            let fixed_1k = bench.load(route, false, 1_000, opts.duration, CONNECTIONS)?;
            let max = bench.load(route, false, 0, opts.duration, CONNECTIONS)?;
            let (_, handshakes_in_progress) = server_metrics(&bench, agents.server.admin)?;
            let server_cpu_ms = ThreadCpu::now(server_pid).since(cpu_before);
            let haproxy_cpu_ms = ThreadCpu::now(haproxy_pid).since(haproxy_before).total();
            let probe = probe.stop()?;
            let flood = flood.map(Flood::stop).transpose()?;
            let (hits_after, _) = server_metrics(&bench, agents.server.admin)?;
            let limit_hits = hits_after
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(hits_before.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect();
            let rss_after_kib = rss_kib(server_pid)?;
            if flood.is_some() {
                // Flood connections still queued for a slot notice that their peer has
                // gone only at their deadline: let them go before the next run.
                std::thread::sleep(SETTLE);
            }
            println!(
                "      round {round} {:<50} 1k rps p50 {:>5.0} us p99 {:>6.0} us (errors {}) | max {:>6.0} req/s (errors {}) | newcomer {}/{} answered, p50 {:.1} ms{}",
                config.label(),
                f(&fixed_1k, "p50_us"),
                f(&fixed_1k, "p99_us"),
                fixed_1k["errors"],
                f(&max, "rps"),
                max["errors"],
                probe.answered,
                probe.attempts,
                probe.p50_ms,
                flood
                    .as_ref()
                    .map(|s| format!(
                        " | flood: {} opened, {} answered, {} refused at once, open {:.0} on average, its CPU {:.0} ms",
                        s.opened, s.answered, s.refused_at_once, s.open_mean, s.cpu_ms
                    ))
                    .unwrap_or_default(),
            );
            samples.push(Sample {
                round,
                config,
                fixed_1k,
                max,
                probe,
                flood,
                limit_hits,
                handshakes_in_progress,
                server_cpu_ms,
                idle_cpu_ms,
                haproxy_cpu_ms,
                rss_before_kib,
                rss_after_kib,
            });
        }
    }
    let rss_end = rss_kib(server_pid)?;
    drop((haproxy_client, haproxy_server));
    agents.terminate()?;
    let Bench { control, .. } = bench;
    control.terminate()?;

    let report = render(&samples, opts, rss_start, rss_end);
    println!("\n{report}");
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("handshakes.md"), &report)?;
    let json = serde_json::json!({
        "server_agent_rss_kib": { "start": rss_start, "end": rss_end },
        "samples": samples,
    });
    std::fs::write(out.join("handshakes.json"), serde_json::to_string_pretty(&json)?)?;
    println!("wrote bench-results/handshakes.md and bench-results/handshakes.json");
    Ok(())
}

fn render(samples: &[Sample], opts: &Options, rss_start: u64, rss_end: u64) -> String {
    let of = |config: Config, get: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().filter(|s| s.config == config).map(get).collect())
    };
    let errors = |config: Config, pick: fn(&Sample) -> &Value| -> u64 {
        samples.iter().filter(|s| s.config == config).map(|s| pick(s)["errors"].as_u64().unwrap_or(0)).sum()
    };
    let p50 = |s: &Sample| f(&s.fixed_1k, "p50_us");
    let p99 = |s: &Sample| f(&s.fixed_1k, "p99_us");
    let max_p99 = |s: &Sample| f(&s.max, "p99_us");
    let max_rps = |s: &Sample| f(&s.max, "rps");
    // A run's p99 as a multiple of its baseline's (the quiet run of the same route).
    let p99_ratio = |config: Config| of(config, &p99) / of(config.baseline(), &p99).max(1e-9);
    let max_p99_ratio = |config: Config| of(config, &max_p99) / of(config.baseline(), &max_p99).max(1e-9);

    let mut s = String::new();
    let _ = writeln!(s, "# Idle TLS handshake flood on the tunnel port vs established traffic\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench handshakes --duration {}s --rounds {} --flood {}` on {} ({} CPUs). The `bench l7` lab: \
         client agent -> mTLS tunnel -> server agent -> nginx, both agents in eBPF mode with the default limits \
         (`--max-tunnel-handshakes 256`, 32 per peer address, `--tunnel-handshake-timeout 5s`, \
         `--tunnel-handshake-threads 1` at `--tunnel-handshake-nice 10`). Agent flooded: {} connections to the server agent's port {TUNNEL_PORT} from \
         the `direct` host (no agent), each sends a TLS 1.3 ClientHello and then nothing; a connection the server \
         closes is opened again (at most once a second per connection). The same agents serve every run; rounds \
         rotate the order. HTTP/1.1, {CONNECTIONS} connections; 1k rps is open loop (latency from each request's \
         due time), max is closed loop. Medians over rounds (errors summed).\n\n\
         Controls, in the same rotation, with the `bench l7` HAProxy 2.6 pair (one thread each; mutual TLS and \
         HTTP/2 between a HAProxy on `client` and one on `server`, ECDSA P-256 certificates like the agents', the \
         server side's handshake bounded by {}s like the agent's): *bystander flooded* is the 32-address flood \
         aimed at the server-side HAProxy's mutual-TLS port (OpenSSL, no handshake limits) while the load still \
         runs through the mesh: the machine pays for the flood, the agents do not. *HAProxy pair* runs send the \
         same load through the two HAProxies (from `direct`), quiet and with that flood on the server-side \
         HAProxy, the one carrying the load. Ratios are to the quiet run of the same route.\n",
        opts.duration.as_secs(),
        opts.rounds,
        opts.flood,
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.flood,
        HAPROXY_HANDSHAKE_TIMEOUT.as_secs(),
    );
    let _ = writeln!(
        s,
        "| run | 1k p50 | 1k p99 | 1k p99 / quiet | 1k errors | max req/s | max p99 | max p99 / quiet | max errors |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for config in CONFIGS {
        let _ = writeln!(
            s,
            "| {} | {:.0} us | {:.0} us | {:.2}x | {} | {:.0} | {:.0} us | {:.2}x | {} |",
            config.label(),
            of(config, &p50),
            of(config, &p99),
            p99_ratio(config),
            errors(config, |s| &s.fixed_1k),
            of(config, &max_rps),
            of(config, &max_p99),
            max_p99_ratio(config),
            errors(config, |s| &s.max),
        );
    }
    let _ = writeln!(s);
    for config in [Config::OneSource, Config::ManySources] {
        let ratio = p99_ratio(config);
        let _ = writeln!(
            s,
            "- {}: p99 at 1k rps {:.2}x the quiet run's (target <= 2x: {})",
            config.label(),
            ratio,
            if ratio <= 2.0 { "met" } else { "NOT met" }
        );
    }
    let excess = |config: Config| of(config, &p99) - of(config.baseline(), &p99);
    let _ = writeln!(
        s,
        "- {}: p99 at 1k rps {:.2}x the quiet run's, {:.0} us added against {:.0} us when the agent is flooded from \
         as many addresses ({:.0}% of it)",
        Config::Bystander.label(),
        p99_ratio(Config::Bystander),
        excess(Config::Bystander),
        excess(Config::ManySources),
        100.0 * excess(Config::Bystander) / excess(Config::ManySources).max(1e-9),
    );
    let _ = writeln!(
        s,
        "- the peer under the same flood: HAProxy pair p99 at 1k rps {:.2}x its quiet run's ({:.0} -> {:.0} us), \
         the mesh's {:.2}x",
        p99_ratio(Config::HaproxyFlooded),
        of(Config::HaproxyQuiet, &p99),
        of(Config::HaproxyFlooded, &p99),
        p99_ratio(Config::ManySources),
    );
    let _ = writeln!(
        s,
        "- server agent RSS: {:.1} MiB at the start, {:.1} MiB at the end\n",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );

    let _ = writeln!(
        s,
        "A newcomer's handshakes (a ClientHello every 250 ms from the client host, time to the first \
         answer, 6 s deadline; the server agent's port in the mesh runs, the server-side HAProxy's in the HAProxy \
         pair's), over both load points:\n"
    );
    let _ = writeln!(s, "| run | answered / sent | p50 | max |");
    let _ = writeln!(s, "|---|---|---|---|");
    for config in CONFIGS {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.config == config).collect();
        let (answered, sent) =
            mine.iter().fold((0, 0), |(a, t), s| (a + s.probe.answered, t + s.probe.attempts));
        let _ = writeln!(
            s,
            "| {} | {answered} / {sent} | {:.1} ms | {:.1} ms |",
            config.label(),
            median(mine.iter().map(|s| s.probe.p50_ms).filter(|v| v.is_finite()).collect()),
            mine.iter().map(|s| s.probe.max_ms).filter(|v| v.is_finite()).fold(f64::NAN, f64::max),
        );
    }

    let _ = writeln!(
        s,
        "\nPer round (limit hits are the server agent's `mesh_limit_hits_total` during the run):\n"
    );
    let _ = writeln!(
        s,
        "| round | run | 1k p50 | 1k p99 | 1k errors | max req/s | max errors | flood: opened / answered / refused at once / closed waiting / closed after answer | open (mean, least) | answered open (most) | handshakes in progress | limit hits | server agent CPU before the load, flood alone: main / handshake | server agent CPU: main / handshake / other | server HAProxy CPU | flood's own CPU | server agent RSS before -> after |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for x in samples {
        let flood = x.flood.as_ref().map_or_else(
            || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            |f| {
                (
                    format!(
                        "{} / {} / {} / {} / {}",
                        f.opened, f.answered, f.refused_at_once, f.closed_waiting, f.closed_after_answer
                    ),
                    format!("{:.0}, {}", f.open_mean, f.open_min),
                    f.answered_open_max.to_string(),
                )
            },
        );
        let hits = if x.limit_hits.is_empty() {
            "-".to_owned()
        } else {
            x.limit_hits.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} us | {:.0} us | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} ms in {:.0} s | {:.0} / {:.0} / {:.0} ms | {:.0} ms | {} | {:.1} -> {:.1} MiB |",
            x.round,
            x.config.label(),
            f(&x.fixed_1k, "p50_us"),
            f(&x.fixed_1k, "p99_us"),
            x.fixed_1k["errors"],
            f(&x.max, "rps"),
            x.max["errors"],
            flood.0,
            flood.1,
            flood.2,
            x.handshakes_in_progress.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            hits,
            x.idle_cpu_ms.main,
            x.idle_cpu_ms.handshake,
            RAMP_UP.as_secs_f64(),
            x.server_cpu_ms.main,
            x.server_cpu_ms.handshake,
            x.server_cpu_ms.other,
            x.haproxy_cpu_ms,
            x.flood.as_ref().map_or_else(|| "-".to_owned(), |f| format!("{:.0} ms", f.cpu_ms)),
            x.rss_before_kib as f64 / 1024.0,
            x.rss_after_kib as f64 / 1024.0,
        );
    }
    s
}
