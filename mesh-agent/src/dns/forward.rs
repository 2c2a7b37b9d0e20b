//! Queries for names outside the registry go to the node's resolver unchanged,
//! over the transport they came on, and its answer comes back unchanged: a
//! truncated UDP answer stays truncated, so the client asks again over TCP and that
//! query is forwarded over TCP.
//!
//! Every upstream socket is the agent's own (made in the agent's namespace, with its
//! mark and from its cgroup), so interception never takes it back to the agent.
//! Each UDP query uses a fresh socket on a random port, connected to the upstream,
//! and only a datagram that answers the question (ID and question checked) is
//! relayed: a spoofed one is not.

use std::{io, net::SocketAddr, time::Duration};

use socket2::Domain;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UdpSocket,
};

use super::{DnsError, answer};
use crate::socket::SocketFactory;

/// The largest DNS message (UDP datagram or TCP frame).
pub const MAX_MESSAGE: usize = u16::MAX as usize;

/// Sends `query` over UDP to each upstream in turn until one answers it within
/// `timeout`; returns that answer.
pub async fn udp(
    query: &[u8],
    upstreams: &[SocketAddr],
    sockets: &SocketFactory,
    timeout: Duration,
) -> Result<Vec<u8>, DnsError> {
    first_answer(upstreams, timeout, |upstream| udp_once(query, upstream, sockets)).await
}

/// Sends `query` over TCP (length-prefixed, RFC 1035 4.2.2) to each upstream in
/// turn until one answers it within `timeout`.
pub async fn tcp(
    query: &[u8],
    upstreams: &[SocketAddr],
    sockets: &SocketFactory,
    timeout: Duration,
) -> Result<Vec<u8>, DnsError> {
    first_answer(upstreams, timeout, |upstream| tcp_once(query, upstream, sockets, timeout)).await
}

/// Asks each upstream in turn, each within `timeout`, until one gives an answer;
/// otherwise the last upstream's failure.
async fn first_answer<F, Fut>(
    upstreams: &[SocketAddr],
    timeout: Duration,
    mut ask: F,
) -> Result<Vec<u8>, DnsError>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<Vec<u8>>>,
{
    let mut last = DnsError::NoUpstream;
    for &upstream in upstreams {
        match tokio::time::timeout(timeout, ask(upstream)).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(source)) => last = DnsError::Upstream { upstream, source },
            Err(_) => last = DnsError::Timeout { upstream, timeout },
        }
    }
    Err(last)
}

/// One UDP exchange; datagrams that do not answer `query` (another ID or question,
/// perhaps spoofed) are ignored until one does.
async fn udp_once(query: &[u8], upstream: SocketAddr, sockets: &SocketFactory) -> io::Result<Vec<u8>> {
    let socket = sockets.udp(Domain::for_address(upstream))?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        if answer::answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// One TCP exchange on a connection of its own; a reply that does not answer
/// `query` is an error (the connection carried nothing else).
async fn tcp_once(
    query: &[u8],
    upstream: SocketAddr,
    sockets: &SocketFactory,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let mut stream = sockets.connect(upstream, timeout).await?;
    write_frame(&mut stream, query).await?;
    let reply = read_frame(&mut stream).await?.ok_or(io::ErrorKind::UnexpectedEof)?;
    if !answer::answers(query, &reply) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "answer does not match the query"));
    }
    Ok(reply)
}

/// Writes one length-prefixed message.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    w.write_all(&frame).await
}

/// Reads one length-prefixed message; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut message).await?;
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn response_to(query: &[u8], truncated: bool) -> Vec<u8> {
        let mut m = Message::from_vec(query).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.metadata.truncation = truncated;
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn udp_relays_the_matching_answer_and_ignores_strays() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            // A stray datagram first (another ID), then the truncated answer.
            server.send_to(&response_to(&query(7), false), from).await.unwrap();
            server.send_to(&response_to(&buf[..n], true), from).await.unwrap();
        });
        let q = query(42);
        let reply = udp(&q, &[addr], &SocketFactory::new(0), Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply, response_to(&q, true), "relayed unchanged, truncation included");
    }

    #[tokio::test]
    async fn udp_tries_the_next_upstream_after_a_timeout() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&response_to(&buf[..n], false), from).await.unwrap();
        });
        let q = query(1);
        let upstreams = [silent.local_addr().unwrap(), addr];
        let reply = udp(&q, &upstreams, &SocketFactory::new(0), Duration::from_millis(200)).await.unwrap();
        assert_eq!(reply, response_to(&q, false));
        let err = udp(&q, &upstreams[..1], &SocketFactory::new(0), Duration::from_millis(50)).await;
        assert!(matches!(err, Err(DnsError::Timeout { .. })), "{err:?}");
        assert!(matches!(
            udp(&q, &[], &SocketFactory::new(0), Duration::from_millis(50)).await,
            Err(DnsError::NoUpstream)
        ));
    }

    #[tokio::test]
    async fn tcp_forwards_length_prefixed_messages() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let q = read_frame(&mut s).await.unwrap().unwrap();
            write_frame(&mut s, &response_to(&q, false)).await.unwrap();
        });
        let q = query(9);
        let reply = tcp(&q, &[addr], &SocketFactory::new(0), Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply, response_to(&q, false));
    }

    #[tokio::test]
    async fn tcp_refuses_a_reply_to_another_query() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            read_frame(&mut s).await.unwrap().unwrap();
            write_frame(&mut s, &response_to(&query(8), false)).await.unwrap();
        });
        let err = tcp(&query(9), &[addr], &SocketFactory::new(0), Duration::from_secs(5)).await;
        assert!(
            matches!(&err, Err(DnsError::Upstream { source, .. }) if source.kind() == io::ErrorKind::InvalidData),
            "{err:?}"
        );
    }
}
