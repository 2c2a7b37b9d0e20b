//! Accepting TLS connections for tonic, with bounded handshakes.
//!
//! Handshakes run on tasks of their own, so a slow or silent client delays nobody
//! else; at most [`AcceptLimits::handshakes`] run at once (more connections are
//! closed at once) and each has [`AcceptLimits::handshake_timeout`] to finish. Done
//! connections go to tonic through a small bounded queue; a handshake task holds
//! its slot until tonic has taken its connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bounds on the TLS handshakes in progress.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Handshakes in progress at most; connections beyond are closed at once.
    pub handshakes: usize,
    /// Time a client has to complete its handshake.
    pub handshake_timeout: Duration,
}

impl Default for AcceptLimits {
    fn default() -> AcceptLimits {
        AcceptLimits { handshakes: 256, handshake_timeout: Duration::from_secs(10) }
    }
}

/// A TLS connection as tonic sees it: a byte stream that knows its TCP addresses (so
/// `Request::remote_addr` works as on plain TCP).
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener` until `shutdown` and yields the connections whose TLS
/// handshake with `config` completed.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    let in_progress = Arc::new(Semaphore::new(limits.handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, typically: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a gRPC connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = in_progress.clone().try_acquire_owned() else {
                crate::metrics::tls_handshake_failed();
                tracing::debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let info = TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: Some(peer) };
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx.send(Ok(TlsConn { inner, info })).await;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::tls_handshake_failed();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        crate::metrics::tls_handshake_failed();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
