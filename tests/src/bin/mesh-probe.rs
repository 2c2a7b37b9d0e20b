//! `mesh-probe`: a small raw-TCP workload client for the mesh's tests, demo and
//! benchmarks. Every subcommand is bounded by `--timeout` and prints one JSON line.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
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

fn connect(cli: &Cli) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&cli.connect, cli.timeout)
        .with_context(|| format!("connecting to {}", cli.connect))?;
    s.set_read_timeout(Some(cli.timeout))?;
    s.set_write_timeout(Some(cli.timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// xorshift64*: deterministic bytes without a dependency.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
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
    };
    println!("{out}");
    Ok(())
}
