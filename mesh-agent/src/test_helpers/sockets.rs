//! Sockets as the tests need them: bounded accepts, the original destination of a
//! redirected connection, connections carrying a mark (from this process, or from a
//! child in a given cgroup or group), IPv6-only listeners.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
    sockopt,
};
use nix::sys::time::TimeVal;

/// Waits up to `patience` for a connection on `listener`.
pub(crate) fn accept_within(listener: &TcpListener, patience: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + patience;
    loop {
        match listener.accept() {
            Ok(conn) => return Some(conn),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` of an accepted socket.
pub(crate) fn original_dst(stream: &TcpStream) -> SocketAddr {
    let fd = stream.as_raw_fd();
    if stream.local_addr().unwrap().is_ipv4() {
        let mut sa = libc::sockaddr_in {
            sin_family: 0,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket borrowed from `stream`; `sa` and `len`
        // are valid for writes and `len` is `sa`'s size.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len)
        };
        assert_eq!(rc, 0, "SO_ORIGINAL_DST: {}", io::Error::last_os_error());
        assert_eq!(i32::from(sa.sin_family), libc::AF_INET);
        SocketAddr::V4(SocketAddrV4::new(u32::from_be(sa.sin_addr.s_addr).into(), u16::from_be(sa.sin_port)))
    } else {
        let mut sa = libc::sockaddr_in6 {
            sin6_family: 0,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
            sin6_scope_id: 0,
        };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as above, for a `sockaddr_in6`.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len)
        };
        assert_eq!(rc, 0, "IP6T_SO_ORIGINAL_DST: {}", io::Error::last_os_error());
        assert_eq!(i32::from(sa.sin6_family), libc::AF_INET6);
        SocketAddr::V6(SocketAddrV6::new(sa.sin6_addr.s6_addr.into(), u16::from_be(sa.sin6_port), 0, 0))
    }
}

/// Connects with `SO_MARK` set, as the agent's own sockets do.
pub(crate) fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd: OwnedFd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::Mark, &mark)?;
    // Bounds a connect that is never answered.
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0))?;
    let connected = match dst {
        SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    match connected {
        Ok(()) => {}
        // A signal to this (test) process interrupted the wait, not the connect, which
        // goes on in the kernel: wait for its outcome.
        Err(nix::errno::Errno::EINTR) => {
            let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let ready = loop {
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
                match n {
                    -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
                    -1 => return Err(io::Error::last_os_error()),
                    n => break n,
                }
            };
            if ready == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            let error = socket::getsockopt(&fd, sockopt::SocketError)?;
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error));
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from(fd))
}

/// An IPv6-only listener, so it can share a port with an IPv4 one.
pub(crate) fn listen_v6only(addr: SocketAddrV6) -> TcpListener {
    let fd = socket::socket(AddressFamily::Inet6, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
    socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(addr)).unwrap();
    socket::listen(&fd, Backlog::new(16).unwrap()).unwrap();
    TcpListener::from(fd)
}

/// Who opens a connection made by [`connect_in_child`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Opener<'a> {
    /// `SO_MARK` on the socket.
    pub(crate) mark: Option<u32>,
    /// The cgroup (directory) the process joins before it creates the socket.
    pub(crate) cgroup: Option<&'a Path>,
    /// The gid the process takes before it creates the socket (uid stays root,
    /// so setting the mark is still allowed).
    pub(crate) gid: Option<u32>,
}

/// Connects to `dst` from a child process, which exits once connected (closing
/// the connection): a socket belongs to the cgroup of the process that created
/// it and carries its credentials, so telling the agent's sockets from a
/// workload's takes another process. The child inherits the calling thread's
/// network namespace. Fails with the child's `connect(2)` error.
pub(crate) fn connect_in_child(dst: SocketAddr, opener: Opener<'_>) -> io::Result<()> {
    let procs = match opener.cgroup {
        Some(dir) => Some(std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?),
        None => None,
    };
    let addr = SockaddrStorage::from(dst);
    let domain = if dst.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let mark = opener.mark;
    let mut command = Command::new("true");
    command.stdin(Stdio::null());
    if let Some(gid) = opener.gid {
        command.gid(gid);
    }
    // SAFETY: between fork and exec the child makes only async-signal-safe
    // calls (write, socket, setsockopt, connect) on values prepared before the
    // fork, and allocates nothing (`last_os_error` holds a plain errno). The
    // socket is left without close-on-exec so the connection lasts until `true`
    // exits.
    unsafe {
        command.pre_exec(move || {
            let fail = || Err(io::Error::last_os_error());
            if let Some(procs) = &procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return fail();
            }
            let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
            if fd < 0 {
                return fail();
            }
            if let Some(mark) = mark {
                let size = std::mem::size_of::<u32>() as libc::socklen_t;
                if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, (&raw const mark).cast(), size) != 0
                {
                    return fail();
                }
            }
            // Bounds a connect that is never answered.
            let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
            let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, (&raw const timeout).cast(), size)
                != 0
            {
                return fail();
            }
            if libc::connect(fd, addr.as_ptr(), addr.len()) != 0 {
                return fail();
            }
            Ok(())
        });
    }
    let status = command.status()?;
    if status.success() { Ok(()) } else { Err(io::Error::other(format!("`true` exited with {status}"))) }
}
