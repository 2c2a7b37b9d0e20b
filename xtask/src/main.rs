//! Developer tasks for the mesh workspace: `cargo xtask <task>`.

mod ebpf;

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
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::BuildEbpf { check } => ebpf::run(&root, &ebpf::Options { check }),
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
