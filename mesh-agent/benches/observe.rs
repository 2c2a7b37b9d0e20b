//! What observability costs the data path, per request.
//!
//! `cargo bench -p mesh-agent --bench observe`

use std::{hint::black_box, net::SocketAddr, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use mesh_agent::{
    intercept::ActiveMode,
    listener::Direction,
    observe::{
        access_log::{AccessLog, AccessRecord},
        labels::{self, MeshName},
        metrics::{self, ConnectionMetrics, RequestLabels, RequestMetrics, RequestOutcome},
        trace::{TRACEPARENT, TRACESTATE, TraceContext, X_REQUEST_ID},
    },
};

fn request_labels() -> RequestLabels {
    RequestLabels {
        direction: Direction::Outbound,
        source_workload: MeshName::known("default/frontend"),
        source_identity: MeshName::known("spiffe://mesh.local/ns/default/sa/frontend"),
        destination_service: MeshName::known("reviews.default.svc.cluster.local"),
        mtls: true,
    }
}

fn outcome(i: u64) -> RequestOutcome {
    RequestOutcome {
        method: labels::method(&http::Method::GET),
        status: Some(if i.is_multiple_of(10) { 503 } else { 200 }),
        grpc_status: None,
        duration: Duration::from_micros(100 + i % 5000),
        request_bytes: 100,
        response_bytes: 2000,
    }
}

fn record(l: &RequestLabels, source: SocketAddr) -> AccessRecord {
    AccessRecord {
        source_workload: Some(l.source_workload.clone()),
        source_identity: Some(l.source_identity.clone()),
        destination_service: Some(l.destination_service.clone()),
        protocol: Some("http1"),
        method: Some("GET".to_owned()),
        path: Some("/reviews/1".to_owned()),
        response_code: Some(200),
        latency: Some(Duration::from_micros(850)),
        bytes_sent: 100,
        bytes_received: 2000,
        ..AccessRecord::http(Direction::Outbound, ActiveMode::Ebpf, source)
    }
}

fn observe(c: &mut Criterion) {
    let handle = metrics::install(None).expect("install recorder");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (log, writer) = runtime.block_on(async { AccessLog::with_writer(tokio::io::sink(), 8192) });
    let l = request_labels();
    let source: SocketAddr = "10.0.0.5:41000".parse().expect("addr");

    let mut i = 0u64;
    c.bench_function("record_request", |b| {
        b.iter(|| {
            i += 1;
            metrics::record_request(black_box(&l), &outcome(i));
        })
    });
    let cached = RequestMetrics::new(request_labels());
    c.bench_function("request_metrics_cached", |b| {
        b.iter(|| {
            i += 1;
            cached.record(black_box(&outcome(i)));
        })
    });
    c.bench_function("access_log_try_send", |b| b.iter(|| black_box(log.log(record(&l, source)))));
    c.bench_function("request_metrics_cached_and_access_log", |b| {
        b.iter(|| {
            i += 1;
            cached.record(black_box(&outcome(i)));
            black_box(log.log(record(&l, source)))
        })
    });
    c.bench_function("connection_metrics_open_close", |b| {
        b.iter(|| {
            let mut conn = ConnectionMetrics::open(
                Direction::Outbound,
                &l.source_workload,
                &l.destination_service,
                true,
            );
            conn.add_sent(100);
            conn.add_received(2000);
            conn.close(Duration::from_millis(3));
        })
    });

    let mut incoming = HeaderMap::new();
    incoming.insert(
        &TRACEPARENT,
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    incoming.insert(&TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
    incoming.insert(&X_REQUEST_ID, HeaderValue::from_static("4f1d5c1e-8a3b-4c1e-9d2f-0a1b2c3d4e5f"));
    c.bench_function("traceparent_parse_child", |b| {
        b.iter(|| {
            let (ctx, _) = TraceContext::from_headers(black_box(&incoming));
            black_box(ctx.child())
        })
    });
    c.bench_function("traceparent_parse_child_apply", |b| {
        let mut out = incoming.clone();
        b.iter(|| {
            let (ctx, _) = TraceContext::from_headers(black_box(&incoming));
            ctx.child().apply(&mut out);
        })
    });
    c.bench_function("trace_new_root", |b| {
        let empty = HeaderMap::new();
        b.iter(|| black_box(TraceContext::from_headers(black_box(&empty))))
    });

    runtime.block_on(writer.shutdown()).expect("access log shutdown");
    eprintln!("access log records dropped during the run: {}", log.dropped());
    black_box(handle.render());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = observe
}
criterion_main!(benches);
