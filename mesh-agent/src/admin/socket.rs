//! The admin unix socket: where requests that change the agent are served.
//!
//! Only the agent's own user (root in practice) may reach it: the socket is made
//! in a directory of mode 0700 owned by that user (created if missing; an existing
//! one that others could enter is refused, never changed, since it may be shared
//! like `/run`), the socket itself is mode 0600, and each connection's peer
//! credentials are checked again. The file is removed when the agent stops.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

/// Why the admin socket could not be made safe; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--admin-socket (MESH_ADMIN_SOCKET) {0}: must be an absolute path to a file in a directory")]
    NotAbsolute(PathBuf),
    #[error("--admin-socket (MESH_ADMIN_SOCKET): creating directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(
        "--admin-socket (MESH_ADMIN_SOCKET): directory {path} is mode {mode:04o} owned by uid {owner}; the \
         admin socket needs a directory only uid {uid} can enter (0700, owned by it): give it a directory \
         of its own such as /run/mesh, or fix this one with chmod 0700"
    )]
    UnsafeDir { path: PathBuf, mode: u32, owner: u32, uid: u32 },
    #[error("--admin-socket (MESH_ADMIN_SOCKET): {path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("--admin-socket (MESH_ADMIN_SOCKET) {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound admin socket; the file is removed on drop.
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
    /// (device, inode) of the socket file this agent made: only that one is removed.
    made: (u64, u64),
    listener: UnixListener,
}

impl AdminSocket {
    /// Makes `path`'s directory safe (or refuses), clears a stale socket left by a
    /// killed agent, binds, and restricts the socket to mode 0600.
    pub fn bind(path: &Path) -> Result<AdminSocket, SocketError> {
        let io_err = |source| SocketError::Io { path: path.to_owned(), source };
        let dir = match path.parent() {
            Some(dir) if path.is_absolute() && path.file_name().is_some() && dir != Path::new("") => dir,
            _ => return Err(SocketError::NotAbsolute(path.to_owned())),
        };
        let uid = nix::unistd::geteuid().as_raw();
        secure_dir(dir, uid)?;
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    // An upgrade: the new agent starts beside the draining one and takes
                    // the socket over (the old one removes only the file it made).
                    warn!(path = %path.display(), "another agent serves this admin socket; taking it over (upgrade)");
                } else {
                    info!(path = %path.display(), "removing the stale admin socket of an earlier agent");
                }
                fs::remove_file(path).map_err(io_err)?;
            }
            Ok(_) => return Err(SocketError::NotASocket { path: path.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let meta = fs::symlink_metadata(path).map_err(io_err)?;
        Ok(AdminSocket { path: path.to_owned(), made: (meta.dev(), meta.ino()), listener })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection from the agent's own user (or root); others are dropped
    /// with a warning.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        let uid = nix::unistd::geteuid().as_raw();
        loop {
            let (stream, _) = self.listener.accept().await?;
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == uid || cred.uid() == 0 => return Ok(stream),
                Ok(cred) => {
                    warn!(peer_uid = cred.uid(), pid = ?cred.pid(), "admin socket: refused a peer of another user")
                }
                Err(e) => warn!(error = %e, "admin socket: cannot read the peer's credentials; refused"),
            }
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // Remove only the file this agent made (a successor may have replaced it).
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.made
            && let Err(e) = fs::remove_file(&self.path)
        {
            warn!(path = %self.path.display(), error = %e, "could not remove the admin socket");
        }
    }
}

/// Creates `dir` (mode 0700) if missing; accepts an existing one only if `uid` owns
/// it and nobody else may enter it.
fn secure_dir(dir: &Path, uid: u32) -> Result<(), SocketError> {
    if !dir.exists() {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)
                .map_err(|source| SocketError::CreateDir { path: parent.to_owned(), source })?;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {
                // The umask may have taken bits away, never added any; set exactly 0700.
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(|source| SocketError::CreateDir { path: dir.to_owned(), source })?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(SocketError::CreateDir { path: dir.to_owned(), source }),
        }
    }
    let meta =
        fs::symlink_metadata(dir).map_err(|source| SocketError::Io { path: dir.to_owned(), source })?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != uid || mode & 0o077 != 0 {
        return Err(SocketError::UnsafeDir { path: dir.to_owned(), mode, owner: meta.uid(), uid });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-admin-socket-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn makes_a_private_directory_and_socket_and_removes_the_socket_on_drop() {
        let base = scratch("private");
        let path = base.join("run/mesh/agent.sock");
        let socket = AdminSocket::bind(&path).unwrap();
        let dir_mode = fs::metadata(base.join("run/mesh")).unwrap().mode() & 0o777;
        let sock_mode = fs::symlink_metadata(&path).unwrap().mode() & 0o777;
        assert_eq!((dir_mode, sock_mode), (0o700, 0o600));
        // Served: a second agent on the same path (an upgrade) takes it over, and the
        // first, when it stops, leaves the new one's socket alone.
        let next = AdminSocket::bind(&path).expect("the new agent takes the socket over");
        drop(socket);
        assert!(path.exists(), "the old agent removed the new agent's socket");
        assert!(tokio::net::UnixStream::connect(&path).await.is_ok(), "the new agent's socket answers");
        drop(next);
        assert!(!path.exists(), "the socket file outlived the agent");
        fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_never_another_file() {
        let base = scratch("stale");
        let path = base.join("mesh/agent.sock");
        drop(AdminSocket::bind(&path).unwrap());
        // A killed agent leaves its socket behind: bind it without serving it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        drop(AdminSocket::bind(&path).expect("a stale socket is replaced"));
        fs::write(&path, "not a socket").unwrap();
        let e = AdminSocket::bind(&path).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
        fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn refuses_a_directory_others_may_enter_and_leaves_it_alone() {
        let base = scratch("shared");
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        let e = AdminSocket::bind(&base.join("agent.sock")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SocketError::UnsafeDir { mode: 0o755, .. }), "{msg}");
        assert!(msg.contains("--admin-socket") && msg.contains("0755"), "{msg}");
        assert_eq!(fs::metadata(&base).unwrap().mode() & 0o777, 0o755, "an existing directory was changed");
        assert!(!base.join("agent.sock").exists());
        let e = AdminSocket::bind(Path::new("agent.sock")).unwrap_err();
        assert!(matches!(e, SocketError::NotAbsolute(_)), "{e}");
        fs::remove_dir_all(&base).unwrap();
    }
}
