//! `cargo xtask demo`: the mesh running for real on this machine.
//!
//! Installs what the demo needs, builds release binaries and runs
//! [`mesh_tests::demo`]: a control plane with its CA on host `control`, an agent and a
//! workload calling services by VIP on `frontend`, the servers and their own agent on
//! `backend`, so HTTP/1.1, HTTP/2 and TCP between them go through the mTLS tunnel.
//! The terminal shows each path live (requests, errors, latency, identities, the
//! interception mode). Ctrl-C or `--duration` tears everything down and checks that
//! nothing was left behind; `--summary-json` writes the final numbers for scripts.

use std::{path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::{Result, ensure};
use mesh_tests::demo;

pub struct Options {
    pub mode: String,
    pub duration: Option<Duration>,
    pub keep: bool,
    pub summary_json: Option<PathBuf>,
}

extern "C" fn on_signal(_: libc::c_int) {
    demo::STOP.store(true, Ordering::SeqCst);
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

pub fn run(root: &std::path::Path, opts: &Options) -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo needs root (namespaces, cgroups, BPF or iptables)");
    install_signal_handlers()?;
    println!("[1/3] system packages");
    crate::setup::system_packages()?;
    println!("[2/3] building release binaries (mesh-agent, mesh-control, mesh-probe, meshctl)");
    // The demo runs the built binaries in place: meshctl's path stays valid after it.
    let release = crate::release::build(root)?;
    crate::release::use_bins(&release);
    println!("[3/3] the mesh (meshctl: {})", release.join("meshctl").display());
    let summary = demo::run(&demo::Options {
        mode: opts.mode.clone(),
        duration: opts.duration,
        keep: opts.keep,
        live: true,
        summary_json: opts.summary_json.clone(),
    })?;
    if let Some(p) = &opts.summary_json {
        println!("summary: {} ({} paths)", p.display(), summary.rows.len());
    }
    Ok(())
}
