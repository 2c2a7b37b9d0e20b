//! `mesh-probe`: a small raw-TCP workload client for the mesh's tests, demo and
//! benchmarks. Every subcommand is bounded by `--timeout` and prints one JSON line.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mesh_tests::attacker::pseudo_random;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Raw TCP workload client for mesh tests")]
struct Cli {
    /// Destination.
    #[arg(long, global = true, default_value = "127.0.0.1:7000")]
    connect: SocketAddr,
    /// Give up after this long (connect, each read and write).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime_lite)]
    timeout: Duration,
    /// Put this SO_MARK on the socket before connecting (decimal or 0x-hex), as
    /// a root workload trying to pass for the agent would.
    #[arg(long, global = true, value_parser = parse_mark)]
    mark: Option<u32>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send N pseudo-random bytes, half-close, read them back from an echo server and
    /// compare byte for byte.
    Echo {
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Send hex bytes, then half-close and read the reply until EOF, or reset.
    Send {
        #[arg(long, default_value = "")]
        hex: String,
        /// Close with RST right after sending.
        #[arg(long)]
        reset: bool,
        /// Wait this long after sending before closing.
        #[arg(long, default_value = "0ms", value_parser = humantime_lite)]
        linger: Duration,
    },
    /// Ask a whoami server which peer address it saw.
    Whoami,
    /// Read a server-first banner without sending, then exchange one echoed line.
    Banner,
    /// Connect N times sequentially, exchanging one small echo each time; report
    /// latency percentiles of connect and of connect+round trip.
    Connects {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// HTTP load against `--connect`: fixed `--rps` (open loop) or, with 0, as fast as
    /// possible; prints requests, errors, rate and latency percentiles.
    Load {
        #[arg(long, default_value_t = 0)]
        rps: u32,
        #[arg(long, default_value = "10s", value_parser = humantime_lite)]
        duration: Duration,
        #[arg(long, default_value_t = 8)]
        connections: u32,
        /// HTTP/2 with prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// HTTP/2 closed loop: requests in flight per connection.
        #[arg(long, default_value_t = 8)]
        streams: u32,
        #[arg(long, default_value = "bench")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// `count` GET requests to `path` over ONE connection (HTTP/1.1 keep-alive, or
    /// HTTP/2 with prior knowledge): each reply's status, `x-mesh-endpoint` and the
    /// `server=<name>` its body starts with.
    Http {
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long)]
        http2: bool,
    },
    /// Open `count` connections one after another, answer one HTTP/1.1 keep-alive
    /// GET on each, print how many are held, then hold them all open until stdin
    /// closes: what an agent's memory is like with that many connections open.
    Hold {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// WebSocket client by hand: HTTP/1.1 Upgrade to `path`, check the accept key,
    /// send `count` masked text frames and read each echo, then close.
    Websocket {
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long, default_value = "hello")]
        message: String,
        #[arg(long, default_value_t = 3)]
        count: usize,
    },
}

fn humantime_lite(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("bad duration unit in {s:?} (use ms or s)")),
    }
}

fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("bad mark {s:?} (decimal or 0x-hex)"))
}

fn connect(cli: &Cli) -> Result<TcpStream> {
    let s = match cli.mark {
        None => TcpStream::connect_timeout(&cli.connect, cli.timeout),
        Some(mark) => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(cli.connect),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_mark(mark).context("setting SO_MARK (needs CAP_NET_ADMIN or CAP_NET_RAW)")?;
            socket.connect_timeout(&cli.connect.into(), cli.timeout).map(|()| TcpStream::from(socket))
        }
    }
    .with_context(|| format!("connecting to {}", cli.connect))?;
    s.set_read_timeout(Some(cli.timeout))?;
    s.set_write_timeout(Some(cli.timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Soft `RLIMIT_NOFILE` up to the hard limit: `hold` keeps thousands of sockets.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body (nginx's answers).
fn read_http_response(s: &mut TcpStream) -> Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before a whole response");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 16 * 1024 {
                bail!("response head over 16 KiB");
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("not a 200: {}", head.lines().next().unwrap_or_default());
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        if buf.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex")).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e6
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match &cli.cmd {
        Cmd::Load { rps, duration, connections, http2, streams, host, path } => {
            let spec = mesh_tests::load::LoadSpec {
                target: cli.connect,
                host: host.clone(),
                path: path.clone(),
                http2: *http2,
                rps: *rps,
                duration: *duration,
                connections: *connections,
                streams: *streams,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            serde_json::to_value(rt.block_on(mesh_tests::load::run(spec))?)?
        }
        Cmd::Echo { bytes, seed } => {
            let s = connect(&cli)?;
            let local = s.local_addr()?;
            let data = pseudo_random(*bytes, *seed);
            let mut writer = s.try_clone()?;
            let to_send = data.clone();
            let w = std::thread::spawn(move || -> std::io::Result<()> {
                writer.write_all(&to_send)?;
                writer.shutdown(Shutdown::Write)
            });
            let mut got = Vec::with_capacity(*bytes);
            (&s).read_to_end(&mut got).context("reading echo")?;
            w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?.context("writing")?;
            json!({"local": local.to_string(), "sent": data.len(), "received": got.len(), "ok": got == data})
        }
        Cmd::Send { hex: h, reset, linger } => {
            let mut s = connect(&cli)?;
            let local = s.local_addr()?;
            s.write_all(&unhex(h)?)?;
            std::thread::sleep(*linger);
            if *reset {
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                drop(s);
                json!({"local": local.to_string(), "reset": true})
            } else {
                s.shutdown(Shutdown::Write)?;
                let mut got = Vec::new();
                let res = s.read_to_end(&mut got);
                json!({"local": local.to_string(), "reply_hex": hex(&got), "error": res.err().map(|e| e.to_string())})
            }
        }
        Cmd::Hold { count } => {
            raise_nofile_limit();
            let start = Instant::now();
            let mut held = Vec::with_capacity(*count);
            for i in 0..*count {
                let mut s = connect(&cli).with_context(|| format!("connection {} of {count}", i + 1))?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                read_http_response(&mut s).with_context(|| format!("answer on connection {}", i + 1))?;
                held.push(s);
            }
            let line = json!({"held": held.len(), "open_ms": start.elapsed().as_secs_f64() * 1000.0});
            println!("{line}");
            std::io::stdout().flush()?;
            // Until the caller closes our stdin (or goes away).
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            return Ok(());
        }
        Cmd::Whoami => {
            let mut s = connect(&cli)?;
            let local = s.local_addr()?;
            s.write_all(b"who\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            let saw = line.trim().strip_prefix("peer=").unwrap_or_default().to_owned();
            json!({"local": local.to_string(), "server_saw": saw})
        }
        Cmd::Banner => {
            let start = Instant::now();
            let mut s = connect(&cli)?;
            let mut reader = BufReader::new(s.try_clone()?);
            let mut banner = String::new();
            reader.read_line(&mut banner)?;
            let banner_ms = start.elapsed().as_secs_f64() * 1000.0;
            s.write_all(b"ping\n")?;
            let mut echo = String::new();
            reader.read_line(&mut echo)?;
            json!({"banner": banner.trim(), "echo": echo.trim(), "banner_ms": banner_ms})
        }
        Cmd::Connects { count } => {
            let mut connect_times = Vec::with_capacity(*count);
            let mut rtt_times = Vec::with_capacity(*count);
            let mut buf = [0u8; 1];
            for _ in 0..*count {
                let start = Instant::now();
                let mut s = connect(&cli)?;
                connect_times.push(start.elapsed());
                // A byte no sniffer could take for HTTP or TLS, so the agent decides at once.
                s.write_all(&[0])?;
                s.read_exact(&mut buf)?;
                rtt_times.push(start.elapsed());
            }
            connect_times.sort();
            rtt_times.sort();
            json!({
                "count": count,
                "connect_p50_us": percentile(&connect_times, 0.50),
                "connect_p99_us": percentile(&connect_times, 0.99),
                "first_byte_p50_us": percentile(&rtt_times, 0.50),
                "first_byte_p99_us": percentile(&rtt_times, 0.99),
            })
        }
        Cmd::Http { path, count, http2 } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(http_requests(&cli, path, *count, *http2))?
        }
        Cmd::Websocket { path, message, count } => websocket(&cli, path, message, *count)?,
    };
    println!("{out}");
    Ok(())
}

fn websocket(cli: &Cli, path: &str, message: &str, count: usize) -> Result<serde_json::Value> {
    use mesh_tests::websocket as ws;
    let mut s = connect(cli)?;
    let key = ws::base64(&pseudo_random(16, std::process::id().into()));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        cli.connect
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).context("reading the handshake response")?;
        if n == 0 {
            bail!("connection closed during the handshake: {:?}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    let headers: serde_json::Map<String, serde_json::Value> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), json!(v.trim())))
        .collect();
    let accept_ok =
        headers.get("sec-websocket-accept").and_then(|v| v.as_str()) == Some(&ws::accept_key(&key));
    let mut echoed = Vec::new();
    let mut read_frame = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Result<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, used)) = ws::decode(buf) {
                buf.drain(..used);
                return Ok((op, payload));
            }
            let n = s.read(&mut chunk).context("reading a frame")?;
            if n == 0 {
                bail!("connection closed while reading a frame");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    if status.contains(" 101 ") {
        for i in 0..count {
            let text = format!("{message} {i}");
            s.write_all(&ws::encode(ws::TEXT, text.as_bytes(), Some([0x12, 0x34, 0x56, i as u8])))?;
            let (op, payload) = read_frame(&mut s, &mut buf)?;
            echoed.push(json!({"opcode": op, "text": String::from_utf8_lossy(&payload)}));
        }
        s.write_all(&ws::encode(ws::CLOSE, &[0x03, 0xe8], Some([9, 8, 7, 6])))?;
        let (op, _) = read_frame(&mut s, &mut buf)?;
        echoed.push(json!({"opcode": op}));
    }
    Ok(json!({"status": status, "headers": headers, "accept_ok": accept_ok, "frames": echoed}))
}

async fn http_requests(cli: &Cli, path: &str, count: usize, http2: bool) -> Result<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::time::timeout(cli.timeout, tokio::net::TcpStream::connect(cli.connect))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>),
    }
    let mut sender = if http2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    let mut replies = Vec::with_capacity(count);
    for i in 0..count {
        let req = hyper::Request::get(format!("http://{}{path}?i={i}", cli.connect))
            .header("host", cli.connect.to_string())
            .body(Empty::new())?;
        let send = async {
            match &mut sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => s.send_request(req).await,
            }
        };
        let resp = tokio::time::timeout(cli.timeout, send).await.context("request timed out")??;
        let status = resp.status().as_u16();
        let endpoint = resp
            .headers()
            .get("x-mesh-endpoint")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = tokio::time::timeout(cli.timeout, resp.into_body().collect())
            .await
            .context("body timed out")??;
        let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        let server =
            body.strip_prefix("server=").and_then(|r| r.split_whitespace().next()).map(str::to_owned);
        replies.push(json!({"status": status, "endpoint": endpoint, "server": server}));
    }
    Ok(json!({"replies": replies}))
}
