//! The tunnel end to end over loopback TCP: a [`TunnelPool`] and a [`TunnelServer`]
//! with identities from an in-process CA, relaying to real TCP targets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::identity::test_ca::TestCa;
use crate::identity::{IdentityError, TlsConfigs, TokioClock, WorkloadIdentity};
use crate::limits::HandshakeLimits;
use crate::socket::SocketFactory;

/// Guards waits on the network so a broken test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A tunnel server for `payments` that allows `cart`, with hooks to observe it.
struct Fixture {
    ca: TestCa,
    cart: SpiffeId,
    payments: SpiffeId,
    server_addr: SocketAddr,
    /// TCP connections the server accepted (it resolves TLS once per connection).
    accepted: Arc<AtomicUsize>,
    /// (peer, target) pairs the authorize callback was asked about.
    authorized: Arc<Mutex<Vec<(SpiffeId, SocketAddr)>>>,
    records: mpsc::UnboundedReceiver<TunnelRecord>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
    tls: TlsConfigs,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(Duration::from_secs(10)).await
    }

    async fn start_with(handshake_timeout: Duration) -> Fixture {
        Fixture::start_relaying(handshake_timeout, None).await
    }

    async fn start_relaying(handshake_timeout: Duration, relay: Option<Relay>) -> Fixture {
        Fixture::start_full(handshake_timeout, relay, HandshakeLimits::default(), None).await
    }

    async fn start_full(
        handshake_timeout: Duration,
        relay: Option<Relay>,
        handshakes: HandshakeLimits,
        runtime: Option<Arc<super::HandshakeRuntime>>,
    ) -> Fixture {
        let ca = TestCa::new("cluster.local");
        let (cart, payments) = (ca.id("cart"), ca.id("payments"));
        let tls = TlsConfigs::new(ca.bundle(), Arc::new(TokioClock::new()));
        let server_config = tls.server_config(ca.fresh(&payments)).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let server_tls: ServerTls = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Some(server_config.clone())
        });
        let allowed: HashSet<SpiffeId> = [cart.clone()].into();
        let authorized = Arc::new(Mutex::new(Vec::new()));
        let seen = authorized.clone();
        let authorize: Authorize = Arc::new(move |peer, target| {
            seen.lock().unwrap().push((peer.clone(), target));
            if allowed.contains(peer) { Ok(()) } else { Err(format!("{peer} is not allowed")) }
        });
        let connect: ConnectTarget = Arc::new(|target| Box::pin(TcpStream::connect(target)));
        let (record_tx, records) = mpsc::unbounded_channel();
        let mut server = TunnelServer::new(server_tls, authorize, connect)
            .with_handshake_timeout(handshake_timeout)
            .with_handshake_limits(handshakes)
            .with_on_close(Arc::new(move |record| {
                let _ = record_tx.send(record);
            }));
        if let Some(relay) = relay {
            server = server.with_relay(relay);
        }
        if let Some(runtime) = runtime {
            server = server.with_handshake_runtime(runtime);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(server.serve(listener, shutdown.clone()));
        Fixture { ca, cart, payments, server_addr, accepted, authorized, records, shutdown, served, tls }
    }

    /// A pool whose workloads (cart, and an intruder the policy denies) have fresh
    /// certificates from the fixture's CA.
    fn pool(&self) -> TunnelPool {
        let identities: HashMap<SpiffeId, Arc<WorkloadIdentity>> =
            [self.cart.clone(), self.ca.id("intruder")]
                .into_iter()
                .map(|id| (id.clone(), self.ca.fresh(&id)))
                .collect();
        let tls = self.tls.clone();
        let lookup = move |source: &SpiffeId, expected: &SpiffeId| {
            let identity = identities.get(source).cloned();
            let identity = identity.ok_or_else(|| IdentityError::Config(format!("no identity {source}")))?;
            tls.client_config(identity, expected.clone())
        };
        TunnelPool::new(Arc::new(lookup), SocketFactory::new(0), PATIENCE)
    }

    async fn open(&self, pool: &TunnelPool, target: SocketAddr) -> Result<TunnelStream, TunnelError> {
        within("open", pool.open(self.server_addr, &self.cart, &self.payments, target, HeaderMap::new()))
            .await
    }
}

/// A TCP server echoing every byte back, closing its write half at EOF.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.into_split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    addr
}

/// An address where nothing listens (connections are refused).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn round_trip(stream: &mut TunnelStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0; message.len()];
    within("echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, message);
}

/// A server that answers, ends its side and drops the stream (RST_STREAM(NO_ERROR))
/// while the client still has its side open, as a receiving agent serving HTTP
/// with `Connection: close` does: once the answer was read to its end, the client's
/// later writes and shutdown are no error (RFC 9113 §8.1).
#[tokio::test]
async fn a_peer_that_answered_and_reset_with_no_error_ends_the_stream_cleanly() {
    let relay: Relay = Arc::new(|_info, mut tunnel, _target| {
        Box::pin(async move {
            tunnel.write_all(b"whole answer").await.unwrap();
            tunnel.shutdown().await.unwrap();
            (0, 12, None)
        })
    });
    let f = Fixture::start_relaying(Duration::from_secs(10), Some(relay)).await;
    let echo = echo_server().await;
    let pool = f.pool();
    let mut stream = f.open(&pool, echo).await.unwrap();
    let mut answer = Vec::new();
    within("the answer", stream.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(answer, b"whole answer");
    // The reset may take a moment to arrive; writes and the shutdown stay clean.
    for _ in 0..20 {
        within("write", stream.write_all(b"more")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    within("shutdown", stream.shutdown()).await.unwrap();

    // A reset that is an error still is one, answer read or not.
    let relay: Relay = Arc::new(|_info, mut tunnel, _target| {
        Box::pin(async move {
            let mut first = [0u8; 1];
            tunnel.read_exact(&mut first).await.unwrap();
            tunnel.write_all(b"part").await.unwrap();
            tunnel.shutdown().await.unwrap();
            tunnel.reset();
            (0, 4, None)
        })
    });
    let f = Fixture::start_relaying(Duration::from_secs(10), Some(relay)).await;
    let pool = f.pool();
    let mut stream = f.open(&pool, echo).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the answer", stream.read_to_end(&mut answer)).await;
    let mut failed = false;
    for _ in 0..200 {
        if stream.write_all(b"more").await.is_err() {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(failed, "a CANCEL reset must surface as an error");
}

/// With a handshake runtime the listener's accept loop runs there too: streams are
/// served as without one, and shutdown still closes the port.
#[tokio::test]
async fn a_server_accepting_on_the_handshake_runtime_serves_and_closes_its_port_at_shutdown() {
    let runtime = Arc::new(super::HandshakeRuntime::new(1, 0).unwrap());
    let f =
        Fixture::start_full(Duration::from_secs(10), None, HandshakeLimits::default(), Some(runtime)).await;
    let echo = echo_server().await;
    let pool = f.pool();
    let mut stream = f.open(&pool, echo).await.unwrap();
    round_trip(&mut stream, b"accepted on the handshake runtime").await;
    drop(stream);
    f.shutdown.cancel();
    within("drain", f.served).await.unwrap();
    let closed = within("port closed", async {
        loop {
            match TcpStream::connect(f.server_addr).await {
                Err(e) => break e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    assert_eq!(closed.kind(), std::io::ErrorKind::ConnectionRefused, "{closed}");
}

#[tokio::test]
async fn bytes_round_trip_and_the_server_sees_the_client_identity() {
    let mut f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let mut stream = f.open(&pool, echo).await.unwrap();
    round_trip(&mut stream, b"hello through the tunnel").await;
    assert_eq!(*f.authorized.lock().unwrap(), vec![(f.cart.clone(), echo)]);

    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", stream.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    let record = within("record", f.records.recv()).await.unwrap();
    assert_eq!((record.peer_id, record.target, record.status), (f.cart.clone(), echo, 200));
    assert_eq!((record.bytes_in, record.bytes_out, record.error), (24, 24, None));
}

#[tokio::test]
async fn streams_to_the_same_peer_share_one_connection() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let (a, b) = tokio::join!(f.open(&pool, echo), f.open(&pool, echo));
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    let mut c = f.open(&pool, echo).await.unwrap();
    round_trip(&mut a, b"first").await;
    round_trip(&mut b, b"second").await;
    round_trip(&mut c, b"third").await;
    assert_eq!(f.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test]
async fn a_full_connection_makes_the_pool_dial_another_instead_of_queueing_the_stream() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool().with_streams_per_connection(2);
    // Three long-lived streams at once: the third must not wait for one to end.
    let mut a = f.open(&pool, echo).await.unwrap();
    let mut b = f.open(&pool, echo).await.unwrap();
    let mut c = f.open(&pool, echo).await.unwrap();
    round_trip(&mut a, b"first").await;
    round_trip(&mut b, b"second").await;
    round_trip(&mut c, b"third").await;
    assert_eq!(f.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.connection_count(), 2);
    // A stream that ends gives its place back: the next one rides an open connection.
    drop(a);
    let mut d = f.open(&pool, echo).await.unwrap();
    round_trip(&mut d, b"fourth").await;
    assert_eq!(f.accepted.load(Ordering::SeqCst), 2, "a freed place is reused, not dialed anew");
}

#[tokio::test]
async fn a_principal_the_policy_denies_is_refused_with_403() {
    let mut f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let intruder = f.ca.id("intruder");
    let result = pool.open(f.server_addr, &intruder, &f.payments, echo, HeaderMap::new());
    let err = within("open", result).await.unwrap_err();
    assert!(err.is_denied(), "{err}");
    assert!(matches!(&err, TunnelError::Refused { status: 403, reason } if reason == "denied by policy"));
    let record = within("record", f.records.recv()).await.unwrap();
    assert_eq!((record.peer_id, record.status), (intruder, 403));
}

#[tokio::test]
async fn a_peer_with_another_identity_is_refused_before_any_stream() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let reviews = f.ca.id("reviews");
    let result = pool.open(f.server_addr, &f.cart, &reviews, echo, HeaderMap::new());
    let err = within("open", result).await.unwrap_err();
    assert!(matches!(&err, TunnelError::IdentityMismatch { expected, .. } if *expected == reviews), "{err}");
    assert!(
        matches!(err.identity_error(), Some(IdentityError::UnexpectedPeer { found, .. }) if *found == f.payments.to_string()),
        "{err}"
    );
    assert_eq!(pool.connection_count(), 0);
    assert!(f.authorized.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_target_refusing_the_connection_gives_502() {
    let mut f = Fixture::start().await;
    let pool = f.pool();
    let target = closed_port().await;
    let err = f.open(&pool, target).await.unwrap_err();
    assert!(matches!(err, TunnelError::Refused { status: 502, .. }), "{err}");
    let record = within("record", f.records.recv()).await.unwrap();
    assert_eq!(record.status, 502);
    assert!(record.error.is_some());
    // The connection survives a refused stream.
    let echo = echo_server().await;
    round_trip(&mut f.open(&pool, echo).await.unwrap(), b"still here").await;
    assert_eq!(f.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_half_closed_stream_still_carries_the_answer() {
    let f = Fixture::start().await;
    // Reads the whole request (to EOF), then answers with its length.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        tcp.read_to_end(&mut request).await.unwrap();
        tcp.write_all(format!("got {} bytes", request.len()).as_bytes()).await.unwrap();
    });
    let pool = f.pool();
    let mut stream = f.open(&pool, target).await.unwrap();
    stream.write_all(b"the whole request").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    within("answer", stream.read_to_string(&mut answer)).await.unwrap();
    assert_eq!(answer, "got 17 bytes");
}

#[tokio::test]
async fn eight_mebibytes_cross_both_ways_intact() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let stream = f.open(&pool, echo).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let payload: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(8 << 20).collect();
    let (mut read, mut write) = tokio::io::split(stream);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        // Uneven chunks, so writes straddle frame and window boundaries.
        for chunk in sent.chunks(100_003) {
            write.write_all(chunk).await.unwrap();
        }
        write.shutdown().await.unwrap();
    });
    let mut received = Vec::with_capacity(payload.len());
    within("echo", read.read_to_end(&mut received)).await.unwrap();
    within("writer", writer).await.unwrap();
    assert_eq!(received.len(), payload.len());
    assert!(received == payload, "echoed bytes differ");
}

/// A flood from one address costs the server the accept and the reset: connections
/// over the address's handshake cap never reach the TLS setup (the accept loop runs
/// on the data path's worker).
#[tokio::test]
async fn connections_over_an_address_handshake_cap_are_reset_before_tls_setup() {
    let f = Fixture::start_full(PATIENCE, None, HandshakeLimits::new(2, 256), None).await;
    // Two silent connections hold the address's places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(f.server_addr).await.unwrap());
    }
    within("both at the TLS setup", async {
        while f.accepted.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for _ in 0..5 {
        let mut over = TcpStream::connect(f.server_addr).await.unwrap();
        let mut sink = Vec::new();
        let read = within("the reset", over.read_to_end(&mut sink)).await;
        assert!(read.is_err() || sink.is_empty(), "refused at once: {read:?}");
    }
    assert_eq!(f.accepted.load(Ordering::SeqCst), 2, "no TLS setup for the refused connections");
    // Once they go, the address is admitted again.
    drop(silent);
    let pool = f.pool();
    let mut stream = f.open(&pool, echo_server().await).await.unwrap();
    round_trip(&mut stream, b"after the flood").await;
}

#[tokio::test]
async fn garbage_and_silent_clients_are_dropped_and_the_server_keeps_serving() {
    let f = Fixture::start_with(Duration::from_millis(300)).await;
    // Not TLS at all.
    let mut plain = TcpStream::connect(f.server_addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = within("garbage close", plain.read_to_end(&mut sink)).await;
    // Connected but silent: the handshake timeout closes it.
    let mut silent = TcpStream::connect(f.server_addr).await.unwrap();
    let closed = within("silent close", silent.read_to_end(&mut sink)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    let echo = echo_server().await;
    let pool = f.pool();
    round_trip(&mut f.open(&pool, echo).await.unwrap(), b"after the noise").await;
}

#[tokio::test]
async fn shutdown_stops_new_streams_and_lets_open_ones_finish() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let pool = f.pool();
    let mut stream = f.open(&pool, echo).await.unwrap();
    f.shutdown.cancel();
    round_trip(&mut stream, b"during the drain").await;
    // The listener is closed: a new stream cannot be opened anywhere.
    let err = f.open(&pool, echo).await.unwrap_err();
    assert!(matches!(err, TunnelError::Connect { .. } | TunnelError::H2(_)), "{err}");
    assert!(!f.served.is_finished());
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", stream.read_to_end(&mut rest)).await.unwrap();
    within("drain", f.served).await.unwrap();
}

#[tokio::test]
async fn a_peer_reset_reads_as_connection_reset() {
    let f = Fixture::start().await;
    // A target that resets its connection (SO_LINGER 0) once it has read something.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1];
        tcp.read_exact(&mut buf).await.unwrap();
        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).unwrap();
    });
    let pool = f.pool();
    let mut stream = f.open(&pool, target).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let err = within("reset", stream.read(&mut buf)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// A TCP relay to `to` that can be frozen: once `frozen` is set it stops moving
/// bytes but keeps both sockets open, like a peer node that vanished without a FIN.
async fn freezable_relay(to: SocketAddr, frozen: Arc<AtomicBool>) -> SocketAddr {
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if frozen.load(Ordering::SeqCst) {
                        break;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // Whatever happened, the sockets stay open (no FIN, no RST) until the test ends.
        std::future::pending::<()>().await;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(to).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(pump(client_read, server_write, frozen.clone()));
            tokio::spawn(pump(server_read, client_write, frozen.clone()));
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_that_stops_answering_is_dropped_by_keepalive_pings() {
    let f = Fixture::start().await;
    let echo = echo_server().await;
    let frozen = Arc::new(AtomicBool::new(false));
    let relay = freezable_relay(f.server_addr, frozen.clone()).await;
    let interval = Duration::from_millis(100);
    let pool = f.pool().with_keepalive(interval, Duration::from_millis(200));
    let open = || pool.open(relay, &f.cart, &f.payments, echo, HeaderMap::new());
    let mut stream = within("open", open()).await.unwrap();
    round_trip(&mut stream, b"alive").await;
    // Answered pings keep an idle connection: several intervals pass and it stays.
    let deadline = tokio::time::Instant::now() + interval * 5;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(pool.connection_count(), 1, "a healthy peer's connection was dropped");
        tokio::time::sleep(interval / 2).await;
    }
    round_trip(&mut stream, b"still alive").await;

    // The peer goes silent without closing: the unanswered ping drops the
    // connection, so the next stream dials afresh instead of waiting forever.
    frozen.store(true, Ordering::SeqCst);
    within("the dead connection to be dropped", async {
        while pool.connection_count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut buf = [0u8; 1];
    let read = within("the stream to fail", stream.read(&mut buf)).await;
    assert!(!matches!(read, Ok(1)), "the stream of a dead connection must not deliver data: {read:?}");
}
