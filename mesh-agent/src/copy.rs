//! Bytes both ways between two streams, for the relays that carry a connection
//! through the tunnel (both agents' ends) and the plaintext inbound relay.
//!
//! Two things set it apart from `tokio::io::copy_bidirectional`:
//! - **No copy at a tunnel end.** h2 hands out each received DATA chunk as `Bytes`
//!   and takes `Bytes` to send. A [`Chunked`] stream that can (the tunnel) gives its
//!   own chunks and takes ours as they are, so a byte read from a socket goes to h2
//!   without a memcpy, and a byte from h2 goes straight to the socket's `write`.
//! - **Buffers that fit the connection.** A socket read goes into a fresh region of a
//!   [`BytesMut`] that starts at [`INITIAL`] and doubles while reads fill it (a bulk
//!   transfer) up to [`MAX`], and halves while they use little of it. Thousands of
//!   quiet keep-alive connections then hold about a KiB each, where the fixed 8 KiB
//!   per direction of `copy_bidirectional` held 16, and one bulk stream moves in
//!   256 KiB reads (h2 still frames them; the tunnel's window bounds what is in flight).
//!
//! Half-close is preserved: a direction that reads EOF shuts the other side's write
//! half down (a FIN, or END_STREAM on the tunnel) and the other direction goes on.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// First read size of a direction.
pub const INITIAL: usize = 1024;
/// Largest read size of a direction.
pub const MAX: usize = 256 * 1024;

/// A stream one end of a relay can be. The defaults read into the relay's buffer
/// and write from it; a stream that holds its data as `Bytes` overrides them.
pub trait Chunked: AsyncRead + AsyncWrite + Unpin {
    /// The next received chunk (`None` at EOF). The default reads at most `want`
    /// bytes into `buf`, which the caller hands over empty, and splits them off.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        debug_assert!(buf.is_empty());
        if buf.capacity() < want {
            buf.reserve(want);
        }
        let n =
            ready!(tokio_util::io::poll_read_buf(Pin::new(&mut (&mut *self).take(want as u64)), cx, buf))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(Ok(Some(buf.split().freeze())))
    }

    /// Sends a prefix of `chunk` (at least one byte) and advances it past what went.
    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut *self).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: Chunked + ?Sized> Chunked for &mut T {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        (**self).poll_chunk(cx, buf, want)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        (**self).poll_send_chunk(cx, chunk)
    }
}

impl Chunked for tokio::net::TcpStream {}
impl Chunked for tokio::io::DuplexStream {}

/// Copies `a` to `b` and `b` to `a` until both directions reached EOF (each then
/// shut the other side's write half) or one failed. Returns the bytes copied from
/// `a` to `b` and from `b` to `a`.
pub async fn bidirectional<A: Chunked, B: Chunked>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)> {
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let ab = a_to_b.poll(cx, a, b)?;
        let ba = b_to_a.poll(cx, b, a)?;
        match (ab, ba) {
            (Poll::Ready(up), Poll::Ready(down)) => Poll::Ready(Ok((up, down))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's state.
#[derive(Debug)]
struct Direction {
    buf: BytesMut,
    /// Read, not yet all written.
    chunk: Bytes,
    /// The next read's size.
    want: usize,
    read_done: bool,
    done: bool,
    /// Written since the last flush.
    unflushed: bool,
    copied: u64,
}

impl Default for Direction {
    fn default() -> Self {
        Direction {
            buf: BytesMut::new(),
            chunk: Bytes::new(),
            want: INITIAL,
            read_done: false,
            done: false,
            unflushed: false,
            copied: 0,
        }
    }
}

impl Direction {
    fn poll<R: Chunked, W: Chunked>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<u64>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if !self.chunk.is_empty() {
                let before = self.chunk.len();
                ready!(to.poll_send_chunk(cx, &mut self.chunk))?;
                self.copied += (before - self.chunk.len()) as u64;
                self.unflushed = true;
                continue;
            }
            if self.read_done {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match from.poll_chunk(cx, &mut self.buf, self.want) {
                Poll::Ready(Ok(Some(chunk))) => {
                    self.want = next_size(self.want, chunk.len());
                    self.chunk = chunk;
                }
                Poll::Ready(Ok(None)) => self.read_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what was written.
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The next read's size after a read of `got` bytes with `want` asked for: double
/// when the read filled it, halve when it used under a quarter.
fn next_size(want: usize, got: usize) -> usize {
    if got >= want {
        (want * 2).min(MAX)
    } else if got < want / 4 {
        (want / 2).max(INITIAL)
    } else {
        want
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_with_small_ones() {
        let mut want = INITIAL;
        for _ in 0..20 {
            want = next_size(want, want);
        }
        assert_eq!(want, MAX, "a bulk transfer reaches the largest reads");
        assert_eq!(next_size(MAX, MAX / 2), MAX, "half-full reads keep the size");
        for _ in 0..20 {
            want = next_size(want, 10);
        }
        assert_eq!(want, INITIAL, "small reads bring it back down");
    }

    #[tokio::test]
    async fn copies_both_ways_byte_for_byte_with_half_close_kept() {
        let (mut left, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut right) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..700_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let writer_left = tokio::spawn(async move {
            left.write_all(&up2).await.unwrap();
            left.shutdown().await.unwrap();
            let mut got = Vec::new();
            left.read_to_end(&mut got).await.unwrap();
            got
        });
        // The right end reads everything first: its own direction is still open
        // after the other one ended (half-close), and only then answers.
        let mut got = Vec::new();
        right.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up);
        right.write_all(&down2).await.unwrap();
        right.shutdown().await.unwrap();
        assert_eq!(writer_left.await.unwrap(), down);
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn an_error_on_either_side_ends_the_relay_with_it() {
        let (left, mut a) = tokio::io::duplex(1024);
        let (mut b, right) = tokio::io::duplex(1024);
        drop(right);
        let relay = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        let mut left = left;
        left.write_all(b"hello").await.unwrap();
        let err = relay.await.unwrap().expect_err("writing to a closed peer fails");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
