//! Full agent-to-agent mTLS handshakes over loopback TCP, both sides in this
//! process on one tokio thread (so the rate is per core, both sides' work counted).
//!
//! A handshake here is: TCP connect, TLS 1.3 with client certificate, both SPIFFE
//! checks, and one byte from the server (so the server has verified the client
//! before the clock stops). Criterion measures the mean; a plain loop afterwards
//! prints the latency distribution and the rate.
//!
//! Then the server side alone, as a receiving agent sees a burst of new peers: the
//! server runs on a thread of its own, clients on this one with 8 handshakes under
//! way at a time, and the server thread's CPU time (user and system, so accepting
//! and the socket work are counted) gives its handshakes per CPU-second.

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

/// The calling thread's CPU time, user and system.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Server-side handshakes per CPU-second: `n` handshakes, 8 at a time, against a
/// server on its own thread, whose CPU time is read on that thread.
fn server_side(n: usize) {
    let ca = Ca::new();
    let cart = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
    let payments = SpiffeId::new("cluster.local", "shop", "payments").unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_identity = ca.identity(&payments);
    let root = ca.root.clone();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let tls = TlsConfigs::new(
                TrustBundle::new("cluster.local", vec![root]).unwrap(),
                Arc::new(TokioClock::new()),
            );
            let acceptor = TlsAcceptor::from(tls.server_config(server_identity).unwrap());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let started = thread_cpu();
            let accept = async {
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
            };
            tokio::select! {
                () = accept => unreachable!(),
                _ = stop_rx => {}
            }
            thread_cpu() - started
        })
    });
    let addr = addr_rx.recv().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls = runtime.block_on(async {
        TlsConfigs::new(
            TrustBundle::new("cluster.local", vec![ca.root.clone()]).unwrap(),
            Arc::new(TokioClock::new()),
        )
    });
    let client = tls.client_config(ca.identity(&cart), payments).unwrap();
    let start = Instant::now();
    runtime.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            if i >= 8 {
                set.join_next().await.unwrap().unwrap();
            }
            set.spawn(handshake(addr, client.clone()));
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
    });
    let wall = start.elapsed();
    stop_tx.send(()).unwrap();
    let cpu = server.join().unwrap();
    println!(
        "mtls handshake, server side on its own thread: n={n} server CPU {:.0} us each, {:.0} handshakes per CPU-second; wall rate {:.0}/s",
        cpu.as_secs_f64() * 1e6 / n as f64,
        n as f64 / cpu.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
}

fn bench_server_side(_: &mut Criterion) {
    server_side(4000);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5));
    targets = bench, bench_server_side
}
criterion_main!(benches);
