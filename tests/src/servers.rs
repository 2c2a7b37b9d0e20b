//! In-process servers living in a test host's namespace: each runs a single-threaded
//! tokio runtime on its own thread (which entered the namespace), listens dual-stack
//! on `[::]:port`, records what it saw, and stops on drop.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use crate::netns::Host;

/// What a server observed about one connection.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The peer address as the server saw it (IPv4-mapped addresses unmapped).
    pub peer: Option<SocketAddr>,
    /// Bytes received (recorder servers keep them all; others leave this empty).
    pub bytes: Vec<u8>,
    /// Whether the connection ended with an error (e.g. a reset).
    pub error: Option<String>,
    /// For HTTP servers: "HTTP/1.1 GET /path".
    pub request: Option<String>,
    /// When it was recorded (HTTP servers: when the request arrived).
    pub at: Option<std::time::Instant>,
}

/// A running server; stops when dropped.
pub struct Server {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Everything observed so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops the server (it stops listening and its connections close) and returns
    /// everything it observed, including requests that arrived while it stopped.
    pub fn stop(self) -> Vec<Seen> {
        let seen = self.seen.clone();
        drop(self);
        seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

type Handler =
    Arc<dyn Fn(TcpStream, SocketAddr, Arc<Mutex<Vec<Seen>>>) -> futures_lite::BoxFuture + Send + Sync>;

mod futures_lite {
    pub type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

fn spawn(host: &Host, port: u16, handler: Handler) -> Result<Server> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let seen2 = seen.clone();
    let thread = host.spawn_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = match TcpListener::bind(("::", port)).await {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    r = listener.accept() => {
                        let Ok((stream, peer)) = r else { continue };
                        // As real servers do; without it, Nagle and delayed ACKs add
                        // 40 ms stalls that would be blamed on whatever sits in between.
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(handler(stream, unmap(peer), seen2.clone()));
                    }
                }
            }
        });
    })?;
    ready_rx.recv()??;
    Ok(Server { port, seen, stop: Some(stop_tx), thread: Some(thread) })
}

fn record(seen: &Mutex<Vec<Seen>>, s: Seen) {
    seen.lock().unwrap().push(s);
}

/// Echoes every byte back; half-close is echoed too (EOF in, shutdown out).
pub fn echo(host: &Host, port: u16) -> Result<Server> {
    spawn(
        host,
        port,
        Arc::new(|mut stream, peer, seen| {
            Box::pin(async move {
                let (mut r, mut w) = stream.split();
                let res = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                record(
                    &seen,
                    Seen { peer: Some(peer), error: res.err().map(|e| e.to_string()), ..Default::default() },
                );
            })
        }),
    )
}

/// Reads one line, answers `peer=<addr>` with the address it saw, closes.
pub fn whoami(host: &Host, port: u16) -> Result<Server> {
    spawn(
        host,
        port,
        Arc::new(|stream, peer, seen| {
            Box::pin(async move {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let _ = reader.read_line(&mut line).await;
                let _ = reader.get_mut().write_all(format!("peer={peer}\n").as_bytes()).await;
                let _ = reader.get_mut().shutdown().await;
                record(&seen, Seen { peer: Some(peer), ..Default::default() });
            })
        }),
    )
}

/// A server-first protocol: greets on connect, then echoes lines.
pub fn banner(host: &Host, port: u16) -> Result<Server> {
    spawn(
        host,
        port,
        Arc::new(|mut stream, peer, seen| {
            Box::pin(async move {
                record(&seen, Seen { peer: Some(peer), ..Default::default() });
                if stream.write_all(b"220 mesh-test ready\r\n").await.is_err() {
                    return;
                }
                let (r, mut w) = stream.split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            })
        }),
    )
}

/// Reads until EOF or error and records every byte; sends nothing.
pub fn recorder(host: &Host, port: u16) -> Result<Server> {
    spawn(
        host,
        port,
        Arc::new(|mut stream, peer, seen| {
            Box::pin(async move {
                let mut bytes = Vec::new();
                let res = stream.read_to_end(&mut bytes).await;
                record(
                    &seen,
                    Seen {
                        peer: Some(peer),
                        bytes,
                        error: res.err().map(|e| e.to_string()),
                        ..Default::default()
                    },
                );
            })
        }),
    )
}

async fn http_reply(
    name: Arc<str>,
    req: Request<Incoming>,
    peer: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let line = format!("{:?} {} {}", req.version(), req.method(), req.uri().path());
    record(&seen, Seen { peer: Some(peer), request: Some(line.clone()), ..Default::default() });
    Ok(Response::new(Full::new(Bytes::from(format!("server={name} {line}\n")))))
}

/// HTTP/1.1 and HTTP/2 (prior knowledge) server answering `server=<name> <version> <method> <path>`.
pub fn http(host: &Host, port: u16, name: &str) -> Result<Server> {
    let name: Arc<str> = name.into();
    spawn(
        host,
        port,
        Arc::new(move |stream, peer, seen| {
            let name = name.clone();
            Box::pin(async move {
                let svc = service_fn(move |req| http_reply(name.clone(), req, peer, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            })
        }),
    )
}

/// HTTPS (HTTP/1.1 over TLS) with a self-signed certificate for `svc.test`.
pub fn https(host: &Host, port: u16, name: &str) -> Result<Server> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["svc.test".to_owned()])?;
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(
        vec![cert.cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
    )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let name: Arc<str> = name.into();
    spawn(
        host,
        port,
        Arc::new(move |stream, peer, seen| {
            let (name, acceptor) = (name.clone(), acceptor.clone());
            Box::pin(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let svc = service_fn(move |req| http_reply(name.clone(), req, peer, seen.clone()));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            })
        }),
    )
}

async fn echo_headers_reply(
    name: Arc<str>,
    status: u16,
    req: Request<Incoming>,
    peer: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let line = format!("{:?} {} {}", req.version(), req.method(), req.uri().path());
    record(
        &seen,
        Seen {
            peer: Some(peer),
            request: Some(line.clone()),
            at: Some(Instant::now()),
            ..Default::default()
        },
    );
    let mut body = format!("server={name} {line}\n");
    for (k, v) in req.headers() {
        body.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    Ok(resp)
}

/// HTTP/1.1 and HTTP/2 server answering every request with `status` and a body of
/// `server=<name> <version> <method> <path>` followed by one `name: value` line per
/// request header it received (so tests see what the mesh added or changed).
pub fn http_echo_headers(host: &Host, port: u16, name: &str, status: u16) -> Result<Server> {
    let name: Arc<str> = name.into();
    spawn(
        host,
        port,
        Arc::new(move |stream, peer, seen| {
            let name = name.clone();
            Box::pin(async move {
                let svc =
                    service_fn(move |req| echo_headers_reply(name.clone(), status, req, peer, seen.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            })
        }),
    )
}

/// A WebSocket echo server written by hand over TCP: answers the HTTP/1.1 Upgrade
/// with 101 and the RFC 6455 accept key, then echoes every text frame (unmasked, as
/// a server sends) until a close frame, which it answers. Records the request line.
pub fn websocket_echo(host: &Host, port: u16) -> Result<Server> {
    use crate::websocket;
    spawn(
        host,
        port,
        Arc::new(|mut stream, peer, seen| {
            Box::pin(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                buf.drain(..head_end);
                let request = head.lines().next().unwrap_or_default().to_owned();
                record(
                    &seen,
                    Seen {
                        peer: Some(peer),
                        request: Some(request),
                        at: Some(Instant::now()),
                        ..Default::default()
                    },
                );
                let key = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim().eq_ignore_ascii_case("sec-websocket-key").then(|| v.trim().to_owned())
                });
                let Some(key) = key else {
                    let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                };
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    websocket::accept_key(&key)
                );
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    while let Some((opcode, payload, used)) = websocket::decode(&buf) {
                        buf.drain(..used);
                        let _ = stream.write_all(&websocket::encode(opcode, &payload, None)).await;
                        if opcode == websocket::CLOSE {
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
        }),
    )
}
