//! Paths of the workspace binaries under test, built on first use so a test never
//! runs a stale binary. `MESH_MESH_AGENT_BIN` / `MESH_MESH_PROBE_BIN` (and so on) override them
//! (the benchmark uses release builds).

use std::{path::PathBuf, sync::OnceLock};

fn build(package: &str, bin: &str) -> PathBuf {
    // The benchmark builds release binaries itself and points here with these.
    let var = format!("MESH_{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    let run = escargot::CargoBuild::new()
        .package(package)
        .bin(bin)
        .current_release()
        .current_target()
        .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .run()
        .unwrap_or_else(|e| panic!("building {bin}: {e}"));
    run.path().to_path_buf()
}

/// The `mesh-agent` binary.
pub fn agent() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("mesh-agent", "mesh-agent"))
}

/// The `mesh-probe` workload client.
pub fn probe() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("mesh-tests", "mesh-probe"))
}

/// The `mesh-control` control plane.
pub fn control() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("control", "mesh-control"))
}

/// The `mesh-cni` CNI plugin and installer.
pub fn cni() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("mesh-cni", "mesh-cni"))
}

/// The `meshctl` operator CLI.
pub fn meshctl() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("control", "meshctl"))
}

/// The `mesh-flood` hostile clients.
pub fn flood() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("mesh-tests", "mesh-flood"))
}
