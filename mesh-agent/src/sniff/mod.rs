//! Protocol sniffing on intercepted connections.
//!
//! The agent learns nothing about an intercepted connection but its addresses, yet
//! routing and policy differ for TLS (by SNI/ALPN), HTTP/1, HTTP/2 and plain TCP. So
//! before forwarding, [`sniff`] reads the first bytes the client sends and
//! classifies them with [`detect`]. Nothing is consumed: every byte read stays in
//! the caller's buffer, to be written upstream unchanged before the rest of the
//! connection is spliced.
//!
//! [`detect`] only ever decides on what it has seen, and a decision on a prefix
//! holds for every longer input, so the outcome does not depend on how the client's
//! bytes happen to be split into reads.
//!
//! Anything the sniffer cannot place is [`Protocol::Opaque`], forwarded as plain
//! TCP; the [`OpaqueReason`] says why, for metrics and logs.

use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

mod http;
mod tls;

/// Most bytes [`sniff`] buffers before giving up with [`OpaqueReason::TooLarge`].
///
/// Two full TLS records: room for a ClientHello that spills over one record
/// (post-quantum key shares push hellos past a few KiB, and some clients fragment
/// their records) while bounding what an undecided connection can make us hold.
/// HTTP/1 request lines have their own, smaller cap of 8 KiB.
pub const MAX_SNIFF_BYTES: usize = 2 * (5 + tls::MAX_RECORD_PAYLOAD);

/// How much buffer space [`sniff`] asks for per read, so that short hellos and
/// request lines do not reserve the whole [`MAX_SNIFF_BYTES`] up front.
const READ_CHUNK: usize = 4 * 1024;

/// What the sniffer decided about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello; its routing-relevant fields are parsed.
    Tls(TlsInfo),
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1(Http1Info),
    /// The HTTP/2 prior-knowledge connection preface
    /// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
    Http2,
    /// Forward as plain TCP.
    Opaque(OpaqueReason),
}

impl Protocol {
    /// A short, stable name for metrics labels and logs.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls",
            Self::Http1(_) => "http1",
            Self::Http2 => "http2",
            Self::Opaque(_) => "opaque",
        }
    }
}

/// What a TLS ClientHello tells a router before any decryption.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo {
    /// The `server_name` host name, exactly as sent (DNS names compare
    /// case-insensitively, so match accordingly). `None` if the client sent none
    /// (for instance when dialling an IP address) or sent one that is not
    /// printable ASCII.
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order of preference; names that are
    /// not UTF-8 are converted lossily.
    pub alpn: Vec<String>,
}

/// What an HTTP/1 request line tells a router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http1Info {
    /// The request method, e.g. `GET`.
    pub method: String,
    /// `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub minor_version: u8,
}

/// Why a connection is forwarded as plain TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpaqueReason {
    /// The destination port is configured as opaque, so the caller never sniffed.
    /// [`sniff`] itself never returns this.
    OpaquePort,
    /// The client sent nothing before the timeout: most likely a server-first
    /// protocol (SMTP, MySQL, SSH, ...), which must not be kept waiting longer.
    NoClientData,
    /// The client sent some bytes but not enough to decide before the timeout.
    Timeout,
    /// The bytes are not TLS, HTTP/1 or HTTP/2 (or are a malformed version of one).
    Unrecognized,
    /// The buffering cap was reached (or would be) before a decision.
    TooLarge,
    /// The client closed its side before a decision could be made.
    ClientClosed,
    /// The server spoke before the client sent enough to decide (a server-first
    /// protocol): the caller, connected upstream while sniffing, stopped waiting.
    /// [`sniff`] itself never returns this.
    ServerFirst,
}

impl OpaqueReason {
    /// A short, stable `snake_case` name for metrics labels and logs.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::OpaquePort => "opaque_port",
            Self::NoClientData => "no_client_data",
            Self::Timeout => "timeout",
            Self::Unrecognized => "unrecognized",
            Self::TooLarge => "too_large",
            Self::ClientClosed => "client_closed",
            Self::ServerFirst => "server_first",
        }
    }
}

impl std::fmt::Display for OpaqueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// The bytes are a valid prefix of something recognisable; read more.
    NeedMore,
    /// Final: more bytes will not change it.
    Done(Protocol),
}

/// Classifies the bytes a client has sent so far.
///
/// Pure and cheap enough to call again after every read: it never panics, reads
/// nothing beyond the first TLS handshake message or HTTP request line, and
/// allocates only for the strings it returns. Once it returns [`Detection::Done`]
/// for some bytes, it returns the same for any extension of them.
#[must_use]
pub fn detect(buf: &[u8]) -> Detection {
    match buf.first() {
        None => Detection::NeedMore,
        Some(&tls::CONTENT_TYPE_HANDSHAKE) => tls::detect(buf),
        Some(_) => http::detect(buf),
    }
}

/// Failure to sniff; the bytes read before it are still in the caller's buffer.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// The client socket failed (reset, for instance).
    #[error("reading from client: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads from `io`, appending to `buf`, until [`detect`] decides.
///
/// Stops early with [`Protocol::Opaque`] when the client closes
/// ([`OpaqueReason::ClientClosed`]), when [`MAX_SNIFF_BYTES`] are buffered
/// ([`OpaqueReason::TooLarge`]), or when `timeout` elapses
/// ([`OpaqueReason::NoClientData`] if `buf` is still empty, otherwise
/// [`OpaqueReason::Timeout`]). The timeout bounds the whole sniff, not each read,
/// so a client trickling bytes cannot hold it open.
///
/// Every byte read stays in `buf` for the caller to replay upstream, including on
/// error; bytes already in `buf` on entry are classified before reading. `buf` never
/// grows past [`MAX_SNIFF_BYTES`] through this call.
pub async fn sniff<R>(io: &mut R, buf: &mut BytesMut, timeout: Duration) -> Result<Protocol, SniffError>
where
    R: AsyncRead + Unpin,
{
    sniff_until(io, buf, tokio::time::sleep(timeout)).await
}

/// [`sniff`], with the timeout given as a future that completes when time is up.
/// Separate so tests can control time without tokio's `test-util`.
async fn sniff_until<R, D>(io: &mut R, buf: &mut BytesMut, deadline: D) -> Result<Protocol, SniffError>
where
    R: AsyncRead + Unpin,
    D: Future<Output = ()>,
{
    let mut deadline = std::pin::pin!(deadline);
    loop {
        if let Detection::Done(protocol) = detect(buf) {
            tracing::trace!(protocol = protocol.name(), bytes = buf.len(), "sniffed");
            return Ok(protocol);
        }
        let room = MAX_SNIFF_BYTES.saturating_sub(buf.len());
        if room == 0 {
            return Ok(Protocol::Opaque(OpaqueReason::TooLarge));
        }
        buf.reserve(room.min(READ_CHUNK));

        let read = {
            // `limit` keeps a single read from carrying `buf` past the cap.
            let mut limited = (&mut *buf).limit(room);
            tokio::select! {
                // Data that is already there wins over a deadline that is already
                // past: it costs nothing to look at it.
                biased;
                read = io.read_buf(&mut limited) => Some(read),
                () = &mut deadline => None,
            }
        };
        match read {
            Some(Ok(0)) => return Ok(Protocol::Opaque(OpaqueReason::ClientClosed)),
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None if buf.is_empty() => return Ok(Protocol::Opaque(OpaqueReason::NoClientData)),
            None => return Ok(Protocol::Opaque(OpaqueReason::Timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::{AsyncWriteExt, ReadBuf};

    use super::*;

    /// A timeout that never fires.
    fn never() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// A timeout that has already fired: whatever is readable right now is read,
    /// then the sniff times out.
    async fn expired() {}

    /// A reader that hands out `data` in chunks of the given sizes (cycling), is
    /// optionally not ready before each chunk, then reports end of file.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        next: usize,
        stall: bool,
        stalled: bool,
    }

    impl Chunked {
        fn new(data: Vec<u8>, sizes: Vec<usize>, stall: bool) -> Self {
            Self { data, pos: 0, sizes, next: 0, stall, stalled: false }
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.stall && !self.stalled {
                self.stalled = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.stalled = false;
            let size =
                self.sizes.get(self.next % self.sizes.len().max(1)).copied().unwrap_or(usize::MAX).max(1);
            self.next += 1;
            let rest = &self.data[self.pos..];
            let n = size.min(rest.len()).min(out.remaining());
            out.put_slice(&rest[..n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    fn opaque(reason: OpaqueReason) -> Protocol {
        Protocol::Opaque(reason)
    }

    /// A hand-built ClientHello handshake message (type, length, minimal body).
    fn minimal_hello() -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut out = vec![0x01, 0, 0, u8::try_from(body.len()).expect("small")];
        out.extend(body);
        out
    }

    #[test]
    fn names() {
        assert_eq!(Protocol::Tls(TlsInfo::default()).name(), "tls");
        assert_eq!(Protocol::Http1(Http1Info { method: "GET".into(), minor_version: 1 }).name(), "http1");
        assert_eq!(Protocol::Http2.name(), "http2");
        assert_eq!(opaque(OpaqueReason::Timeout).name(), "opaque");
        assert_eq!(OpaqueReason::OpaquePort.as_str(), "opaque_port");
        assert_eq!(OpaqueReason::NoClientData.as_str(), "no_client_data");
        assert_eq!(OpaqueReason::Timeout.as_str(), "timeout");
        assert_eq!(OpaqueReason::Unrecognized.as_str(), "unrecognized");
        assert_eq!(OpaqueReason::TooLarge.to_string(), "too_large");
        assert_eq!(OpaqueReason::ClientClosed.as_str(), "client_closed");
    }

    #[test]
    fn detect_dispatch() {
        assert_eq!(detect(b""), Detection::NeedMore);
        assert_eq!(detect(&[0x16]), Detection::NeedMore);
        assert_eq!(detect(b"PRI"), Detection::NeedMore);
        assert_eq!(detect(http::H2_PREFACE), Detection::Done(Protocol::Http2));
        assert_eq!(
            detect(b"HEAD / HTTP/1.1\r\n"),
            Detection::Done(Protocol::Http1(Http1Info { method: "HEAD".into(), minor_version: 1 }))
        );
        assert_eq!(detect(b"\x00\x00"), Detection::Done(opaque(OpaqueReason::Unrecognized)));
    }

    #[tokio::test]
    async fn silent_client_is_no_client_data() {
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let got = sniff_until(&mut server, &mut buf, expired()).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::NoClientData));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn public_sniff_times_out() {
        // A zero timeout is already past; no real waiting.
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let got = sniff(&mut server, &mut buf, Duration::ZERO).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::NoClientData));
    }

    #[tokio::test]
    async fn partial_bytes_then_silence_is_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /ind").await.expect("write");
        let mut buf = BytesMut::new();
        let got = sniff_until(&mut server, &mut buf, expired()).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::Timeout));
        assert_eq!(&buf[..], b"GET /ind");
    }

    #[tokio::test]
    async fn immediate_eof_is_client_closed() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let mut buf = BytesMut::new();
        let got = sniff(&mut server, &mut buf, Duration::from_secs(3600)).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::ClientClosed));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn eof_mid_hello_keeps_the_bytes() {
        let hello = minimal_hello();
        let mut input = vec![0x16, 0x03, 0x01, 0x00, u8::try_from(hello.len()).expect("small")];
        input.extend(&hello[..10]);
        let mut io = Chunked::new(input.clone(), vec![3], true);
        let mut buf = BytesMut::new();
        let got = sniff_until(&mut io, &mut buf, never()).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::ClientClosed));
        assert_eq!(&buf[..], &input[..]);
    }

    #[tokio::test]
    async fn small_chunks_from_a_live_client() {
        // Room for the whole request, so the writer never waits on a sniffer
        // that has already decided and stopped reading.
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in b"PUT /things/1 HTTP/1.1\r\nHost: a\r\n\r\n".chunks(3) {
                client.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
            // Keep the connection open: the decision must not need EOF.
            client
        });
        let mut buf = BytesMut::new();
        let got = sniff(&mut server, &mut buf, Duration::from_secs(3600)).await.expect("sniff");
        assert_eq!(got, Protocol::Http1(Http1Info { method: "PUT".into(), minor_version: 1 }));
        assert!(b"PUT /things/1 HTTP/1.1\r\nHost: a\r\n\r\n".starts_with(&buf));
        drop(writer.await.expect("writer"));
    }

    #[tokio::test]
    async fn bytes_already_buffered_are_classified_first() {
        let mut io = Failing;
        let mut buf = BytesMut::from(&http::H2_PREFACE[..]);
        let got = sniff_until(&mut io, &mut buf, never()).await.expect("sniff");
        assert_eq!(got, Protocol::Http2);
        assert_eq!(&buf[..], &http::H2_PREFACE[..]);
    }

    #[tokio::test]
    async fn read_errors_are_reported() {
        let mut buf = BytesMut::from(&b"GE"[..]);
        let got = sniff_until(&mut Failing, &mut buf, never()).await;
        assert!(matches!(got, Err(SniffError::Io(err)) if err.kind() == io::ErrorKind::ConnectionReset));
        assert_eq!(&buf[..], b"GE");
    }

    #[tokio::test]
    async fn buffering_stops_at_the_cap() {
        // A legitimate ClientHello framed one byte per record takes six bytes per
        // handshake byte, so a big one cannot arrive within the cap.
        let mut hello = minimal_hello();
        let padding = 10_000;
        let len = u32::try_from(hello.len() - 4 + 6 + padding).expect("fits").to_be_bytes();
        hello[1..4].copy_from_slice(&len[1..]);
        // Extensions block holding one `padding` extension (type 0x0015).
        hello.extend(u16::try_from(padding + 4).expect("fits").to_be_bytes());
        hello.extend([0x00, 0x15]);
        hello.extend(u16::try_from(padding).expect("fits").to_be_bytes());
        hello.extend(vec![0u8; padding]);
        let input: Vec<u8> = hello.iter().flat_map(|&b| [0x16, 0x03, 0x03, 0x00, 0x01, b]).collect();
        assert!(input.len() > MAX_SNIFF_BYTES);

        let mut io = Chunked::new(input.clone(), vec![7000], false);
        let mut buf = BytesMut::new();
        let got = sniff_until(&mut io, &mut buf, never()).await.expect("sniff");
        assert_eq!(got, opaque(OpaqueReason::TooLarge));
        assert_eq!(buf.len(), MAX_SNIFF_BYTES);
        assert_eq!(&buf[..], &input[..MAX_SNIFF_BYTES]);
    }

    /// Runs `sniff_until` to completion on a fresh current-thread runtime.
    fn run(io: &mut Chunked, buf: &mut BytesMut) -> Result<Protocol, SniffError> {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(sniff_until(
            io,
            buf,
            never(),
        ))
    }

    /// Inputs that exercise the TLS and HTTP paths, not only random bytes.
    fn interesting_input() -> impl Strategy<Value = Vec<u8>> {
        let tail = proptest::collection::vec(any::<u8>(), 0..600);
        prop_oneof![
            tail.clone(),
            tail.clone().prop_map(|t| [&[0x16, 0x03, 0x01][..], &t].concat()),
            tail.clone().prop_map(|t| [&[0x16, 0x03, 0x03, 0x00, 0x40, 0x01, 0x00, 0x00][..], &t].concat()),
            tail.clone().prop_map(|t| [&b"GET "[..], &t].concat()),
            tail.clone().prop_map(|t| [&b"GET / HTTP/1."[..], &t].concat()),
            tail.prop_map(|t| [&http::H2_PREFACE[..20], &t].concat()),
        ]
    }

    proptest! {
        #[test]
        fn detect_never_panics(input in interesting_input()) {
            let _ = detect(&input);
        }

        #[test]
        fn decisions_survive_more_bytes(input in interesting_input(), cut in any::<proptest::sample::Index>()) {
            let prefix = &input[..cut.index(input.len() + 1)];
            if let Detection::Done(decided) = detect(prefix) {
                prop_assert_eq!(detect(&input), Detection::Done(decided));
            }
        }

        #[test]
        fn sniff_never_consumes_and_ignores_read_sizes(
            input in interesting_input(),
            sizes in proptest::collection::vec(1usize..64, 1..8),
            stall in any::<bool>(),
        ) {
            let mut buf = BytesMut::new();
            let got = run(&mut Chunked::new(input.clone(), sizes, stall), &mut buf).expect("sniff");

            // What was read is exactly the start of the input...
            prop_assert!(input.starts_with(&buf));
            match &got {
                // ...all of it when the client closed undecided...
                Protocol::Opaque(OpaqueReason::ClientClosed) => {
                    prop_assert_eq!(&buf[..], &input[..]);
                    prop_assert_eq!(detect(&buf), Detection::NeedMore);
                }
                // ...and otherwise enough to explain the decision.
                decided => prop_assert_eq!(detect(&buf), Detection::Done(decided.clone())),
            }

            // The same input in a single read gives the same answer.
            let mut whole = BytesMut::new();
            let once = run(&mut Chunked::new(input.clone(), vec![usize::MAX], false), &mut whole)
                .expect("sniff");
            prop_assert_eq!(once, got);
        }
    }
}
