//! OTLP span export: each HTTP request the agent proxies becomes one span per
//! agent (CLIENT on the sending side, SERVER on the receiving side), sent to an
//! OpenTelemetry collector over OTLP/gRPC. Off unless `--otlp-endpoint` is set.
//!
//! The spans are built from the same [`AccessRecord`] the access log writes, so the
//! data path does no extra work per request beyond queueing it: the span id is the
//! parent id the hop gave the next hop in `traceparent` (see [`super::trace`]), and
//! the parent is the id the request arrived with, so the agents' spans sit between
//! the applications' own spans in the trace.
//!
//! Only sampled traces (W3C `sampled` flag) are exported. Traces the agent starts
//! itself are sampled with `--otlp-sample-ratio`.
//!
//! Like the access log, export never slows the data path: [`Spans::export`] puts the
//! span on a bounded queue and drops (and counts) it when the queue is full. A
//! background task sends batches of up to [`MAX_BATCH`] spans at least every
//! [`FLUSH_INTERVAL`], one export at a time with a deadline; a batch the collector
//! does not take is dropped and counted, not retried forever. On shutdown the queue
//! is exported once more.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, SpanFlags, Status, span::SpanKind, status::StatusCode},
};
use tokio::{
    sync::mpsc::{self, error::TrySendError},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{access_log::AccessRecord, metrics, trace::SpanId};
use crate::{intercept::ActiveMode, listener::Direction};

/// Spans queued before export starts dropping them (the OpenTelemetry SDKs' default).
pub const DEFAULT_QUEUE: usize = 2048;
/// Most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// Longest a span waits in the queue when traffic is light.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one export request (the OTLP exporters' default).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last export.
const SHUTDOWN_EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// The instrumentation scope and `service.name` of the agent's spans.
const SERVICE_NAME: &str = "mesh-agent";

/// Why span export could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpanExportError {
    #[error("--otlp-endpoint {endpoint:?}: {why}")]
    Endpoint { endpoint: String, why: String },
    #[error("--otlp-sample-ratio {0}: must be between 0 and 1")]
    SampleRatio(f64),
}

/// How span export is set up.
#[derive(Clone, Debug)]
pub struct SpanExportConfig {
    /// The collector's OTLP/gRPC address, `http://host:4317`.
    pub endpoint: String,
    /// Share (0..=1) of the traces this agent starts that are sampled.
    pub sample_ratio: f64,
    /// The node, as `service.instance.id` and `host.name` of every span.
    pub node: String,
    pub mode: ActiveMode,
    pub queue: usize,
}

/// The ids of one hop's span; the trace id is the record's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopSpan {
    /// The id this hop gave the next one as its parent.
    pub span_id: SpanId,
    /// The span the request arrived from; `None` when the agent started the trace.
    pub parent_id: Option<SpanId>,
    /// W3C trace flags.
    pub flags: u8,
    pub tracestate: Option<HeaderValue>,
}

/// The data path's side of span export: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Spans {
    tx: mpsc::Sender<AccessRecord>,
    sample_ratio: f64,
}

/// The export task's handle; keep it to flush on shutdown.
#[derive(Debug)]
pub struct SpanExporter {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Spans {
    /// Checks the configuration and starts the export task (needs a Tokio runtime).
    /// The collector is dialled lazily: an agent starts even when it is down.
    pub fn start(config: &SpanExportConfig) -> Result<(Self, SpanExporter), SpanExportError> {
        if !(0.0..=1.0).contains(&config.sample_ratio) {
            return Err(SpanExportError::SampleRatio(config.sample_ratio));
        }
        let bad =
            |why: &str| SpanExportError::Endpoint { endpoint: config.endpoint.clone(), why: why.into() };
        let uri: http::Uri =
            config.endpoint.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad("https is not supported; point it at a node-local collector over http"));
            }
            _ => return Err(bad("must be an http:// URL, e.g. http://otel-collector:4317")),
        }
        if uri.host().is_none() {
            return Err(bad("has no host"));
        }
        let channel = tonic::transport::Endpoint::from(uri)
            .connect_timeout(Duration::from_secs(5))
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let shutdown = CancellationToken::new();
        let resource = resource(&config.node, config.mode);
        let task =
            tokio::spawn(export_loop(rx, TraceServiceClient::new(channel), resource, shutdown.clone()));
        Ok((Self { tx, sample_ratio: config.sample_ratio }, SpanExporter { shutdown, task }))
    }

    /// Whether a trace the agent starts now is sampled.
    pub fn sample_new_trace(&self) -> bool {
        self.sample_ratio >= 1.0 || fastrand::f64() < self.sample_ratio
    }

    /// Queues a finished request's record (with [`AccessRecord::span`] set); drops
    /// and counts it when the queue is full.
    pub fn export(&self, record: AccessRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => metrics::spans_dropped("queue_full", 1),
            Err(TrySendError::Closed(_)) => metrics::spans_dropped("shutdown", 1),
        }
    }
}

impl SpanExporter {
    /// Exports what is still queued (within a short deadline) and stops.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            warn!(error = %e, "span export task failed");
        }
    }
}

type Client = TraceServiceClient<tonic::transport::Channel>;

async fn export_loop(
    mut rx: mpsc::Receiver<AccessRecord>,
    mut client: Client,
    resource: Resource,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Span> = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            got = rx.recv() => match got {
                Some(record) => {
                    batch.extend(span_of(&record));
                    if batch.len() >= MAX_BATCH {
                        send(&mut client, &resource, &mut batch, EXPORT_TIMEOUT, &mut failing).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    send(&mut client, &resource, &mut batch, EXPORT_TIMEOUT, &mut failing).await;
                }
            }
        }
    }
    rx.close();
    while let Ok(record) = rx.try_recv() {
        batch.extend(span_of(&record));
        if batch.len() >= MAX_BATCH {
            send(&mut client, &resource, &mut batch, SHUTDOWN_EXPORT_TIMEOUT, &mut failing).await;
        }
    }
    if !batch.is_empty() {
        send(&mut client, &resource, &mut batch, SHUTDOWN_EXPORT_TIMEOUT, &mut failing).await;
    }
}

/// Sends `batch` (emptying it); a failure is logged once until an export succeeds
/// again, so a collector that is down does not flood the agent's log.
async fn send(
    client: &mut Client,
    resource: &Resource,
    batch: &mut Vec<Span>,
    deadline: Duration,
    failing: &mut bool,
) {
    let n = batch.len() as u64;
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: SERVICE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: std::mem::replace(batch, Vec::with_capacity(MAX_BATCH)),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    let outcome = match tokio::time::timeout(deadline, client.export(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner().partial_success),
        Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {deadline:?}")),
    };
    match outcome {
        Ok(partial) => {
            let rejected = partial.map_or(0, |p| p.rejected_spans.clamp(0, n as i64) as u64);
            if rejected > 0 {
                metrics::spans_dropped("rejected", rejected);
                debug!(rejected, "the collector rejected some spans");
            }
            metrics::spans_exported(n - rejected);
            if std::mem::take(failing) {
                warn!("span export works again");
            }
        }
        Err(why) => {
            metrics::spans_dropped("export_failed", n);
            if !std::mem::replace(failing, true) {
                warn!(error = %why, spans = n, "span export failed; dropping spans until the collector answers");
            }
        }
    }
}

fn resource(node: &str, mode: ActiveMode) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", SERVICE_NAME),
            kv("service.version", env!("CARGO_PKG_VERSION")),
            kv("service.instance.id", node),
            kv("host.name", node),
            kv("mesh.interception_mode", mode.as_str()),
        ],
        ..Default::default()
    }
}

fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.into()))
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    attribute(key, any_value::Value::IntValue(value))
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// The OTLP span of one HTTP request record, or `None` when it has no span ids.
///
/// Attribute names follow the OpenTelemetry HTTP and RPC semantic conventions where
/// they have one; the mesh's own facts are under `mesh.`.
pub fn span_of(record: &AccessRecord) -> Option<Span> {
    let hop = record.span.as_ref()?;
    let trace_id = record.trace_id?;
    let outbound = record.direction == Direction::Outbound;
    let method = record.method.as_deref().unwrap_or("HTTP");
    let service = record.destination_service.as_ref().map(|s| s.as_str()).unwrap_or("unknown");
    let start = record.timestamp;
    let end = start + record.latency.unwrap_or_default();

    let mut attributes = Vec::with_capacity(20);
    attributes.push(kv("http.request.method", method));
    if let Some(path) = &record.path {
        attributes.push(kv("url.path", path.as_str()));
    }
    if let Some(authority) = &record.authority {
        attributes.push(kv("server.address", authority.as_str()));
    }
    if let Some(code) = record.response_code {
        attributes.push(kv_int("http.response.status_code", code.into()));
    }
    match record.protocol {
        Some("grpc") => {
            attributes.push(kv("rpc.system", "grpc"));
            attributes.push(kv("network.protocol.name", "http"));
            attributes.push(kv("network.protocol.version", "2"));
        }
        Some(p) => {
            attributes.push(kv("network.protocol.name", "http"));
            attributes.push(kv("network.protocol.version", if p == "http2" { "2" } else { "1.1" }));
        }
        None => {}
    }
    if let Some(code) = record.grpc_status {
        attributes.push(kv_int("rpc.grpc.status_code", code.into()));
    }
    attributes.push(kv("client.address", record.source.ip().to_canonical().to_string()));
    if let Some(endpoint) = record.destination_endpoint {
        attributes.push(kv("network.peer.address", endpoint.ip().to_canonical().to_string()));
        attributes.push(kv_int("network.peer.port", endpoint.port().into()));
    }
    attributes.push(kv("mesh.destination.service", service));
    for (key, name) in [
        ("mesh.source.identity", &record.source_identity),
        ("mesh.destination.identity", &record.destination_identity),
    ] {
        if let Some(name) = name.as_ref().filter(|n| !n.is_unknown()) {
            attributes.push(kv(key, name.as_str()));
        }
    }
    attributes.push(kv("mesh.interception_mode", record.mode.as_str()));
    if let Some(id) = &record.request_id {
        attributes.push(kv("mesh.request_id", id.as_str()));
    }
    if let Some(retries) = record.retries.filter(|r| *r > 0) {
        attributes.push(kv_int("mesh.retries", retries.into()));
    }
    attributes.push(kv_int("http.request.body.size", record.bytes_sent.min(i64::MAX as u64) as i64));
    attributes.push(kv_int("http.response.body.size", record.bytes_received.min(i64::MAX as u64) as i64));

    // A client span fails on 4xx as well; a server span only on what it caused (5xx).
    let failed_status = record.response_code.is_some_and(|c| c >= 500 || (outbound && c >= 400));
    let grpc_failed = record.grpc_status.is_some_and(|c| c != 0);
    let status = if failed_status || grpc_failed || record.error.is_some() {
        if let Some(code) = record.response_code.filter(|_| failed_status) {
            attributes.push(kv("error.type", code.to_string()));
        }
        Status { code: StatusCode::Error as i32, message: record.error.clone().unwrap_or_default() }
    } else {
        Status { code: StatusCode::Unset as i32, message: String::new() }
    };

    let remote_parent = SpanFlags::ContextHasIsRemoteMask as u32
        | if hop.parent_id.is_some() { SpanFlags::ContextIsRemoteMask as u32 } else { 0 };
    Some(Span {
        trace_id: trace_id.as_bytes().to_vec(),
        span_id: hop.span_id.as_bytes().to_vec(),
        trace_state: hop.tracestate.as_ref().and_then(|s| s.to_str().ok()).unwrap_or_default().to_owned(),
        parent_span_id: hop.parent_id.map(|p| p.as_bytes().to_vec()).unwrap_or_default(),
        flags: u32::from(hop.flags) | remote_parent,
        name: format!("{method} {service}"),
        kind: if outbound { SpanKind::Client } else { SpanKind::Server } as i32,
        start_time_unix_nano: unix_nanos(start),
        end_time_unix_nano: unix_nanos(end),
        attributes,
        status: Some(status),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{
        labels::MeshName,
        trace::{FLAG_SAMPLED, TraceId},
    };

    fn record(direction: Direction) -> AccessRecord {
        let mut r = AccessRecord::http(direction, ActiveMode::Ebpf, "10.0.0.2:41000".parse().unwrap());
        r.trace_id = TraceId::from_hex(b"4bf92f3577b34da6a3ce929d0e0e4736");
        r.method = Some("POST".into());
        r.path = Some("/cart".into());
        r.destination_service = Some(MeshName::known("shop/api"));
        r.destination_endpoint = Some("10.0.1.7:8080".parse().unwrap());
        r.source_identity = Some(MeshName::known("spiffe://cluster.local/ns/shop/sa/frontend"));
        r.protocol = Some("http1");
        r.response_code = Some(200);
        r.latency = Some(Duration::from_millis(3));
        r.span = Some(HopSpan {
            span_id: SpanId::from_hex(b"00f067aa0ba902b7").unwrap(),
            parent_id: Some(SpanId::from_hex(b"b7ad6b7169203331").unwrap()),
            flags: FLAG_SAMPLED,
            tracestate: Some(HeaderValue::from_static("vendor=x")),
        });
        r
    }

    fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
    }

    #[test]
    fn a_record_becomes_a_span_between_its_parent_and_the_next_hop() {
        let span = span_of(&record(Direction::Outbound)).expect("span");
        assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span.span_id), "00f067aa0ba902b7");
        assert_eq!(hex(&span.parent_span_id), "b7ad6b7169203331");
        assert_eq!(span.trace_state, "vendor=x");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.name, "POST shop/api");
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 3_000_000);
        assert_eq!(span.flags, 0x301, "sampled, with a remote parent");
        assert_eq!(attr(&span, "http.response.status_code"), Some(&any_value::Value::IntValue(200)));
        assert_eq!(attr(&span, "url.path"), Some(&any_value::Value::StringValue("/cart".into())));
        assert_eq!(attr(&span, "network.peer.port"), Some(&any_value::Value::IntValue(8080)));
        assert_eq!(
            attr(&span, "mesh.source.identity"),
            Some(&any_value::Value::StringValue("spiffe://cluster.local/ns/shop/sa/frontend".into()))
        );
        assert_eq!(span.status.unwrap().code, StatusCode::Unset as i32);
    }

    #[test]
    fn error_status_follows_the_span_kind() {
        let mut client = record(Direction::Outbound);
        client.response_code = Some(404);
        assert_eq!(span_of(&client).unwrap().status.unwrap().code, StatusCode::Error as i32);
        let mut server = record(Direction::Inbound);
        server.response_code = Some(404);
        let span = span_of(&server).unwrap();
        assert_eq!(span.kind, SpanKind::Server as i32);
        assert_eq!(span.status.unwrap().code, StatusCode::Unset as i32, "a 404 is the client's fault");
        server.response_code = Some(503);
        server.error = Some("local workload: connection refused".into());
        let status = span_of(&server).unwrap().status.unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "local workload: connection refused");
        let mut grpc = record(Direction::Outbound);
        grpc.protocol = Some("grpc");
        grpc.grpc_status = Some(14);
        let span = span_of(&grpc).unwrap();
        assert_eq!(
            span.status.as_ref().unwrap().code,
            StatusCode::Error as i32,
            "UNAVAILABLE under HTTP 200"
        );
        assert_eq!(attr(&span, "rpc.grpc.status_code"), Some(&any_value::Value::IntValue(14)));
    }

    #[test]
    fn a_root_hop_has_no_parent_and_records_without_ids_have_no_span() {
        let mut r = record(Direction::Outbound);
        r.span.as_mut().unwrap().parent_id = None;
        let span = span_of(&r).unwrap();
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.flags, 0x101, "sampled, parent known to be absent (not remote)");
        r.span = None;
        assert!(span_of(&r).is_none());
    }

    #[test]
    fn bad_configuration_names_the_flag() {
        let config = |endpoint: &str, sample_ratio: f64| SpanExportConfig {
            endpoint: endpoint.into(),
            sample_ratio,
            node: "n".into(),
            mode: ActiveMode::Ebpf,
            queue: 8,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for (endpoint, ratio, want) in [
                ("otel:4317", 1.0, "--otlp-endpoint \"otel:4317\": must be an http:// URL"),
                ("https://otel:4317", 1.0, "https is not supported"),
                ("http://otel:4317", 1.5, "--otlp-sample-ratio 1.5: must be between 0 and 1"),
            ] {
                let err = Spans::start(&config(endpoint, ratio)).unwrap_err().to_string();
                assert!(err.contains(want), "{endpoint} {ratio}: {err}");
            }
            assert!(Spans::start(&config("http://127.0.0.1:4317", 0.1)).is_ok());
        });
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_blocking() {
        // A collector that is never reached: the export task holds its first batch
        // (up to the deadline) and the queue of 2 fills.
        let (tx, _rx) = mpsc::channel(2);
        let spans = Spans { tx, sample_ratio: 1.0 };
        let (recorder, handle) = crate::observe::metrics::build(None).unwrap();
        ::metrics::with_local_recorder(&recorder, || {
            for _ in 0..5 {
                spans.export(record(Direction::Outbound));
            }
        });
        let text = handle.render();
        assert!(text.contains("mesh_spans_dropped_total{reason=\"queue_full\"} 3"), "{text}");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }
}
