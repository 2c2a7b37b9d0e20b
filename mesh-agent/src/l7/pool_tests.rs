//! The bounds on upstream connections per endpoint: requests beyond them wait for a
//! connection (HTTP/1) or a stream (HTTP/2) to come free instead of opening more,
//! and give up with a clear error when none does within the connect timeout. And
//! the bound on streams per HTTP/2 connection: a full connection makes the pool
//! dial another rather than queue a request behind long-lived ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::pool::{Body, Dial, MAX_H1_PER_ENDPOINT, SendError, UpstreamBody, UpstreamPool, Version};
use crate::socket::SocketFactory;
use crate::workload_identity::IdentitySlot;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn pool() -> Arc<UpstreamPool> {
    Arc::new(new_pool())
}

fn new_pool() -> UpstreamPool {
    let sockets = SocketFactory::new(0);
    let tunnels = crate::mtls::pool(IdentitySlot::default(), sockets.clone(), CONNECT_TIMEOUT);
    UpstreamPool::new(sockets, tunnels, IdentitySlot::default(), Duration::from_secs(30))
}

fn get() -> Request<Body> {
    Request::get("/")
        .header("host", "backend")
        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync())
        .unwrap()
}

/// A server that accepts every connection and answers each request after `hold`
/// (one request per connection read, then a 200), counting connections.
async fn slow_server(hold: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            tokio::time::sleep(hold).await;
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn requests_beyond_the_bound_wait_for_a_free_connection_and_open_no_more() {
    let (backend, accepted) = slow_server(Duration::from_millis(200)).await;
    let pool = pool();
    let requests = MAX_H1_PER_ENDPOINT + 44;
    let sends = (0..requests).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let resp =
                pool.send(backend, &Dial::Plain, Version::Http1, Duration::from_secs(5), get()).await?;
            let status = resp.status();
            resp.into_body().collect().await.map_err(SendError::Request)?;
            Ok::<_, SendError>(status)
        })
    });
    for send in sends.collect::<Vec<_>>() {
        assert_eq!(send.await.unwrap().expect("every request is answered").as_u16(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), MAX_H1_PER_ENDPOINT, "connections opened");
}

#[tokio::test]
async fn a_request_that_finds_every_connection_busy_past_its_timeout_says_so() {
    let (backend, accepted) = slow_server(Duration::from_secs(30)).await;
    let pool = pool();
    // Fill the bound with requests that will not be answered in time.
    let _busy: Vec<_> = (0..MAX_H1_PER_ENDPOINT)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.send(backend, &Dial::Plain, Version::Http1, Duration::from_secs(5), get()).await
            })
        })
        .collect();
    while accepted.load(Ordering::SeqCst) < MAX_H1_PER_ENDPOINT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = tokio::time::Instant::now();
    let e = pool.send(backend, &Dial::Plain, Version::Http1, CONNECT_TIMEOUT, get()).await.unwrap_err();
    assert!(started.elapsed() >= CONNECT_TIMEOUT, "gave up after {:?}", started.elapsed());
    let text = e.to_string();
    assert!(text.contains(&format!("all {MAX_H1_PER_ENDPOINT} HTTP/1 connections")), "{text}");
    assert_eq!(accepted.load(Ordering::SeqCst), MAX_H1_PER_ENDPOINT, "no connection beyond the bound");
}

/// An HTTP/2 server allowing `streams` concurrent streams per connection that
/// answers each request after `hold`, counting connections.
async fn slow_h2_server(streams: u32, hold: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let service = hyper::service::service_fn(move |_req| async move {
                tokio::time::sleep(hold).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"ok"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn http2_requests_beyond_the_streams_of_the_bounded_connections_wait_for_a_free_stream() {
    use super::pool::MAX_H2_PER_ENDPOINT;
    // 8 connections × 2 streams = 16 at once; 64 requests must all be answered, on
    // the bound's connections and no more.
    let (backend, accepted) = slow_h2_server(2, Duration::from_millis(100)).await;
    let pool = Arc::new(new_pool().with_streams_per_connection(2));
    let sends = (0..64).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let resp =
                pool.send(backend, &Dial::Plain, Version::Http2, Duration::from_secs(5), get()).await?;
            let status = resp.status();
            resp.into_body().collect().await.map_err(SendError::Request)?;
            Ok::<_, SendError>(status)
        })
    });
    for send in sends.collect::<Vec<_>>() {
        assert_eq!(send.await.unwrap().expect("every request is answered").as_u16(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), MAX_H2_PER_ENDPOINT, "HTTP/2 connections opened");
}

/// Requests in flight at once on one HTTP/2 or direct connection in the tests of
/// spreading: the servers there allow no more, so a request sent on a full
/// connection would wait inside h2 for another to end.
pub(super) const STREAMS: usize = 2;

/// A body that never ends: a long poll, a server-streaming call.
type HoldBody = http_body_util::Either<
    http_body_util::Full<Bytes>,
    http_body_util::StreamBody<
        tokio_stream::Pending<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    >,
>;

/// Answers `/hold` with headers and a body that never ends, anything else with a
/// short complete body.
pub(super) async fn hold_or_answer(
    req: Request<hyper::body::Incoming>,
) -> Result<http::Response<HoldBody>, std::convert::Infallible> {
    let body = match req.uri().path() {
        "/hold" => HoldBody::Right(http_body_util::StreamBody::new(tokio_stream::pending())),
        _ => HoldBody::Left(http_body_util::Full::new(Bytes::from_static(b"done"))),
    };
    Ok(http::Response::new(body))
}

/// What [`spreads_over_connections`] needs of a pool under test.
pub(super) trait Target {
    /// Sends a GET of `path`, within the test's patience.
    fn get(&self, path: &'static str) -> impl Future<Output = http::Response<UpstreamBody>> + Send;
    /// Connections the server side has accepted.
    fn accepted(&self) -> usize;
}

/// With [`STREAMS`] per connection: [`STREAMS`] + 1 long-lived requests at once all
/// get their answer (none waits for another to end) on two connections; a request
/// dropped by its client and one whose response ended each free their place for
/// the next without a dial; once all places are taken again, another is dialed.
pub(super) async fn spreads_over_connections<T: Target + Send + Sync + 'static>(target: Arc<T>) {
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..=STREAMS {
        let target = target.clone();
        sends.spawn(async move { target.get("/hold").await });
    }
    let mut held = sends.join_all().await;
    assert_eq!(target.accepted(), 2, "a full connection makes the pool dial another");

    // A client that goes away frees its place: the next request rides an open connection.
    held.remove(0);
    held.push(target.get("/hold").await);
    assert_eq!(target.accepted(), 2, "a dropped request's place is reused, not dialed anew");

    // So does a request whose response ended, its body still held.
    let mut body = target.get("/quick").await.into_body();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap() {
        frame.unwrap();
    }
    held.push(target.get("/hold").await);
    assert_eq!(target.accepted(), 2, "a finished request's place is reused, not dialed anew");

    // Every place taken: the next long-lived request gets a connection of its own.
    held.push(target.get("/hold").await);
    assert_eq!(target.accepted(), 3);
    assert_eq!(held.len(), 2 * STREAMS + 1);
    drop(body);
}

struct PlainH2 {
    pool: UpstreamPool,
    backend: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Target for PlainH2 {
    async fn get(&self, path: &'static str) -> http::Response<UpstreamBody> {
        let req = Request::get(path)
            .header("host", "backend")
            .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap();
        let send = self.pool.send(self.backend, &Dial::Plain, Version::Http2, Duration::from_secs(5), req);
        let resp = tokio::time::timeout(Duration::from_secs(10), send).await;
        resp.expect("a long-lived request must not wait for another to end").unwrap()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_full_http2_connection_makes_the_pool_dial_another_instead_of_queueing_the_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(STREAMS as u32)
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(s),
                        hyper::service::service_fn(hold_or_answer),
                    ),
            );
        }
    });
    let pool = new_pool().with_streams_per_connection(STREAMS);
    spreads_over_connections(Arc::new(PlainH2 { pool, backend, accepted })).await;
}
