//! Making sockets inside another network namespace (a pod's).
//!
//! A socket belongs to the network namespace of the thread that created it, for its
//! whole life, whatever thread uses it afterwards. So the agent, which lives in the
//! node's namespace, enters a pod's namespace only for the `socket()` call (and `bind`
//! / `listen` for listeners): `setns` on the current thread, create, `setns` back. Two
//! system calls per socket, no thread per pod, and nothing else ever runs inside the
//! pod's namespace (a guard restores the thread's namespace even if creation fails).

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// An open network namespace: a pod's (by path) or the agent's own.
#[derive(Debug)]
pub struct NetnsHandle {
    path: PathBuf,
    file: File,
    /// The namespace's cookie (what the eBPF programs key pods by).
    cookie: u64,
}

impl NetnsHandle {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening network namespace {}: {e}", path.display()))
        })?;
        let handle = Self { path: path.to_owned(), file, cookie: 0 };
        let cookie = handle.run(|| {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            crate::intercept::ebpf::netns_cookie(probe.as_fd())
        })??;
        Ok(Self { cookie, ..handle })
    }

    /// The agent's own namespace.
    pub fn own() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` with the current thread inside this namespace, then moves the thread
    /// back. `f` must not block or await: it runs on a runtime thread.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let back = File::open("/proc/thread-self/ns/net")?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::other(format!("entering network namespace {}: {e}", self.path.display()))
        })?;
        let _restore = Restore(back);
        Ok(f())
    }

    /// Lets connections waiting in a closing listener's accept queue move to another
    /// listener of the same `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, 5.14+),
    /// so an agent that stops listening during an upgrade drops none: the new agent's
    /// listener takes them.
    pub fn migrate_requests(&self) -> io::Result<()> {
        self.run(migrate_requests_here)?
    }

    /// Whether the namespace behind `path` is this one (same inode).
    pub fn is(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
}

/// Moves the thread back to its namespace when dropped.
struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.0, CloneFlags::CLONE_NEWNET) {
            // The thread would go on in the pod's namespace: nothing safe remains.
            tracing::error!(error = %e, fd = self.0.as_raw_fd(), "cannot return to the agent's network namespace");
            std::process::abort();
        }
    }
}

/// [`NetnsHandle::migrate_requests`] for the current thread's namespace.
pub fn migrate_requests_here() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", b"1")
}
