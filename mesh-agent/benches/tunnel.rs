//! The agent-to-agent tunnel against plain loopback TCP, both in one run so the
//! ratio means something on a shared machine.
//!
//! - open: a new CONNECT stream over an already established tunnel connection
//!   (request, the server's connect to the target, the 200), against a plain TCP
//!   connect to the same target.
//! - throughput: 16 MiB one way to a sink that acknowledges EOF with one byte,
//!   through a tunnel stream against over a plain TCP connection.
//!
//! Everything (client, tunnel server, target) runs on one tokio thread, so the
//! numbers are per core with every side's work counted. Needs root (the pool's
//! sockets carry SO_MARK).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::HeaderMap;
use mesh_agent::identity::{SpiffeId, TlsConfigs, TokioClock, TrustBundle};
use mesh_agent::socket::SocketFactory;
use mesh_agent::tunnel::{Authorize, ConnectTarget, TunnelPool, TunnelServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const TRANSFER: usize = 16 << 20;
const CHUNK: usize = 64 * 1024;

mod common;
use common::Ca;

struct Setup {
    runtime: Runtime,
    pool: TunnelPool,
    tunnel_addr: SocketAddr,
    cart: SpiffeId,
    payments: SpiffeId,
    /// Accepts and holds connections (for the open benchmark).
    idle_target: SocketAddr,
    /// Reads to EOF, then answers one byte.
    sink_target: SocketAddr,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ca = Ca::new();
    let cart = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    let payments = SpiffeId::new("cluster.local", "shop", "payments").unwrap();
    let tls = TlsConfigs::new(
        TrustBundle::new("cluster.local", vec![ca.root.clone()]).unwrap(),
        Arc::new(TokioClock::new()),
    );
    let (tunnel_addr, idle_target, sink_target) = runtime.block_on(async {
        let server_tls = TunnelServer::fixed_tls(tls.server_config(ca.identity(&payments)).unwrap());
        let authorize: Authorize = Arc::new(|_, _| Ok(()));
        let connect: ConnectTarget = Arc::new(|target| {
            Box::pin(async move {
                let tcp = TcpStream::connect(target).await?;
                tcp.set_nodelay(true)?;
                Ok(tcp)
            })
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tunnel_addr = listener.local_addr().unwrap();
        let server = TunnelServer::new(server_tls, authorize, connect);
        tokio::spawn(server.serve(listener, CancellationToken::new()));
        (tunnel_addr, spawn_target(false).await, spawn_target(true).await)
    });
    let source = ca.identity(&cart);
    let client_tls =
        move |_: &SpiffeId, expected: &SpiffeId| tls.client_config(source.clone(), expected.clone());
    let pool = TunnelPool::new(Arc::new(client_tls), SocketFactory::new(0), Duration::from_secs(5));
    Setup { runtime, pool, tunnel_addr, cart, payments, idle_target, sink_target }
}

/// A target that either drops what it reads and acknowledges EOF (`sink`) or just
/// holds the connection until the client goes.
async fn spawn_target(sink: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    let _ = n;
                }
                if sink {
                    let _ = tcp.write_all(b"k").await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    addr
}

impl Setup {
    async fn open(&self, target: SocketAddr) -> mesh_agent::tunnel::TunnelStream {
        self.pool.open(self.tunnel_addr, &self.cart, &self.payments, target, HeaderMap::new()).await.unwrap()
    }
}

async fn tcp_connect(target: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(target).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp
}

/// Sends TRANSFER bytes, half-closes, waits for the sink's acknowledgement.
async fn transfer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let chunk = vec![0x5au8; CHUNK];
    for _ in 0..TRANSFER / CHUNK {
        stream.write_all(&chunk).await.unwrap();
    }
    stream.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await.unwrap();
}

fn bench(c: &mut Criterion) {
    let s = setup();
    // Establish the pooled connection before timing opens over it.
    drop(s.runtime.block_on(s.open(s.idle_target)));

    let mut open = c.benchmark_group("open");
    open.bench_function("tunnel_stream_on_existing_connection", |b| {
        b.iter(|| drop(s.runtime.block_on(s.open(s.idle_target))));
    });
    open.bench_function("plain_tcp_connect", |b| {
        b.iter(|| drop(s.runtime.block_on(tcp_connect(s.idle_target))))
    });
    open.finish();

    let mut throughput = c.benchmark_group("throughput");
    throughput.throughput(Throughput::Bytes(TRANSFER as u64));
    throughput.bench_function("tunnel_16MiB", |b| {
        b.iter(|| s.runtime.block_on(async { transfer(s.open(s.sink_target).await).await }));
    });
    throughput.bench_function("plain_tcp_16MiB", |b| {
        b.iter(|| s.runtime.block_on(async { transfer(tcp_connect(s.sink_target).await).await }));
    });
    throughput.finish();

    // One plain pass of each, printed side by side, for the ratios.
    let time = |n: u32, f: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        start.elapsed() / n
    };
    let tunnel_open = time(2000, &|| drop(s.runtime.block_on(s.open(s.idle_target))));
    let tcp_open = time(2000, &|| drop(s.runtime.block_on(tcp_connect(s.idle_target))));
    let tunnel_copy = time(10, &|| s.runtime.block_on(async { transfer(s.open(s.sink_target).await).await }));
    let tcp_copy =
        time(10, &|| s.runtime.block_on(async { transfer(tcp_connect(s.sink_target).await).await }));
    let mib_s = |d: Duration| (TRANSFER >> 20) as f64 / d.as_secs_f64();
    println!(
        "open: tunnel stream {tunnel_open:?}, tcp connect {tcp_open:?}, ratio {:.2}",
        tunnel_open.as_secs_f64() / tcp_open.as_secs_f64()
    );
    println!(
        "throughput: tunnel {:.0} MiB/s, tcp {:.0} MiB/s, tunnel/tcp {:.2}",
        mib_s(tunnel_copy),
        mib_s(tcp_copy),
        tcp_copy.as_secs_f64() / tunnel_copy.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
