//! The agent's own upstream sockets.
//!
//! Every socket the agent opens carries its mark (`SO_MARK`), which the iptables
//! chains return on (together with a match a workload cannot set, see
//! `intercept::iptables`); the eBPF programs tell the agent's connects apart by its
//! cgroup. A workload served in a network namespace of its own (a pod) is dialled
//! from inside that namespace ([`SocketFactory::in_netns`]): its upstream connections
//! carry the pod's own source address, as they would without the mesh, and delivery
//! to the pod's own application arrives over the pod's loopback, which inbound
//! capture leaves alone.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::workload::netns::NetnsHandle;

/// Opens marked TCP connections, in the agent's namespace or a workload's.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    mark: u32,
    netns: Option<Arc<NetnsHandle>>,
}

impl SocketFactory {
    pub fn new(mark: u32) -> Self {
        Self { mark, netns: None }
    }

    /// The same factory making its sockets inside `netns`.
    pub fn in_netns(&self, netns: Arc<NetnsHandle>) -> Self {
        Self { mark: self.mark, netns: Some(netns) }
    }

    /// The mark put on every socket.
    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// The namespace sockets are made in, when not the agent's own.
    pub fn netns(&self) -> Option<&Arc<NetnsHandle>> {
        self.netns.as_ref()
    }

    /// A new TCP socket for `domain`, in this factory's namespace.
    pub fn socket(&self, domain: Domain) -> io::Result<Socket> {
        let make = || Socket::new(domain, Type::STREAM, Some(Protocol::TCP));
        match &self.netns {
            Some(ns) => ns.run(make)?,
            None => make(),
        }
    }

    /// A non-blocking UDP socket for `domain` carrying the agent's mark, in this
    /// factory's namespace: the DNS listeners (in a workload's namespace) and the
    /// DNS forwarder's upstream sockets (in the agent's).
    pub fn udp(&self, domain: Domain) -> io::Result<Socket> {
        let make = || Socket::new(domain, Type::DGRAM, Some(Protocol::UDP));
        let socket = match &self.netns {
            Some(ns) => ns.run(make)?,
            None => make(),
        }?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    /// Connects to `addr` from a socket carrying the agent's mark, within `timeout`.
    /// Mark 0 is no mark, and is not set: setting any mark needs CAP_NET_ADMIN, which
    /// a process that intercepts nothing (the east-west gateway) does not have.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let socket = self.socket(Domain::for_address(addr))?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(timeout, socket.connect(addr)).await {
            Ok(res) => res,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )),
        }
    }
}
