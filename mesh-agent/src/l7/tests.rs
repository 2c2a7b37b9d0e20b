//! The L7 proxy end to end inside one process: real hyper backends on loopback, the
//! agent's connection handler behind a loopback listener (original destination
//! fixed to a service VIP), and hyper clients over HTTP/1.1 and HTTP/2.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api as api;
use tokio::net::{TcpListener, TcpStream};

use crate::discovery::{RouteStore, table::RouteTable};
use crate::intercept::ActiveMode;
use crate::listener::{Direction, ProxyContext};
use crate::orig_dst::Fixed;
use crate::socket::SocketFactory;

const VIP: &str = "10.96.0.10:80";

/// How a test backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Behaviour {
    Ok,
    Status(u16),
    GrpcUnavailable,
    Slow(Duration),
}

pub(super) struct Backend {
    pub(super) addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// The `host` header of the last request (HTTP/1.1), for mirror tests.
    pub(super) last_host: Arc<std::sync::Mutex<Option<String>>>,
    behaviour: Arc<std::sync::Mutex<Behaviour>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    /// A backend speaking HTTP/1.1 and HTTP/2 (prior knowledge) that answers with its
    /// name and echoes `traceparent` and `x-request-id` as response headers.
    pub(super) async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(std::sync::Mutex::new(Behaviour::Ok));
        let last_host = Arc::new(std::sync::Mutex::new(None));
        let (h, b, lh) = (hits.clone(), behaviour.clone(), last_host.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (h, b, lh) = (h.clone(), b.clone(), lh.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        *lh.lock().unwrap() =
                            req.headers().get("host").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        h.fetch_add(1, Ordering::SeqCst);
                        let behaviour = *b.lock().unwrap();
                        async move { Ok::<_, Infallible>(answer(name, behaviour, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Backend { addr, hits, last_host, behaviour, task: Some(task) }
    }

    /// Stops accepting and closes the listening socket.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub(super) fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub(super) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(name: &str, behaviour: Behaviour, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(name.to_owned())));
    for h in ["traceparent", "x-request-id", "x-forwarded-for"] {
        if let Some(v) = req.headers().get(h) {
            resp.headers_mut().insert(format!("echo-{h}").parse::<http::HeaderName>().unwrap(), v.clone());
        }
    }
    resp.headers_mut().insert("backend", name.parse().unwrap());
    match behaviour {
        Behaviour::Ok => {}
        Behaviour::Status(s) => *resp.status_mut() = StatusCode::from_u16(s).unwrap(),
        Behaviour::GrpcUnavailable => {
            resp.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
            resp.headers_mut().insert("grpc-status", "14".parse().unwrap());
        }
        Behaviour::Slow(d) => tokio::time::sleep(d).await,
    }
    resp
}

pub(super) fn snapshot(backends: &[&Backend], policy: Option<api::Policy>) -> api::Snapshot {
    api::Snapshot {
        services: vec![api::Service {
            name: "web".into(),
            namespace: "default".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![api::ServicePort { name: "http".into(), port: 80, ..Default::default() }],
            endpoints: backends
                .iter()
                .map(|b| api::Endpoint {
                    address: b.addr.ip().to_string(),
                    port: b.addr.port().into(),
                    weight: 1,
                    ..Default::default()
                })
                .collect(),
            policy,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The agent's outbound listener with `snapshot` applied; returns its address.
pub(super) async fn agent(snapshot: &api::Snapshot) -> (SocketAddr, Arc<ProxyContext>) {
    agent_in(snapshot, None).await
}

async fn agent_in(
    snapshot: &api::Snapshot,
    locality: Option<crate::balance::Locality>,
) -> (SocketAddr, Arc<ProxyContext>) {
    agent_with(snapshot, locality, Default::default()).await
}

async fn agent_with(
    snapshot: &api::Snapshot,
    locality: Option<crate::balance::Locality>,
    downstream: super::DownstreamTimeouts,
) -> (SocketAddr, Arc<ProxyContext>) {
    static VERSION: AtomicU32 = AtomicU32::new(1);
    let routes = Arc::new(RouteStore::new(true));
    let version = VERSION.fetch_add(1, Ordering::Relaxed).into();
    routes.apply(RouteTable::build(version, snapshot, 1000).unwrap());
    let sockets = SocketFactory::new(0);
    let tunnels = crate::mtls::pool(Default::default(), sockets.clone(), Duration::from_secs(1));
    let ctx = Arc::new(ProxyContext {
        mode: ActiveMode::Ebpf,
        sockets: sockets.clone(),
        lookup: Box::new(Fixed(VIP.parse().unwrap())),
        inbound_lookup: Box::new(Fixed(VIP.parse().unwrap())),
        workload: crate::observe::labels::MeshName::unknown(),
        detect_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        opaque_ports: Default::default(),
        own_addrs: Vec::new(),
        stats: Default::default(),
        routes,
        node: String::new(),
        identity: Default::default(),
        tunnels: tunnels.clone(),
        services: Default::default(),
        rate_limits: Default::default(),
        upstreams: Arc::new(super::pool::UpstreamPool::new(
            sockets,
            tunnels,
            Default::default(),
            Duration::from_secs(30),
        )),
        records: Default::default(),
        locality,
        downstream,
        tcp_idle_timeout: Some(crate::forward::idle::DEFAULT),
        splice: Default::default(),
        shutdown: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = ctx.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { return };
            tokio::spawn(crate::forward::handle(c.clone(), Direction::Outbound, tcp, peer));
        }
    });
    (addr, ctx)
}

/// One HTTP/1.1 keep-alive connection to the agent.
pub(super) async fn h1_client(agent: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(agent).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn get(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    headers: &[(&str, &str)],
) -> (StatusCode, HashMap<String, String>, Bytes) {
    client.ready().await.unwrap();
    let mut req = Request::get("/hello").header("host", "web.default");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn retry_policy(retry_on: &[&str]) -> api::Policy {
    api::Policy {
        retries: Some(api::RetryPolicy {
            attempts: 3,
            retry_on: retry_on.iter().map(|s| (*s).to_owned()).collect(),
            backoff_base_ms: 1,
            backoff_max_ms: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn requests_on_one_connection_are_balanced_round_robin() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let (agent, ctx) = agent(&snapshot(&[&a, &b, &c], None)).await;
    let mut client = h1_client(agent).await;
    let mut seen: HashMap<Bytes, usize> = HashMap::new();
    for _ in 0..30 {
        let (status, _, body) = get(&mut client, &[]).await;
        assert_eq!(status, StatusCode::OK);
        *seen.entry(body).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| *n == 10), "round robin gives each backend exactly 10 of 30: {seen:?}");
    // The client's one connection became pooled upstream connections, reused.
    assert!(ctx.upstreams.connection_count() <= 3, "{}", ctx.upstreams.connection_count());
}

#[tokio::test]
async fn a_dead_endpoint_costs_no_failed_request_with_retries() {
    let (a, b, mut c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let (agent, _ctx) =
        agent(&snapshot(&[&a, &b, &c], Some(retry_policy(&["connect-failure", "reset"])))).await;
    c.stop().await;
    let mut client = h1_client(agent).await;
    for i in 0..30 {
        let (status, h, _) = get(&mut client, &[]).await;
        assert_eq!(status, StatusCode::OK, "request {i} failed: {h:?}");
    }
    assert_eq!(c.hits(), 0);
    assert_eq!(a.hits() + b.hits(), 30);
}

#[tokio::test]
async fn a_503_is_retried_on_another_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set(Behaviour::Status(503));
    let (agent, _ctx) = agent(&snapshot(&[&a, &b], Some(retry_policy(&["503"])))).await;
    let mut client = h1_client(agent).await;
    for _ in 0..10 {
        let (status, h, body) = get(&mut client, &[]).await;
        assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"a"[..]), "{h:?}");
    }
    assert!(b.hits() > 0, "the failing endpoint was tried");
}

#[tokio::test]
async fn without_a_retry_policy_the_endpoints_error_reaches_the_client() {
    let a = Backend::start("a").await;
    a.set(Behaviour::Status(503));
    let (agent, _ctx) = agent(&snapshot(&[&a], None)).await;
    let mut client = h1_client(agent).await;
    let (status, h, body) = get(&mut client, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body.as_ref(), b"a", "the backend's own response, not the agent's");
    assert!(!h.contains_key("x-mesh-error"));
}

#[tokio::test]
async fn grpc_unavailable_opens_the_circuit_of_its_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set(Behaviour::GrpcUnavailable);
    let policy = api::Policy {
        circuit_breaker: Some(api::CircuitBreaker {
            enabled: true,
            failure_rate: 0.5,
            window: 4,
            reset_timeout_ms: 60_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (agent, ctx) = agent(&snapshot(&[&a, &b], Some(policy))).await;
    let mut client = h1_client(agent).await;
    for _ in 0..20 {
        let _ = get(&mut client, &[]).await;
    }
    let hits_when_open = b.hits();
    assert!(hits_when_open <= 5, "b got {hits_when_open} requests; its circuit should have opened after 4");
    for _ in 0..20 {
        let (status, _, body) = get(&mut client, &[]).await;
        assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"a"[..]));
    }
    assert_eq!(b.hits(), hits_when_open, "an open circuit gets no requests");
    let states: Vec<_> = ctx.services.snapshot()[0].endpoints().iter().map(|e| e.breaker().state()).collect();
    assert!(states.iter().any(|s| s.as_str() == "open"), "{states:?}");
    // The admin dump shows it too.
    let dump = ctx.services.dump();
    let b_dump = dump[0].endpoints.iter().find(|e| e.address == b.addr).unwrap();
    assert_eq!((b_dump.circuit, b_dump.circuit_times_opened), ("open", 1), "{dump:?}");
}

#[tokio::test]
async fn trace_context_is_continued_or_started() {
    let a = Backend::start("a").await;
    let (agent, _ctx) = agent(&snapshot(&[&a], None)).await;
    let mut client = h1_client(agent).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, h, _) = get(&mut client, &[("traceparent", parent)]).await;
    let got = &h["echo-traceparent"];
    assert_eq!(&got[..36], &parent[..36], "same version and trace id");
    assert_ne!(&got[36..52], &parent[36..52], "a new parent id");
    assert!(!h["echo-x-request-id"].is_empty());

    let (_, h, _) = get(&mut client, &[]).await;
    assert_eq!(h["echo-traceparent"].len(), 55, "a trace is started: {h:?}");
    assert!(!h["echo-x-request-id"].is_empty());
}

#[tokio::test]
async fn rate_limited_clients_get_429_with_retry_after() {
    let a = Backend::start("a").await;
    let policy = api::Policy {
        rate_limit: Some(api::RateLimit { requests_per_second: 1, burst: 2 }),
        ..Default::default()
    };
    let (agent, _ctx) = agent(&snapshot(&[&a], Some(policy))).await;
    let mut client = h1_client(agent).await;
    let statuses: Vec<StatusCode> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(&mut client, &[]).await);
        }
        v.into_iter()
            .map(|(s, h, _)| {
                if s == StatusCode::TOO_MANY_REQUESTS {
                    assert_eq!(h["retry-after"], "1");
                }
                s
            })
            .collect()
    };
    assert_eq!(statuses, vec![StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(a.hits(), 2);
}

#[tokio::test]
async fn the_calling_side_leaves_a_meshed_endpoints_limit_to_its_agent() {
    // A meshed endpoint (behind an agent) that this agent cannot reach: it has no
    // workload certificate, so every request fails, but none on the rate limit.
    let mut s = snapshot(&[], None);
    s.services[0].endpoints = vec![api::Endpoint {
        address: "127.0.0.1".into(),
        port: 9,
        weight: 1,
        agent_address: "127.0.0.1:9".into(),
        identity: "spiffe://cluster.local/ns/default/sa/web".into(),
        ..Default::default()
    }];
    s.services[0].policy = Some(api::Policy {
        rate_limit: Some(api::RateLimit { requests_per_second: 1, burst: 1 }),
        ..Default::default()
    });
    let (agent, _ctx) = agent(&s).await;
    let mut client = h1_client(agent).await;
    for _ in 0..2 {
        let (status, _, body) = get(&mut client, &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "tried, not limited here: {body:?}");
        assert!(String::from_utf8_lossy(&body).contains("no workload certificate"), "{body:?}");
    }
}

#[tokio::test]
async fn a_slow_endpoint_meets_the_request_timeout() {
    let a = Backend::start("a").await;
    a.set(Behaviour::Slow(Duration::from_secs(30)));
    let policy = api::Policy {
        timeouts: Some(api::Timeouts { request_ms: 200, ..Default::default() }),
        ..Default::default()
    };
    let (agent, _ctx) = agent(&snapshot(&[&a], Some(policy))).await;
    let mut client = h1_client(agent).await;
    let (status, h, _) = get(&mut client, &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(h["x-mesh-error"], "agent");
}

#[tokio::test]
async fn http2_requests_are_multiplexed_and_balanced() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (agent, ctx) = agent(&snapshot(&[&a, &b], None)).await;
    let tcp = TcpStream::connect(agent).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut send = send.clone();
        calls.push(tokio::spawn(async move {
            let req = Request::post("http://web.default/pkg.Svc/Call")
                .header("content-type", "application/grpc")
                .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    let mut seen: HashMap<Bytes, usize> = HashMap::new();
    for c in calls {
        *seen.entry(c.await.unwrap()).or_default() += 1;
    }
    assert_eq!(seen.get(&Bytes::from_static(b"a")), Some(&10), "{seen:?}");
    assert_eq!(seen.get(&Bytes::from_static(b"b")), Some(&10), "{seen:?}");
    assert_eq!(ctx.upstreams.connection_count(), 2, "one multiplexed HTTP/2 connection per endpoint");
}

#[tokio::test]
async fn garbage_after_an_http_request_line_gets_400_and_the_agent_carries_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let (agent, _ctx) = agent(&snapshot(&[&a], None)).await;
    let mut tcp = TcpStream::connect(agent).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\x01\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&out));
    let mut client = h1_client(agent).await;
    assert_eq!(get(&mut client, &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn locality_aware_balancing_prefers_the_callers_zone() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let policy = api::Policy {
        load_balancer: Some(api::LoadBalancer { locality_aware: true, ..Default::default() }),
        ..Default::default()
    };
    let mut snap = snapshot(&[&a, &b, &c], Some(policy));
    for (ep, zone) in snap.services[0].endpoints.iter_mut().zip(["z1", "z2", "z2"]) {
        ep.locality = Some(api::Locality { region: "r".into(), zone: zone.into() });
    }
    let (agent, _ctx) = agent_in(&snap, Some(crate::balance::Locality::new("r", "z2"))).await;
    let mut client = h1_client(agent).await;
    for _ in 0..20 {
        let (_, _, body) = get(&mut client, &[]).await;
        assert_ne!(
            body.as_ref(),
            b"a",
            "the other zone's endpoint is not used while the caller's zone has endpoints"
        );
    }
    assert_eq!((b.hits(), c.hits()), (10, 10));
}

#[tokio::test]
async fn upstream_connections_close_after_the_services_idle_timeout() {
    let a = Backend::start("a").await;
    let policy = api::Policy {
        timeouts: Some(api::Timeouts { idle_ms: 50, ..Default::default() }),
        ..Default::default()
    };
    let (agent, ctx) = agent(&snapshot(&[&a], Some(policy))).await;
    let mut client = h1_client(agent).await;
    assert_eq!(get(&mut client, &[]).await.0, StatusCode::OK);
    let used = std::time::Instant::now();
    assert_eq!(ctx.upstreams.connection_count(), 1, "the connection is pooled after use");
    ctx.upstreams.sweep();
    assert_eq!(ctx.upstreams.connection_count(), 1, "a fresh connection survives a sweep");
    let deadline = used + Duration::from_secs(5);
    while ctx.upstreams.connection_count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the idle connection was never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
        ctx.upstreams.sweep();
    }
    assert!(used.elapsed() >= Duration::from_millis(50), "closed before its idle timeout");
}

/// Time limits short enough for a test (pings as in production).
fn timeouts(header: Duration, idle: Duration) -> super::DownstreamTimeouts {
    super::DownstreamTimeouts { idle: Some(idle), header, ..Default::default() }
}

/// What the agent sends on `rx` until it closes the connection (at most 10 s).
async fn read_until_closed(rx: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = rx.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the agent never closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_client_dripping_a_request_head_is_dropped_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let a = Backend::start("a").await;
    let header = Duration::from_millis(300);
    let (agent, _ctx) =
        agent_with(&snapshot(&[&a], None), None, timeouts(header, Duration::from_secs(60))).await;
    let (mut rx, mut tx) = TcpStream::connect(agent).await.unwrap().into_split();
    let started = std::time::Instant::now();
    tx.write_all(b"GET /hello HTTP/1.1\r\nHost: web.default\r\n").await.unwrap();
    // A byte every 50 ms: the head keeps growing and never ends.
    let drip = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if tx.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let out = read_until_closed(&mut rx).await;
    let waited = started.elapsed();
    drip.abort();
    assert_eq!(out, "", "no response to a head that never ended");
    assert!(waited >= header && waited < Duration::from_secs(5), "dropped after {waited:?}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    let a = Backend::start("a").await;
    let idle = Duration::from_millis(300);
    let (agent, _ctx) =
        agent_with(&snapshot(&[&a], None), None, timeouts(Duration::from_secs(60), idle)).await;
    let mut tcp = TcpStream::connect(agent).await.unwrap();
    let sent = std::time::Instant::now();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    let out = read_until_closed(&mut tcp).await;
    let waited = sent.elapsed();
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\na"), "{out}");
    assert!(waited >= idle && waited < Duration::from_secs(5), "closed after {waited:?}");
}

#[tokio::test]
async fn a_request_in_flight_longer_than_the_idle_timeout_is_not_cut() {
    let a = Backend::start("a").await;
    a.set(Behaviour::Slow(Duration::from_millis(900)));
    let (agent, _ctx) = agent_with(
        &snapshot(&[&a], None),
        None,
        timeouts(Duration::from_millis(200), Duration::from_millis(300)),
    )
    .await;
    let mut client = h1_client(agent).await;
    let (status, _, body) = get(&mut client, &[]).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"a"[..]));
    // The same connection still serves.
    a.set(Behaviour::Ok);
    let (status, _, body) = get(&mut client, &[]).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"a"[..]));
}

#[tokio::test]
async fn shutdown_closes_an_idle_kept_alive_connection_well_before_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let (agent, ctx) = agent(&snapshot(&[&a], None)).await;
    let mut tcp = TcpStream::connect(agent).await.unwrap();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"\r\n\r\na") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    closes_at_shutdown(&ctx, &mut tcp).await;
}

/// A backend that switches every connection to an echo protocol: it answers the
/// first request head with a 101 and then sends back every byte it reads.
async fn upgrade_echo_backend() -> Backend {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(n @ 1..) => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let switch =
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n";
                if tcp.write_all(switch).await.is_err() {
                    return;
                }
                let (mut rx, mut tx) = tcp.split();
                let _ = tokio::io::copy(&mut rx, &mut tx).await;
            });
        }
    });
    Backend {
        addr,
        hits,
        last_host: Default::default(),
        behaviour: Arc::new(std::sync::Mutex::new(Behaviour::Ok)),
        task: Some(task),
    }
}

/// Upgrades a fresh connection to the agent and checks that bytes are relayed
/// both ways; returns the upgraded connection.
async fn upgraded(agent: SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(agent).await.unwrap();
    tcp.write_all(b"GET /echo HTTP/1.1\r\nHost: web.default\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut buf).await.unwrap(),
            1,
            "closed in the 101: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(buf[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tcp.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    tcp
}

#[tokio::test]
async fn an_upgraded_connection_is_closed_after_the_idle_timeout() {
    let a = upgrade_echo_backend().await;
    let idle = Duration::from_millis(300);
    let (agent, _ctx) =
        agent_with(&snapshot(&[&a], None), None, timeouts(Duration::from_secs(60), idle)).await;
    let mut tcp = upgraded(agent).await;
    let quiet = std::time::Instant::now();
    assert_eq!(read_until_closed(&mut tcp).await, "");
    let waited = quiet.elapsed();
    // The watch looks every quarter of the limit.
    assert!(waited >= idle && waited < Duration::from_secs(5), "closed after {waited:?}");
}

#[tokio::test]
async fn shutdown_closes_an_upgraded_connection() {
    let a = upgrade_echo_backend().await;
    let (agent, ctx) = agent(&snapshot(&[&a], None)).await;
    let mut tcp = upgraded(agent).await;
    closes_at_shutdown(&ctx, &mut tcp).await;
}

/// Shuts the agent down and checks that it closes `tcp` well before any idle limit.
async fn closes_at_shutdown(ctx: &ProxyContext, tcp: &mut TcpStream) {
    let asked = std::time::Instant::now();
    ctx.shutdown.cancel();
    assert_eq!(read_until_closed(tcp).await, "");
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "closed after {waited:?}, idle timeout {:?}",
        ctx.downstream.idle
    );
}
