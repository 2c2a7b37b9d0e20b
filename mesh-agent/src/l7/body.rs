//! Bodies the proxy streams through while watching them: bytes counted, a gRPC
//! status read from the trailers, and one callback when the body is over, however
//! it ends (complete, failed, or dropped by a client that went away).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::pool::BoxError;

/// How a watched body ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyEnd {
    /// Data bytes that went through.
    pub bytes: u64,
    /// `grpc-status` from the trailers, when there were any.
    pub grpc_status: Option<u32>,
    /// Whether the body reached its end (false: failed or abandoned).
    pub complete: bool,
    /// The error that ended it, if one did.
    pub error: Option<String>,
}

/// Called once when a watched body is over.
pub type OnEnd = Box<dyn FnOnce(BodyEnd) + Send>;

/// `inner`, counted into `counter` (if any) and reported to `on_end` (if any).
pub struct Observed<B> {
    inner: B,
    bytes: u64,
    grpc_status: Option<u32>,
    counter: Option<Arc<AtomicU64>>,
    on_end: Option<OnEnd>,
    /// The body had nothing to send from the start (HEAD, 204, trailers-only gRPC):
    /// hyper may drop it unpolled, and that is a complete body.
    empty: bool,
}

impl<B: Body> Observed<B> {
    pub fn new(inner: B, counter: Option<Arc<AtomicU64>>, on_end: Option<OnEnd>) -> Self {
        let empty = inner.is_end_stream();
        Observed { inner, bytes: 0, grpc_status: None, counter, on_end, empty }
    }
}

impl<B> Observed<B> {
    fn end(&mut self, complete: bool, error: Option<String>) {
        if let Some(on_end) = self.on_end.take() {
            on_end(BodyEnd { bytes: self.bytes, grpc_status: self.grpc_status, complete, error });
        }
    }
}

/// The `grpc-status` header or trailer, if present and numeric.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.bytes += n;
                    if let Some(c) = &this.counter {
                        c.fetch_add(n, Ordering::Relaxed);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.grpc_status = grpc_status(trailers);
                }
                if this.inner.is_end_stream() {
                    this.end(true, None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                this.end(false, Some(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.end(true, None);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if self.on_end.is_some() {
            let complete = self.empty;
            self.end(complete, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::Mutex;

    #[tokio::test]
    async fn counts_bytes_reads_grpc_status_and_reports_once() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"de"))),
            Ok(Frame::trailers(trailers)),
        ];
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let counter = Arc::new(AtomicU64::new(0));
        let body = Observed::new(
            StreamBody::new(futures_stream(frames)),
            Some(counter.clone()),
            Some(Box::new(move |e| seen.lock().unwrap().push(e))),
        );
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"abcde"));
        let ends = ends.lock().unwrap();
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0], BodyEnd { bytes: 5, grpc_status: Some(14), complete: true, error: None });
        assert_eq!(counter.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_dropped_body_reports_incomplete() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let body = Observed::new(
            Full::new(Bytes::from_static(b"x")),
            None,
            Some(Box::new(move |e: BodyEnd| seen.lock().unwrap().push(e.complete))),
        );
        drop(body);
        assert_eq!(*ends.lock().unwrap(), vec![false]);
    }

    fn futures_stream(
        frames: Vec<Result<Frame<Bytes>, BoxError>>,
    ) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin {
        tokio_stream::iter(frames)
    }
}
