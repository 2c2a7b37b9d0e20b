//! `cargo xtask bench intercept`: the same workload measured, in one run, directly
//! (no agent), through the agent in eBPF mode and through the agent in iptables mode.
//!
//! Two test hosts (network namespaces on a bridge); the workload runs in a cgroup on
//! `client`, servers on `server`. Per mode:
//! - connection setup: `mesh-probe connects` opens N connections one after another
//!   and exchanges one byte on each; reported as p50/p99 of "connect + first byte
//!   back" (through the agent, `connect()` itself returns as soon as the local agent
//!   accepts, so only the round trip shows what the workload waits for),
//! - HTTP/1.1 keep-alive: `wrk` requests/s and latency p50/p99 against nginx,
//! - bulk TCP: `iperf3` throughput.
//!
//! Ratios are against the direct path of the same run.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{Agent, AgentOptions, Cgroup, Lab, servers};
use serde::Serialize;
use serde_json::Value;

pub struct Options {
    pub rounds: usize,
    pub duration: Duration,
    pub connects: usize,
    pub connections: usize,
    /// The eBPF-mode agent runs with `--sockmap on`.
    pub sockmap: bool,
}

#[derive(Serialize, Clone, Debug, Default)]
struct ModeResult {
    mode: String,
    connect_p50_us: f64,
    connect_p99_us: f64,
    connect_first_byte_p50_us: f64,
    connect_first_byte_p99_us: f64,
    http_rps: f64,
    http_p50_ms: f64,
    http_p99_ms: f64,
    bulk_gbit_s: f64,
}

const ECHO: u16 = 7000;
const HTTP: u16 = 8080;
const IPERF: u16 = 5201;

pub fn intercept(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    crate::setup::system_packages()?;
    println!("[1/3] building release binaries");
    let _bins = crate::release::build_aside(root)?;

    println!("[2/3] starting test hosts, servers and agents");
    // One client host per mode, all against the same server, so the modes can be
    // measured in interleaved rounds: drift on a shared machine hits them alike.
    let modes = ["direct", "ebpf", "iptables"];
    let lab = Lab::new(&["direct", "ebpf", "iptables", "server"])?;
    let server = lab.host("server");
    let _echo = servers::echo(server, ECHO)?;
    // nginx, not the harness's own HTTP server: that one, not the agent, was the
    // limit (25k requests/s whichever path).
    let nginx_dir = tempfile::tempdir()?;
    let _http = crate::bench_l7::start_nginx(
        server,
        nginx_dir.path(),
        &format!("listen {HTTP}; location / {{ return 200 \"bench\\n\"; }}"),
        HTTP,
    )?;
    let _iperf = KillOnDrop(
        server
            .command("iperf3", None)?
            .args(["-s", "-p", &IPERF.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 server")?,
    );
    let mut clients = Vec::new();
    for mode in modes {
        let wl = Cgroup::new("bench")?;
        let agent = match mode {
            "direct" => None,
            // The shipped default: info, one record per connection.
            m => {
                let base = AgentOptions::new(m).cgroup(&wl);
                let base = if opts.sockmap && m == "ebpf" { base.arg("--sockmap").arg("on") } else { base };
                Some(Agent::start(lab.host(m), AgentOptions { log: Some("info".into()), ..base })?)
            }
        };
        clients.push((mode, wl, agent));
    }

    println!(
        "[3/3] measuring: {} rounds x (direct, ebpf, iptables), {:?} per load test; medians reported",
        opts.rounds, opts.duration
    );
    let mut rounds: Vec<Vec<ModeResult>> = vec![Vec::new(); modes.len()];
    for round in 1..=opts.rounds {
        for (i, (mode, wl, _)) in clients.iter().enumerate() {
            let r = measure(&lab, lab.host(mode), wl, mode, opts)?;
            println!(
                "      round {round} {mode:<9} connect p50 {:>6.1} us | connect+first byte p50 {:>6.1} us p99 {:>6.1} us | http {:>7.0} req/s p50 {:.3} ms p99 {:.3} ms | bulk {:.2} Gbit/s",
                r.connect_p50_us,
                r.connect_first_byte_p50_us,
                r.connect_first_byte_p99_us,
                r.http_rps,
                r.http_p50_ms,
                r.http_p99_ms,
                r.bulk_gbit_s
            );
            rounds[i].push(r);
        }
    }
    for (_, _, agent) in clients.drain(..) {
        if let Some(a) = agent {
            a.terminate()?;
        }
    }
    let results: Vec<ModeResult> = rounds.iter().map(|r| median(r)).collect();

    let report = render(&results, opts);
    println!("\n{report}");
    let dir = root.join("bench-results");
    std::fs::create_dir_all(&dir)?;
    // An A/B run with `--sockmap` keeps its own files beside the plain run's.
    let name = if opts.sockmap { "intercept-sockmap" } else { "intercept" };
    std::fs::write(dir.join(format!("{name}.md")), &report)?;
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&results)?)?;
    println!("wrote bench-results/{name}.md and bench-results/{name}.json");
    Ok(())
}

/// A child process killed when the benchmark ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = checked(cmd)?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing output of {cmd:?}"))
}

fn checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn measure(
    lab: &Lab,
    client: &mesh_tests::Host,
    wl: &Cgroup,
    mode: &str,
    opts: &Options,
) -> Result<ModeResult> {
    let server = lab.host("server");
    let probe = PathBuf::from(std::env::var_os("MESH_MESH_PROBE_BIN").context("probe path")?);

    // Warm up (ARP/ND, agent pools, page cache) outside the measurement.
    checked(client.command(&probe, Some(wl.absolute()))?.args([
        "--connect",
        &server.v4_addr(ECHO).to_string(),
        "connects",
        "--count",
        "50",
    ]))?;
    let c = run_json(client.command(&probe, Some(wl.absolute()))?.args([
        "--connect",
        &server.v4_addr(ECHO).to_string(),
        "connects",
        "--count",
        &opts.connects.to_string(),
    ]))?;

    let secs = format!("{}s", opts.duration.as_secs().max(1));
    let url = format!("http://{}/", server.v4_addr(HTTP));
    let wrk = checked(client.command("wrk", Some(wl.absolute()))?.args([
        "-t1",
        &format!("-c{}", opts.connections),
        &format!("-d{secs}"),
        "--latency",
        &url,
    ]))?;
    let wrk = String::from_utf8_lossy(&wrk.stdout).into_owned();

    let iperf = run_json(client.command("iperf3", Some(wl.absolute()))?.args([
        "-c",
        &server.v4.to_string(),
        "-p",
        &IPERF.to_string(),
        "-t",
        &opts.duration.as_secs().max(1).to_string(),
        "-J",
    ]))?;
    let bps = iperf["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;

    Ok(ModeResult {
        mode: mode.to_owned(),
        connect_p50_us: c["connect_p50_us"].as_f64().unwrap_or_default(),
        connect_p99_us: c["connect_p99_us"].as_f64().unwrap_or_default(),
        connect_first_byte_p50_us: c["first_byte_p50_us"].as_f64().unwrap_or_default(),
        connect_first_byte_p99_us: c["first_byte_p99_us"].as_f64().unwrap_or_default(),
        http_rps: wrk_value(&wrk, "Requests/sec:").context("wrk requests/sec")?,
        http_p50_ms: wrk_latency(&wrk, "50%").context("wrk p50")?,
        http_p99_ms: wrk_latency(&wrk, "99%").context("wrk p99")?,
        bulk_gbit_s: bps / 1e9,
    })
}

/// Per-metric median over rounds.
fn median(rounds: &[ModeResult]) -> ModeResult {
    let m = |f: fn(&ModeResult) -> f64| crate::bench_observe::median(rounds.iter().map(f).collect());
    ModeResult {
        mode: rounds.first().map(|r| r.mode.clone()).unwrap_or_default(),
        connect_p50_us: m(|r| r.connect_p50_us),
        connect_p99_us: m(|r| r.connect_p99_us),
        connect_first_byte_p50_us: m(|r| r.connect_first_byte_p50_us),
        connect_first_byte_p99_us: m(|r| r.connect_first_byte_p99_us),
        http_rps: m(|r| r.http_rps),
        http_p50_ms: m(|r| r.http_p50_ms),
        http_p99_ms: m(|r| r.http_p99_ms),
        bulk_gbit_s: m(|r| r.bulk_gbit_s),
    }
}

pub(crate) fn wrk_value(out: &str, key: &str) -> Option<f64> {
    out.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// A latency percentile line of `wrk --latency` ("99%    1.23ms"), in milliseconds.
pub(crate) fn wrk_latency(out: &str, pct: &str) -> Option<f64> {
    let v = out.lines().find_map(|l| l.trim().strip_prefix(pct))?.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

fn render(results: &[ModeResult], opts: &Options) -> String {
    let direct = results.iter().find(|r| r.mode == "direct").cloned().unwrap_or_default();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Interception benchmark\n\n`cargo xtask bench intercept{}` ({} rounds, medians; per round {} sequential connects, \
         wrk {} connections x {}s, iperf3 {}s), one run, each mode on its own client host against the same server. \
         Ratios are to the direct path (lower is better for latency, higher for throughput). `connect()` returns when \
         the local agent accepts, so through the agent it is not the time to reach the server: \
         connect+first byte is what the workload waits for.\n",
        if opts.sockmap { " --sockmap" } else { "" },
        opts.rounds,
        opts.connects,
        opts.connections,
        opts.duration.as_secs(),
        opts.duration.as_secs()
    );
    let _ = writeln!(
        s,
        "| mode | connect() p50 (us) | p99 (us) | connect+first byte p50 (us) | p99 (us) | HTTP/1.1 req/s | HTTP p50 (ms) | HTTP p99 (ms) | bulk Gbit/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.3} ({:.2}x) | {:.3} ({:.2}x) | {:.2} ({:.2}x) |",
            r.mode,
            r.connect_p50_us,
            ratio(r.connect_p50_us, direct.connect_p50_us),
            r.connect_p99_us,
            ratio(r.connect_p99_us, direct.connect_p99_us),
            r.connect_first_byte_p50_us,
            ratio(r.connect_first_byte_p50_us, direct.connect_first_byte_p50_us),
            r.connect_first_byte_p99_us,
            ratio(r.connect_first_byte_p99_us, direct.connect_first_byte_p99_us),
            r.http_rps,
            ratio(r.http_rps, direct.http_rps),
            r.http_p50_ms,
            ratio(r.http_p50_ms, direct.http_p50_ms),
            r.http_p99_ms,
            ratio(r.http_p99_ms, direct.http_p99_ms),
            r.bulk_gbit_s,
            ratio(r.bulk_gbit_s, direct.bulk_gbit_s),
        );
    }
    let ebpf = results.iter().find(|r| r.mode == "ebpf");
    let ipt = results.iter().find(|r| r.mode == "iptables");
    if let (Some(e), Some(i)) = (ebpf, ipt) {
        let _ = writeln!(
            s,
            "\neBPF vs iptables: connect() p50 {:.2}x, p99 {:.2}x; connect+first byte p50 {:.2}x, p99 {:.2}x; HTTP req/s {:.2}x; bulk {:.2}x.",
            ratio(e.connect_p50_us, i.connect_p50_us),
            ratio(e.connect_p99_us, i.connect_p99_us),
            ratio(e.connect_first_byte_p50_us, i.connect_first_byte_p50_us),
            ratio(e.connect_first_byte_p99_us, i.connect_first_byte_p99_us),
            ratio(e.http_rps, i.http_rps),
            ratio(e.bulk_gbit_s, i.bulk_gbit_s),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "  Latency Distribution\n     50%  210.00us\n     75%  1.20ms\n     99%    2.50s\nRequests/sec:  45123.45\n";
        assert_eq!(wrk_latency(out, "50%"), Some(0.21));
        assert_eq!(wrk_latency(out, "99%"), Some(2500.0));
        assert_eq!(wrk_value(out, "Requests/sec:"), Some(45123.45));
    }
}
