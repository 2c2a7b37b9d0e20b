//! Idle TLS handshakes against an agent's tunnel port, for `bench handshakes`.
//!
//! The flood keeps `connections` TCP connections open to the port, each bound to one
//! of the given source addresses (round robin), each having sent a whole TLS 1.3
//! ClientHello and then nothing: an admitted one costs the agent a key exchange and a
//! signature, then holds a handshake slot until the agent's handshake deadline. A
//! connection the agent closes is opened again, no sooner than a second after its
//! last opening (so a refused connection is retried once a second, not in a loop
//! that would spend the machine's CPU on the flooder itself).
//!
//! The probe ([`probe`]) is a well-behaved newcomer: from its own address, a
//! ClientHello every 250 ms, timing the agent's first answer (then it closes, which
//! frees the slot at once).

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A connection's next opening comes at least this long after its last.
const REOPEN_AFTER: Duration = Duration::from_secs(1);
/// Connect timeout of a flood connection (the bridge answers in microseconds; a
/// dropped SYN must not stall the loop).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Time spent opening connections per turn of the loop, at most.
const OPEN_BUDGET: Duration = Duration::from_millis(100);
/// Closed without an answer this soon after opening: refused at once.
const REFUSED_AT_ONCE: Duration = Duration::from_millis(100);

/// What the flood saw, over its whole run.
#[derive(Serialize, Clone, Debug, Default)]
pub struct FloodStats {
    pub sources: usize,
    pub target_connections: usize,
    /// Connections opened (connected, ClientHello sent).
    pub opened: u64,
    /// Connects that failed or timed out.
    pub connect_failed: u64,
    /// Connections the agent answered (its ServerHello: the handshake had a slot
    /// and ran its key exchange and signature).
    pub answered: u64,
    /// Closed by the agent without an answer within 100 ms of opening (refused at
    /// once: over the per-address cap).
    pub refused_at_once: u64,
    /// Closed by the agent without an answer later (no slot before the deadline).
    pub closed_waiting: u64,
    /// Closed by the agent after answering (the handshake deadline).
    pub closed_after_answer: u64,
    /// Connections open (sampled every 100 ms after the first second): least and mean.
    pub open_min: usize,
    pub open_mean: f64,
    /// Answered connections open at once (holding a slot), most.
    pub answered_open_max: usize,
    /// CPU time the flood's own thread used (it shares the machine with the load).
    pub cpu_ms: f64,
}

struct Conn {
    stream: TcpStream,
    opened: Instant,
    answered: bool,
}

/// A running flood; stopped (and its figures returned) by [`Flood::stop`].
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<FloodStats>,
}

impl Flood {
    /// Starts the flood on `host`'s namespace; it stops by itself at `until`.
    pub fn start(
        host: &mesh_tests::Host,
        target: SocketAddr,
        sources: Vec<IpAddr>,
        connections: usize,
        until: Instant,
    ) -> anyhow::Result<Flood> {
        anyhow::ensure!(!sources.is_empty(), "a flood needs a source address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = host.spawn_in(move || run(target, &sources, connections, until, &stopped))?;
        Ok(Flood { stop, thread })
    }

    /// Stops the flood (its connections close) and returns what it saw.
    pub fn stop(self) -> anyhow::Result<FloodStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))
    }
}

fn open(source: IpAddr, target: SocketAddr, hello: &[u8]) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    socket.connect_timeout(&SockAddr::from(target), CONNECT_TIMEOUT)?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(hello)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

fn run(
    target: SocketAddr,
    sources: &[IpAddr],
    connections: usize,
    until: Instant,
    stop: &AtomicBool,
) -> FloodStats {
    let start = Instant::now();
    let mut stats =
        FloodStats { sources: sources.len(), target_connections: connections, ..Default::default() };
    let mut conns: Vec<Option<Conn>> = (0..connections).map(|_| None).collect();
    let mut next_open = vec![start; connections];
    let mut samples = (0usize, 0usize, usize::MAX);
    let mut next_sample = start + Duration::from_secs(1);
    let mut buf = [0u8; 16 * 1024];
    let mut opened_total = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let turn = Instant::now();
        for (i, slot) in conns.iter_mut().enumerate() {
            if slot.is_some() || next_open[i] > turn {
                continue;
            }
            if turn.elapsed() > OPEN_BUDGET {
                break;
            }
            next_open[i] = Instant::now() + REOPEN_AFTER;
            opened_total += 1;
            match open(sources[i % sources.len()], target, &client_hello(opened_total)) {
                Ok(stream) => {
                    stats.opened += 1;
                    *slot = Some(Conn { stream, opened: Instant::now(), answered: false });
                }
                Err(_) => stats.connect_failed += 1,
            }
        }
        // Wait for the agent's answers and closes.
        let mut fds: Vec<(usize, libc::pollfd)> = conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.as_ref()
                    .map(|c| (i, libc::pollfd { fd: c.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }))
            })
            .collect();
        let mut raw: Vec<libc::pollfd> = fds.iter().map(|(_, p)| *p).collect();
        // SAFETY: `raw` is a live, exclusively borrowed array of `raw.len()` pollfds,
        // and every descriptor in it belongs to a stream in `conns`, open for the call.
        let ready = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, 20) };
        if ready <= 0 {
            // Nothing ready (or interrupted): with no connection open, do not spin.
            if raw.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            for ((i, _), p) in fds.iter_mut().zip(&raw) {
                if p.revents == 0 {
                    continue;
                }
                let Some(conn) = conns[*i].as_mut() else { continue };
                let closed = loop {
                    match conn.stream.read(&mut buf) {
                        Ok(0) => break true,
                        Ok(_) if !conn.answered => {
                            conn.answered = true;
                            stats.answered += 1;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break true,
                    }
                };
                if closed {
                    let conn = conns[*i].take().expect("checked above");
                    match (conn.answered, conn.opened.elapsed() < REFUSED_AT_ONCE) {
                        (true, _) => stats.closed_after_answer += 1,
                        (false, true) => stats.refused_at_once += 1,
                        (false, false) => stats.closed_waiting += 1,
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= next_sample {
            next_sample = now + Duration::from_millis(100);
            let open = conns.iter().flatten().count();
            let answered = conns.iter().flatten().filter(|c| c.answered).count();
            samples = (samples.0 + 1, samples.1 + open, samples.2.min(open));
            stats.answered_open_max = stats.answered_open_max.max(answered);
        }
    }
    if samples.0 > 0 {
        stats.open_min = samples.2;
        stats.open_mean = samples.1 as f64 / samples.0 as f64;
    }
    stats.cpu_ms = thread_cpu_ms();
    stats
}

/// CPU time the calling thread has used.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// What the newcomer saw: the time to the agent's first answer of each ClientHello.
#[derive(Serialize, Clone, Debug, Default)]
pub struct ProbeStats {
    pub attempts: u64,
    /// Answered within the deadline.
    pub answered: u64,
    pub p50_ms: f64,
    pub max_ms: f64,
}

/// A running probe; see [`Probe::stop`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<ProbeStats>,
}

/// Starts a probe on `host`'s namespace (its own address): a ClientHello to `target`
/// every 250 ms, each given `deadline` for the first answer; it stops by itself at `until`.
pub fn probe(
    host: &mesh_tests::Host,
    target: SocketAddr,
    deadline: Duration,
    until: Instant,
) -> anyhow::Result<Probe> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = host.spawn_in(move || {
        let mut times = Vec::new();
        let mut attempts = 0;
        while !stopped.load(Ordering::Relaxed) && Instant::now() < until {
            attempts += 1;
            let started = Instant::now();
            let answered = (|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&target, deadline)?;
                s.set_nodelay(true)?;
                s.write_all(&client_hello(attempts))?;
                s.set_read_timeout(Some(deadline))?;
                Ok(s.read(&mut [0u8; 1024])? > 0)
            })();
            if matches!(answered, Ok(true)) {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            std::thread::sleep(Duration::from_millis(250).saturating_sub(started.elapsed()));
        }
        times.sort_by(f64::total_cmp);
        ProbeStats {
            attempts,
            answered: times.len() as u64,
            p50_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
            max_ms: times.last().copied().unwrap_or(f64::NAN),
        }
    })?;
    Ok(Probe { stop, thread })
}

impl Probe {
    pub fn stop(self) -> anyhow::Result<ProbeStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the probe thread panicked"))
    }
}

/// A TLS 1.3 ClientHello record as an agent would send one (x25519, ECDSA P-256
/// signatures, ALPN `h2`), `n` making its random unique. The key share is the
/// x25519 base point: any public key costs the server the same key exchange.
pub fn client_hello(n: u64) -> Vec<u8> {
    fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
    }
    let mut ext = Vec::new();
    extension(&mut ext, 0x002b, &[2, 0x03, 0x04]); // supported_versions: TLS 1.3
    extension(&mut ext, 0x000a, &[0, 2, 0x00, 0x1d]); // supported_groups: x25519
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, ed25519
    extension(&mut ext, 0x000d, &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x08, 0x07]);
    let mut share = vec![0, 36, 0x00, 0x1d, 0, 32, 9];
    share.extend([0u8; 31]);
    extension(&mut ext, 0x0033, &share); // key_share
    extension(&mut ext, 0x0010, &[0, 3, 2, b'h', b'2']); // ALPN

    let mut body = vec![0x03, 0x03];
    for _ in 0..4 {
        body.extend(n.to_be_bytes()); // random
    }
    body.push(32);
    body.extend([0x5a; 32]); // legacy session id (middlebox compatibility)
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]); // TLS 1.3 cipher suites
    body.extend([1, 0]); // no compression
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);

    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((body.len() as u16 + 4).to_be_bytes());
    record.push(1); // client_hello
    record.extend(&(body.len() as u32).to_be_bytes()[1..]);
    record.extend(body);
    record
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The ClientHello is one a real TLS server takes: rustls answers it with its
    /// first flight (ServerHello and the rest), which is the work the flood makes
    /// the agent do.
    #[test]
    fn rustls_answers_the_client_hello() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".into()]).unwrap().self_signed(&key).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let mut server = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        let hello = client_hello(7);
        assert_eq!(usize::from(u16::from_be_bytes([hello[3], hello[4]])) + 5, hello.len());
        server.read_tls(&mut &hello[..]).unwrap();
        server.process_new_packets().expect("rustls accepts the ClientHello");
        assert!(server.wants_write(), "rustls answers with its first flight");
        assert_eq!(server.alpn_protocol(), Some(&b"h2"[..]));
    }
}
