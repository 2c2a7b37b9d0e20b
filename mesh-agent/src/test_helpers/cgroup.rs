//! cgroup v2 directories for tests, removed on drop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The cgroup2 mount point, if cgroup2 is mounted at its root.
fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fields: Vec<&str> = pre.split(' ').collect();
        let at_root = post.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/");
        at_root.then(|| fields.get(4).map(PathBuf::from)).flatten()
    })
}

/// A cgroup directly under the cgroup2 root, removed on drop.
pub(crate) struct Cgroup {
    /// Its directory.
    pub(crate) dir: PathBuf,
    /// Its path relative to the cgroup2 root (`/name`), as iptables takes it.
    pub(crate) relative: String,
}

impl Cgroup {
    /// Creates `/<prefix>-<pid>-<n>` for `test`. Without a cgroup2 mount the test
    /// is skipped (reported), and fails under `CI`, which must run it.
    pub(crate) fn create(test: &str, prefix: &str) -> Option<Self> {
        let Some(root) = cgroup2_root() else {
            assert!(!super::under_ci(), "{test} needs cgroup2 mounted at its root; CI must run it");
            eprintln!("\n*** SKIPPED: {test}: no cgroup2 mount ***\n");
            return None;
        };
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let dir = root.join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Some(Cgroup { dir, relative: format!("/{name}") })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}
