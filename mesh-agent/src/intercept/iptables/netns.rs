//! Which network namespace the tools program: the caller's own, or another one
//! named by a path (a pod's `/var/run/netns/NAME` or `/proc/PID/ns/net`).
//!
//! For another namespace, the namespace file is opened and checked once, and each
//! tool is started in it: the child calls `setns(2)` between fork and exec. No
//! thread of the agent ever changes namespace, and no `nsenter` binary is needed.
//! Holding the file open keeps the namespace alive while its tables are written.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::IptablesError;

/// The network namespace whose tables a call programs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Netns {
    /// The calling process's own: the agent on a host, or a pod's init container.
    Current,
    /// Another one, by a path that names it: `/var/run/netns/NAME` (`ip netns`,
    /// CNI runtimes) or `/proc/PID/ns/net`.
    Path(PathBuf),
}

impl Netns {
    /// The namespace at `path`.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        Netns::Path(path.into())
    }

    /// Opens the namespace for the tools: `None` for the current one.
    pub(super) fn open(&self) -> Result<Option<Arc<NetnsFile>>, IptablesError> {
        match self {
            Netns::Current => Ok(None),
            Netns::Path(path) => NetnsFile::open(path).map(|f| Some(Arc::new(f))),
        }
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Netns::Current => f.write_str("the current network namespace"),
            Netns::Path(p) => write!(f, "network namespace {}", p.display()),
        }
    }
}

/// An open network namespace file, checked to be one.
#[derive(Debug)]
pub(super) struct NetnsFile {
    path: PathBuf,
    file: File,
}

impl NetnsFile {
    fn open(path: &Path) -> Result<Self, IptablesError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                IptablesError::NetnsGone { path: path.to_owned() }
            } else {
                IptablesError::Netns { path: path.to_owned(), reason: format!("cannot open it: {source}") }
            }
        })?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor,
        // which `file` keeps open for the duration of the call.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            let what = if kind < 0 { "not a namespace file" } else { "a namespace of another kind" };
            return Err(IptablesError::Netns {
                path: path.to_owned(),
                reason: format!(
                    "{what}; expected a network namespace such as /var/run/netns/NAME or /proc/PID/ns/net"
                ),
            });
        }
        Ok(NetnsFile { path: path.to_owned(), file })
    }

    /// The path it was opened from.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `command`'s child enter this namespace before it execs.
    pub(super) fn enter_in_child(self: &Arc<Self>, command: &mut Command) {
        let ns = Arc::clone(self);
        let fd: RawFd = ns.file.as_raw_fd();
        // SAFETY: between fork and exec the child makes one async-signal-safe
        // call, setns(2), on a descriptor that `ns` (moved into the closure, and
        // so alive in the parent until the command is dropped) keeps open; the
        // child's copy is closed by O_CLOEXEC when it execs.
        unsafe {
            command.pre_exec(move || {
                let _keep = &ns;
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
