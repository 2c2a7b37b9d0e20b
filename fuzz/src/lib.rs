//! What the fuzz targets share: driving the sniffer over an in-memory client, and a
//! small runtime to run the few async entry points on.
//!
//! Each target lives in `fuzz_targets/` and says at its top what it feeds in and
//! what it asserts beyond "no panic". Corpora are in `corpus/<target>/`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use mesh_agent::sniff::{self, Detection, MAX_SNIFF_BYTES, OpaqueReason, Protocol};
use tokio::io::{AsyncRead, ReadBuf};

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// Runs `future` to completion on this thread's runtime (made once per process).
pub fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(future))
}

/// A client that sends `data` in reads of `chunk` bytes, then closes.
pub struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], chunk: usize) -> Self {
        Chunked { data, chunk: chunk.max(1) }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(out.remaining());
        let (now, rest) = self.data.split_at(n);
        out.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Sniffs `input` as a client sending it in reads of `chunk` bytes, and checks what
/// the sniffer promises: what it holds is exactly a prefix of what it was given
/// (never more, never altered), within [`MAX_SNIFF_BYTES`], and enough to explain its
/// decision.
pub fn sniff_checked(input: &[u8], chunk: usize) -> Protocol {
    // Far away: the in-memory client never makes it wait.
    let timeout = Duration::from_secs(3600);
    let mut buf = BytesMut::new();
    let got = block_on(sniff::sniff(&mut Chunked::new(input, chunk), &mut buf, timeout))
        .expect("an in-memory client never fails a read");
    assert!(buf.len() <= MAX_SNIFF_BYTES, "held {} bytes, over the cap", buf.len());
    assert!(input.starts_with(&buf), "the sniffer holds bytes it was not given");
    match &got {
        Protocol::Opaque(OpaqueReason::ClientClosed) => {
            assert_eq!(&buf[..], input, "closed before a decision, yet not all bytes were read");
            assert_eq!(sniff::detect(&buf), Detection::NeedMore);
        }
        Protocol::Opaque(OpaqueReason::TooLarge) if buf.len() == MAX_SNIFF_BYTES => {}
        decided => {
            assert_eq!(sniff::detect(&buf), Detection::Done(decided.clone()), "decision not explained")
        }
    }
    got
}

/// Checks the sniffer's promise that a decision on a prefix holds for the whole, and
/// that the answer does not depend on how the bytes are split into reads.
pub fn check_sniffer(input: &[u8], cut: u8, chunk: u8) -> Protocol {
    let whole = sniff::detect(input);
    let prefix = &input[..input.len() * usize::from(cut) / 255];
    if let Detection::Done(decided) = sniff::detect(prefix) {
        assert_eq!(whole, Detection::Done(decided), "a decision on a prefix changed with more bytes");
    }
    let once = sniff_checked(input, usize::MAX);
    // A few reads per input, not one per byte: detect runs after every read.
    let small = (input.len() / 16).max(1) + usize::from(chunk);
    assert_eq!(sniff_checked(input, small), once, "the answer depends on read sizes");
    once
}
