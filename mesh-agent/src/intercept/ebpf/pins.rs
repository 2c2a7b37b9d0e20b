//! Where the eBPF interception lives in bpffs, so it outlives the agent on purpose.
//!
//! Maps and the links that attach the programs are pinned under one directory per
//! maps layout (`<bpffs>/v<layout>/maps`, `.../links`). A killed or restarting agent
//! therefore leaves workloads redirected to listeners that are gone: their connections
//! are refused, never sent around the agent. A new agent finds the same maps (the
//! original destinations of connections made while it was away included) and replaces
//! each link by one running its own programs. `mesh-agent cleanup` removes the directory,
//! which detaches everything.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use mesh_common::MAPS_LAYOUT_VERSION;

/// bpffs's magic number (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Errors pinning or unpinning.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpf filesystem and none could be mounted there ({1}); mount one with \
         `mount -t bpf bpf /sys/fs/bpf` (Kubernetes: a hostPath volume for /sys/fs/bpf) or pass \
         --bpffs-dir"
    )]
    NotBpffs(PathBuf, String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pinning link {path}: {error}")]
    Pin { path: PathBuf, error: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_owned(), source }
}

/// The pinned state of one agent (one node).
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// The layout directory under `bpffs_dir` (created, and bpffs mounted where
    /// `bpffs_dir` lies, if needed).
    pub fn open(bpffs_dir: &Path) -> Result<Self, PinError> {
        ensure_bpffs(bpffs_dir)?;
        let root = layout_dir(bpffs_dir);
        for d in [root.join("maps"), root.join("links")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(Self { root })
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn link_path(&self, name: &str) -> PathBuf {
        self.root.join("links").join(name)
    }

    /// Pins `link` as `name`, replacing (and so detaching, unless another process holds
    /// it) whatever link was pinned under that name: the new program runs before the
    /// old one stops, so no connect slips through between them.
    pub fn replace_link(&self, name: &str, link: FdLink) -> Result<(), PinError> {
        let path = self.link_path(name);
        // bpffs refuses names with a dot.
        let staged = self.link_path(&format!("{name}-new"));
        let _ = fs::remove_file(&staged);
        let pinned: PinnedLink =
            link.pin(&staged).map_err(|e| PinError::Pin { path: staged.clone(), error: chain(&e) })?;
        drop(pinned);
        fs::rename(&staged, &path).map_err(io_err(&path))?;
        Ok(())
    }

    /// Removes the pin `name` (detaching its link when nothing else holds it).
    pub fn remove_link(&self, name: &str) -> Result<bool, PinError> {
        let path = self.link_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(PinError::Io { path, source: e }),
        }
    }

    /// Names of the pinned links.
    pub fn links(&self) -> Vec<String> {
        let dir = self.root.join("links");
        let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
        let mut names: Vec<String> =
            entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

fn layout_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(format!("v{MAPS_LAYOUT_VERSION}"))
}

/// Removes everything pinned under `bpffs_dir` (every layout version): links detach,
/// maps are freed once no program uses them. Returns the paths removed.
pub fn remove_all(bpffs_dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    if !bpffs_dir.exists() {
        return Ok(removed);
    }
    // Links first, so no program still redirects into maps being removed.
    let mut dirs: Vec<PathBuf> = Vec::new();
    collect(bpffs_dir, &mut dirs, &mut removed, "links")?;
    collect(bpffs_dir, &mut dirs, &mut removed, "")?;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PinError::Io { path: d, source: e }),
        }
    }
    Ok(removed)
}

/// Removes the files under `dir` whose parent directory is named `only` (all files when
/// `only` is empty), recording directories for removal afterwards.
fn collect(
    dir: &Path,
    dirs: &mut Vec<PathBuf>,
    removed: &mut Vec<PathBuf>,
    only: &str,
) -> Result<(), PinError> {
    if !dirs.contains(&dir.to_path_buf()) {
        dirs.push(dir.to_path_buf());
    }
    for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            collect(&path, dirs, removed, only)?;
        } else if only.is_empty() || dir.file_name().is_some_and(|n| n == only) {
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
    }
    Ok(())
}

/// Makes sure `dir` is on bpffs: nothing to do when it (or an existing parent) already
/// is; otherwise mounts bpffs on `/sys/fs/bpf` when `dir` is below it, as a node agent
/// must on hosts where nothing mounted it.
fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    if on_bpffs(dir) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if !dir.starts_with(mount_point) {
        return Err(PinError::NotBpffs(
            dir.to_owned(),
            format!("only {} is mounted automatically", mount_point.display()),
        ));
    }
    fs::create_dir_all(mount_point).map_err(io_err(mount_point))?;
    nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| PinError::NotBpffs(dir.to_owned(), format!("mount -t bpf: {e}")))?;
    tracing::info!(path = %mount_point.display(), "mounted bpffs");
    if on_bpffs(dir) {
        Ok(())
    } else {
        Err(PinError::NotBpffs(dir.to_owned(), "still not bpffs after mounting".into()))
    }
}

/// Whether `dir`, or its deepest existing ancestor, is on bpffs.
fn on_bpffs(dir: &Path) -> bool {
    let mut p = Some(dir);
    while let Some(cur) = p {
        if cur.exists() {
            return nix::sys::statfs::statfs(cur)
                .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
                .unwrap_or(false);
        }
        p = cur.parent();
    }
    false
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}
