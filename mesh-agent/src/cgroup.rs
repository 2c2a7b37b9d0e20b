//! Cgroup v2 paths: where the unified hierarchy is mounted, which cgroup the agent
//! itself is in, and how an enrolled workload cgroup is named.
//!
//! A workload cgroup is always carried as a [`CgroupPath`]: its path relative to the
//! cgroup2 root ("/mesh/web"), which is also what iptables' `-m cgroup --path`
//! expects, plus the absolute directory the BPF attach opens.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

/// Errors resolving cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo); eBPF mode \
         needs the unified hierarchy: mount it with `mount -t cgroup2 none /sys/fs/cgroup` \
         or use --mode iptables"
    )]
    NotMounted,
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cgroup {0} is not under the cgroup2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
    #[error(
        "cgroup {0} does not exist (create it first, or enroll it at run time with `meshctl agent enroll PATH --create`)"
    )]
    Missing(PathBuf),
    #[error("cannot read the agent's own cgroup from /proc/self/cgroup")]
    OwnCgroupUnknown,
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup` on unified systems, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text =
        fs::read_to_string(path).map_err(|source| CgroupError::Io { path: path.to_owned(), source })?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NotMounted)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // "36 25 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw": the mount point is
    // the fifth field, the filesystem type the first field after " - ".
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The agent's own cgroup, relative to the cgroup2 root ("0::/path" in /proc/self/cgroup).
pub fn own_cgroup() -> Result<String, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text =
        fs::read_to_string(path).map_err(|source| CgroupError::Io { path: path.to_owned(), source })?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
        .ok_or(CgroupError::OwnCgroupUnknown)
}

/// A cgroup v2 directory, by its path relative to the hierarchy root and its absolute path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath {
    relative: String,
    absolute: PathBuf,
}

impl CgroupPath {
    /// Resolves a user-supplied cgroup: an absolute path under the mount
    /// (`/sys/fs/cgroup/mesh/web`) or a path relative to the hierarchy root (`/mesh/web`,
    /// `mesh/web`). The directory must exist.
    pub fn resolve(mount: &Path, given: &str) -> Result<Self, CgroupError> {
        let cgroup = Self::parse(mount, given)?;
        if !cgroup.absolute.join("cgroup.procs").exists() {
            return Err(CgroupError::Missing(cgroup.absolute));
        }
        Ok(cgroup)
    }

    /// Names a cgroup under `mount` from `given` by its text alone, touching nothing:
    /// only plain directory names may follow the mount (no `..`, no `.`), so whatever
    /// is later created or opened stays inside the hierarchy.
    fn parse(mount: &Path, given: &str) -> Result<Self, CgroupError> {
        let given_path = Path::new(given);
        let absolute = if given_path.starts_with(mount) {
            given_path.to_path_buf()
        } else {
            mount.join(given.trim_start_matches('/'))
        };
        let relative = absolute
            .strip_prefix(mount)
            .map_err(|_| CgroupError::OutsideMount(absolute.clone(), mount.to_owned()))?;
        let mut names = Vec::new();
        for component in relative.components() {
            match component {
                std::path::Component::Normal(name) => names.push(name.to_string_lossy()),
                _ => return Err(CgroupError::OutsideMount(absolute, mount.to_owned())),
            }
        }
        let relative = names.join("/");
        Ok(Self { absolute: mount.join(&relative), relative: format!("/{relative}") })
    }

    /// Creates the cgroup if it does not exist, then resolves it. Returns whether it was
    /// created, so the caller removes only what it made. The path is checked before
    /// anything is created: a path leaving the hierarchy creates nothing.
    pub fn create(mount: &Path, given: &str) -> Result<(Self, bool), CgroupError> {
        let cgroup = Self::parse(mount, given)?;
        let created = !cgroup.absolute.exists();
        if created {
            fs::create_dir_all(&cgroup.absolute)
                .map_err(|source| CgroupError::Io { path: cgroup.absolute.clone(), source })?;
        }
        Ok((Self::resolve(mount, given)?, created))
    }

    /// Path relative to the cgroup2 root, starting with `/`.
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// Absolute directory of the cgroup.
    pub fn absolute(&self) -> &Path {
        &self.absolute
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other_relative: &str) -> bool {
        let me = self.relative.trim_end_matches('/');
        me.is_empty()
            || other_relative == me
            || other_relative.strip_prefix(me).is_some_and(|rest| rest.starts_with('/'))
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_and_hybrid_mounts() {
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "\
25 22 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
27 25 0:24 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("26 25 0:23 / /x rw - cgroup cgroup rw,cpu\n"), None);
    }

    #[test]
    fn resolves_relative_and_absolute_forms() {
        let dir = std::env::temp_dir().join(format!("mesh-cgroup-test-{}", std::process::id()));
        let wl = dir.join("mesh/web");
        fs::create_dir_all(&wl).unwrap();
        fs::write(wl.join("cgroup.procs"), "").unwrap();
        for given in ["/mesh/web", "mesh/web", wl.to_str().unwrap()] {
            let cg = CgroupPath::resolve(&dir, given).unwrap();
            assert_eq!(cg.relative(), "/mesh/web");
            assert_eq!(cg.absolute(), wl);
        }
        assert!(matches!(CgroupPath::resolve(&dir, "/mesh/nope"), Err(CgroupError::Missing(_))));
        assert!(matches!(CgroupPath::resolve(&dir, "/mesh/../../etc"), Err(CgroupError::OutsideMount(..))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_refuses_paths_outside_the_hierarchy_before_creating_anything() {
        let base = std::env::temp_dir().join(format!("mesh-cgroup-create-{}", std::process::id()));
        let mount = base.join("cgroup");
        fs::create_dir_all(&mount).unwrap();
        for given in ["../escaped", "/mesh/../../escaped", "mesh/./../../escaped", "/mesh/x/.."] {
            let e = CgroupPath::create(&mount, given).unwrap_err();
            assert!(matches!(e, CgroupError::OutsideMount(..)), "{given}: {e}");
        }
        assert!(!base.join("escaped").exists(), "a refused path created a directory");
        assert!(!mount.join("mesh").exists(), "a refused path created part of itself");
        let (cg, created) = CgroupPath::create(&mount, "mesh/./web/").unwrap_or_else(|e| {
            // Not a cgroup2 mount: the directory is made, but has no cgroup.procs.
            assert!(matches!(e, CgroupError::Missing(_)), "{e}");
            (CgroupPath::parse(&mount, "mesh/./web/").unwrap(), true)
        });
        assert_eq!(
            (cg.relative(), cg.absolute(), created),
            ("/mesh/web", mount.join("mesh/web").as_path(), true)
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn ancestry() {
        let cg = |r: &str| CgroupPath { relative: r.into(), absolute: PathBuf::new() };
        assert!(cg("/").contains("/anything"));
        assert!(cg("/mesh").contains("/mesh/web"));
        assert!(cg("/mesh").contains("/mesh"));
        assert!(!cg("/mesh").contains("/meshy"));
        assert!(!cg("/mesh/web").contains("/mesh"));
    }
}
