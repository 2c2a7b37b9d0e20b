//! An HTTP load generator for benchmarks: HTTP/1.1 or HTTP/2 (prior knowledge),
//! either open-loop at a fixed request rate or closed-loop at the maximum rate,
//! with latency percentiles.
//!
//! At a fixed rate, each request's latency counts from the moment it was issued,
//! which includes waiting for a free HTTP/1.1 connection: a stalled response delays
//! the requests queued behind it, and that wait is part of what a client would see.
//! (Counting from the due time instead would add the timer's millisecond slack to
//! every sample.) `behind_ms` says how far the generator itself fell behind schedule.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub http2: bool,
    /// Requests per second in total; 0 runs closed-loop as fast as possible.
    pub rps: u32,
    pub duration: Duration,
    /// TCP connections.
    pub connections: u32,
    /// HTTP/2: requests in flight per connection in closed-loop mode.
    pub streams: u32,
}

/// The outcome.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Fixed rate: how late the generator issued its latest request (ms).
    pub behind_ms: f64,
}

type Samples = Arc<std::sync::Mutex<(Vec<u32>, u64)>>;

fn record(samples: &Samples, latency: Option<Duration>) {
    let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
    match latency {
        Some(l) => s.0.push(l.as_micros().min(u128::from(u32::MAX)) as u32),
        None => s.1 += 1,
    }
}

enum Sender {
    H1(Mutex<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn connect(spec: &LoadSpec) -> Result<Sender> {
    let tcp =
        TcpStream::connect(spec.target).await.with_context(|| format!("connecting to {}", spec.target))?;
    tcp.set_nodelay(true)?;
    if spec.http2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Sender::H1(Mutex::new(send)))
    }
}

fn request(spec: &LoadSpec) -> Request<Empty<Bytes>> {
    let uri = if spec.http2 { format!("http://{}{}", spec.host, spec.path) } else { spec.path.clone() };
    let mut b = Request::get(uri);
    if !spec.http2 {
        b = b.header("host", &spec.host);
    }
    b.body(Empty::new()).expect("valid request")
}

/// One request; `Some(time to full response)` or `None` on any failure or non-2xx.
async fn one(sender: &Sender, spec: &LoadSpec) -> bool {
    match sender {
        Sender::H1(s) => {
            // One request at a time on an HTTP/1.1 connection: the lock is the queue.
            let mut s = s.lock().await;
            if s.ready().await.is_err() {
                return false;
            }
            match s.send_request(request(spec)).await {
                Ok(r) => r.into_body().collect().await.is_ok(),
                Err(_) => false,
            }
        }
        Sender::H2(s) => match s.clone().send_request(request(spec)).await {
            Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
            Err(_) => false,
        },
    }
}

/// Runs the load and reports.
pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    let spec = Arc::new(spec);
    let samples: Samples = Default::default();
    let mut senders = Vec::new();
    for _ in 0..spec.connections.max(1) {
        senders.push(Arc::new(connect(&spec).await?));
    }
    let start = Instant::now();
    let end = start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let mut behind_ms = 0.0;
    if spec.rps == 0 {
        let per_conn = if spec.http2 { spec.streams.max(1) } else { 1 };
        for sender in &senders {
            for _ in 0..per_conn {
                let (sender, spec, samples) = (sender.clone(), spec.clone(), samples.clone());
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let t = Instant::now();
                        let ok = one(&sender, &spec).await;
                        record(&samples, ok.then(|| t.elapsed()));
                    }
                });
            }
        }
    } else {
        // Requests are due at a fixed interval, spread round robin over connections.
        let interval = Duration::from_secs_f64(1.0 / f64::from(spec.rps));
        let total = (spec.duration.as_secs_f64() * f64::from(spec.rps)) as u64;
        let mut behind_max = Duration::ZERO;
        let behind = &mut behind_max;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::from_std(start), interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for i in 0..total {
            tick.tick().await;
            let due = start + interval.mul_f64(i as f64);
            let issued = Instant::now();
            *behind = (*behind).max(issued.saturating_duration_since(due));
            let sender = senders[(i % senders.len() as u64) as usize].clone();
            let (spec, samples) = (spec.clone(), samples.clone());
            tasks.spawn(async move {
                let ok = one(&sender, &spec).await;
                record(&samples, ok.then(|| issued.elapsed()));
            });
            // Reap finished tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        behind_ms = behind_max.as_secs_f64() * 1000.0;
    }
    while tasks.join_next().await.is_some() {}
    let seconds = start.elapsed().as_secs_f64();
    let (mut lat, errors) = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() { 0.0 } else { f64::from(lat[((lat.len() as f64 - 1.0) * p).round() as usize]) }
    };
    Ok(LoadReport {
        requests: lat.len() as u64,
        errors,
        seconds,
        rps: lat.len() as f64 / seconds,
        p50_us: pct(0.50),
        p90_us: pct(0.90),
        p99_us: pct(0.99),
        max_us: lat.last().copied().map_or(0.0, f64::from),
        behind_ms,
    })
}
