//! The pods the CNI plugin handed to this agent, kept in a file so that a restarted
//! agent serves every one of them again without the CNI being called (the runtime
//! calls ADD once per sandbox; nobody repeats it because the agent restarted).
//!
//! The file lives on tmpfs (`/run/mesh/`): a node reboot takes the pods' network
//! namespaces and the file together. It is JSON lines, a header line with the format
//! and its version, then one pod per line, so damage to one line loses one pod, not
//! all. Every write replaces the whole file through a temporary file, `fsync` and
//! `rename`, so a crash leaves the old or the new file, never half of one.
//!
//! Loading keeps what can be kept: lines that do not parse or fail the contract's
//! checks, repeats, entries past the limit and pods whose network namespace is gone
//! are dropped, each with its reason (the caller logs them), and a damaged file is
//! copied to `<path>.corrupt` for a post-mortem. A header from a newer format is not
//! guessed at: the file is set aside as `<path>.unreadable` and loading says so.

use std::{
    collections::HashSet,
    io::{ErrorKind, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::cni::PodAnnounce;

/// Where the agent keeps the file unless told otherwise.
pub const DEFAULT_PATH: &str = "/run/mesh/workloads.json";
/// The header's `format`.
pub const FORMAT: &str = "mesh-agent/workloads";
/// The header's `version`: bump it when a line's shape changes incompatibly.
pub const VERSION: u32 = 1;
/// The most of the file read on load (1024 pods take about 300 KiB).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// Why the file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("workload state {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "workload state {}: format {format:?} version {version} is not one this agent reads ({FORMAT:?} \
         version {VERSION}); set aside as {}, no pod restored from it",
        path.display(), set_aside.display()
    )]
    UnknownFormat { path: PathBuf, format: String, version: u32, set_aside: PathBuf },
}

/// A line of the file that was not restored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// 1-based line number.
    pub line: usize,
    pub container_id: Option<String>,
    pub reason: String,
    /// True for damage (bad JSON, failed checks, repeats, over the limit); false for
    /// a pod whose network namespace is simply gone.
    pub corrupt: bool,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pods: Vec<PodAnnounce>,
    pub dropped: Vec<Dropped>,
}

/// The file, and a lock that orders writes.
#[derive(Debug)]
pub struct WorkloadStore {
    path: PathBuf,
    max_pods: usize,
    writing: Mutex<()>,
}

impl WorkloadStore {
    /// A store at `path` holding at most `max_pods` pods.
    pub fn new(path: impl Into<PathBuf>, max_pods: usize) -> Self {
        Self { path: path.into(), max_pods, writing: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    /// Reads the file; `netns_alive` says whether a pod's network namespace still
    /// exists ([`netns_exists`] on a node). No file is no pods.
    pub fn load(&self, netns_alive: impl Fn(&str) -> bool) -> Result<Loaded, StoreError> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Loaded::default()),
            Err(e) => return Err(self.io(&self.path)(e)),
        };
        let mut bytes = Vec::new();
        (&mut file).take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(self.io(&self.path))?;
        let mut out = Loaded::default();
        let drop = |out: &mut Loaded, line: usize, id: Option<String>, reason: String, corrupt: bool| {
            out.dropped.push(Dropped { line, container_id: id, reason, corrupt });
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            bytes.truncate(MAX_FILE_BYTES as usize);
            let lines = bytes.iter().filter(|b| **b == b'\n').count();
            drop(
                &mut out,
                lines + 1,
                None,
                format!("file larger than {MAX_FILE_BYTES} bytes; the rest is ignored"),
                true,
            );
            // The last line is cut: leave it out rather than misread it.
            if let Some(end) = bytes.iter().rposition(|b| *b == b'\n') {
                bytes.truncate(end);
            }
        }
        let mut seen = HashSet::new();
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            let n = i + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if n == 1 {
                match serde_json::from_slice::<Header>(line) {
                    Ok(h) if h.format == FORMAT && h.version == VERSION => continue,
                    Ok(h) => {
                        let set_aside = self.sibling(".unreadable");
                        std::fs::rename(&self.path, &set_aside).map_err(self.io(&set_aside))?;
                        return Err(StoreError::UnknownFormat {
                            path: self.path.clone(),
                            format: h.format,
                            version: h.version,
                            set_aside,
                        });
                    }
                    // A damaged header: read the rest as this version's lines.
                    Err(_) => {
                        if serde_json::from_slice::<PodAnnounce>(line).is_err() {
                            drop(&mut out, n, None, "not the header line".into(), true);
                            continue;
                        }
                    }
                }
            }
            let pod = match serde_json::from_slice::<PodAnnounce>(line) {
                Ok(p) => p,
                Err(e) => {
                    drop(&mut out, n, None, format!("not a pod record: {e}"), true);
                    continue;
                }
            };
            let id = Some(pod.container_id.clone());
            if let Err(e) = pod.check() {
                drop(&mut out, n, id, e.to_string(), true);
            } else if !seen.insert(pod.container_id.clone()) {
                drop(&mut out, n, id, "container id repeated".into(), true);
            } else if out.pods.len() >= self.max_pods {
                drop(&mut out, n, id, format!("more than {} pods", self.max_pods), true);
            } else if !netns_alive(&pod.netns) {
                drop(&mut out, n, id, format!("network namespace {} is gone", pod.netns), false);
            } else {
                out.pods.push(pod);
            }
        }
        if out.dropped.iter().any(|d| d.corrupt) {
            // Best effort: the copy is for people; loading goes on without it.
            let _ = std::fs::copy(&self.path, self.sibling(".corrupt"));
        }
        Ok(out)
    }

    /// Replaces the file with `pods`, atomically (see the module docs).
    pub fn save(&self, pods: &[PodAnnounce]) -> Result<(), StoreError> {
        let _order = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(self.io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(self.io(dir))?;
        }
        let mut text = serde_json::to_string(&Header { format: FORMAT.into(), version: VERSION })
            .expect("the header serialises");
        text.push('\n');
        for pod in pods {
            text.push_str(&serde_json::to_string(pod).expect("a pod serialises"));
            text.push('\n');
        }
        let tmp = self.sibling(".tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(self.io(&tmp))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(self.io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(self.io(&self.path))?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(self.io(dir))
    }
}

/// Whether `path` is a live network namespace: a bind mount of nsfs (as `ip netns`
/// and container runtimes make them) or `/proc/PID/ns/net`. A file left after the
/// namespace was unmounted is on another file system, so it does not count.
pub fn netns_exists(path: &str) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::cni::PodRef;

    fn pod(id: &str, netns: &str) -> PodAnnounce {
        PodAnnounce {
            container_id: id.into(),
            netns: format!("/var/run/netns/{netns}"),
            ifname: "eth0".into(),
            pod: Some(PodRef { namespace: "shop".into(), name: format!("web-{id}"), uid: None }),
            ips: vec![format!("10.88.0.{}", id.len()).parse().unwrap()],
        }
    }

    fn store(dir: &tempfile::TempDir) -> WorkloadStore {
        WorkloadStore::new(dir.path().join("state/workloads.json"), 8)
    }

    #[test]
    fn saved_pods_come_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let pods = vec![pod("a", "n1"), pod("bb", "n2")];
        store(&dir).save(&pods).unwrap();
        let mode = std::fs::metadata(store(&dir).path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file is root's alone");
        // A new store object, as a restarted agent makes.
        let loaded = store(&dir).load(|_| true).unwrap();
        assert_eq!(loaded.pods, pods);
        assert!(loaded.dropped.is_empty());
        assert!(!dir.path().join("state/workloads.json.tmp").exists());
    }

    #[test]
    fn no_file_is_no_pods() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = store(&dir).load(|_| true).unwrap();
        assert!(loaded.pods.is_empty() && loaded.dropped.is_empty());
    }

    #[test]
    fn pods_whose_netns_is_gone_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        store(&dir).save(&[pod("a", "n1"), pod("bb", "gone")]).unwrap();
        let loaded = store(&dir).load(|p| !p.ends_with("gone")).unwrap();
        assert_eq!(loaded.pods, [pod("a", "n1")]);
        assert_eq!(loaded.dropped.len(), 1);
        let d = &loaded.dropped[0];
        assert_eq!((d.container_id.as_deref(), d.corrupt), (Some("bb"), false));
        assert!(d.reason.contains("/var/run/netns/gone is gone"), "{}", d.reason);
        assert!(!dir.path().join("state/workloads.json.corrupt").exists(), "nothing was damaged");
    }

    #[test]
    fn a_corrupt_file_keeps_every_good_line_and_names_the_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let good = |p: &PodAnnounce| serde_json::to_string(p).unwrap();
        let mut bad_check = pod("cc", "n3");
        bad_check.netns = "relative/path".into();
        let text = [
            r#"{"format":"mesh-agent/workloads","version":1}"#.to_owned(),
            good(&pod("a", "n1")),
            "{\"container_id\":\"half".to_owned(),
            good(&bad_check),
            good(&pod("a", "n9")),
            "\u{0}\u{1}garbage".to_owned(),
            good(&pod("bb", "n2")),
        ]
        .join("\n");
        std::fs::create_dir_all(s.path().parent().unwrap()).unwrap();
        std::fs::write(s.path(), &text).unwrap();
        let loaded = s.load(|_| true).unwrap();
        assert_eq!(loaded.pods, [pod("a", "n1"), pod("bb", "n2")]);
        let dropped: Vec<(usize, &str)> =
            loaded.dropped.iter().map(|d| (d.line, d.reason.as_str())).collect();
        assert_eq!(dropped.len(), 4, "{dropped:?}");
        assert!(dropped[0].0 == 3 && dropped[0].1.starts_with("not a pod record"), "{dropped:?}");
        assert!(dropped[1].0 == 4 && dropped[1].1.starts_with("netns:"), "{dropped:?}");
        assert_eq!(dropped[2], (5, "container id repeated"));
        assert_eq!(dropped[3].0, 6);
        assert_eq!(std::fs::read_to_string(dir.path().join("state/workloads.json.corrupt")).unwrap(), text);
    }

    #[test]
    fn a_lost_header_or_a_truncated_tail_loses_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.save(&[pod("a", "n1"), pod("bb", "n2")]).unwrap();
        let text = std::fs::read_to_string(s.path()).unwrap();
        // Header gone, last line cut in the middle (a disk that lied about fsync).
        let body = text.split_once('\n').unwrap().1;
        let cut = &body[..body.len() - 20];
        std::fs::write(s.path(), cut).unwrap();
        let loaded = s.load(|_| true).unwrap();
        assert_eq!(loaded.pods, [pod("a", "n1")]);
        assert_eq!(loaded.dropped.len(), 1);
        assert_eq!(loaded.dropped[0].line, 2);
    }

    #[test]
    fn the_pod_limit_holds_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let pods: Vec<_> = (0..10).map(|i| pod(&"x".repeat(i + 1), &format!("n{i}"))).collect();
        WorkloadStore::new(dir.path().join("w.json"), 100).save(&pods).unwrap();
        let loaded = WorkloadStore::new(dir.path().join("w.json"), 8).load(|_| true).unwrap();
        assert_eq!(loaded.pods.len(), 8);
        assert_eq!(loaded.dropped.len(), 2);
        assert!(loaded.dropped.iter().all(|d| d.reason == "more than 8 pods"));
    }

    #[test]
    fn a_newer_format_is_set_aside_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        std::fs::create_dir_all(s.path().parent().unwrap()).unwrap();
        let text = "{\"format\":\"mesh-agent/workloads\",\"version\":2}\n{\"new\":\"shape\"}\n";
        std::fs::write(s.path(), text).unwrap();
        let e = s.load(|_| true).unwrap_err();
        assert!(matches!(e, StoreError::UnknownFormat { version: 2, .. }), "{e}");
        assert!(e.to_string().contains("set aside as"), "{e}");
        assert!(!s.path().exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("state/workloads.json.unreadable")).unwrap(),
            text
        );
        // The agent goes on with an empty state and writes a fresh file.
        s.save(&[pod("a", "n1")]).unwrap();
        assert_eq!(s.load(|_| true).unwrap().pods.len(), 1);
    }

    #[test]
    fn an_oversized_file_is_read_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = WorkloadStore::new(dir.path().join("w.json"), 100_000);
        let mut text = String::from("{\"format\":\"mesh-agent/workloads\",\"version\":1}\n");
        text.push_str(&serde_json::to_string(&pod("a", "n1")).unwrap());
        text.push('\n');
        text.push_str(&" ".repeat(MAX_FILE_BYTES as usize));
        text.push_str("tail");
        std::fs::write(s.path(), text).unwrap();
        let loaded = s.load(|_| true).unwrap();
        assert_eq!(loaded.pods, [pod("a", "n1")]);
        assert!(loaded.dropped.iter().any(|d| d.reason.contains("larger than")), "{:?}", loaded.dropped);
    }

    #[test]
    fn only_namespaces_count_as_netns() {
        assert!(netns_exists("/proc/self/ns/net"));
        assert!(!netns_exists("/proc/self/status"));
        assert!(!netns_exists("/var/run/netns/mesh-no-such-namespace"));
    }
}
