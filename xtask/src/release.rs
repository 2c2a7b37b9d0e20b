//! Release builds of the binaries the demo and the benchmarks run, and where the
//! test harness finds them (`MESH_*_BIN`, read by `mesh_tests::bins`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

/// Each binary and the variable that points the harness at it.
const BINS: [(&str, &str); 4] = [
    ("mesh-agent", "MESH_MESH_AGENT_BIN"),
    ("mesh-cni", "MESH_MESH_CNI_BIN"),
    ("mesh-probe", "MESH_MESH_PROBE_BIN"),
    ("mesh-control", "MESH_MESH_CONTROL_BIN"),
];

/// Builds the agent, the CNI plugin, the control plane (with `meshctl`) and the probe in release
/// mode; returns the directory that holds them (`CARGO_TARGET_DIR` respected).
pub fn build(root: &Path) -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "--quiet", "-p", "mesh-agent", "--bin", "mesh-agent"])
        .args(["-p", "control", "--bin", "mesh-control", "--bin", "meshctl"])
        .args(["-p", "mesh-tests", "--bin", "mesh-probe"])
        .args(["-p", "mesh-cni", "--bin", "mesh-cni"])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "release build failed");
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
        .join("release"))
}

/// Points the harness at the binaries in `dir`.
pub fn use_bins(dir: &Path) {
    for (bin, var) in BINS {
        // SAFETY (of set_var): called before any thread is started.
        unsafe { std::env::set_var(var, dir.join(bin)) };
    }
}

/// [`build`], then copies the binaries aside and points the harness at the copies,
/// so that another build into the same target directory cannot swap a binary under
/// a running benchmark. The copies are removed when the returned directory drops.
pub fn build_aside(root: &Path) -> Result<tempfile::TempDir> {
    let release = build(root)?;
    let aside = tempfile::Builder::new().prefix("mesh-bench-bins-").tempdir()?;
    for (bin, _) in BINS {
        std::fs::copy(release.join(bin), aside.path().join(bin)).with_context(|| format!("copying {bin}"))?;
    }
    use_bins(aside.path());
    Ok(aside)
}
