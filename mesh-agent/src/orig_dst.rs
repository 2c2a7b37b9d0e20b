//! Recovering where an intercepted connection was going.
//!
//! Both interception modes answer the same socket option on the accepted socket:
//! under iptables the kernel's conntrack does, in eBPF mode the `cgroup/getsockopt`
//! program does. So the agent has one code path, and a seam ([`OrigDstLookup`]) so
//! tests of the proxy can run without root.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// How the listener learns an accepted connection's original destination.
pub trait OrigDstLookup: Send + Sync + 'static {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// `getsockopt(SO_ORIGINAL_DST)` / `getsockopt(IP6T_SO_ORIGINAL_DST)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOption;

impl OrigDstLookup for SocketOption {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let local = stream.local_addr()?;
        let dst = if local.is_ipv4() {
            let sin = getsockopt(stream, sockopt::OriginalDst)?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        } else {
            let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            // A dual-stack workload socket that dialled an IPv4-mapped address.
            match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            }
        };
        Ok(dst)
    }
}

/// Always answers the same destination: for tests that exercise the proxy without
/// any interception in place.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub SocketAddr);

impl OrigDstLookup for Fixed {
    fn orig_dst(&self, _stream: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

/// The accepted socket's own local address: what the eBPF `sk_lookup` capture keeps
/// (it hands the connection to the listener without rewriting its destination).
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalAddr;

impl OrigDstLookup for LocalAddr {
    fn orig_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        stream.local_addr().map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
    }
}
