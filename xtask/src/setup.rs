//! System packages the tests, demo and benchmarks run (iptables, iproute2, curl,
//! bpftool, wrk, iperf3, h2load, nginx, openssl, python3-venv, prometheus, the CNI reference
//! plugins), installed with apt when
//! missing, idempotently.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// Debian package for each tool.
const TOOLS: &[(&str, &str)] = &[
    ("iptables", "iptables"),
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("h2load", "nghttp2-client"),
    ("nginx", "nginx"),
    // The CA tests read issued certificates with the openssl CLI.
    ("openssl", "openssl"),
    // The gRPC e2e test runs a real grpcio client and server from a venv.
    ("python3", "python3-venv"),
    // The observability e2e test scrapes the agent with a real Prometheus.
    ("prometheus", "prometheus"),
    // The L7 benchmark's reference: the same two proxy hops with HAProxy.
    ("haproxy", "haproxy"),
    // The dashboard e2e test loads the control plane's page in headless Chromium.
    ("chromium", "chromium"),
    // The CNI e2e test chains mesh-cni after the real bridge and host-local plugins
    // (not on PATH: a path is checked as a file).
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
];

/// Whether `python3 -m venv` works (Debian ships it separately from python3).
fn has_venv() -> bool {
    Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(tool: &str) -> bool {
    if tool.starts_with('/') {
        return std::path::Path::new(tool).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Installs the packages whose tools are missing.
pub fn system_packages() -> Result<()> {
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(t, _)| !on_path(t) || (*t == "python3" && !has_venv()))
        .map(|(_, p)| *p)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        println!("      system packages present");
        return Ok(());
    }
    println!("      installing {} (apt-get)", missing.join(" "));
    ensure!(
        nix::unistd::geteuid().is_root(),
        "missing packages {}: install them (apt-get install -y {}) or run as root",
        missing.join(" "),
        missing.join(" ")
    );
    let quiet = |c: &mut Command| c.stdout(Stdio::null()).status();
    let update = quiet(Command::new("apt-get").args(["update", "-qq"])).context("running apt-get update")?;
    ensure!(update.success(), "apt-get update failed");
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("running apt-get install")?;
    ensure!(install.success(), "apt-get install {} failed", missing.join(" "));
    Ok(())
}

/// `cargo xtask test`: packages, then the whole workspace's tests. Privileged tests
/// fail rather than skip under `CI=true`.
pub fn test(root: &std::path::Path, extra: &[String]) -> Result<()> {
    println!("[1/2] checking system packages for the end-to-end tests");
    system_packages()?;
    println!("[2/2] cargo test --workspace {}", extra.join(" "));
    let status =
        Command::new(env!("CARGO")).current_dir(root).args(["test", "--workspace"]).args(extra).status()?;
    ensure!(status.success(), "tests failed");
    Ok(())
}
