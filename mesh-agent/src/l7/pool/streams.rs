//! Streams on multiplexed upstream connections (HTTP/2 to an endpoint, or direct to
//! a peer agent), as the tunnel pool counts its CONNECT streams
//! ([`crate::tunnel::STREAMS_PER_CONNECTION`]): a connection carries at most a set
//! number of requests at once, each holding a [`StreamLease`] until its response
//! body ends or is dropped, and the pool dials another connection when every one of
//! a key's is full. Without this, every request to a peer rode one connection and,
//! past the peer's `max_concurrent_streams`, waited inside h2 for another request
//! to end: long polls and streaming gRPC calls could hold everyone else up
//! indefinitely. hyper cannot say how many streams a connection has open
//! (`http2::SendRequest::is_ready` only says it is not closed), hence the count
//! here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use super::Body;

/// Requests one multiplexed upstream connection carries at once before the pool
/// dials another (default of [`super::UpstreamPool::with_streams_per_connection`]).
/// 100 as ztunnel's pool and the tunnel's: it is also the least RFC 9113 (5.1.2)
/// recommends a server allow, so a server rarely makes one of these wait, while
/// many long-lived streams spread over connections (and h2 works each
/// connection's frames on one task, so a busy peer's load spreads over tasks too).
pub(crate) const STREAMS_PER_CONNECTION: usize = 100;

/// Longest pause between looks for a free stream while none is free. A stream
/// that ends and a dial that completes wake waiters at once; this only bounds a
/// wake-up missed when the sweeper dropped a key's entry meanwhile.
const WAIT_STEP_MAX: Duration = Duration::from_millis(50);

/// How full one connection is; shared by its pool entry and its leases.
#[derive(Debug)]
struct Load {
    streams: AtomicUsize,
    /// The key's, woken when a stream ends.
    room: Arc<Notify>,
}

/// One request's place on its connection, given back when the response body
/// (which holds it) ends or is dropped, or the request fails.
#[derive(Debug)]
pub(super) struct StreamLease(Arc<Load>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        // One waiter can use the freed place; if none waits, the next one to wait
        // looks again at once (a stored permit), which is harmless.
        self.0.room.notify_one();
    }
}

/// A place for one request on a connection: the connection's sender and the lease.
pub(super) struct Stream {
    pub(super) sender: http2::SendRequest<Body>,
    pub(super) lease: StreamLease,
}

/// One pooled multiplexed connection.
struct Conn {
    sender: http2::SendRequest<Body>,
    load: Arc<Load>,
    /// Last time a request was given a stream on it.
    since: Instant,
    /// Closed after this long unused (the service's `timeouts.idle`, else the pool's).
    idle_timeout: Duration,
}

impl Conn {
    /// Open, and either in use or used recently: a connection with a long poll
    /// running is not idle however long ago the poll began.
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed()
            && (self.load.streams.load(Ordering::Acquire) > 0
                || now.duration_since(self.since) < self.idle_timeout)
    }

    /// A place for one more request, if fewer than `limit` are in flight.
    fn lease(&self, limit: usize) -> Option<StreamLease> {
        self.load
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| StreamLease(self.load.clone()))
    }
}

/// The multiplexed connections of one key (an endpoint, or a peer agent and
/// identity pair), and the dial under way for it.
#[derive(Default)]
pub(super) struct Conns {
    open: Vec<Conn>,
    /// Dials under way (at most one: see [`Conns::checkout`]).
    dialing: usize,
    /// Woken when a stream ends, a dial completes or a dial is given up.
    room: Arc<Notify>,
}

/// What [`Conns::checkout`] found.
pub(super) enum Checkout {
    Ready(Stream),
    /// No connection has room: the caller dials one, in the slot reserved for it,
    /// and gives it back with [`Conns::filled`] or [`Conns::abandoned`].
    Dial,
    /// No room and no dial to make now: wait on `room` and look again; `at_bound`
    /// says the connection bound (not a dial under way) is what stops another.
    Full {
        room: OwnedNotified,
        at_bound: bool,
    },
}

impl Conns {
    /// A stream on the first open connection with fewer than `limit` requests in
    /// flight; else a slot to dial another, while fewer than `max` are open and no
    /// dial is under way; else something to wait on.
    pub(super) fn checkout(&mut self, now: Instant, idle: Duration, limit: usize, max: usize) -> Checkout {
        self.open.retain(|c| c.usable(now));
        for conn in &mut self.open {
            if let Some(lease) = conn.lease(limit) {
                conn.since = now;
                conn.idle_timeout = idle;
                return Checkout::Ready(Stream { sender: conn.sender.clone(), lease });
            }
        }
        // One dial at a time: requests arriving together share the first connection
        // rather than each opening one; the next is dialed when it is full.
        if self.dialing == 0 && self.open.len() < max {
            self.dialing += 1;
            return Checkout::Dial;
        }
        // Made under the lock, so a wake-up between here and the wait is not lost.
        let room = self.room.clone().notified_owned();
        Checkout::Full { room, at_bound: self.open.len() >= max }
    }

    /// A dial reserved by [`Conns::checkout`] brought `sender`: pooled, with the
    /// dialing request's stream on it.
    pub(super) fn filled(&mut self, sender: http2::SendRequest<Body>, idle: Duration) -> Stream {
        self.dialing = self.dialing.saturating_sub(1);
        let load = Arc::new(Load { streams: AtomicUsize::new(1), room: self.room.clone() });
        let lease = StreamLease(load.clone());
        self.open.push(Conn { sender: sender.clone(), load, since: Instant::now(), idle_timeout: idle });
        self.room.notify_waiters();
        Stream { sender, lease }
    }

    /// A dial reserved by [`Conns::checkout`] failed or was dropped: a waiting
    /// request may try one.
    pub(super) fn abandoned(&mut self) {
        self.dialing = self.dialing.saturating_sub(1);
        self.room.notify_waiters();
    }

    /// Takes the connection `lease` is on out of the pool: it refused a new stream
    /// (GOAWAY, closed). Its streams in flight go on to their end.
    pub(super) fn forget(&mut self, lease: &StreamLease) {
        self.open.retain(|c| !Arc::ptr_eq(&c.load, &lease.0));
    }

    /// Drops connections closed or idle too long; whether anything is left (an open
    /// connection or a dial under way).
    pub(super) fn sweep(&mut self, now: Instant) -> bool {
        self.open.retain(|c| c.usable(now));
        !self.open.is_empty() || self.dialing > 0
    }

    /// Connections not known to be closed.
    pub(super) fn open_count(&self) -> usize {
        self.open.iter().filter(|c| !c.sender.is_closed()).count()
    }
}

/// How long a request may wait for a free stream: until its connect timeout, looking
/// again whenever woken and at least every [`WAIT_STEP_MAX`].
pub(super) struct Patience {
    deadline: tokio::time::Instant,
    step: Duration,
    /// Whether this request was already counted at the connection bound.
    counted: bool,
}

impl Patience {
    pub(super) fn new(timeout: Duration) -> Self {
        Patience {
            deadline: tokio::time::Instant::now() + timeout,
            step: Duration::from_millis(1),
            counted: false,
        }
    }

    /// True the first time only: a request is counted once at the bound, however
    /// often it looks.
    pub(super) fn first_at_bound(&mut self) -> bool {
        !std::mem::replace(&mut self.counted, true)
    }

    /// Waits for `room` or the next look; false once the deadline has passed.
    pub(super) async fn wait(&mut self, room: OwnedNotified) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.deadline {
            return false;
        }
        let wake = (now + self.step).min(self.deadline);
        self.step = (self.step * 2).min(WAIT_STEP_MAX);
        let _ = tokio::time::timeout_at(wake, room).await;
        true
    }
}

/// The body of an upstream response: hyper's, holding the request's
/// [`StreamLease`] on a multiplexed connection until the body ends, fails or is
/// dropped (HTTP/1 responses hold none).
///
/// The place is given back when the response ends: a request body still streaming
/// after its response ended (rare) is not counted, and is bounded by the peer's
/// own `max_concurrent_streams` as before.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<StreamLease>,
}

impl UpstreamBody {
    pub(super) fn plain(inner: Incoming) -> Self {
        UpstreamBody { inner, lease: None }
    }

    /// `inner` holding `lease`; a body that is over from the start (HEAD, 204,
    /// trailers-only gRPC) gives it back at once, since hyper may never poll it.
    pub(super) fn leased(inner: Incoming, lease: StreamLease) -> Self {
        let lease = (!hyper::body::Body::is_end_stream(&inner)).then_some(lease);
        UpstreamBody { inner, lease }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let over = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if over {
            this.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
