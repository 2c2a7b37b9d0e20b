//! The bound on HTTP/1 connections per upstream endpoint: requests beyond it wait for
//! a connection to come free instead of opening more, and give up with a clear error
//! when none does within the connect timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::pool::{Body, Dial, MAX_H1_PER_ENDPOINT, SendError, UpstreamPool, Version};
use crate::socket::SocketFactory;
use crate::workload_identity::IdentitySlot;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn pool() -> Arc<UpstreamPool> {
    let sockets = SocketFactory::new(0);
    let tunnels = crate::mtls::pool(IdentitySlot::default(), sockets.clone(), CONNECT_TIMEOUT);
    Arc::new(UpstreamPool::new(sockets, tunnels, IdentitySlot::default(), Duration::from_secs(30)))
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
    // no more than the bound's connections.
    let (backend, accepted) = slow_h2_server(2, Duration::from_millis(100)).await;
    let pool = pool();
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
    let opened = accepted.load(Ordering::SeqCst);
    assert!((1..=MAX_H2_PER_ENDPOINT).contains(&opened), "{opened} HTTP/2 connections opened");
}
