//! The agent's own upstream sockets.
//!
//! Every socket the agent opens carries its mark (`SO_MARK`). That one fact is what
//! keeps the agent's traffic from being intercepted again, in both modes: the eBPF
//! connect programs skip marked sockets and the iptables chains RETURN on the mark.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Opens marked TCP connections.
#[derive(Clone, Copy, Debug)]
pub struct SocketFactory {
    mark: u32,
}

impl SocketFactory {
    pub fn new(mark: u32) -> Self {
        Self { mark }
    }

    /// The mark put on every socket.
    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Connects to `addr` from a socket carrying the agent's mark, within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_mark(self.mark)?;
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
