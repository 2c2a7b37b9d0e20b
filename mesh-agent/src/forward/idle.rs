//! The idle timeout of byte relays (opaque TCP and TLS, relayed directly or through
//! the tunnel): a relay that moved no byte in either direction for
//! `--tcp-idle-timeout` ends, so a peer that went silent or vanished without a FIN
//! does not hold a task and two sockets forever.
//!
//! The data path pays one relaxed store per read or write ([`Marked`] sets a flag);
//! one timer per relay, waking every quarter of the timeout, takes the flag
//! ([`watch`]). A relay therefore ends between the timeout and a quarter more after
//! its last byte.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// Default idle timeout (Envoy's `tcp_proxy` default).
pub const DEFAULT: Duration = Duration::from_secs(3600);

/// What the connection's record and log line say when the relay ended idle.
pub const ERROR: &str = "idle timeout";

/// How long [`close`] waits for the peers to close their halves too.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Whether bytes moved through a relay since the watch last looked.
#[derive(Debug, Default)]
pub struct Activity(AtomicBool);

impl Activity {
    pub(super) fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// IO that marks `activity` whenever bytes are read from or written to it. Wrapping
/// one side of a relay is enough: every byte relayed is read from it or written to it.
#[derive(Debug)]
pub struct Marked<'a, T> {
    inner: T,
    activity: &'a Activity,
}

impl<'a, T> Marked<'a, T> {
    pub fn new(inner: T, activity: &'a Activity) -> Self {
        Marked { inner, activity }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> crate::copy::Chunked for Marked<'_, T> {}

impl<T: AsyncRead + Unpin> AsyncRead for Marked<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.mark();
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Marked<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(1..)) = written {
            self.activity.mark();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(1..)) = written {
            self.activity.mark();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Drives `relay` to its end (`Some` of its output), or until `activity` saw no byte
/// for `timeout` (`None`: the caller closes both sides, see [`close`]). `None` as
/// the timeout: the relay is never cut.
pub async fn watch<F: Future>(relay: F, activity: &Activity, timeout: Option<Duration>) -> Option<F::Output> {
    let Some(timeout) = timeout else { return Some(relay.await) };
    let period = (timeout / 4).max(Duration::from_millis(1));
    let mut quiet_since = Instant::now();
    let tick = tokio::time::sleep(period);
    tokio::pin!(relay, tick);
    loop {
        tokio::select! {
            biased;
            out = relay.as_mut() => return Some(out),
            () = tick.as_mut() => {
                let now = Instant::now();
                // Bytes moved at some point since the last look: count from now.
                if activity.take() {
                    quiet_since = now;
                } else if now.duration_since(quiet_since) >= timeout {
                    return None;
                }
                tick.as_mut().reset(now + period);
            }
        }
    }
}

/// Closes both sides of a relay that went idle: shuts down both write halves (FIN,
/// or END_STREAM on a tunnel stream), then reads and discards until both peers have
/// closed theirs, for at most a second, so that neither side is left with a reset
/// for bytes nobody read.
pub async fn close<A, B>(a: &mut A, b: &mut B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::join!(a.shutdown(), b.shutdown());
    let _ = tokio::time::timeout(CLOSE_GRACE, async { tokio::join!(discard(a), discard(b)) }).await;
}

/// Reads until EOF or an error.
async fn discard(from: &mut (impl AsyncRead + Unpin)) {
    // On the heap: this rare path should not grow every relay's future.
    let mut buf = vec![0u8; 512];
    while let Ok(1..) = from.read(&mut buf).await {}
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A relay between two in-memory pipes, watched with [`TIMEOUT`]; returns the
    /// client's and the server's ends and whether the relay ended idle.
    fn relay() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<bool>) {
        let (client, mut near) = tokio::io::duplex(1024);
        let (mut far, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            let activity = Activity::default();
            let mut marked = Marked::new(&mut near, &activity);
            let copy = tokio::io::copy_bidirectional(&mut marked, &mut far);
            let idle = watch(copy, &activity, Some(TIMEOUT)).await.is_none();
            if idle {
                close(&mut near, &mut far).await;
            }
            idle
        });
        (client, server, task)
    }

    /// Whether `end` reads EOF within twice the timeout.
    async fn eof(end: &mut DuplexStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(tokio::time::timeout(TIMEOUT * 2, end.read(&mut buf)).await, Ok(Ok(0)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_moves_no_byte_ends_after_the_timeout() {
        let (mut client, mut server, task) = relay();
        let start = Instant::now();
        assert!(eof(&mut client).await, "the client sees a clean close");
        assert!(eof(&mut server).await, "the server sees a clean close");
        let waited = start.elapsed();
        assert!(waited >= TIMEOUT && waited <= TIMEOUT + TIMEOUT / 4, "ended after {waited:?}");
        // Closing both ends lets the relay's close finish at once.
        drop((client, server));
        assert!(task.await.unwrap(), "ended idle");
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_with_traffic_every_half_timeout_is_not_cut() {
        let (mut client, mut server, task) = relay();
        for i in 0..10u8 {
            tokio::time::sleep(TIMEOUT / 2).await;
            // Both directions in turn: either one keeps the relay alive.
            let (from, to) = if i % 2 == 0 { (&mut client, &mut server) } else { (&mut server, &mut client) };
            from.write_all(&[i]).await.unwrap();
            assert_eq!(to.read_u8().await.unwrap(), i, "the relay still carries bytes after {i} pauses");
        }
        assert!(!task.is_finished());
        // Then silence: cut after the timeout from the last byte.
        let last = Instant::now();
        assert!(eof(&mut client).await);
        let waited = last.elapsed();
        assert!(waited >= TIMEOUT && waited <= TIMEOUT + TIMEOUT / 4, "ended after {waited:?}");
        drop(server);
        assert!(task.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_that_ends_by_itself_is_not_cut_and_none_never_cuts() {
        let (mut client, mut server, task) = relay();
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        assert!(eof(&mut client).await && eof(&mut server).await);
        assert!(!task.await.unwrap(), "ended by itself");

        let activity = Activity::default();
        let start = Instant::now();
        let out = watch(tokio::time::sleep(TIMEOUT * 10), &activity, None).await;
        assert_eq!((out, start.elapsed()), (Some(()), TIMEOUT * 10));
    }

    #[tokio::test(start_paused = true)]
    async fn close_gives_up_on_a_peer_that_keeps_its_half_open() {
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let start = Instant::now();
        let closing = tokio::spawn(async move { close(&mut near, &mut far).await });
        assert!(eof(&mut client).await && eof(&mut server).await, "both are told");
        // Neither closes its own half: the grace runs out.
        closing.await.unwrap();
        assert_eq!(start.elapsed(), CLOSE_GRACE);
        drop((client, server));
    }
}
