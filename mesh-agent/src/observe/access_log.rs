//! The access log: one JSON line per HTTP request or TCP connection.
//!
//! The data path hands a finished [`AccessRecord`] to [`AccessLog::log`], which
//! never blocks and never awaits: it puts the record on a bounded queue, and when
//! the queue is full (the writer cannot keep up, or stdout is stuck) the record is
//! dropped and counted, in [`AccessLog::dropped`] and in
//! [`super::metrics::ACCESS_LOG_DROPPED_TOTAL`]. Losing a log line is better than
//! slowing every connection on the node.
//!
//! A background task turns records into lines. It writes whatever is queued in one
//! batch and writes as soon as the queue is empty, so a line appears promptly
//! when traffic is light, and batches grow by themselves under load. Formatting
//! (timestamps, JSON) happens there, not on the data path.
//! [`AccessLogWriter::shutdown`] writes everything still queued before returning.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Serialize, Serializer};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc::{self, error::TrySendError},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{labels::MeshName, trace::TraceId};
use crate::{intercept::ActiveMode, listener::Direction};

/// Records queued before the log starts dropping: a few seconds of a busy node.
pub const DEFAULT_CAPACITY: usize = 8192;
/// Longest a record waits in the writer before its batch is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes gathered before writing even if more records are queued, to bound memory.
const BATCH_BYTES: usize = 64 * 1024;
/// The longest path written; longer ones are cut (at a character boundary).
const MAX_PATH: usize = 2048;
/// The longest method, authority, request id or error written.
const MAX_FIELD: usize = 256;

/// Whether a record describes one HTTP request or one TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Http,
    Tcp,
}

/// One access log line. Optional fields are left out of the JSON when unknown.
///
/// Build it with [`AccessRecord::http`] or [`AccessRecord::tcp`] and fill in what
/// the handler knows, with struct update syntax or by assigning fields. Names are
/// [`MeshName`]s so that a connection's labels are shared, not copied, per request.
#[derive(Clone, Debug, Serialize)]
pub struct AccessRecord {
    /// When the record was made (RFC 3339, UTC, milliseconds): for HTTP when the
    /// request arrived, for TCP when the connection closed.
    #[serde(serialize_with = "rfc3339")]
    pub timestamp: SystemTime,
    pub kind: Kind,
    #[serde(serialize_with = "direction")]
    pub direction: Direction,
    pub mode: ActiveMode,
    /// The client's address.
    pub source: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<MeshName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<MeshName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<MeshName>,
    /// The endpoint the balancer picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<MeshName>,
    /// Where the client meant to connect, before interception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<SocketAddr>,
    /// What sniffing found: `http1`, `http2`, `tls`, `opaque`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "bounded_opt")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "bounded_path")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "bounded_opt")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// HTTP: request start to response end.
    #[serde(rename = "latency_ms", skip_serializing_if = "Option::is_none", serialize_with = "millis")]
    pub latency: Option<Duration>,
    /// TCP: accept to close.
    #[serde(rename = "duration_ms", skip_serializing_if = "Option::is_none", serialize_with = "millis")]
    pub duration: Option<Duration>,
    /// Bytes from the client towards the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the client.
    pub bytes_received: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "bounded_opt")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// The service route that took the request, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<std::sync::Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "bounded_opt")]
    pub error: Option<String>,
    /// This hop's span, set only when the request's trace is sampled and span export
    /// is on (see [`super::spans`]); not part of the log line.
    #[serde(skip)]
    pub span: Option<super::spans::HopSpan>,
}

impl AccessRecord {
    /// A record of one HTTP request, timestamped now.
    pub fn http(direction: Direction, mode: ActiveMode, source: SocketAddr) -> Self {
        Self::new(Kind::Http, direction, mode, source)
    }

    /// A record of one TCP connection, timestamped now.
    pub fn tcp(direction: Direction, mode: ActiveMode, source: SocketAddr) -> Self {
        Self::new(Kind::Tcp, direction, mode, source)
    }

    fn new(kind: Kind, direction: Direction, mode: ActiveMode, source: SocketAddr) -> Self {
        Self {
            timestamp: SystemTime::now(),
            kind,
            direction,
            mode,
            source,
            source_workload: None,
            source_identity: None,
            destination_service: None,
            destination_endpoint: None,
            destination_identity: None,
            original_destination: None,
            protocol: None,
            method: None,
            path: None,
            authority: None,
            response_code: None,
            grpc_status: None,
            latency: None,
            duration: None,
            bytes_sent: 0,
            bytes_received: 0,
            trace_id: None,
            request_id: None,
            // An HTTP request was retried zero times until the proxy says otherwise.
            retries: (kind == Kind::Http).then_some(0),
            route: None,
            error: None,
            span: None,
        }
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn direction<S: Serializer>(d: &Direction, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

fn millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64() * 1000.0),
        None => s.serialize_none(),
    }
}

fn cut(v: &str, max: usize) -> &str {
    if v.len() <= max {
        return v;
    }
    let mut end = max;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

fn bounded_opt<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(cut(v, MAX_FIELD)),
        None => s.serialize_none(),
    }
}

fn bounded_path<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(cut(v, MAX_PATH)),
        None => s.serialize_none(),
    }
}

/// Where lines go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// The process's standard output (the container runtime collects it).
    #[default]
    Stdout,
    /// A file, appended to and created if missing.
    File(PathBuf),
}

/// How the access log is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub output: Output,
    /// Records queued before dropping; at least 1.
    pub capacity: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self { output: Output::Stdout, capacity: DEFAULT_CAPACITY }
    }
}

/// Why the access log could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening access log file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("flushing the access log: {0}")]
    Flush(io::Error),
    #[error("access log writer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The data path's side of the access log: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<AccessRecord>,
    dropped: Arc<AtomicU64>,
}

/// The writer task's handle; keep it to shut the log down cleanly.
#[derive(Debug)]
pub struct AccessLogWriter {
    shutdown: CancellationToken,
    task: JoinHandle<io::Result<()>>,
}

impl AccessLog {
    /// Opens the configured output and starts the writer task (needs a Tokio runtime).
    pub async fn start(config: &AccessLogConfig) -> Result<(Self, AccessLogWriter), AccessLogError> {
        match &config.output {
            Output::Stdout => Ok(Self::with_writer(tokio::io::stdout(), config.capacity)),
            Output::File(path) => {
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|source| AccessLogError::Open { path: path.clone(), source })?;
                Ok(Self::with_writer(file, config.capacity))
            }
        }
    }

    /// Starts the writer task on any byte sink (needs a Tokio runtime).
    pub fn with_writer<W>(out: W, capacity: usize) -> (Self, AccessLogWriter)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(write_lines(rx, out, shutdown.clone(), dropped.clone()));
        (Self { tx, dropped }, AccessLogWriter { shutdown, task })
    }

    /// Queues a record; returns false if it was dropped (queue full or log shut down).
    pub fn log(&self, record: AccessRecord) -> bool {
        match self.tx.try_send(record) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                count_dropped(&self.dropped, 1);
                false
            }
        }
    }

    /// Records dropped so far, by this log and its clones.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn count_dropped(dropped: &AtomicU64, n: u64) {
    dropped.fetch_add(n, Ordering::Relaxed);
    super::metrics::access_log_dropped(n);
}

impl AccessLogWriter {
    /// Stops accepting records, writes and flushes everything already queued, and
    /// waits for the writer to finish. Call it last, after connections have drained.
    pub async fn shutdown(self) -> Result<(), AccessLogError> {
        self.shutdown.cancel();
        self.task.await?.map_err(AccessLogError::Flush)
    }
}

/// Lines waiting to be written, and how many records they hold.
struct Batch {
    buf: Vec<u8>,
    records: u64,
}

impl Batch {
    fn push(&mut self, record: &AccessRecord) {
        let start = self.buf.len();
        match serde_json::to_writer(&mut self.buf, record) {
            Ok(()) => {
                self.buf.push(b'\n');
                self.records += 1;
            }
            Err(e) => {
                self.buf.truncate(start);
                warn!(error = %e, "access log record could not be encoded");
            }
        }
    }

    /// Writes the batch out. A failed write loses the batch (counted as dropped)
    /// but keeps the log running: a full disk must not stop the agent.
    async fn write<W: AsyncWrite + Unpin>(&mut self, out: &mut W, dropped: &AtomicU64) {
        if self.buf.is_empty() {
            return;
        }
        let result = match out.write_all(&self.buf).await {
            Ok(()) => out.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            warn!(error = %e, lines = self.records, "access log write failed; lines lost");
            count_dropped(dropped, self.records);
        }
        self.buf.clear();
        self.records = 0;
    }
}

async fn write_lines<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<AccessRecord>,
    mut out: W,
    shutdown: CancellationToken,
    dropped: Arc<AtomicU64>,
) -> io::Result<()> {
    let mut batch = Batch { buf: Vec::with_capacity(BATCH_BYTES), records: 0 };
    loop {
        let record = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = rx.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        batch.push(&record);
        // Linger for FLUSH_INTERVAL, then write everything queued by then: under load
        // that is one write per interval instead of one per record (file and stdout
        // writes each cross to tokio's blocking pool), and while the task sleeps,
        // senders wake nobody.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(FLUSH_INTERVAL) => {}
        }
        loop {
            while batch.buf.len() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => batch.push(&r),
                    Err(_) => break,
                }
            }
            let full = batch.buf.len() >= BATCH_BYTES;
            batch.write(&mut out, &dropped).await;
            if !full {
                break;
            }
        }
    }
    // Refuse new records, then write what was accepted before.
    rx.close();
    while let Some(r) = rx.recv().await {
        batch.push(&r);
        if batch.buf.len() >= BATCH_BYTES {
            batch.write(&mut out, &dropped).await;
        }
    }
    batch.write(&mut out, &dropped).await;
    out.flush().await
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    use super::*;
    use crate::observe::{metrics, trace::TraceId};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn http_record(i: usize) -> AccessRecord {
        AccessRecord {
            source_workload: Some(MeshName::known("default/frontend")),
            source_identity: Some(MeshName::known("spiffe://td/ns/default/sa/frontend")),
            destination_service: Some(MeshName::known("reviews.default.svc.cluster.local")),
            destination_endpoint: Some(addr("10.0.1.7:9080")),
            destination_identity: Some(MeshName::known("spiffe://td/ns/default/sa/reviews")),
            original_destination: Some(addr("10.96.0.10:80")),
            protocol: Some("http1"),
            method: Some("GET".into()),
            path: Some(format!("/reviews/{i}")),
            authority: Some("reviews".into()),
            response_code: Some(200),
            latency: Some(Duration::from_micros(1500)),
            bytes_sent: 12,
            bytes_received: 345,
            trace_id: TraceId::from_hex(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            request_id: Some("req-1".into()),
            retries: Some(1),
            ..AccessRecord::http(Direction::Outbound, ActiveMode::Ebpf, addr("10.0.0.5:41000"))
        }
    }

    fn tcp_record() -> AccessRecord {
        AccessRecord {
            original_destination: Some(addr("10.96.0.20:5432")),
            protocol: Some("opaque"),
            duration: Some(Duration::from_secs(3)),
            bytes_sent: 1000,
            bytes_received: 2000,
            error: Some("upstream: connection reset".into()),
            ..AccessRecord::tcp(Direction::Inbound, ActiveMode::Iptables, addr("[fd00::5]:41000"))
        }
    }

    #[tokio::test]
    async fn lines_are_json_with_the_fields_of_each_kind() {
        let (out, reader) = tokio::io::duplex(64 * 1024);
        let (log, writer) = AccessLog::with_writer(out, 16);
        assert!(log.log(http_record(7)));
        assert!(log.log(tcp_record()));
        // Lines appear while the log keeps running: no shutdown needed to see them.
        let mut lines = BufReader::new(reader).lines();
        let http: Value = serde_json::from_str(&lines.next_line().await.expect("read").expect("line"))
            .expect("http line is JSON");
        let tcp: Value = serde_json::from_str(&lines.next_line().await.expect("read").expect("line"))
            .expect("tcp line is JSON");

        let ts = http["timestamp"].as_str().expect("timestamp");
        assert!(humantime::parse_rfc3339(ts).is_ok() && ts.ends_with('Z'), "{ts}");
        assert_eq!(http["kind"], "http");
        assert_eq!(http["direction"], "outbound");
        assert_eq!(http["mode"], "ebpf");
        assert_eq!(http["source"], "10.0.0.5:41000");
        assert_eq!(http["source_workload"], "default/frontend");
        assert_eq!(http["source_identity"], "spiffe://td/ns/default/sa/frontend");
        assert_eq!(http["destination_service"], "reviews.default.svc.cluster.local");
        assert_eq!(http["destination_endpoint"], "10.0.1.7:9080");
        assert_eq!(http["destination_identity"], "spiffe://td/ns/default/sa/reviews");
        assert_eq!(http["original_destination"], "10.96.0.10:80");
        assert_eq!(http["protocol"], "http1");
        assert_eq!(http["method"], "GET");
        assert_eq!(http["path"], "/reviews/7");
        assert_eq!(http["authority"], "reviews");
        assert_eq!(http["response_code"], 200);
        assert_eq!(http["latency_ms"], 1.5);
        assert_eq!(http["bytes_sent"], 12);
        assert_eq!(http["bytes_received"], 345);
        assert_eq!(http["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(http["request_id"], "req-1");
        assert_eq!(http["retries"], 1);
        assert!(http.get("error").is_none() && http.get("duration_ms").is_none(), "{http}");

        assert_eq!(tcp["kind"], "tcp");
        assert_eq!(tcp["direction"], "inbound");
        assert_eq!(tcp["mode"], "iptables");
        assert_eq!(tcp["source"], "[fd00::5]:41000");
        assert_eq!(tcp["duration_ms"], 3000.0);
        assert_eq!(tcp["bytes_sent"], 1000);
        assert_eq!(tcp["bytes_received"], 2000);
        assert_eq!(tcp["error"], "upstream: connection reset");
        for absent in ["method", "path", "response_code", "latency_ms", "trace_id", "source_workload"] {
            assert!(tcp.get(absent).is_none(), "{absent} in {tcp}");
        }
        writer.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn oversized_fields_are_cut() {
        let (out, mut reader) = tokio::io::duplex(64 * 1024);
        let (log, writer) = AccessLog::with_writer(out, 4);
        let mut r = http_record(0);
        r.path = Some("/é".repeat(2000));
        r.authority = Some("a".repeat(10_000));
        assert!(log.log(r));
        writer.shutdown().await.expect("shutdown");
        let mut text = String::new();
        reader.read_to_string(&mut text).await.expect("read");
        let v: Value = serde_json::from_str(text.trim_end()).expect("JSON");
        let path = v["path"].as_str().expect("path");
        assert!(path.len() <= MAX_PATH && path.len() > MAX_PATH - 4, "{}", path.len());
        assert_eq!(v["authority"].as_str().expect("authority").len(), MAX_FIELD);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // A one-byte pipe nobody drains: the writer blocks in the middle of a line.
        let (out, mut reader) = tokio::io::duplex(1);
        let (log, writer) = AccessLog::with_writer(out, 2);
        let (recorder, handle) = metrics::build(None).expect("recorder");
        assert!(log.log(http_record(0)));
        // Once a byte arrives the writer has taken record 0 and is stuck writing it.
        let mut first = [0u8; 1];
        reader.read_exact(&mut first).await.expect("first byte");

        let accepted = ::metrics::with_local_recorder(&recorder, || {
            (1..=10).map(|i| log.log(http_record(i))).collect::<Vec<_>>()
        });
        assert_eq!(accepted, [true, true, false, false, false, false, false, false, false, false]);
        assert_eq!(log.dropped(), 8);
        assert!(handle.render().contains("mesh_access_log_dropped_total 8\n"), "{}", handle.render());

        // Nothing accepted is lost: shutting down writes records 0, 1 and 2.
        let done = tokio::spawn(writer.shutdown());
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("read");
        done.await.expect("join").expect("shutdown");
        let mut text = vec![first[0]];
        text.extend(rest);
        let paths: Vec<String> = String::from_utf8(text)
            .expect("utf-8")
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("JSON")["path"].as_str().expect("path").to_owned()
            })
            .collect();
        assert_eq!(paths, ["/reviews/0", "/reviews/1", "/reviews/2"]);
    }

    #[tokio::test]
    async fn shutdown_writes_everything_queued() {
        let (out, mut reader) = tokio::io::duplex(1 << 20);
        let (log, writer) = AccessLog::with_writer(out, DEFAULT_CAPACITY);
        // The writer task has not run yet (single-threaded runtime): all 500 are queued.
        for i in 0..500 {
            assert!(log.log(http_record(i)));
        }
        writer.shutdown().await.expect("shutdown");
        let mut text = String::new();
        reader.read_to_string(&mut text).await.expect("read");
        assert_eq!(text.lines().count(), 500);
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
        // After shutdown, records are refused and counted rather than queued forever.
        assert!(!log.log(tcp_record()));
        assert_eq!(log.dropped(), 1);
    }

    /// A sink whose writes always fail, like stdout on a closed pipe or a full disk.
    struct Broken;

    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    // Paused clock: the writer's linger passes without real waiting.
    #[tokio::test(start_paused = true)]
    async fn failed_writes_are_counted_and_the_log_keeps_running() {
        let (log, writer) = AccessLog::with_writer(Broken, 8);
        assert!(log.log(http_record(0)));
        tokio::time::sleep(FLUSH_INTERVAL * 2).await;
        assert_eq!(log.dropped(), 1, "the failed write was not counted");
        // The writer survived the error: the queue still accepts records.
        assert!(log.log(http_record(1)));
        writer.shutdown().await.expect("shutdown");
        assert_eq!(log.dropped(), 2);
    }

    #[tokio::test]
    async fn file_output_appends_lines() {
        let path = std::env::temp_dir().join(format!("mesh-access-log-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = AccessLogConfig { output: Output::File(path.clone()), capacity: 8 };
        for round in 0..2 {
            let (log, writer) = AccessLog::start(&config).await.expect("start");
            assert!(log.log(http_record(round)));
            writer.shutdown().await.expect("shutdown");
        }
        let text = std::fs::read_to_string(&path).expect("read log file");
        let _ = std::fs::remove_file(&path);
        assert_eq!(text.lines().count(), 2, "{text}");
        let missing = AccessLogConfig { output: Output::File("/nonexistent-dir/x.log".into()), capacity: 8 };
        assert!(matches!(AccessLog::start(&missing).await, Err(AccessLogError::Open { .. })));
    }
}
