//! Sockets as the tests need them: bounded accepts, the original destination of a
//! redirected connection, connections carrying a mark, IPv6-only listeners.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt};
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
    match dst {
        SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
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
