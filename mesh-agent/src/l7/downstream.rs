//! Time limits on the connections the L7 proxy serves (a workload's connection on the
//! client side, a peer's tunnel stream on the receiving side), so that a client that
//! goes silent, dies without a FIN or sends a request head byte by byte cannot hold a
//! connection and its task forever:
//!
//! - HTTP/1: a request head must be complete within [`DownstreamTimeouts::header`] of
//!   its first byte, or the connection is dropped;
//! - HTTP/2: the peer is pinged every [`DownstreamTimeouts::keepalive_interval`] and
//!   dropped when a ping goes unanswered for [`DownstreamTimeouts::keepalive_timeout`];
//! - both: a connection with no request in flight for [`DownstreamTimeouts::idle`] is
//!   closed (HTTP/1 dropped, HTTP/2 sent a GOAWAY so a stream that crossed it still
//!   finishes). A request is in flight from the moment its head is complete until its
//!   response body is done, so a slow upstream or a long response never counts as idle.
//!
//! An upgraded HTTP/1 connection (WebSocket) is left to its protocol: once hyper hands
//! it over, neither limit applies.
//!
//! When the agent shuts down, served connections close gracefully ([`watch`]): HTTP/1
//! at once between requests, or after the response of the request under way; HTTP/2
//! with a GOAWAY, once its open streams are done.
//!
//! hyper's own `header_read_timeout` is left off: in hyper 1.x its timer also runs
//! while a kept-alive connection waits for its next request, so it would close idle
//! connections after the header timeout (30 s), long before the idle timeout and
//! before the peers' pools (`--upstream-idle-timeout`, 90 s) stop reusing them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Default idle timeout (Envoy's default for downstream connections).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
/// Default time for a whole HTTP/1 request head.
pub const DEFAULT_HEADER: Duration = Duration::from_secs(30);
/// Default interval of HTTP/2 keep-alive pings.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default wait for a ping's answer (hyper's default).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The time limits of served connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownstreamTimeouts {
    /// A connection with no request in flight this long is closed; `None`: never.
    pub idle: Option<Duration>,
    /// An HTTP/1 request head must be complete this long after its first byte.
    pub header: Duration,
    /// HTTP/2 ping interval.
    pub keepalive_interval: Duration,
    /// How long an HTTP/2 ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
}

impl Default for DownstreamTimeouts {
    fn default() -> Self {
        DownstreamTimeouts {
            idle: Some(DEFAULT_IDLE),
            header: DEFAULT_HEADER,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// Why a served connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Http(hyper::Error),
    /// An HTTP/1 request head was still incomplete this long after its first byte.
    #[error("request head incomplete {0:?} after its first byte")]
    HeaderTimeout(Duration),
}

impl From<hyper::Error> for ServeError {
    fn from(e: hyper::Error) -> Self {
        let timeout = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<HeaderTimedOut>());
        match timeout {
            Some(t) => ServeError::HeaderTimeout(t.0),
            None => ServeError::Http(e),
        }
    }
}

/// The read error [`HeadTimer`] ends a connection with.
#[derive(Debug, thiserror::Error)]
#[error("request head incomplete {0:?} after its first byte")]
struct HeaderTimedOut(Duration);

/// What one connection's reader, service and idle watch share; atomics only, so
/// HTTP/2 streams (served on their own tasks) can update it without a lock.
#[derive(Debug)]
pub(super) struct Activity {
    start: Instant,
    /// Requests in flight.
    open: AtomicUsize,
    /// When the last request ended, in nanoseconds since `start` (0: none yet).
    last_end: AtomicU64,
    /// HTTP/1: bytes of a request head were read and its request has not started.
    head: AtomicBool,
    /// A request has started on the connection.
    used: AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            open: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            head: AtomicBool::new(false),
            used: AtomicBool::new(false),
        })
    }

    /// Whether the connection has not begun a request: no request started and no
    /// byte of a head read (HTTP/1). Dropping it then loses nothing, and nothing of
    /// ours is waiting to be written.
    pub(super) fn untouched(&self) -> bool {
        !self.used.load(Ordering::Acquire) && !self.head.load(Ordering::Relaxed)
    }

    /// Since when no request has been in flight; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.start + Duration::from_nanos(self.last_end.load(Ordering::Acquire)))
    }
}

/// One request in flight, from its service call to the end of its response body.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.used.store(true, Ordering::Release);
        activity.head.store(false, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Saturates after ~584 years of connection.
        let since_start = u64::try_from(a.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Before the count drops, so whoever sees it at 0 also sees this end.
        a.last_end.fetch_max(since_start, Ordering::AcqRel);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service whose requests are counted in flight until their response bodies end.
pub(super) struct Tracked<S> {
    pub(super) inner: S,
    pub(super) activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Dropped with the future if the client goes away before the response.
        let in_flight = InFlight::start(&self.activity);
        let upgrade = super::headers::is_upgrade(req.headers());
        TrackedFuture { response: self.inner.call(req), in_flight: Some(in_flight), upgrade }
    }
}

pin_project_lite::pin_project! {
    /// [`Tracked`]'s future: the inner one, unboxed. (A boxed async block cost an
    /// allocation and a copy of the whole request future per request.)
    pub(super) struct TrackedFuture<F> {
        #[pin]
        response: F,
        in_flight: Option<InFlight>,
        upgrade: bool,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx))?;
        let Some(in_flight) = this.in_flight.take() else {
            // Polled after completion: a caller bug, answered without tracking.
            unreachable!("TrackedFuture polled after it completed")
        };
        if *this.upgrade && response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // The connection becomes the upgraded protocol's (WebSocket): one request
            // in flight for the rest of its life, so neither timer touches it.
            in_flight.0.open.fetch_add(1, Ordering::AcqRel);
        }
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _in_flight: in_flight })))
    }
}

/// A response body that keeps its request in flight until hyper drops it.
pub(super) struct TrackedBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// HTTP/1 connection IO that fails a read still waiting for the rest of a request
/// head [`DownstreamTimeouts::header`] after the head's first bytes arrived.
pub(super) struct HeadTimer<I> {
    inner: I,
    activity: Arc<Activity>,
    limit: Duration,
    /// Made on the first head that does not arrive in one read; reused after.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current head.
    armed: bool,
}

impl<I> HeadTimer<I> {
    pub(super) fn new(inner: I, activity: Arc<Activity>, limit: Duration) -> Self {
        HeadTimer { inner, activity, limit, timer: None, armed: false }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeadTimer<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                // Bytes with no request in flight begin the next head (or continue it).
                let a = &this.activity;
                if a.open.load(Ordering::Acquire) == 0 && !a.head.load(Ordering::Relaxed) {
                    a.head.store(true, Ordering::Relaxed);
                    this.armed = false;
                }
            }
            Poll::Pending if this.activity.head.load(Ordering::Relaxed) => {
                // The head did not come whole: its clock starts now, on the read that
                // follows its first bytes at once.
                if !this.armed {
                    let deadline = Instant::now() + this.limit;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                if let Some(timer) = &mut this.timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        HeaderTimedOut(this.limit),
                    )));
                }
            }
            _ => {}
        }
        read
    }
}

super::io::write_through!(HeadTimer);

/// Why [`watch`] stopped driving a connection.
pub(super) enum Watched<T> {
    /// The connection ended by itself, with this output.
    Ended(T),
    /// No request has been in flight for the idle timeout; the caller closes it.
    Idle,
    /// The agent is shutting down; the caller closes it gracefully.
    Shutdown,
}

/// Drives `conn` until it ends, has had no request in flight for `idle`, or
/// `shutdown` is cancelled.
///
/// The idle timer is lazy: requests only touch atomics, and the watch wakes at most
/// once per `idle` while requests are in flight, then sleeps until exactly `idle`
/// after the last one ended. `conn` is polled first, so what it can read already
/// (a request that crossed the shutdown) is taken in before the caller closes it.
pub(super) async fn watch<F: Future + ?Sized>(
    mut conn: Pin<&mut F>,
    activity: &Activity,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
) -> Watched<F::Output> {
    // Polled only when `idle` is set.
    let limit = idle.unwrap_or_default();
    let sleep = tokio::time::sleep(limit);
    tokio::pin!(sleep);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            out = conn.as_mut() => return Watched::Ended(out),
            () = cancelled.as_mut() => return Watched::Shutdown,
            () = sleep.as_mut(), if idle.is_some() => {
                let now = Instant::now();
                match activity.idle_since() {
                    Some(since) if now >= since + limit => return Watched::Idle,
                    Some(since) => sleep.as_mut().reset(since + limit),
                    None => sleep.as_mut().reset(now + limit),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use tokio::task::JoinHandle;

    use super::*;
    use crate::l7::pool::{self, Version};

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    /// `serve_http` on one end of an in-memory pipe, answering "ok" after `delay`;
    /// returns the client's end and the server's result.
    fn serve(version: Version, delay: Duration) -> (DuplexStream, JoinHandle<Result<(), ServeError>>) {
        let service = hyper::service::service_fn(move |_req: Request<Incoming>| answer(delay));
        serve_with(version, service, CancellationToken::new())
    }

    /// `serve_http` with `service`, shut down by `shutdown`.
    fn serve_with<S>(
        version: Version,
        service: S,
        shutdown: CancellationToken,
    ) -> (DuplexStream, JoinHandle<Result<(), ServeError>>)
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<pool::Body>, Error = Infallible>
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let timeouts = DownstreamTimeouts { idle: Some(IDLE), header: HEADER, ..Default::default() };
        let task = tokio::spawn(async move {
            crate::l7::serve_http(server, version, service, &timeouts, &shutdown, crate::l7::Served::Client)
                .await
        });
        (client, task)
    }

    /// A service answering "ok" after `delay` that tells `called` of each request as
    /// it arrives.
    fn announcing(
        delay: Duration,
        called: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<pool::Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<pool::Body>, Infallible>> + Send,
    > + Send
    + 'static {
        hyper::service::service_fn(move |_req: Request<Incoming>| {
            let _ = called.send(());
            answer(delay)
        })
    }

    /// Reads one HTTP/1 response whose body is "ok".
    async fn read_ok_response(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while !(out.ends_with(b"\r\n\r\nok")) {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn answer(delay: Duration) -> Result<Response<pool::Body>, Infallible> {
        tokio::time::sleep(delay).await;
        let body = Full::new(Bytes::from_static(b"ok")).map_err(|never| match never {});
        Ok(Response::new(pool::Body::new(body)))
    }

    /// Switches to a protocol that echoes what it reads.
    async fn echo_upgrade(mut req: Request<Incoming>) -> Result<Response<pool::Body>, Infallible> {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let body = http_body_util::Empty::<Bytes>::new().map_err(|never| match never {});
        let mut resp = Response::new(pool::Body::new(body));
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        resp.headers_mut().insert(http::header::UPGRADE, http::HeaderValue::from_static("echo"));
        Ok(resp)
    }

    /// Reads until the server closes; what it sent.
    async fn read_to_close(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_be_complete_within_the_header_timeout_of_its_first_byte() {
        let (mut client, server) = serve(Version::Http1, Duration::ZERO);
        let first_byte = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        // More bytes do not restart the clock.
        tokio::time::sleep(HEADER / 2).await;
        client.write_all(b"X-More: 1\r\n").await.unwrap();
        assert_eq!(read_to_close(&mut client).await, "", "no response to a head that never ended");
        assert_eq!(first_byte.elapsed(), HEADER);
        assert!(matches!(server.await.unwrap(), Err(ServeError::HeaderTimeout(HEADER))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_closes_after_the_idle_timeout_not_the_header_timeout() {
        let (mut client, server) = serve(Version::Http1, Duration::ZERO);
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let answered = Instant::now();
        let out = read_to_close(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("ok"), "{out}");
        assert_eq!(answered.elapsed(), IDLE);
        assert!(server.await.unwrap().is_ok(), "closing an idle connection is no error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_connection_that_sends_nothing_closes_after_the_idle_timeout() {
        let (mut client, server) = serve(Version::Http1, Duration::ZERO);
        let opened = Instant::now();
        assert_eq!(read_to_close(&mut client).await, "");
        assert_eq!(opened.elapsed(), IDLE);
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_longer_than_the_idle_timeout_is_not_cut() {
        let slow = IDLE * 3;
        let (mut client, server) = serve(Version::Http1, slow);
        let sent = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let out = read_to_close(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("ok"), "{out}");
        // Answered after `slow`, then idle for `IDLE`.
        assert_eq!(sent.elapsed(), slow + IDLE);
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn http2_goes_away_once_no_stream_was_open_for_the_idle_timeout() {
        let slow = IDLE * 2;
        let (client, server) = serve(Version::Http2, slow);
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let sent = Instant::now();
        let resp = send.send_request(Request::get("http://x/").body(Full::<Bytes>::default()).unwrap());
        let body = resp.await.unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!((body.as_ref(), sent.elapsed()), (&b"ok"[..], slow), "the open stream was not cut");
        conn.await.unwrap().unwrap();
        assert_eq!(sent.elapsed(), slow + IDLE);
        let r = server.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_peer_that_stops_answering_pings_is_dropped() {
        let (mut client, server) = serve(Version::Http2, Duration::ZERO);
        let opened = Instant::now();
        // The preface and an empty SETTINGS frame, then silence: pings go unanswered.
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        let _ = read_to_close(&mut client).await;
        let d = DownstreamTimeouts::default();
        let waited = opened.elapsed();
        assert!(
            waited >= d.keepalive_interval + d.keepalive_timeout && waited < IDLE,
            "dropped after {waited:?}"
        );
        assert!(matches!(server.await.unwrap(), Err(ServeError::Http(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_is_left_to_its_protocol() {
        let (mut client, server) =
            serve_with(Version::Http1, hyper::service::service_fn(echo_upgrade), CancellationToken::new());
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        assert!(server.await.unwrap().is_ok(), "hyper hands the connection over");
        // Bytes, then a pause longer than the header timeout: no request head is
        // being read any more, so nothing may time out.
        let mut buf = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(HEADER * 2).await;
        client.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_an_idle_kept_alive_http1_connection_at_once() {
        let shutdown = CancellationToken::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let (mut client, server) =
            serve_with(Version::Http1, announcing(Duration::ZERO, tx), shutdown.clone());
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let out = read_ok_response(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let asked = Instant::now();
        shutdown.cancel();
        assert_eq!(read_to_close(&mut client).await, "");
        assert_eq!(asked.elapsed(), Duration::ZERO, "closed at once, not after the idle timeout");
        let r = server.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_an_http1_connection_that_never_sent_a_request_at_once() {
        let shutdown = CancellationToken::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let (mut client, server) =
            serve_with(Version::Http1, announcing(Duration::ZERO, tx), shutdown.clone());
        // The server is waiting for a first request.
        tokio::task::yield_now().await;
        let asked = Instant::now();
        shutdown.cancel();
        assert_eq!(read_to_close(&mut client).await, "");
        assert_eq!(asked.elapsed(), Duration::ZERO);
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_request_in_flight_at_shutdown_gets_its_whole_response_then_the_connection_closes() {
        let slow = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let (tx, mut called) = tokio::sync::mpsc::unbounded_channel();
        let (mut client, server) = serve_with(Version::Http1, announcing(slow, tx), shutdown.clone());
        let sent = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        called.recv().await.unwrap();
        shutdown.cancel();
        let out = read_to_close(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nok"), "{out}");
        assert!(out.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{out}");
        assert_eq!(sent.elapsed(), slow, "closed right after the response");
        let r = server.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_request_arriving_with_the_shutdown_is_still_answered() {
        // A connection accepted just before shutdown whose request is already here
        // (sniffed, or in the socket buffer): answered, then closed.
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let (mut client, server) = serve_with(Version::Http1, announcing(Duration::ZERO, tx), shutdown);
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let out = read_to_close(&mut client).await;
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nok"), "{out}");
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn http2_at_shutdown_sends_goaway_and_finishes_the_open_stream() {
        let slow = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let (tx, mut called) = tokio::sync::mpsc::unbounded_channel();
        let (client, server) = serve_with(Version::Http2, announcing(slow, tx), shutdown.clone());
        let (h2, conn) = h2::client::handshake(client).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut h2 = h2.ready().await.unwrap();
        let sent = Instant::now();
        let (response, _) = h2.send_request(Request::get("http://x/").body(()).unwrap(), true).unwrap();
        called.recv().await.unwrap();
        shutdown.cancel();

        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let mut body = response.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!((got.as_slice(), sent.elapsed()), (&b"ok"[..], slow), "the open stream was not cut");
        // The GOAWAY came before the response: no new stream may be opened.
        let e = h2.send_request(Request::get("http://x/").body(()).unwrap(), true).unwrap_err();
        assert!(e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR), "{e}");
        conn.await.unwrap().unwrap();
        assert_eq!(sent.elapsed(), slow, "the connection closed with its last stream");
        let r = server.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    /// Opens `resets` streams and resets each before the server can take it up, then
    /// asks once more; returns that last request's status, or the error that ended
    /// the connection.
    async fn after_pending_resets(
        served: crate::l7::Served,
        resets: usize,
    ) -> Result<http::StatusCode, h2::Error> {
        let (client, server) = tokio::io::duplex(1024 * 1024);
        let timeouts = DownstreamTimeouts { idle: Some(IDLE), header: HEADER, ..Default::default() };
        let service = hyper::service::service_fn(|_req: Request<Incoming>| answer(Duration::ZERO));
        tokio::spawn(async move {
            crate::l7::serve_http(
                server,
                Version::Http2,
                service,
                &timeouts,
                &CancellationToken::new(),
                served,
            )
            .await
        });
        let (mut send, connection) = h2::client::handshake(client).await?;
        tokio::spawn(connection);
        let get = || Request::get("http://peer.test/").body(()).unwrap();
        for _ in 0..resets {
            send = send.ready().await?;
            let (_response, mut stream) = send.send_request(get(), false)?;
            stream.send_reset(h2::Reason::CANCEL);
        }
        let (response, _) = send.ready().await?.send_request(get(), true)?;
        Ok(response.await?.status())
    }

    #[tokio::test]
    async fn a_peer_agent_resetting_streams_of_workloads_that_gave_up_keeps_its_connection() {
        let resets = 200;
        assert_eq!(after_pending_resets(crate::l7::Served::PeerAgent, resets).await.unwrap(), 200);
        // A workload's own connection keeps h2's rapid-reset guard: the same resets
        // close it (GOAWAY ENHANCE_YOUR_CALM, which the client may see only as the
        // connection going away).
        let closed = after_pending_resets(crate::l7::Served::Client, resets).await;
        assert!(closed.is_err(), "{closed:?}");
    }
}
