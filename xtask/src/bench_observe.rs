//! `cargo xtask bench observe`: what observability costs on the data path. HTTP/1.1
//! through the whole mesh (client agent -> mTLS tunnel -> server agent -> nginx, the
//! `bench l7` lab) with both agents recording Prometheus metrics and writing the
//! access log to a file (ON), against both agents with `--metrics off --access-log
//! off` (OFF), in one run: the maximum request rate and the latency at a fixed
//! 1k requests/s. Agents are restarted per configuration; rounds alternate the
//! order (OFF first, then ON first, ...) so drift hits both alike.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Result, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::bench_l7::{Bench, f};

pub struct Options {
    pub duration: Duration,
    pub connections: u32,
    pub rounds: usize,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Config {
    Off,
    On,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Off => "OFF (--metrics off --access-log off)",
            Config::On => "ON (--metrics on --access-log FILE)",
        }
    }
}

#[derive(Serialize, Debug)]
struct Sample {
    round: usize,
    config: Config,
    max: Value,
    fixed_1k: Value,
    /// Access log lines the client agent wrote (ON only).
    access_log_lines: Option<u64>,
}

fn count_lines(path: &Path) -> u64 {
    std::fs::read(path).map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64).unwrap_or(0)
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root (namespaces, cgroups, BPF)");
    ensure!(opts.rounds > 0, "--rounds must be at least 1");
    crate::setup::system_packages()?;
    println!("[1/3] building release binaries");
    let _bins = crate::release::build_aside(root)?;

    println!("[2/3] starting the control plane and the server");
    let bench = Bench::start("obsbench")?;
    let logs = bench.dir.path().join("access-logs");
    std::fs::create_dir_all(&logs)?;

    println!("[3/3] {} rounds of OFF and ON, {:?} per point", opts.rounds, opts.duration);
    let mut samples = Vec::new();
    for round in 0..opts.rounds {
        let order = if round % 2 == 0 { [Config::Off, Config::On] } else { [Config::On, Config::Off] };
        for config in order {
            let agents = bench.agents(|host| match config {
                Config::Off => vec!["--metrics".into(), "off".into(), "--access-log".into(), "off".into()],
                Config::On => vec![
                    "--metrics".into(),
                    "on".into(),
                    "--access-log".into(),
                    logs.join(format!("{host}.log")).display().to_string(),
                ],
            })?;
            // Warm-up: connections, pools, tunnel.
            bench.load("client", false, 0, Duration::from_secs(1), opts.connections)?;
            let max = bench.load("client", false, 0, opts.duration, opts.connections)?;
            let fixed_1k = bench.load("client", false, 1_000, opts.duration, opts.connections)?;
            agents.terminate()?;
            let access_log_lines = (config == Config::On).then(|| count_lines(&logs.join("client.log")));
            // The logs grow by ~0.5 KB a request: do not keep them.
            for host in ["client", "server"] {
                let _ = std::fs::remove_file(logs.join(format!("{host}.log")));
            }
            println!(
                "      round {round} {:<3} max {:>7.0} req/s (errors {}) | 1k rps p50 {:>5.0} us p99 {:>6.0} us (errors {}){}",
                if config == Config::On { "ON" } else { "OFF" },
                f(&max, "rps"),
                max["errors"],
                f(&fixed_1k, "p50_us"),
                f(&fixed_1k, "p99_us"),
                fixed_1k["errors"],
                access_log_lines.map(|n| format!(" | {n} access log lines")).unwrap_or_default(),
            );
            samples.push(Sample { round, config, max, fixed_1k, access_log_lines });
        }
    }
    let Bench { control, .. } = bench;
    control.terminate()?;

    let report = render(&samples, opts);
    println!("\n{report}");
    let out = root.join("bench-results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("observe.md"), &report)?;
    std::fs::write(out.join("observe.json"), serde_json::to_string_pretty(&samples)?)?;
    println!("wrote bench-results/observe.md and bench-results/observe.json");
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn render(samples: &[Sample], opts: &Options) -> String {
    let of = |config: Config, get: &dyn Fn(&Sample) -> f64| {
        median(samples.iter().filter(|s| s.config == config).map(get).collect())
    };
    let max_rps = |s: &Sample| f(&s.max, "rps");
    let p50 = |s: &Sample| f(&s.fixed_1k, "p50_us");
    let p99 = |s: &Sample| f(&s.fixed_1k, "p99_us");
    let (off_rps, on_rps) = (of(Config::Off, &max_rps), of(Config::On, &max_rps));
    let (off_p99, on_p99) = (of(Config::Off, &p99), of(Config::On, &p99));
    let throughput_cost = (1.0 - on_rps / off_rps.max(1e-9)) * 100.0;
    let p99_added_ms = (on_p99 - off_p99) / 1000.0;

    let mut s = String::new();
    let _ =
        writeln!(s, "# Observability overhead: metrics + access log ON vs OFF, HTTP/1.1 through the mesh\n");
    let _ = writeln!(
        s,
        "`cargo xtask bench observe --duration {}s --connections {} --rounds {}` on {} ({} CPUs). The `bench l7` lab: \
         client agent -> mTLS tunnel -> server agent -> nginx, both agents in eBPF mode, one worker thread, log level \
         info. ON: both agents with `--metrics on --access-log FILE` (one JSON line per request on each agent); OFF: \
         `--metrics off --access-log off` (no recorder installed: recording is a no-op). Agents restart per \
         configuration; rounds alternate the order. Max rate is closed loop with {} connections; the 1k rps point is \
         open loop (latency from each request's due time). Medians over rounds.\n",
        opts.duration.as_secs(),
        opts.connections,
        opts.rounds,
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.connections,
    );
    let _ = writeln!(s, "| configuration | max req/s | 1k rps p50 | 1k rps p99 |");
    let _ = writeln!(s, "|---|---|---|---|");
    for config in [Config::Off, Config::On] {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} us | {:.0} us |",
            config.name(),
            of(config, &max_rps),
            of(config, &p50),
            of(config, &p99),
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- throughput ON/OFF: {:.3}x ({:+.1}% cost; target < 5%: {})",
        on_rps / off_rps.max(1e-9),
        throughput_cost,
        if throughput_cost < 5.0 { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        s,
        "- p99 at 1k rps, ON - OFF: {:+.3} ms (target < 0.1 ms: {})\n",
        p99_added_ms,
        if p99_added_ms < 0.1 { "met" } else { "NOT met" }
    );
    let _ = writeln!(s, "Per round:\n");
    let _ = writeln!(
        s,
        "| round | config | max req/s | max errors | 1k p50 | 1k p99 | 1k errors | client access log lines |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for x in samples {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {:.0} us | {:.0} us | {} | {} |",
            x.round,
            if x.config == Config::On { "ON" } else { "OFF" },
            f(&x.max, "rps"),
            x.max["errors"],
            f(&x.fixed_1k, "p50_us"),
            f(&x.fixed_1k, "p99_us"),
            x.fixed_1k["errors"],
            x.access_log_lines.map_or_else(|| "-".to_owned(), |n| n.to_string()),
        );
    }
    s
}
