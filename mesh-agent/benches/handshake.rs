//! Full agent-to-agent mTLS handshakes over loopback TCP, both sides in this
//! process on one tokio thread (so the rate is per core, both sides' work counted).
//!
//! A handshake here is: TCP connect, TLS 1.3 with client certificate, both SPIFFE
//! checks, and one byte from the server (so the server has verified the client
//! before the clock stops). Criterion measures the mean; a plain loop afterwards
//! prints the latency distribution and the rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_agent::identity::{SpiffeId, TlsConfigs, TokioClock, TrustBundle};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

mod common;
use common::Ca;

struct Setup {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    client: Arc<ClientConfig>,
}

fn setup() -> Setup {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ca = Ca::new();
    let cart = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    let payments = SpiffeId::new("cluster.local", "shop", "payments").unwrap();
    let (addr, client) = runtime.block_on(async {
        let tls = TlsConfigs::new(
            TrustBundle::new("cluster.local", vec![ca.root.clone()]).unwrap(),
            Arc::new(TokioClock::new()),
        );
        let server: Arc<ServerConfig> = tls.server_config(ca.identity(&payments)).unwrap();
        let client = tls.client_config(ca.identity(&cart), payments.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"k").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        (addr, client)
    });
    Setup { runtime, addr, client }
}

async fn handshake(addr: SocketAddr, client: Arc<ClientConfig>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(client).connect(name, tcp).await.unwrap();
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
}

fn bench(c: &mut Criterion) {
    let s = setup();
    c.bench_function("mtls_handshake_loopback", |b| {
        b.iter(|| s.runtime.block_on(handshake(s.addr, s.client.clone())));
    });

    let n = 2000;
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        s.runtime.block_on(handshake(s.addr, s.client.clone()));
        latencies.push(t.elapsed());
    }
    let total = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "mtls handshake, one thread, both sides: n={n} p50={:?} p90={:?} p99={:?} rate={:.0} handshakes/s",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        n as f64 / total.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
