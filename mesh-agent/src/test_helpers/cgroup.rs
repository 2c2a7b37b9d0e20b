//! cgroup v2 directories for tests, removed on drop.

use std::path::PathBuf;

/// The cgroup2 mount point, if cgroup2 is mounted at its root.
pub(crate) fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fields: Vec<&str> = pre.split(' ').collect();
        let at_root = post.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/");
        at_root.then(|| fields.get(4).map(PathBuf::from)).flatten()
    })
}

/// A cgroup, removed on drop.
pub(crate) struct Cgroup(pub(crate) PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
