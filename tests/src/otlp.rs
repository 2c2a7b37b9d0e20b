//! A minimal OpenTelemetry collector for the tests: an OTLP/gRPC trace service in a
//! test host's namespace that keeps every span it receives, flattened to what the
//! tests compare (hex ids, string attributes, the sender's `service.instance.id`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use tokio::sync::oneshot;

use crate::netns::Host;

/// One received span.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `SpanKind` as its protobuf number (2 server, 3 client).
    pub kind: i32,
    /// `Status.code` (0 unset, 1 ok, 2 error).
    pub status: i32,
    pub flags: u32,
    pub attributes: BTreeMap<String, String>,
    /// The resource's `service.instance.id` (the agent's node).
    pub instance: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

/// `SpanKind::Server`.
pub const SERVER: i32 = 2;
/// `SpanKind::Client`.
pub const CLIENT: i32 = 3;

/// A running collector; stops when dropped.
pub struct Collector {
    pub port: u16,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Service(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
            let instance = resource.get("service.instance.id").cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    status: span.status.map_or(0, |s| s.code),
                    flags: span.flags,
                    attributes: attributes(&span.attributes),
                    instance: instance.clone(),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                });
            }
        }
        self.0.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts a collector on `[::]:port` in `host`'s namespace; it is accepting
/// connections when this returns.
pub fn collector(host: &Host, port: u16) -> Result<Collector> {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let service = Service(spans.clone());
    let thread = host.spawn_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(("::", port)).await {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let serve = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
            // Not a graceful shutdown: the agents' connections may be gone with their
            // namespace already, and would never answer a GOAWAY.
            tokio::select! {
                _ = serve => {}
                _ = stop_rx => {}
            }
        });
    })?;
    ready_rx.recv()??;
    Ok(Collector { port, spans, stop: Some(stop_tx), thread: Some(thread) })
}
