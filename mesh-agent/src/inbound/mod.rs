//! The receiving side: connections for the workloads of this node, checked here,
//! where the workload is, whatever way they came.
//!
//! - [`stream`]: a peer agent's CONNECT stream (over mutual TLS, the peer's identity
//!   proven), served per request when it carries HTTP and relayed as bytes
//!   otherwise;
//! - [`plain`]: plaintext arriving from outside the mesh (inbound capture), refused
//!   under `mtls: strict`, authorized as the principal `unauthenticated` under
//!   `permissive`;
//! - direct HTTP from peer agents is [`crate::l7::inbound`]'s, which both of the
//!   above also use for HTTP;
//! - [`first_bytes`]: what a connection carries, decided here and not taken from the
//!   sending side's word.
//!
//! Authorization is [`crate::authz`]'s: every service selecting the workload port
//! must allow. Services' rate limits are [`rate_limit`]'s, applied here too, per
//! calling identity, to every HTTP request that authorization allowed.

pub mod first_bytes;
pub mod plain;
pub mod rate_limit;
pub mod stream;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::forward::idle;

/// How a byte relay to a workload ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from the caller to the workload (`prefix` included).
    pub to_workload: u64,
    /// Bytes from the workload to the caller.
    pub from_workload: u64,
    /// `None` when both sides finished cleanly.
    pub error: Option<RelayEnd>,
}

/// Why a relay did not end cleanly.
#[derive(Debug)]
pub enum RelayEnd {
    /// Either side failed; the caller resets its side (the workload's is reset).
    Failed(std::io::Error),
    /// No byte moved for the idle timeout; both sides were closed.
    Idle,
}

impl RelayEnd {
    pub fn message(&self) -> String {
        match self {
            RelayEnd::Failed(e) => e.to_string(),
            RelayEnd::Idle => idle::ERROR.to_owned(),
        }
    }
}

/// Relays `caller` and `workload` both ways, writing `prefix` (what detection
/// read) to the workload first, until both are done, one fails, or nothing moved
/// for `idle_timeout`.
pub async fn relay<C>(
    caller: &mut C,
    workload: &mut TcpStream,
    prefix: &[u8],
    idle_timeout: Option<Duration>,
) -> Relayed
where
    C: crate::copy::Chunked,
{
    let activity = idle::Activity::default();
    // Every byte relayed goes through the workload's socket: marked there, counted there.
    let mut counted = Counted::new(idle::Marked::new(&mut *workload, &activity));
    let (read, written) = (counted.read.clone(), counted.written.clone());
    let copied = {
        let relay = async {
            if !prefix.is_empty() {
                counted.write_all(prefix).await?;
            }
            crate::copy::bidirectional(caller, &mut counted).await
        };
        idle::watch(relay, &activity, idle_timeout).await
    };
    drop(counted);
    let error = match copied {
        Some(Ok(_)) => None,
        Some(Err(e)) => {
            crate::forward::reset(workload);
            Some(RelayEnd::Failed(e))
        }
        None => {
            idle::close(caller, workload).await;
            Some(RelayEnd::Idle)
        }
    };
    Relayed {
        to_workload: written.load(Ordering::Relaxed),
        from_workload: read.load(Ordering::Relaxed),
        error,
    }
}

/// A stream that counts the bytes read and written through it.
pub(crate) struct Counted<T> {
    inner: T,
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub fn new(inner: T) -> Self {
        Counted { inner, read: Default::default(), written: Default::default() }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> crate::copy::Chunked for Counted<T> {}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
