//! Workload and agent cgroups for tests, under `<cgroup2 mount>/mesh-test/`.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The cgroup2 mount point (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("cgroup v2 is not mounted")
}

/// A cgroup, killed and removed on drop.
pub struct Cgroup {
    absolute: PathBuf,
    relative: String,
}

impl Cgroup {
    /// Creates `mesh-test/<pid>-<n>-<name>`.
    pub fn new(name: &str) -> Result<Self> {
        let mount = mount()?;
        let parent = mount.join("mesh-test");
        std::fs::create_dir_all(&parent)?;
        remove_stale(&parent);
        let leaf = format!("{}-{}-{name}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let absolute = parent.join(&leaf);
        std::fs::create_dir(&absolute).with_context(|| format!("creating {}", absolute.display()))?;
        Ok(Self { absolute, relative: format!("/mesh-test/{leaf}") })
    }

    /// A cgroup below this one (removed with it at the latest).
    pub fn child(&self, name: &str) -> Result<Self> {
        let leaf = format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed));
        let absolute = self.absolute.join(&leaf);
        std::fs::create_dir(&absolute).with_context(|| format!("creating {}", absolute.display()))?;
        Ok(Self { absolute, relative: format!("{}/{leaf}", self.relative) })
    }

    /// Absolute directory.
    pub fn absolute(&self) -> &Path {
        &self.absolute
    }

    /// Path relative to the cgroup2 root (what `--cgroup` and iptables take).
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// Process ids currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.absolute.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

fn kill_and_remove(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    // Children first: a cgroup with children cannot be removed.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove(&e.path());
            }
        }
    }
    for _ in 0..200 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes cgroups of test processes that no longer exist.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next() else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_and_remove(&e.path());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_and_remove(&self.absolute);
    }
}
