//! Developer tasks for the mesh workspace: `cargo xtask <task>`.

mod bench;
mod bench_connrate;
mod bench_handshakes;
mod bench_l7;
mod bench_observe;
mod bench_peers;
mod bench_pods;
mod demo;
mod ebpf;
mod handshake_flood;
mod release;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for the mesh workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF programs (installs rust-src and bpf-linker for nightly if missing)
    /// and update the object the agent embeds.
    BuildEbpf {
        /// Rebuild and fail if the committed object differs from the fresh build.
        #[arg(long)]
        check: bool,
    },
    /// Run the mesh for real: test hosts, agent, workloads and live traffic (root).
    Demo {
        /// Interception mode: auto, ebpf or iptables.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Stop after this long (default: run until Ctrl-C).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Keep running until Ctrl-C and print commands to try by hand.
        #[arg(long)]
        keep: bool,
        /// At the end, write the per-path numbers, the modes and what teardown found
        /// left behind as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
    },
    /// Install the system packages the tests need (if missing), then run every test
    /// of the workspace. Extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (needs root): `intercept` compares direct, eBPF and iptables paths.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Connection setup latency, HTTP/1.1 keep-alive throughput and latency, bulk TCP:
    /// direct vs eBPF mode vs iptables mode, one run.
    Intercept {
        /// Interleaved rounds over the three modes (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Duration of each load test.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Sequential connections for the setup-latency measurement.
        #[arg(long, default_value_t = 2000)]
        connects: usize,
        /// Concurrent keep-alive connections for wrk.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Start the eBPF-mode agent with `--sockmap on` (the workload's loopback leg
        /// through sk_msg); results go to bench-results/intercept-sockmap.md.
        #[arg(long)]
        sockmap: bool,
    },
    /// HTTP/1.1 and HTTP/2 through client agent -> mTLS -> server agent vs direct, at
    /// 1k and 10k requests/s and at the maximum rate, one run.
    L7 {
        /// Duration of each load point.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Requests in flight at the maximum rate: HTTP/1.1 connections, or HTTP/2
        /// streams (16 per connection).
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// Rounds of every point; each figure reported is the median over rounds (a
        /// 5 s point's p99 swings by milliseconds on a shared VM).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Only these protocols (`http1`, `http2`); all when not given.
        #[arg(long, value_delimiter = ',')]
        protocols: Vec<String>,
        /// Only these load points (`1k`, `10k`, `max`); all when not given.
        #[arg(long, value_delimiter = ',')]
        loads: Vec<String>,
    },
    /// Observability overhead: HTTP/1.1 through the mesh with metrics and the access
    /// log (to a file) ON vs OFF, max rate and p99 at 1k requests/s, one run.
    Observe {
        /// Duration of each load point.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// HTTP/1.1 connections at the maximum rate (requests in flight).
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// Rounds of OFF and ON (alternating order; medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Idle TLS handshakes flooding the server agent's tunnel port (from one and from
    /// 32 source addresses) vs quiet: HTTP/1.1 through the mesh at 1k requests/s and
    /// at the maximum rate, a newcomer's handshake wait, limit hits and RSS, one run.
    /// Controls in the same run: the flood on a bystander (a HAProxy's TLS port on the
    /// server host), and the load through a HAProxy pair, quiet and flooded.
    Handshakes {
        /// Duration of each load point.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Rounds of every run (rotating order; medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Idle handshakes kept open during a flooded run.
        #[arg(long, default_value_t = 1000)]
        flood: usize,
    },
    /// The mesh beside Istio's ztunnel, one run: keep-alive, 1 MiB, `Connection:
    /// close` and one-stream 16 MiB loads with wrk through each pair (the mesh's L4
    /// and L7 ports) as ratios to each lab's direct path, and each proxy's memory idle,
    /// after load and holding connections open. ztunnel runs when `ZTUNNEL_BIN` names
    /// its binary (../shared/anchors/ztunnel/README.md builds it); without it, the
    /// mesh's columns alone.
    Peers {
        /// Rounds over every workload and path (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Duration of each wrk run.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// ztunnel's binary.
        #[arg(long, env = "ZTUNNEL_BIN")]
        ztunnel: Option<PathBuf>,
        /// Connections held open through each pair for the memory figures.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        held: Vec<usize>,
        /// Only these workloads (`keepalive`, `bulk`, `close`, `stream`); all when not
        /// given. A partial run leaves bench-results/peers.md alone.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Start the mesh's agents with `--sockmap on` (a workload's loopback leg to
        /// its agent through sk_msg); results go to bench-results/peers-sockmap.md.
        #[arg(long)]
        sockmap: bool,
    },
    /// New connections per second (`wrk -H 'Connection: close'`) through an eBPF-mode
    /// pair and an iptables-mode pair in one lab, both ports (L4 and L7) beside the
    /// direct path, with the SYN retransmits and listen drops of each run and each
    /// agent's RSS idle and after the load, one run.
    Connrate {
        /// Rounds over every path (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Duration of each wrk run.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// wrk's concurrent connections, each closed after its request.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// Start the eBPF pair's agents with `--sockmap on` (same-node legs through
        /// sk_msg), for an A/B against a run without it.
        #[arg(long)]
        sockmap: bool,
    },
    /// Pods on one node through the real CNI chain, each with its own identity: time
    /// from CNI ADD to the pod being served, and the agent's memory, both modes.
    Pods {
        /// Pods to add (one identity each).
        #[arg(long, default_value_t = 50)]
        pods: usize,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Demo { mode, duration, keep, summary_json } => {
            demo::run(&root, &demo::Options { mode, duration, keep, summary_json })
        }
        Task::Test { args } => setup::test(&root, &args),
        Task::BuildEbpf { check } => ebpf::run(&root, &ebpf::Options { check }),
        Task::Bench { which: Bench::Intercept { rounds, duration, connects, connections, sockmap } } => {
            bench::intercept(&root, &bench::Options { rounds, duration, connects, connections, sockmap })
        }
        Task::Bench { which: Bench::L7 { duration, connections, rounds, protocols, loads } } => {
            bench_l7::run(&root, &bench_l7::Options { duration, connections, rounds, protocols, loads })
        }
        Task::Bench { which: Bench::Observe { duration, connections, rounds } } => {
            bench_observe::run(&root, &bench_observe::Options { duration, connections, rounds })
        }
        Task::Bench { which: Bench::Handshakes { duration, rounds, flood } } => {
            bench_handshakes::run(&root, &bench_handshakes::Options { duration, rounds, flood })
        }
        Task::Bench { which: Bench::Peers { rounds, duration, ztunnel, held, workloads, sockmap } } => {
            bench_peers::run(
                &root,
                &bench_peers::Options { rounds, duration, ztunnel, held, workloads, sockmap },
            )
        }
        Task::Bench { which: Bench::Connrate { rounds, duration, connections, sockmap } } => {
            bench_connrate::run(&root, &bench_connrate::Options { rounds, duration, connections, sockmap })
        }
        Task::Bench { which: Bench::Pods { pods } } => bench_pods::run(&root, &bench_pods::Options { pods }),
    }
}

/// The workspace this run is for: `cargo run` (the `cargo xtask` alias) names the
/// manifest directory at run time; the compile-time one is a fallback, and may be a
/// checkout that no longer exists when a target directory is shared between them.
fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
