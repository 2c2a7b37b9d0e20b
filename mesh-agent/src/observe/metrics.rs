//! The agent's Prometheus metrics: names, help texts, histogram buckets, the recorder
//! and typed functions the data path calls to record.
//!
//! The recorder is the `metrics` facade's global one, backed by
//! `metrics-exporter-prometheus` without a listener of its own: the admin server
//! renders `/metrics` from the [`PrometheusHandle`] that [`install`] returns, so the
//! agent keeps one port for operators. Label values come only from
//! [`super::labels`], which keeps cardinality bounded by the mesh's configuration.
//!
//! Recording functions work through whichever recorder is current, so tests use
//! [`build`] and `metrics::with_local_recorder` instead of installing globally.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use metrics::{
    Counter, Gauge, Histogram, Key, Label, Level, Metadata, Unit, describe_counter, describe_gauge,
    describe_histogram,
};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    edges::{self, EdgeCell, EdgeKey},
    labels::MeshName,
};
use crate::{
    intercept::ActiveMode,
    listener::Direction,
    sniff::{OpaqueReason, Protocol},
};

/// HTTP/gRPC requests handled, by direction, source, destination, method and result.
pub const REQUESTS_TOTAL: &str = "mesh_requests_total";
/// Request latency: from the first byte of the request to the end of the response.
pub const REQUEST_DURATION_SECONDS: &str = "mesh_request_duration_seconds";
/// Request body bytes, same labels as [`REQUESTS_TOTAL`].
pub const REQUEST_BYTES_TOTAL: &str = "mesh_request_bytes_total";
/// Response body bytes, same labels as [`REQUESTS_TOTAL`].
pub const RESPONSE_BYTES_TOTAL: &str = "mesh_response_bytes_total";
/// TCP connections accepted and routed.
pub const TCP_CONNECTIONS_OPENED_TOTAL: &str = "mesh_tcp_connections_opened_total";
/// TCP connections that ended, failed ones included (so opened - closed = active).
pub const TCP_CONNECTIONS_CLOSED_TOTAL: &str = "mesh_tcp_connections_closed_total";
/// TCP connections that ended without reaching their destination.
pub const TCP_CONNECTIONS_FAILED_TOTAL: &str = "mesh_tcp_connections_failed_total";
/// Bytes sent from the client towards the destination.
pub const TCP_SENT_BYTES_TOTAL: &str = "mesh_tcp_sent_bytes_total";
/// Bytes received from the destination for the client.
pub const TCP_RECEIVED_BYTES_TOTAL: &str = "mesh_tcp_received_bytes_total";
/// How long TCP connections lasted.
pub const TCP_CONNECTION_DURATION_SECONDS: &str = "mesh_tcp_connection_duration_seconds";
/// Connections currently open through the agent, by direction.
pub const ACTIVE_CONNECTIONS: &str = "mesh_active_connections";
/// 1 for the interception mode in use (`ebpf` or `iptables`).
pub const INTERCEPTION_MODE: &str = "mesh_interception_mode";
/// Circuit breaker state per service endpoint: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_BREAKER_STATE: &str = "mesh_circuit_breaker_state";
/// Ejections by outlier detection, per service endpoint.
pub const OUTLIER_EJECTIONS_TOTAL: &str = "mesh_outlier_ejections_total";
/// Requests retried.
pub const RETRIES_TOTAL: &str = "mesh_retries_total";
/// Copies of requests a route mirrored, by outcome (`sent`, `failed`, `dropped`).
pub const MIRRORED_REQUESTS_TOTAL: &str = "mesh_mirrored_requests_total";
/// Faults a route injected, by kind (`delay`, `abort`).
pub const FAULTS_INJECTED_TOTAL: &str = "mesh_faults_injected_total";
/// Seconds since the last configuration update was applied from the control plane.
pub const DISCOVERY_STALENESS_SECONDS: &str = "mesh_discovery_staleness_seconds";
/// Version of the configuration snapshot applied last.
pub const DISCOVERY_APPLIED_VERSION: &str = "mesh_discovery_applied_version";
/// Seconds until the workload certificate of an identity expires (negative once expired).
pub const CERTIFICATE_EXPIRY_SECONDS: &str = "mesh_certificate_expiry_seconds";
/// Plaintext inbound connections refused, by reason: `strict` (the workload's
/// services require mutual TLS), `denied` (no rule admits unauthenticated callers),
/// `not_a_workload` (the destination is no workload port of this node), `undecided`
/// (stalled in what could be an HTTP request line).
pub const INBOUND_REFUSED_TOTAL: &str = "mesh_inbound_refused_total";
/// Denials by authorization policy at the destination, by `service` and `layer`:
/// `connection` (a tunnel or stream refused for the caller's identity, or raw TCP
/// where the rules allow only HTTP) or `request` (an HTTP request refused on its
/// method or path). What the alert on denials spiking watches.
pub const AUTHORIZATION_DENIED_TOTAL: &str = "mesh_authorization_denied_total";
/// Protocol detection results.
pub const SNIFF_RESULTS_TOTAL: &str = "mesh_sniff_results_total";
/// Connections whose client sent nothing within the detection timeout (server-first).
pub const SNIFF_TIMEOUTS_TOTAL: &str = "mesh_sniff_timeouts_total";
/// Access log records dropped because the writer fell behind.
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "mesh_access_log_dropped_total";
/// Spans accepted by the OTLP collector.
pub const SPANS_EXPORTED_TOTAL: &str = "mesh_spans_exported_total";
/// Spans lost, by reason: `queue_full`, `export_failed`, `rejected` (by the collector),
/// `shutdown` (finished after the exporter stopped).
pub const SPANS_DROPPED_TOTAL: &str = "mesh_spans_dropped_total";

/// Request latency buckets in seconds: 100 µs (a local hop) to 10 s (a timeout).
pub const REQUEST_DURATION_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Connection lifetime buckets in seconds: 1 ms (a health check) to 1 h (long-lived streams).
pub const CONNECTION_DURATION_BUCKETS: [f64; 12] =
    [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// The `Content-Type` of [`PrometheusHandle::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the recorder could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("building the Prometheus recorder: {0}")]
    Build(#[from] BuildError),
    #[error("another metrics recorder is already installed in this process")]
    OtherRecorderInstalled,
}

/// The builder with the agent's histogram buckets; exposed so the control plane or
/// tests can add their own settings.
pub fn builder() -> Result<PrometheusBuilder, MetricsError> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION_SECONDS.into()), &REQUEST_DURATION_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(TCP_CONNECTION_DURATION_SECONDS.into()),
            &CONNECTION_DURATION_BUCKETS,
        )?)
}

/// A recorder and its handle, not installed anywhere: for tests
/// (`metrics::with_local_recorder`) and for embedding in another recorder.
/// `idle_timeout`: series not updated for that long are dropped (see
/// [`super::expiry`]); `None` keeps every series.
pub fn build(idle_timeout: Option<Duration>) -> Result<(PrometheusRecorder, PrometheusHandle), MetricsError> {
    let builder = builder()?;
    let builder = match idle_timeout {
        Some(t) => builder.idle_timeout(MetricKindMask::ALL, Some(t)),
        None => builder,
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    Ok((recorder, handle))
}

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the agent's recorder as the process-wide one and describes every metric.
///
/// Idempotent: later calls return the handle of the first (with the first's
/// `idle_timeout`), so tests and embedders can call it freely. Fails only if some
/// other recorder was installed first.
pub fn install(idle_timeout: Option<Duration>) -> Result<PrometheusHandle, MetricsError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let (recorder, handle) = build(idle_timeout)?;
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::OtherRecorderInstalled)?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Registers help text and units for every metric with the current recorder.
pub fn describe() {
    super::limits::describe();
    crate::dns::describe();
    crate::forward::splice::describe();
    describe_counter!(REQUESTS_TOTAL, Unit::Count, "HTTP and gRPC requests handled by the agent.");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Request duration, first request byte to last response byte."
    );
    describe_counter!(REQUEST_BYTES_TOTAL, Unit::Bytes, "Request body bytes.");
    describe_counter!(RESPONSE_BYTES_TOTAL, Unit::Bytes, "Response body bytes.");
    describe_counter!(TCP_CONNECTIONS_OPENED_TOTAL, Unit::Count, "TCP connections opened.");
    describe_counter!(
        TCP_CONNECTIONS_CLOSED_TOTAL,
        Unit::Count,
        "TCP connections closed, failed ones included."
    );
    describe_counter!(
        TCP_CONNECTIONS_FAILED_TOTAL,
        Unit::Count,
        "TCP connections that never reached their destination."
    );
    describe_counter!(TCP_SENT_BYTES_TOTAL, Unit::Bytes, "Bytes sent from clients towards destinations.");
    describe_counter!(TCP_RECEIVED_BYTES_TOTAL, Unit::Bytes, "Bytes received from destinations for clients.");
    describe_histogram!(TCP_CONNECTION_DURATION_SECONDS, Unit::Seconds, "TCP connection lifetime.");
    describe_gauge!(ACTIVE_CONNECTIONS, Unit::Count, "Connections currently open through the agent.");
    describe_gauge!(INTERCEPTION_MODE, "1 for the interception mode in use.");
    describe_gauge!(CIRCUIT_BREAKER_STATE, "Circuit breaker state: 0 closed, 1 open, 2 half-open.");
    describe_counter!(OUTLIER_EJECTIONS_TOTAL, Unit::Count, "Endpoints ejected by outlier detection.");
    describe_counter!(RETRIES_TOTAL, Unit::Count, "Requests retried.");
    describe_counter!(
        MIRRORED_REQUESTS_TOTAL,
        Unit::Count,
        "Copies of requests sent to a route's mirror: sent (answered), failed, or dropped (body not held, or too many in flight)."
    );
    describe_counter!(FAULTS_INJECTED_TOTAL, Unit::Count, "Delays and aborts injected by routes.");
    describe_gauge!(DISCOVERY_STALENESS_SECONDS, Unit::Seconds, "Time since configuration was last applied.");
    describe_gauge!(DISCOVERY_APPLIED_VERSION, "Version of the configuration snapshot applied last.");
    describe_gauge!(
        CERTIFICATE_EXPIRY_SECONDS,
        Unit::Seconds,
        "Time until the workload certificate expires."
    );
    describe_counter!(SNIFF_RESULTS_TOTAL, Unit::Count, "Protocol detection results.");
    describe_counter!(INBOUND_REFUSED_TOTAL, Unit::Count, "Plaintext inbound connections refused.");
    describe_counter!(
        AUTHORIZATION_DENIED_TOTAL,
        Unit::Count,
        "Connections and requests denied by authorization policy at the destination."
    );
    describe_counter!(SNIFF_TIMEOUTS_TOTAL, Unit::Count, "Protocol detections ended by the timeout.");
    describe_counter!(
        ACCESS_LOG_DROPPED_TOTAL,
        Unit::Count,
        "Access log records dropped because the queue was full."
    );
    describe_counter!(SPANS_EXPORTED_TOTAL, Unit::Count, "Spans accepted by the OTLP collector.");
    describe_counter!(
        SPANS_DROPPED_TOTAL,
        Unit::Count,
        "Spans lost: queue full, export failed, or rejected by the collector."
    );
}

/// Runs the recorder's upkeep (draining histogram samples) every `period` until
/// `shutdown`, so memory stays bounded when nobody scrapes.
pub fn spawn_upkeep(
    handle: PrometheusHandle,
    period: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    })
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn counter(name: &'static str, labels: Vec<Label>) -> Counter {
    let key = Key::from_parts(name, labels);
    metrics::with_recorder(|r| r.register_counter(&key, &METADATA))
}

fn gauge(name: &'static str, labels: Vec<Label>) -> Gauge {
    let key = Key::from_parts(name, labels);
    metrics::with_recorder(|r| r.register_gauge(&key, &METADATA))
}

fn histogram(name: &'static str, labels: Vec<Label>) -> Histogram {
    let key = Key::from_parts(name, labels);
    metrics::with_recorder(|r| r.register_histogram(&key, &METADATA))
}

fn label(key: &'static str, value: &'static str) -> Label {
    Label::from_static_parts(key, value)
}

fn name_label(key: &'static str, value: &MeshName) -> Label {
    Label::new(key, value.shared())
}

/// Who sent a request and where it went; built once per connection (or per route)
/// and reused for each request on it.
#[derive(Clone, Debug)]
pub struct RequestLabels {
    pub direction: Direction,
    pub source_workload: MeshName,
    pub source_identity: MeshName,
    pub destination_service: MeshName,
    /// Over mutual TLS (the dashboard's edge shows it): inbound, the caller
    /// presented an identity; outbound, the service's endpoints are meshed.
    pub mtls: bool,
}

/// What happened to one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestOutcome {
    /// From [`super::labels::method`] / [`super::labels::method_str`].
    pub method: &'static str,
    /// The HTTP status, `None` if no response was received.
    pub status: Option<u16>,
    /// The `grpc-status` trailer (or header), `None` for plain HTTP.
    pub grpc_status: Option<u32>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Records one finished request: count, latency and body sizes.
///
/// Looks up four series in the recorder on every call; on a connection that
/// carries many requests prefer [`RequestMetrics`], which remembers them.
pub fn record_request(labels: &RequestLabels, outcome: &RequestOutcome) {
    RequestSeries::register(labels, outcome).record(outcome);
    outcome.record_edge(&edges::global().edge(labels.edge()));
}

/// The series one request result is recorded in.
#[derive(Debug)]
struct RequestSeries {
    /// The [`super::expiry::epoch`] it was registered in.
    epoch: u64,
    method: &'static str,
    status: &'static str,
    grpc_status: &'static str,
    requests: Counter,
    duration: Histogram,
    request_bytes: Counter,
    response_bytes: Counter,
}

impl RequestSeries {
    fn register(labels: &RequestLabels, outcome: &RequestOutcome) -> Self {
        let status = super::labels::response_code(outcome.status);
        let grpc_status = super::labels::grpc_status(outcome.grpc_status);
        let set = vec![
            label("direction", labels.direction.as_str()),
            name_label("source_workload", &labels.source_workload),
            name_label("source_identity", &labels.source_identity),
            name_label("destination_service", &labels.destination_service),
            label("method", outcome.method),
            label("response_code", status),
            label("grpc_status", grpc_status),
        ];
        Self {
            epoch: super::expiry::epoch(),
            method: outcome.method,
            status,
            grpc_status,
            request_bytes: counter(REQUEST_BYTES_TOTAL, set.clone()),
            response_bytes: counter(RESPONSE_BYTES_TOTAL, set.clone()),
            duration: histogram(REQUEST_DURATION_SECONDS, set.clone()),
            requests: counter(REQUESTS_TOTAL, set),
        }
    }

    fn matches(&self, method: &str, status: &str, grpc_status: &str) -> bool {
        self.method == method && self.status == status && self.grpc_status == grpc_status
    }

    fn record(&self, outcome: &RequestOutcome) {
        self.request_bytes.increment(outcome.request_bytes);
        self.response_bytes.increment(outcome.response_bytes);
        self.duration.record(outcome.duration.as_secs_f64());
        self.requests.increment(1);
    }
}

/// Series remembered per [`RequestMetrics`]; a connection rarely sees more
/// (method, status) pairs than this, and past it recording still works, uncached.
const MAX_CACHED_SERIES: usize = 8;

/// [`RequestLabels`] with the series they have been recorded in, so that a
/// connection (or route) carrying many requests pays the recorder's lookup once
/// per distinct (method, status, grpc status) instead of once per request.
///
/// Cached series stay bound to the recorder current when they were first used; a
/// series cached in an earlier [`super::expiry::epoch`] is registered again before
/// use, since an idle series may have been dropped meanwhile.
#[derive(Debug)]
pub struct RequestMetrics {
    labels: RequestLabels,
    cache: Mutex<Vec<RequestSeries>>,
    /// The dashboard's edge, looked up once.
    edge: Arc<EdgeCell>,
}

impl RequestMetrics {
    pub fn new(labels: RequestLabels) -> Self {
        let edge = edges::global().edge(labels.edge());
        Self { labels, cache: Mutex::new(Vec::new()), edge }
    }

    pub fn labels(&self) -> &RequestLabels {
        &self.labels
    }

    /// Records one finished request, as [`record_request`] does.
    pub fn record(&self, outcome: &RequestOutcome) {
        let status = super::labels::response_code(outcome.status);
        let grpc_status = super::labels::grpc_status(outcome.grpc_status);
        outcome.record_edge(&self.edge);
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(series) = cache.iter_mut().find(|s| s.matches(outcome.method, status, grpc_status)) {
            if series.epoch != super::expiry::epoch() {
                *series = RequestSeries::register(&self.labels, outcome);
            }
            series.record(outcome);
            return;
        }
        let series = RequestSeries::register(&self.labels, outcome);
        series.record(outcome);
        if cache.len() < MAX_CACHED_SERIES {
            cache.push(series);
        }
    }
}

/// The metrics of one TCP connection, registered once when it opens so that byte
/// counts during the relay are plain atomic adds.
///
/// Dropping it without [`close`](Self::close) or [`fail`](Self::fail) still counts
/// the connection as closed and releases the active-connections gauge, so an early
/// return or a panic in a handler cannot leak a phantom connection.
#[derive(Debug)]
pub struct ConnectionMetrics {
    /// Its labels and the [`super::expiry::epoch`] its handles were registered in:
    /// a connection that outlives the epoch registers them again before counting.
    labels: Vec<Label>,
    epoch: u64,
    closed: Counter,
    failed: Counter,
    sent: Counter,
    received: Counter,
    duration: Histogram,
    active: Gauge,
    edge: Arc<EdgeCell>,
    done: bool,
}

impl ConnectionMetrics {
    /// Counts a newly opened connection and returns the handles for the rest of its
    /// life; `mtls`: it travels to the destination's agent over mutual TLS.
    pub fn open(
        direction: Direction,
        source_workload: &MeshName,
        destination_service: &MeshName,
        mtls: bool,
    ) -> Self {
        let set = vec![
            label("direction", direction.as_str()),
            name_label("source_workload", source_workload),
            name_label("destination_service", destination_service),
        ];
        counter(TCP_CONNECTIONS_OPENED_TOTAL, set.clone()).increment(1);
        let active = gauge(ACTIVE_CONNECTIONS, vec![label("direction", direction.as_str())]);
        active.increment(1.0);
        let edge = edges::global().edge(EdgeKey {
            inbound: matches!(direction, Direction::Inbound),
            source: source_workload.clone(),
            service: destination_service.clone(),
            protocol: "tcp",
            mtls,
        });
        edge.connection();
        Self {
            epoch: super::expiry::epoch(),
            closed: counter(TCP_CONNECTIONS_CLOSED_TOTAL, set.clone()),
            failed: counter(TCP_CONNECTIONS_FAILED_TOTAL, set.clone()),
            sent: counter(TCP_SENT_BYTES_TOTAL, set.clone()),
            received: counter(TCP_RECEIVED_BYTES_TOTAL, set.clone()),
            duration: histogram(TCP_CONNECTION_DURATION_SECONDS, set.clone()),
            labels: set,
            active,
            edge,
            done: false,
        }
    }

    /// Registers the handles again if they are from an earlier epoch (their series
    /// may have expired while the connection was idle).
    fn refresh(&mut self) {
        if self.epoch == super::expiry::epoch() {
            return;
        }
        self.epoch = super::expiry::epoch();
        let set = &self.labels;
        self.closed = counter(TCP_CONNECTIONS_CLOSED_TOTAL, set.clone());
        self.failed = counter(TCP_CONNECTIONS_FAILED_TOTAL, set.clone());
        self.sent = counter(TCP_SENT_BYTES_TOTAL, set.clone());
        self.received = counter(TCP_RECEIVED_BYTES_TOTAL, set.clone());
        self.duration = histogram(TCP_CONNECTION_DURATION_SECONDS, set.clone());
    }

    /// Adds bytes relayed client -> destination (callable during the relay for
    /// long-lived connections, so rates move before the connection ends).
    pub fn add_sent(&mut self, bytes: u64) {
        self.refresh();
        self.sent.increment(bytes);
        self.edge.bytes(bytes);
    }

    /// Adds bytes relayed destination -> client.
    pub fn add_received(&mut self, bytes: u64) {
        self.refresh();
        self.received.increment(bytes);
        self.edge.bytes(bytes);
    }

    /// The connection ended after reaching its destination.
    pub fn close(mut self, duration: Duration) {
        self.finish(duration);
    }

    /// The connection ended without reaching its destination.
    pub fn fail(mut self, duration: Duration) {
        self.refresh();
        self.failed.increment(1);
        self.edge.failed();
        self.finish(duration);
    }

    fn finish(&mut self, duration: Duration) {
        self.refresh();
        if !self.done {
            self.done = true;
            self.closed.increment(1);
            self.duration.record(duration.as_secs_f64());
            self.active.decrement(1.0);
        }
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        if !self.done {
            self.refresh();
            self.done = true;
            self.closed.increment(1);
            self.active.decrement(1.0);
        }
    }
}

/// Marks the interception mode in use.
pub fn set_interception_mode(mode: ActiveMode) {
    gauge(INTERCEPTION_MODE, vec![label("mode", mode.as_str())]).set(1.0);
}

/// A circuit breaker's state, as the gauge's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// Publishes the state of the breaker for one endpoint of a service. `endpoint` must
/// come from the service's endpoint set (the control plane's snapshot).
pub fn set_circuit_breaker_state(service: &MeshName, endpoint: &MeshName, state: BreakerState) {
    let set = vec![name_label("service", service), name_label("endpoint", endpoint)];
    gauge(CIRCUIT_BREAKER_STATE, set).set(f64::from(state as u8));
    let shown = match state {
        BreakerState::Closed => None,
        BreakerState::Open => Some("open"),
        BreakerState::HalfOpen => Some("half-open"),
    };
    edges::global().breaker(service.as_str(), endpoint.as_str(), shown);
}

/// Counts an ejection of `endpoint` (of `service`) by outlier detection. Endpoints
/// are the service's own, so the label set stays bounded by the registry.
pub fn outlier_ejection(service: &MeshName, endpoint: SocketAddr) {
    let labels = vec![name_label("service", service), Label::new("endpoint", endpoint.to_string())];
    counter(OUTLIER_EJECTIONS_TOTAL, labels).increment(1);
    edges::global().ejection(service.as_str(), &endpoint.to_string());
}

/// Counts a plaintext inbound connection to `service` refused for `reason` (see
/// [`INBOUND_REFUSED_TOTAL`]).
pub fn inbound_refused(service: &MeshName, reason: &'static str) {
    counter(INBOUND_REFUSED_TOTAL, vec![name_label("service", service), Label::new("reason", reason)])
        .increment(1);
}

/// Counts a denial by authorization policy of a connection or request to `service`
/// (`layer`: `connection` or `request`, see [`AUTHORIZATION_DENIED_TOTAL`]) from
/// `caller` (a principal: a SPIFFE ID or `unauthenticated`), whose edge on the
/// dashboard shows it.
pub fn authorization_denied(service: &MeshName, caller: &str, layer: &'static str) {
    counter(AUTHORIZATION_DENIED_TOTAL, vec![name_label("service", service), Label::new("layer", layer)])
        .increment(1);
    edges::denied(service, caller, layer);
}

/// Counts a retried request to `service`.
pub fn retry(service: &MeshName) {
    counter(RETRIES_TOTAL, vec![name_label("service", service)]).increment(1);
}

/// Counts a mirrored copy of a request to `service` by route `route`.
pub fn mirrored(service: &MeshName, route: &str, outcome: &'static str) {
    counter(
        MIRRORED_REQUESTS_TOTAL,
        vec![
            name_label("service", service),
            Label::new("route", route.to_owned()),
            Label::from_static_parts("outcome", outcome),
        ],
    )
    .increment(1);
}

/// Counts a fault (`delay` or `abort`) route `route` injected into a request to `service`.
pub fn fault_injected(service: &MeshName, route: &str, kind: &'static str) {
    counter(
        FAULTS_INJECTED_TOTAL,
        vec![
            name_label("service", service),
            Label::new("route", route.to_owned()),
            Label::from_static_parts("kind", kind),
        ],
    )
    .increment(1);
}

/// Publishes how long ago configuration was last applied.
pub fn set_discovery_staleness(age: Duration) {
    gauge(DISCOVERY_STALENESS_SECONDS, Vec::new()).set(age.as_secs_f64());
}

/// Publishes the version of the configuration snapshot applied last.
pub fn set_discovery_applied_version(version: u64) {
    // Exact up to 2^53, far beyond any snapshot counter.
    gauge(DISCOVERY_APPLIED_VERSION, Vec::new()).set(version as f64);
}

/// Publishes the seconds left before the certificate of `identity` expires
/// (negative once it has).
pub fn set_certificate_expiry(identity: &MeshName, seconds_left: f64) {
    gauge(CERTIFICATE_EXPIRY_SECONDS, vec![name_label("identity", identity)]).set(seconds_left);
}

/// Counts a protocol detection result, and the timeout separately.
pub fn record_sniff(protocol: &Protocol) {
    counter(SNIFF_RESULTS_TOTAL, vec![label("protocol", protocol.name())]).increment(1);
    if matches!(protocol, Protocol::Opaque(OpaqueReason::Timeout)) {
        counter(SNIFF_TIMEOUTS_TOTAL, Vec::new()).increment(1);
    }
}

/// Counts spans the OTLP collector accepted.
pub fn spans_exported(spans: u64) {
    counter(SPANS_EXPORTED_TOTAL, Vec::new()).increment(spans);
}

/// Counts spans lost before or during export, by `reason`.
pub fn spans_dropped(reason: &'static str, spans: u64) {
    counter(SPANS_DROPPED_TOTAL, vec![label("reason", reason)]).increment(spans);
}

/// Counts access log records dropped.
pub fn access_log_dropped(records: u64) {
    counter(ACCESS_LOG_DROPPED_TOTAL, Vec::new()).increment(records);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::labels;

    fn outcome(method: &'static str, status: u16, millis: u64) -> RequestOutcome {
        RequestOutcome {
            method,
            status: Some(status),
            grpc_status: None,
            duration: Duration::from_millis(millis),
            request_bytes: 10,
            response_bytes: 200,
        }
    }

    fn request_labels() -> RequestLabels {
        RequestLabels {
            direction: Direction::Outbound,
            source_workload: MeshName::known("default/frontend"),
            source_identity: MeshName::known("spiffe://mesh.local/ns/default/sa/frontend"),
            destination_service: MeshName::known("reviews.default.svc.cluster.local"),
            mtls: true,
        }
    }

    #[test]
    fn recorded_requests_render_as_prometheus_series_with_buckets() {
        let (recorder, handle) = build(None).expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            describe();
            let l = request_labels();
            record_request(&l, &outcome(labels::method(&http::Method::GET), 200, 3));
            record_request(&l, &outcome(labels::method(&http::Method::GET), 200, 700));
            let propfind = http::Method::from_bytes(b"PROPFIND").expect("token");
            record_request(&l, &outcome(labels::method(&propfind), 503, 1));
        });
        let text = handle.render();
        let series = "direction=\"outbound\",source_workload=\"default/frontend\",\
             source_identity=\"spiffe://mesh.local/ns/default/sa/frontend\",\
             destination_service=\"reviews.default.svc.cluster.local\"";
        assert!(
            text.contains(&format!(
                "mesh_requests_total{{{series},method=\"GET\",response_code=\"200\",grpc_status=\"\"}} 2"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "mesh_requests_total{{{series},method=\"other\",response_code=\"503\",grpc_status=\"\"}} 1"
            )),
            "{text}"
        );
        assert!(!text.contains("PROPFIND"), "{text}");
        assert!(text.contains("# HELP mesh_requests_total"), "{text}");
        assert!(text.contains("# TYPE mesh_request_duration_seconds histogram"), "{text}");
        // 3 ms falls in le=0.005 but not 0.0025; 700 ms only from le=1 on.
        let get = format!("{series},method=\"GET\",response_code=\"200\",grpc_status=\"\"");
        for (le, count) in
            [("0.0001", 0), ("0.0025", 0), ("0.005", 1), ("0.5", 1), ("1", 2), ("10", 2), ("+Inf", 2)]
        {
            let line = format!("mesh_request_duration_seconds_bucket{{{get},le=\"{le}\"}} {count}\n");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert!(text.contains(&format!("mesh_request_bytes_total{{{get}}} 20")), "{text}");
        assert!(text.contains(&format!("mesh_response_bytes_total{{{get}}} 400")), "{text}");
    }

    #[test]
    fn cached_request_metrics_record_the_same_series() {
        let (recorder, handle) = build(None).expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            let cached = RequestMetrics::new(request_labels());
            // More distinct results than the cache holds: all must still be counted.
            for status in 200..(200 + MAX_CACHED_SERIES as u16 + 3) {
                for _ in 0..2 {
                    cached.record(&outcome("GET", status, 1));
                }
            }
            record_request(cached.labels(), &outcome("GET", 200, 1));
        });
        let text = handle.render();
        for status in 200..(200 + MAX_CACHED_SERIES as u16 + 3) {
            let n = if status == 200 { 3 } else { 2 };
            let tail = format!("method=\"GET\",response_code=\"{status}\",grpc_status=\"\"}} {n}\n");
            let found = text
                .lines()
                .any(|l| l.starts_with("mesh_requests_total{") && format!("{l}\n").ends_with(&tail));
            assert!(found, "missing status {status} x{n} in\n{text}");
        }
    }

    #[test]
    fn connection_lifecycle_counts_and_balances_the_active_gauge() {
        let (recorder, handle) = build(None).expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            let src = MeshName::known("default/frontend");
            let dst = MeshName::known("db.default.svc.cluster.local");
            let mut ok = ConnectionMetrics::open(Direction::Outbound, &src, &dst, true);
            ok.add_sent(100);
            ok.add_received(50);
            ok.add_sent(1);
            let failed = ConnectionMetrics::open(Direction::Outbound, &src, &dst, true);
            let dropped = ConnectionMetrics::open(Direction::Outbound, &src, &MeshName::unknown(), false);
            let still_open = ConnectionMetrics::open(Direction::Inbound, &src, &dst, true);
            ok.close(Duration::from_secs(2));
            failed.fail(Duration::from_millis(5));
            drop(dropped);
            std::mem::forget(still_open);
        });
        let text = handle.render();
        let series = "direction=\"outbound\",source_workload=\"default/frontend\",\
                      destination_service=\"db.default.svc.cluster.local\"";
        for line in [
            format!("mesh_tcp_connections_opened_total{{{series}}} 2\n"),
            format!("mesh_tcp_connections_closed_total{{{series}}} 2\n"),
            format!("mesh_tcp_connections_failed_total{{{series}}} 1\n"),
            format!("mesh_tcp_sent_bytes_total{{{series}}} 101\n"),
            format!("mesh_tcp_received_bytes_total{{{series}}} 50\n"),
            format!("mesh_tcp_connection_duration_seconds_bucket{{{series},le=\"0.01\"}} 1\n"),
            format!("mesh_tcp_connection_duration_seconds_bucket{{{series},le=\"1\"}} 1\n"),
            format!("mesh_tcp_connection_duration_seconds_bucket{{{series},le=\"5\"}} 2\n"),
            "mesh_tcp_connections_closed_total{direction=\"outbound\",source_workload=\"default/frontend\",\
             destination_service=\"unknown\"} 1\n"
                .to_owned(),
            "mesh_active_connections{direction=\"outbound\"} 0\n".to_owned(),
            "mesh_active_connections{direction=\"inbound\"} 1\n".to_owned(),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn control_plane_and_sniff_metrics_render() {
        let (recorder, handle) = build(None).expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            set_interception_mode(ActiveMode::Ebpf);
            let svc = MeshName::known("reviews");
            set_circuit_breaker_state(&svc, &MeshName::known("10.0.0.5:9080"), BreakerState::Open);
            outlier_ejection(&svc, "10.0.0.5:9080".parse().unwrap());
            retry(&svc);
            retry(&svc);
            set_discovery_staleness(Duration::from_millis(1500));
            set_discovery_applied_version(42);
            set_certificate_expiry(&MeshName::known("spiffe://td/ns/a/sa/b"), 3600.0);
            record_sniff(&Protocol::Http2);
            record_sniff(&Protocol::Opaque(OpaqueReason::Timeout));
            access_log_dropped(1);
        });
        let text = handle.render();
        for line in [
            "mesh_interception_mode{mode=\"ebpf\"} 1\n",
            "mesh_circuit_breaker_state{service=\"reviews\",endpoint=\"10.0.0.5:9080\"} 1\n",
            "mesh_outlier_ejections_total{service=\"reviews\",endpoint=\"10.0.0.5:9080\"} 1\n",
            "mesh_retries_total{service=\"reviews\"} 2\n",
            "mesh_discovery_staleness_seconds 1.5\n",
            "mesh_discovery_applied_version 42\n",
            "mesh_certificate_expiry_seconds{identity=\"spiffe://td/ns/a/sa/b\"} 3600\n",
            "mesh_sniff_results_total{protocol=\"http2\"} 1\n",
            "mesh_sniff_results_total{protocol=\"opaque\"} 1\n",
            "mesh_sniff_timeouts_total 1\n",
            "mesh_access_log_dropped_total 1\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn install_is_idempotent() {
        let first = install(None).expect("install");
        let second = install(None).expect("second install returns the same recorder");
        metrics::counter!(RETRIES_TOTAL, "service" => "idempotence-probe").increment(1);
        assert!(first.render().contains("idempotence-probe"));
        assert!(second.render().contains("idempotence-probe"));
    }
}
