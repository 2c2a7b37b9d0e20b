//! The plaintext relay between real loopback sockets, copying and splicing: bytes
//! arrive whole and in order, are counted exactly, half-close and resets cross it,
//! the idle timeout still cuts it, and refused pipes leave it copying.

use std::os::fd::OwnedFd;

use ring::digest::{Context, SHA256};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinHandle,
    time::timeout,
};

use super::*;

const MIB: usize = 1024 * 1024;
/// Far beyond what any test here takes, even on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// A client and a server, the relay between them running on its own task.
struct Relayed {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<Outcome>,
}

async fn start(sniffed: &'static [u8], idle_timeout: Option<Duration>, pipes: &Pipes) -> Relayed {
    let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(agent.local_addr().unwrap()).await.unwrap();
    let (mut near, _) = agent.accept().await.unwrap();
    let mut far = TcpStream::connect(upstream.local_addr().unwrap()).await.unwrap();
    let (server, _) = upstream.accept().await.unwrap();
    let pipes = pipes.clone();
    let relay = tokio::spawn(async move {
        relay(&mut near, &mut far, sniffed, Instant::now(), idle_timeout, &pipes).await
        // Both agent sockets close here (with a RST on the side set to be reset).
    });
    Relayed { client, server, relay }
}

/// Writes `len` bytes (a random block whose chunks are numbered, so a chunk lost,
/// repeated or moved changes the digest); returns their SHA-256.
async fn send(to: &mut (impl AsyncWrite + Unpin), len: usize, seed: u64) -> Vec<u8> {
    let mut block = vec![0u8; 256 * 1024];
    fastrand::Rng::with_seed(seed).fill(&mut block);
    let mut digest = Context::new(&SHA256);
    let (mut sent, mut chunk) = (0, 0u64);
    while sent < len {
        let n = block.len().min(len - sent);
        block[..8].copy_from_slice(&chunk.to_le_bytes());
        to.write_all(&block[..n]).await.unwrap();
        digest.update(&block[..n]);
        sent += n;
        chunk += 1;
    }
    digest.finish().as_ref().to_vec()
}

/// Reads until EOF; returns how much and its SHA-256.
async fn receive(from: &mut (impl AsyncRead + Unpin)) -> (usize, Vec<u8>) {
    let mut buf = vec![0u8; 128 * 1024];
    let mut digest = Context::new(&SHA256);
    let mut len = 0;
    loop {
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            return (len, digest.finish().as_ref().to_vec());
        }
        digest.update(&buf[..n]);
        len += n;
    }
}

/// Reads exactly `len` bytes and returns them.
async fn read_exact(from: &mut (impl AsyncRead + Unpin), len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    from.read_exact(&mut buf).await.unwrap();
    buf
}

/// Sends `len` bytes from `from` and reads them at `to` at the same time.
async fn exchange(from: &mut TcpStream, to: &mut TcpStream, len: usize, seed: u64) {
    let (sent, got) = tokio::join!(send(from, len, seed), read_exact(to, len));
    assert_eq!(ring::digest::digest(&SHA256, &got).as_ref(), sent);
}

/// `len` bytes each way at once, each side shutting down after sending; checks
/// what arrived and what the relay counted.
async fn both_ways(pipes: &Pipes, len: usize) -> Outcome {
    let Relayed { client, server, relay } = start(b"sniffed", Some(PATIENCE), pipes).await;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let c2u = tokio::spawn(async move {
        let digest = send(&mut cw, len, 1).await;
        cw.shutdown().await.unwrap();
        digest
    });
    let u2c = tokio::spawn(async move {
        let digest = send(&mut sw, len, 2).await;
        sw.shutdown().await.unwrap();
        digest
    });
    let at_server = tokio::spawn(async move {
        assert_eq!(read_exact(&mut sr, 7).await, b"sniffed", "the sniffed bytes come first");
        receive(&mut sr).await
    });
    let at_client = tokio::spawn(async move { receive(&mut cr).await });
    let ran = timeout(PATIENCE, async {
        let (sent_up, sent_down) = (c2u.await.unwrap(), u2c.await.unwrap());
        let (got_up, got_down) = (at_server.await.unwrap(), at_client.await.unwrap());
        assert_eq!(got_up, (len, sent_up), "client to server");
        assert_eq!(got_down, (len, sent_down), "server to client");
        relay.await.unwrap()
    })
    .await;
    let outcome = ran.expect("the transfer finishes");
    assert_eq!(outcome.error, None);
    assert!(!outcome.idle_timeout);
    assert_eq!(outcome.client_to_upstream, len as u64 + 7, "counted with the sniffed bytes");
    assert_eq!(outcome.upstream_to_client, len as u64);
    assert_eq!(pipes.in_use(), 0, "the pipes are closed with the relay");
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_arrive_whole_through_splice() {
    let pipes = Pipes::new(8);
    both_ways(&pipes, 64 * MIB).await;
    assert_eq!(pipes.taken(), 2, "both directions went to splice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipes_the_relay_copies_every_byte() {
    fn refused(_: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }
    // The kernel refuses the pipe (EMFILE): the connection goes on copying.
    let refusing = Pipes::with_open(8, refused);
    both_ways(&refusing, 16 * MIB).await;
    assert_eq!((refusing.taken(), refusing.in_use()), (0, 0));
    // The budget is spent, or splicing is off.
    for pipes in [Pipes::new(0), Pipes::off()] {
        both_ways(&pipes, 16 * MIB).await;
        assert_eq!(pipes.taken(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_exchange_takes_no_pipe() {
    let pipes = Pipes::new(8);
    both_ways(&pipes, 100 * 1024).await;
    assert_eq!(pipes.taken(), 0, "no read filled the largest buffer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_shuts_its_write_side_still_receives_the_whole_answer() {
    let pipes = Pipes::new(8);
    let Relayed { client, mut server, relay } = start(b"", Some(PATIENCE), &pipes).await;
    let (mut cr, mut cw) = client.into_split();
    let ran = timeout(PATIENCE, async {
        // The server sees the request end (EOF), then answers.
        let (sent_up, got) = tokio::join!(
            async {
                let digest = send(&mut cw, 4 * MIB, 3).await;
                cw.shutdown().await.unwrap();
                digest
            },
            receive(&mut server)
        );
        assert_eq!(got, (4 * MIB, sent_up));
        let answering = tokio::spawn(async move {
            let digest = send(&mut server, 16 * MIB, 4).await;
            server.shutdown().await.unwrap();
            (digest, server)
        });
        let got = receive(&mut cr).await;
        let (sent_down, _server) = answering.await.unwrap();
        assert_eq!(got, (16 * MIB, sent_down), "the whole answer after the half-close");
        relay.await.unwrap()
    })
    .await;
    let outcome = ran.expect("the exchange finishes");
    assert_eq!(outcome.error, None);
    assert_eq!((outcome.client_to_upstream, outcome.upstream_to_client), (4 * MIB as u64, 16 * MIB as u64));
    assert_eq!(pipes.taken(), 2, "both directions went to splice");
}

/// Which end resets the connection in [`a_reset_reaches_the_other_side_as_a_reset`].
#[derive(Clone, Copy, Debug)]
enum Resets {
    Client,
    Server,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_reaches_the_other_side_as_a_reset() {
    for resets in [Resets::Server, Resets::Client] {
        let pipes = Pipes::new(8);
        let Relayed { mut client, mut server, relay } = start(b"", Some(PATIENCE), &pipes).await;
        let ran = timeout(PATIENCE, async {
            // Bulk both ways first, so that both directions splice.
            exchange(&mut client, &mut server, 2 * MIB, 5).await;
            exchange(&mut server, &mut client, 2 * MIB, 6).await;
            assert_eq!(pipes.in_use(), 2, "both directions splice");
            let (aborting, other) = match resets {
                Resets::Server => (server, &mut client),
                Resets::Client => (client, &mut server),
            };
            reset(&aborting);
            drop(aborting);
            let mut buf = [0u8; 64];
            let read = other.read(&mut buf).await;
            let outcome = relay.await.unwrap();
            (read.map_err(|e| e.kind()), outcome)
        })
        .await;
        let (read, outcome) = ran.expect("the reset crosses the relay");
        assert_eq!(
            read,
            Err(io::ErrorKind::ConnectionReset),
            "{resets:?} reset: the other side reads a reset"
        );
        let side = match resets {
            Resets::Server => Side::Upstream,
            Resets::Client => Side::Client,
        };
        assert_eq!(outcome.error.as_ref().map(|(s, _)| *s), Some(side), "{resets:?}: {:?}", outcome.error);
        assert_eq!(
            (outcome.client_to_upstream, outcome.upstream_to_client),
            (2 * MIB as u64, 2 * MIB as u64)
        );
        assert_eq!(pipes.in_use(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_cuts_a_spliced_relay() {
    const IDLE: Duration = Duration::from_millis(400);
    let pipes = Pipes::new(8);
    let Relayed { mut client, mut server, relay } = start(b"", Some(IDLE), &pipes).await;
    let ran = timeout(PATIENCE, async {
        // Bulk both ways, slower than the timeout in all: only the marks of the
        // spliced moves keep it alive.
        for i in 0..6 {
            if i > 0 {
                tokio::time::sleep(IDLE / 4).await;
            }
            exchange(&mut client, &mut server, MIB, i).await;
            exchange(&mut server, &mut client, MIB, i + 100).await;
        }
        assert_eq!(pipes.in_use(), 2, "both directions splice");
        // Then silence.
        let last = Instant::now();
        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "the client is closed cleanly");
        let waited = last.elapsed();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "the server is closed cleanly");
        drop((client, server));
        (waited, relay.await.unwrap())
    })
    .await;
    let (waited, outcome) = ran.expect("the relay ends idle");
    assert!(outcome.idle_timeout, "{:?}", outcome.error);
    // The watch looks every quarter of the timeout: the relay ends between the
    // timeout and a quarter more after its last byte (a little less after the last
    // read here, if the watch looked between the relay's last write and it).
    assert!(waited >= IDLE - IDLE / 8 && waited < IDLE * 5, "closed after {waited:?}");
    assert_eq!((outcome.client_to_upstream, outcome.upstream_to_client), (6 * MIB as u64, 6 * MIB as u64));
    assert_eq!(pipes.in_use(), 0);
}
