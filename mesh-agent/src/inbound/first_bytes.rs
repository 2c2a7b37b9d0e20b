//! What a connection for a local workload carries, found from its first bytes, on
//! the receiving side, where it is decided for good: HTTP is served per request
//! (authorized, identity headers stripped and set); anything else is relayed as bytes.
//!
//! The sending side's detection cannot be trusted here (a client that sends its first
//! byte late, or a peer that is not an agent, sends HTTP in a stream marked opaque),
//! so the wait has no short deadline a client could outwait: the first bytes are
//! awaited for as long as the connection may stay idle, unless the workload speaks
//! first (a server-first protocol, never HTTP). Once the client has sent something,
//! [`sniff`] decides within the detection timeout; a client that stops in the middle
//! of what could still be an HTTP request line is refused ([`First::Undecided`]):
//! relaying it raw would let the rest of the request reach the workload unread.

use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
};

use crate::{
    l7::pool::Version,
    sniff::{self, OpaqueReason, Protocol},
};

/// What the first bytes said.
#[derive(Debug)]
pub enum First {
    /// HTTP: serve it per request, replaying `bytes` first.
    Http(Version, BytesMut),
    /// Not HTTP, or the workload spoke first, or the client closed: relay as bytes,
    /// writing `bytes` to the workload first.
    Opaque(BytesMut, Protocol),
    /// The client stopped in what could still become an HTTP request line.
    Undecided(BytesMut),
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// Reads the client's first bytes (see the module documentation). `workload`, when
/// given, is the connected workload: its speaking first ends the wait. `idle` bounds
/// the wait for the first byte (`None`: no bound).
pub async fn detect<C: AsyncRead + Unpin>(
    client: &mut C,
    workload: Option<&TcpStream>,
    detect_timeout: Duration,
    idle: Option<Duration>,
) -> std::io::Result<First> {
    let mut buf = BytesMut::with_capacity(crate::forward::detect::SNIFF_BUF);
    let workload_spoke = async {
        match workload {
            Some(w) => w.readable().await,
            None => std::future::pending().await,
        }
    };
    let idle_ended = async {
        match idle {
            Some(idle) => tokio::time::sleep(idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        // Cancel-safe: bytes read stay in `buf`.
        read = client.read_buf(&mut buf) => {
            if read? == 0 {
                return Ok(First::Opaque(buf, Protocol::Opaque(OpaqueReason::ClientClosed)));
            }
        }
        _ = workload_spoke => return Ok(First::Opaque(buf, Protocol::Opaque(OpaqueReason::ServerFirst))),
        () = idle_ended => return Ok(First::Idle),
    }
    let protocol =
        sniff::sniff(client, &mut buf, detect_timeout).await.map_err(|sniff::SniffError::Io(e)| e)?;
    Ok(match protocol {
        Protocol::Http1(_) => First::Http(Version::Http1, buf),
        Protocol::Http2 => First::Http(Version::Http2, buf),
        // Still a valid prefix of a request line (or hello) at the deadline.
        Protocol::Opaque(OpaqueReason::Timeout | OpaqueReason::NoClientData) => First::Undecided(buf),
        other => First::Opaque(buf, other),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    const DETECT: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_after_any_delay_is_http() {
        let (mut client, mut peer) = tokio::io::duplex(1024);
        let late = async {
            // Far beyond the detection timeout and the sending side's grace.
            tokio::time::sleep(Duration::from_secs(600)).await;
            peer.write_all(b"GET / HTTP/1.1\r\nx-forwarded-client-cert: forged\r\n\r\n").await.unwrap();
            peer
        };
        let (first, _peer) =
            tokio::join!(detect(&mut client, None, DETECT, Some(Duration::from_secs(3600))), late);
        assert!(matches!(first.unwrap(), First::Http(Version::Http1, _)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_request_line_is_undecided_and_binary_is_opaque() {
        let (mut client, mut peer) = tokio::io::duplex(1024);
        peer.write_all(b"GET /a").await.unwrap();
        let first = detect(&mut client, None, DETECT, None).await.unwrap();
        assert!(matches!(first, First::Undecided(b) if &b[..] == b"GET /a"));

        let (mut client, mut peer) = tokio::io::duplex(1024);
        peer.write_all(b"\x00\x01binary").await.unwrap();
        let first = detect(&mut client, None, DETECT, None).await.unwrap();
        assert!(
            matches!(first, First::Opaque(b, Protocol::Opaque(OpaqueReason::Unrecognized)) if &b[..] == b"\x00\x01binary")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_ends_at_the_idle_timeout_and_a_close_is_opaque() {
        let (mut client, _peer) = tokio::io::duplex(1024);
        let first = detect(&mut client, None, DETECT, Some(Duration::from_secs(60))).await.unwrap();
        assert!(matches!(first, First::Idle));

        let (mut client, peer) = tokio::io::duplex(1024);
        drop(peer);
        let first = detect(&mut client, None, DETECT, None).await.unwrap();
        assert!(
            matches!(first, First::Opaque(b, Protocol::Opaque(OpaqueReason::ClientClosed)) if b.is_empty())
        );
    }

    #[tokio::test]
    async fn a_workload_that_speaks_first_ends_the_wait() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let workload = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        server_side.write_all(b"220 smtp ready\r\n").await.unwrap();
        let (mut client, _peer) = tokio::io::duplex(1024);
        let first = detect(&mut client, Some(&workload), DETECT, None).await.unwrap();
        assert!(matches!(first, First::Opaque(_, Protocol::Opaque(OpaqueReason::ServerFirst))));
    }
}
