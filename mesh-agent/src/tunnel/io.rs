//! One CONNECT stream as a byte stream: [`TunnelStream`] turns an h2 stream pair into
//! tokio's `AsyncRead + AsyncWrite`, so the rest of the agent copies bytes through a
//! tunnel exactly as through a TCP socket.
//!
//! Flow control is where h2 differs from TCP: the peer may send only as much as we
//! have released, and we may send only as much as it granted. Reads release window
//! as the caller consumes bytes (a slow reader slows the sender, nothing piles up);
//! writes wait for granted capacity before handing data to h2.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest write handed to h2 at once; bounds what one stream buffers ahead of
/// the peer's window.
const MAX_WRITE: usize = 256 * 1024;

/// A bidirectional byte stream over one HTTP/2 CONNECT stream, on either side of the
/// tunnel. Shutting down the write half sends END_STREAM (the peer reads EOF); a
/// RST_STREAM from the peer surfaces as an `io::ErrorKind::ConnectionReset` error,
/// except RST_STREAM(NO_ERROR) after the peer's END_STREAM was read: the peer sent
/// its whole answer and wants no more (RFC 9113 §8.1), so what is still written is
/// dropped without error. Dropping it before both ends closed resets the stream.
#[derive(Debug)]
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read by the caller.
    pending: Bytes,
    write_closed: bool,
    /// The peer's END_STREAM was read.
    read_eof: bool,
    received: u64,
    sent: u64,
    /// The stream's place on its pooled connection (sending side only).
    _lease: Option<super::client::StreamLease>,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelStream {
        TunnelStream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            read_eof: false,
            received: 0,
            sent: 0,
            _lease: None,
        }
    }

    /// The same stream holding `lease` until it is dropped.
    pub(crate) fn with_lease(mut self, lease: super::client::StreamLease) -> TunnelStream {
        self._lease = Some(lease);
        self
    }

    /// Bytes read from the peer so far.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Bytes accepted for sending to the peer so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Aborts the stream with RST_STREAM(CANCEL), telling the peer the bytes it has
    /// seen are not the whole story (an EOF would claim they were).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// Whether the peer finished the stream: its END_STREAM read, then a reset
    /// with NO_ERROR (a server done answering, asking the client to stop sending).
    fn finished_by_peer(&mut self, cx: &mut Context<'_>) -> bool {
        self.read_eof && matches!(self.send.poll_reset(cx), Poll::Ready(Ok(h2::Reason::NO_ERROR)))
    }

    /// The error to report after h2 refused a send: the peer's reset reason if it
    /// reset the stream, else `err`.
    fn send_error(&mut self, cx: &mut Context<'_>, err: Option<h2::Error>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => err.map_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe), h2_to_io),
        }
    }
}

/// An h2 error as the I/O error a socket would have given: resets and GOAWAYs become
/// `ConnectionReset`, transport errors stay what they were.
pub(crate) fn h2_to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err.into_io().unwrap_or_else(|| io::Error::other("h2 transport error"));
    }
    if err.is_reset() || err.is_go_away() || err.is_remote() {
        return io::Error::new(io::ErrorKind::ConnectionReset, err);
    }
    io::Error::other(err)
}

fn reset_error(reason: h2::Reason) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, format!("tunnel stream reset by peer: {reason}"))
}

impl AsyncRead for TunnelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    this.read_eof = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        this.received += n as u64;
        // Only now may the peer send these bytes' worth again. A failure means the
        // stream is gone, which the next poll_data reports.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel write half is shut")));
        }
        let granted = match ready!(this.poll_grant(cx, buf.len())) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(this.refused_write(cx, e, buf.len())),
        };
        if let Err(e) = this.send.send_data(Bytes::copy_from_slice(&buf[..granted]), false) {
            return Poll::Ready(this.refused_write(cx, Some(e), buf.len()));
        }
        this.sent += granted as u64;
        Poll::Ready(Ok(granted))
    }

    /// hyper hands a response's head and body chunks over as one vectored write; taking
    /// them so (one copy into one DATA chunk) spares hyper from first flattening them
    /// into a buffer of its own, a copy of every body byte.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel write half is shut")));
        }
        let granted = match ready!(this.poll_grant(cx, total)) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(this.refused_write(cx, e, total)),
        };
        let mut data = bytes::BytesMut::with_capacity(granted);
        for b in bufs {
            let room = granted - data.len();
            if room == 0 {
                break;
            }
            data.extend_from_slice(&b[..b.len().min(room)]);
        }
        if let Err(e) = this.send.send_data(data.freeze(), false) {
            return Poll::Ready(this.refused_write(cx, Some(e), total));
        }
        this.sent += granted as u64;
        Poll::Ready(Ok(granted))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// h2's connection task writes and flushes frames as soon as they are queued.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        // Give back any capacity reserved by an unfinished write.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) if this.finished_by_peer(cx) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(this.send_error(cx, Some(e)))),
        }
    }
}

impl TunnelStream {
    /// Waits until the peer's window lets at least one of `len` bytes go, and says
    /// how many may (at most [`MAX_WRITE`]). `Err` carries h2's refusal, if it gave one.
    fn poll_grant(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<Result<usize, Option<h2::Error>>> {
        let want = len.min(MAX_WRITE);
        self.send.reserve_capacity(want);
        // Capacity left over from an earlier grant is usable at once; poll_capacity
        // wakes only when the grant grows.
        Poll::Ready(match self.send.capacity() {
            0 => match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(n)) => Ok(n.min(want)),
                Some(Err(e)) => Err(Some(e)),
                None => Err(None),
            },
            n => Ok(n.min(want)),
        })
    }

    /// The result of a write h2 refused: dropped as written if the peer finished the
    /// stream (see [`TunnelStream::finished_by_peer`]), else the error.
    fn refused_write(
        &mut self,
        cx: &mut Context<'_>,
        err: Option<h2::Error>,
        len: usize,
    ) -> io::Result<usize> {
        if self.finished_by_peer(cx) {
            return Ok(len);
        }
        Err(self.send_error(cx, err))
    }
}

/// The tunnel hands out h2's own chunks and sends the relay's as they are: no copy
/// on either side of a relay through it (see [`crate::copy`]).
impl crate::copy::Chunked for TunnelStream {
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut bytes::BytesMut,
        _want: usize,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let chunk = if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    self.read_eof = true;
                    return Poll::Ready(Ok(None));
                }
            }
        } else {
            std::mem::take(&mut self.pending)
        };
        self.received += chunk.len() as u64;
        // The relay writes this chunk out before it asks for the next one, so at most
        // one chunk per stream is held beyond the window.
        let _ = self.recv.flow_control().release_capacity(chunk.len());
        Poll::Ready(Ok(Some(chunk)))
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel write half is shut")));
        }
        let len = chunk.len();
        let granted = match ready!(self.poll_grant(cx, len)) {
            Ok(n) => n,
            Err(e) => return Poll::Ready(self.refused_write(cx, e, len).map(|_| chunk.clear())),
        };
        if let Err(e) = self.send.send_data(chunk.split_to(granted), false) {
            return Poll::Ready(self.refused_write(cx, Some(e), len).map(|_| chunk.clear()));
        }
        self.sent += granted as u64;
        Poll::Ready(Ok(()))
    }
}
