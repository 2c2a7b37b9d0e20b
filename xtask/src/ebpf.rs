//! `cargo xtask build-ebpf`: builds `mesh-ebpf` with nightly and bpf-linker, installing
//! what is missing (the nightly's `rust-src`, a bpf-linker built against the nightly's
//! own LLVM), and copies the object to where the agent embeds it.
//!
//! The build is reproducible (source paths are remapped), so `--check` can rebuild and
//! compare bytes with the committed object: CI fails when someone edits the programs or
//! the shared types without rebuilding.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

/// bpf-linker release the build is pinned to.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The committed object, relative to the workspace root.
pub const OBJECT_PATH: &str = "mesh-agent/ebpf/mesh-ebpf.o";

pub struct Options {
    pub check: bool,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let steps = 4;
    step(1, steps, "checking the nightly toolchain");
    let nightly = Nightly::detect()?;
    println!("      {} (LLVM {})", nightly.version, nightly.llvm_major);

    step(2, steps, "checking rust-src for nightly");
    ensure_rust_src()?;

    step(3, steps, "checking bpf-linker");
    let linker_bin = ensure_bpf_linker(&nightly)?;

    step(4, steps, "building mesh-ebpf (bpfel-unknown-none, -Z build-std=core)");
    let built = build(root, &nightly, &linker_bin)?;
    let dest = root.join(OBJECT_PATH);

    if opts.check {
        let committed =
            fs::read(&dest).with_context(|| format!("reading committed object {}", dest.display()))?;
        let fresh = fs::read(&built)?;
        if committed != fresh {
            bail!(
                "{} does not match its sources: the programs or mesh-common changed without a \
                 rebuild (committed {} bytes, fresh build {} bytes). Run `cargo xtask build-ebpf` \
                 and commit the object.",
                OBJECT_PATH,
                committed.len(),
                fresh.len()
            );
        }
        println!("ok: {OBJECT_PATH} matches a fresh build ({} bytes)", fresh.len());
    } else {
        fs::create_dir_all(dest.parent().expect("object path has a parent"))?;
        fs::copy(&built, &dest)?;
        println!("wrote {OBJECT_PATH} ({} bytes)", fs::metadata(&dest)?.len());
    }
    Ok(())
}

fn step(n: usize, of: usize, what: &str) {
    println!("[{n}/{of}] {what}");
}

struct Nightly {
    version: String,
    llvm_major: u32,
    sysroot: PathBuf,
}

impl Nightly {
    fn detect() -> Result<Self> {
        let out = output(Command::new("rustc").args(["+nightly", "-vV"])).context(
            "a nightly toolchain is required to build the eBPF programs: \
             `rustup toolchain install nightly`",
        )?;
        let version = out.lines().next().unwrap_or_default().to_owned();
        let llvm = out
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .context("`rustc +nightly -vV` printed no LLVM version")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("unparseable LLVM version {llvm:?}"))?;
        let sysroot =
            PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
        Ok(Self { version, llvm_major, sysroot })
    }

    /// The nightly's real libLLVM shared object (not the linker-script stub beside it).
    fn libllvm(&self) -> Result<PathBuf> {
        let lib = self.sysroot.join("lib");
        let mut candidates: Vec<PathBuf> = fs::read_dir(&lib)
            .with_context(|| format!("listing {}", lib.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
            })
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .find(|p| is_elf(p))
            .with_context(|| format!("no libLLVM shared object in {}", lib.display()))
    }
}

fn is_elf(p: &Path) -> bool {
    fs::read(p).map(|b| b.starts_with(b"\x7fELF")).unwrap_or(false)
}

fn ensure_rust_src() -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("      rust-src present");
        return Ok(());
    }
    println!("      installing rust-src (rustup component add rust-src --toolchain nightly)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Where the bpf-linker build and its LLVM prefix live: per user, shared between
/// checkouts, keyed by the nightly's LLVM so a toolchain update rebuilds it.
fn tool_dir(nightly: &Nightly) -> PathBuf {
    let base = env::var_os("MESH_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".cargo"))
            .join("mesh-tools")
    });
    base.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{}", nightly.llvm_major))
}

fn home() -> PathBuf {
    env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

fn ensure_bpf_linker(nightly: &Nightly) -> Result<PathBuf> {
    let dir = tool_dir(nightly);
    let bin = dir.join("bin/bpf-linker");
    // The LLVM prefix must exist before the linker runs (its rpath points there), so
    // it is (re)created every time: cheap, and it repairs a nightly update in place.
    let prefix = dir.join("llvm");
    let libllvm = nightly.libllvm()?;
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir)?;
    let soname = libllvm.file_name().expect("file has a name").to_owned();
    for name in [std::ffi::OsString::from("libLLVM.so"), soname] {
        let link = lib_dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }

    if let Ok(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        println!("      {} present at {}", v.trim(), bin.display());
        return Ok(bin);
    }
    println!(
        "      building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} \
         (one time, about a minute)",
        nightly.llvm_major
    );
    status(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{}", nightly.llvm_major),
                "--root",
            ])
            .arg(&dir)
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )?;
    let v =
        output(Command::new(&bin).arg("--version")).context("the freshly built bpf-linker does not run")?;
    ensure!(v.contains(BPF_LINKER_VERSION), "unexpected bpf-linker version: {v}");
    Ok(bin)
}

/// The crates the kernel object is built from, relative to the workspace root.
const STAGED: &[&str] = &["mesh-ebpf", "mesh-common"];

/// Where the object is built. A fixed absolute path: cargo's `-C metadata` for a path
/// dependency outside the build's workspace (mesh-common, beside mesh-ebpf) hashes its
/// absolute path, which ends up in symbol and codegen-unit names. Building a staged
/// copy at the same path everywhere makes the object identical for any checkout.
fn stage_dir() -> PathBuf {
    env::var_os("MESH_EBPF_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/mesh-ebpf-build"))
}

/// Copies the sources (not `target/`) of the staged crates into the stage.
fn stage(root: &Path, stage: &Path) -> Result<()> {
    for krate in STAGED {
        let dest = stage.join(krate);
        if dest.exists() {
            fs::remove_dir_all(&dest).with_context(|| format!("clearing {}", dest.display()))?;
        }
        copy_tree(&root.join(krate), &dest)?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

fn build(root: &Path, nightly: &Nightly, linker: &Path) -> Result<PathBuf> {
    let stage_root = stage_dir();
    stage(root, &stage_root)?;
    let crate_dir = stage_root.join("mesh-ebpf");
    let target_dir = stage_root.join("target");
    let cargo_home = env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cargo"));
    // Remap every absolute path that ends up in BTF/DWARF so the object is the same
    // wherever the stage, cargo home or toolchain live.
    let remaps = [
        (stage_root.clone(), "/mesh".to_owned()),
        (cargo_home.join("registry/src"), "/registry".to_owned()),
        (nightly.sysroot.clone(), "/rust".to_owned()),
    ];
    let mut flags = vec!["-Cdebuginfo=2".to_owned(), "-Clink-arg=--btf".to_owned()];
    for (from, to) in &remaps {
        flags.push(format!("--remap-path-prefix={}={to}", from.display()));
    }
    let path = env::join_paths(
        std::iter::once(linker.parent().expect("bin dir").to_path_buf())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )?;
    status(
        Command::new("cargo")
            .current_dir(&crate_dir)
            .args(["+nightly", "build", "--release", "--locked"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
            .env_remove("RUSTFLAGS")
            .env("PATH", path),
    )?;
    Ok(target_dir.join("bpfel-unknown-none/release/mesh-ebpf"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?} failed ({st})");
    Ok(())
}
