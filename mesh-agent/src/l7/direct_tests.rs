//! Direct HTTP between agents over loopback: the sending side's [`UpstreamPool`]
//! against a [`TunnelServer`] with identities from an in-process CA.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::pool::{Body, Dial, SendError, UpstreamBody, UpstreamPool, Version};
use super::pool_tests::{STREAMS, Target, hold_or_answer, spreads_over_connections};
use crate::discovery::{RouteStore, table::RouteTable};
use crate::identity::test_ca::{TestCa, TestSigner};
use crate::identity::{CertManager, RenewalConfig, SpiffeId, TlsConfigs, TokioClock};
use crate::socket::SocketFactory;
use crate::tunnel::{
    Authorize, ConnectTarget, HttpServe, PROTOCOL_HEADER, REASON_HEADER, ServerTls, TARGET_HEADER,
    TunnelServer,
};
use crate::workload_identity::{AgentIdentity, IdentitySlot};

const PATIENCE: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// What the peer agent saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    target: Option<String>,
    protocol: Option<String>,
    uri: String,
    host: Option<String>,
}

/// The server side of a peer agent for `payments`, and a sending side as `cart`.
struct Peers {
    payments: SpiffeId,
    agent: SocketAddr,
    /// TLS connections the peer agent accepted.
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    pool: Arc<UpstreamPool>,
    _shutdown: tokio_util::sync::DropGuard,
}

/// How the peer agent answers.
#[derive(Clone)]
enum Peer {
    /// The agent's own receiving side ([`super::inbound::Shared`]) for workloads of
    /// node `server` in these routes.
    Real(Arc<RouteStore>),
    /// Serves direct HTTP, answering 200 with the request's target.
    Direct,
    /// Serves direct HTTP, refusing every request before any workload.
    Refusing,
    /// An agent from before direct HTTP: offers only `h2` (CONNECT streams).
    Legacy,
    /// Serves direct HTTP allowing [`STREAMS`] streams per connection, holding
    /// `/hold` open forever; the sending pool moves on at [`STREAMS`] too.
    Holding,
}

async fn peers(kind: Peer) -> Peers {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), Duration::from_secs(3600));
    let (cart, payments) = (signer.ca.id("cart"), signer.ca.id("payments"));
    let tls = TlsConfigs::new(signer.ca.bundle(), clock.clone());
    let mut server_config = tls.server_config(signer.ca.fresh(&payments)).unwrap();
    if let Peer::Legacy = &kind {
        let mut legacy = (*server_config).clone();
        legacy.alpn_protocols = vec![crate::identity::ALPN_H2.to_vec()];
        server_config = Arc::new(legacy);
    }
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let server_tls: ServerTls = Arc::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Some(server_config.clone())
    });
    let authorize: Authorize = Arc::new(|_, _| Ok(()));
    let connect: ConnectTarget = Arc::new(|target| Box::pin(TcpStream::connect(target)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let refusing = matches!(kind, Peer::Refusing);
    let http: HttpServe = Arc::new(move |_peer, _addr, tls, _shutdown| {
        let log = log.clone();
        Box::pin(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                let seen = Seen {
                    target: header(TARGET_HEADER),
                    protocol: header(PROTOCOL_HEADER),
                    uri: req.uri().to_string(),
                    host: header("host"),
                };
                log.lock().unwrap().push(seen.clone());
                let mut resp = Response::new(Full::new(Bytes::from(seen.target.unwrap_or_default())));
                if refusing {
                    *resp.status_mut() = StatusCode::FORBIDDEN;
                    resp.headers_mut().insert(REASON_HEADER, "denied by policy".parse().unwrap());
                }
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        })
    });
    let mut server = TunnelServer::new(server_tls, authorize, connect);
    match &kind {
        Peer::Legacy => {}
        Peer::Holding => {
            server = server.with_http(Arc::new(|_peer, _addr, tls, _shutdown| {
                Box::pin(async move {
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(STREAMS as u32)
                        .serve_connection(TokioIo::new(tls), hyper::service::service_fn(hold_or_answer))
                        .await;
                })
            }));
        }
        Peer::Real(routes) => {
            // The receiving agent's own identity: the `By=` of x-forwarded-client-cert.
            let manager =
                CertManager::new(signer.clone(), signer.ca.bundle(), clock.clone(), RenewalConfig::default())
                    .unwrap();
            let own = manager.identity(&payments).unwrap();
            within("payments' certificate", own.ready()).await;
            let identity = IdentitySlot::default();
            assert!(identity.set(AgentIdentity { manager: Arc::new(manager), workload: own }).is_ok());
            let sockets = SocketFactory::new(0);
            let tunnels = crate::mtls::pool(IdentitySlot::default(), sockets.clone(), PATIENCE);
            let direct = Arc::new(super::inbound::Shared {
                routes: routes.clone(),
                node: "server".into(),
                upstreams: Arc::new(UpstreamPool::new(sockets, tunnels, IdentitySlot::default(), PATIENCE)),
                connect_timeout: PATIENCE,
                mode: crate::intercept::ActiveMode::Ebpf,
                records: Default::default(),
                downstream: Default::default(),
                identity,
                rate_limits: Default::default(),
            });
            server = server.with_http(Arc::new(move |peer, addr, tls, shutdown| {
                let direct = direct.clone();
                Box::pin(async move {
                    let _ = direct.serve_direct(peer, addr, tls, shutdown).await;
                })
            }));
        }
        _ => server = server.with_http(http),
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(listener, shutdown.clone()));

    let manager =
        CertManager::new(signer.clone(), signer.ca.bundle(), clock, RenewalConfig::default()).unwrap();
    let workload = manager.identity(&cart).unwrap();
    within("cart's certificate", workload.ready()).await;
    let slot = IdentitySlot::default();
    assert!(slot.set(AgentIdentity { manager: Arc::new(manager), workload }).is_ok());
    let sockets = SocketFactory::new(0);
    let tunnels = crate::mtls::pool(slot.clone(), sockets.clone(), PATIENCE);
    let mut pool = UpstreamPool::new(sockets, tunnels, slot, Duration::from_secs(30));
    if let Peer::Holding = kind {
        pool = pool.with_streams_per_connection(STREAMS);
    }
    let pool = Arc::new(pool);
    Peers { payments, agent, accepted, seen, pool, _shutdown: shutdown.drop_guard() }
}

impl Peers {
    fn dial(&self) -> Dial {
        Dial::Meshed { agent: self.agent, identity: Arc::new(self.payments.clone()) }
    }

    async fn send(
        &self,
        endpoint: SocketAddr,
        version: Version,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        send(&self.pool, &self.dial(), endpoint, version, req).await
    }
}

impl Target for Peers {
    async fn get(&self, path: &'static str) -> Response<UpstreamBody> {
        let endpoint = SocketAddr::from(([10, 0, 0, 1], 8080));
        let resp = self.send(endpoint, Version::Http2, get(path, Some("payments.shop"))).await;
        resp.expect("a long-lived request must not wait for another to end")
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn send(
    pool: &UpstreamPool,
    dial: &Dial,
    endpoint: SocketAddr,
    version: Version,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendError> {
    within("a response", pool.send(endpoint, dial, version, PATIENCE, req)).await
}

fn get(uri: &str, host: Option<&str>) -> Request<Body> {
    let mut req = Request::get(uri);
    if let Some(host) = host {
        req = req.header("host", host);
    }
    req.body(Empty::new().map_err(|never| match never {}).boxed_unsync()).unwrap()
}

async fn text(resp: Response<UpstreamBody>) -> String {
    let body = within("a body", resp.into_body().collect()).await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn http1_requests_to_many_endpoints_ride_one_direct_connection_naming_their_target() {
    let peers = peers(Peer::Direct).await;
    let endpoints: Vec<SocketAddr> = (1..=4).map(|i| SocketAddr::from(([10, 0, 0, i], 8080))).collect();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..40 {
        let endpoint = endpoints[i % endpoints.len()];
        let (pool, dial) = (peers.pool.clone(), peers.dial());
        sends.spawn(async move {
            let req = get("/cart?id=7", Some("payments.shop"));
            let resp = send(&pool, &dial, endpoint, Version::Http1, req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(
                resp.version(),
                http::Version::HTTP_11,
                "an HTTP/1.1 client gets an HTTP/1.1 response"
            );
            assert_eq!(text(resp).await, endpoint.to_string());
        });
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap();
    }

    assert_eq!(peers.accepted.load(Ordering::SeqCst), 1, "40 concurrent requests share one connection");
    assert_eq!(peers.pool.direct_count(), 1);
    let seen = peers.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    for s in &seen {
        assert_eq!(s.protocol.as_deref(), Some("http1"));
        // HTTP/2 needs an authority: the client's Host, which also rides unchanged.
        assert_eq!(s.uri, "http://payments.shop/cart?id=7");
        assert_eq!(s.host.as_deref(), Some("payments.shop"));
    }
}

#[tokio::test]
async fn a_full_direct_connection_makes_the_pool_dial_another_instead_of_queueing_the_request() {
    let peers = Arc::new(peers(Peer::Holding).await);
    spreads_over_connections(peers.clone()).await;
    assert_eq!(peers.pool.direct_count(), 3);
}

#[tokio::test]
async fn http2_requests_keep_their_authority_and_say_so() {
    let peers = peers(Peer::Direct).await;
    let endpoint = SocketAddr::from(([10, 0, 0, 9], 50051));
    let resp =
        peers.send(endpoint, Version::Http2, get("http://grpc.shop/pkg.Svc/Call", None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = peers.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.target.as_deref(), Some("10.0.0.9:50051"));
    assert_eq!(seen.protocol.as_deref(), Some("http2"));
    assert_eq!(seen.uri, "http://grpc.shop/pkg.Svc/Call");
    // Without Host or authority, the endpoint stands in for HTTP/2's :authority.
    let resp = peers.send(endpoint, Version::Http1, get("/", None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(peers.seen.lock().unwrap()[1].uri, "http://10.0.0.9:50051/");
}

#[tokio::test]
async fn a_request_the_peer_refused_before_any_workload_is_a_connect_failure() {
    let peers = peers(Peer::Refusing).await;
    let endpoint = SocketAddr::from(([10, 0, 0, 1], 80));
    match peers.send(endpoint, Version::Http1, get("/", Some("a"))).await {
        Err(SendError::Connect { endpoint: e, message }) => {
            assert_eq!(e, endpoint);
            assert!(message.contains("403 denied by policy"), "{message}");
        }
        other => panic!("expected a connect failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_agent_without_direct_http_gets_requests_through_connect_streams() {
    let peers = peers(Peer::Legacy).await;
    // A real HTTP/1.1 workload behind the legacy agent, which relays bytes to it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let workload = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let body = format!("{} {}", req.version() == http::Version::HTTP_11, req.uri());
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    for _ in 0..3 {
        let resp = peers.send(workload, Version::Http1, get("/legacy", Some("w"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "true /legacy");
    }
    assert_eq!(peers.pool.direct_count(), 0);
    assert_eq!(
        peers.accepted.load(Ordering::SeqCst),
        2,
        "one connection to learn the peer has no direct HTTP, then one tunnel connection for all requests"
    );
    assert!(peers.seen.lock().unwrap().is_empty());
}

/// An HTTP/1.1 workload answering with what it received.
async fn workload() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                let body = format!(
                    "{:?} {} host={:?} xff={:?} identity={:?} xfcc={:?} mesh={:?}",
                    req.version(),
                    req.uri(),
                    header("host"),
                    header("x-forwarded-for"),
                    header("x-forwarded-client-identity"),
                    header("x-forwarded-client-cert"),
                    header(TARGET_HEADER).or(header(PROTOCOL_HEADER)),
                );
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    addr
}

/// Routes with one service whose endpoint `at` runs on node `server`.
fn routes_with(at: SocketAddr) -> Arc<RouteStore> {
    routes_with_policy(at, None)
}

/// [`routes_with`], the service having `policy`.
fn routes_with_policy(at: SocketAddr, policy: Option<mesh_api::Policy>) -> Arc<RouteStore> {
    let snapshot = mesh_api::Snapshot {
        services: vec![mesh_api::Service {
            name: "payments".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.20".into()],
            ports: vec![mesh_api::ServicePort { name: "http".into(), port: 80, ..Default::default() }],
            endpoints: vec![mesh_api::Endpoint {
                address: at.ip().to_string(),
                port: at.port().into(),
                weight: 1,
                node: "server".into(),
                agent_address: "127.0.0.1:15008".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/payments".into(),
                ..Default::default()
            }],
            policy,
            ..Default::default()
        }],
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    let routes = Arc::new(RouteStore::new(true));
    routes.apply(RouteTable::build(1, &snapshot, 1000).unwrap());
    routes
}

#[tokio::test]
async fn the_receiving_agent_serves_its_workloads_as_the_client_sent_and_turns_other_targets_away() {
    let at = workload().await;
    let peers = peers(Peer::Real(routes_with(at))).await;

    // The client's own identity headers are forgeries: replaced by what the agent proved.
    let mut req = get("/pay/./a/../b?x=1", Some("payments.shop"));
    req.headers_mut()
        .insert("x-forwarded-client-cert", "By=spiffe://evil;URI=spiffe://evil/admin".parse().unwrap());
    req.headers_mut().append("x-forwarded-client-cert", "URI=spiffe://evil/second".parse().unwrap());
    req.headers_mut().insert("x-forwarded-client-identity", "spiffe://evil/admin".parse().unwrap());
    let resp = peers.send(at, Version::Http1, req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        text(resp).await,
        "HTTP/1.1 /pay/b?x=1 host=Some(\"payments.shop\") xff=Some(\"127.0.0.1\") \
         identity=Some(\"spiffe://cluster.local/ns/shop/sa/cart\") \
         xfcc=Some(\"By=spiffe://cluster.local/ns/shop/sa/payments;URI=spiffe://cluster.local/ns/shop/sa/cart\") \
         mesh=None",
        "origin-form with the normalised path, the client's Host, x-forwarded-*, the proven identity, \
         and no mesh headers left"
    );
    // An ambiguous path is refused before the workload.
    let resp = peers.send(at, Version::Http1, get("/pay%2F..%2Fadmin", Some("payments.shop"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Not a workload of this node (stale routing on the sender): refused before any
    // workload, so the sender may try another endpoint.
    let elsewhere = SocketAddr::from(([127, 0, 0, 1], 9));
    match peers.send(elsewhere, Version::Http1, get("/", Some("a"))).await {
        Err(SendError::Connect { message, .. }) => assert!(message.contains("421"), "{message}"),
        other => panic!("expected a connect failure, got {other:?}"),
    }
}

#[tokio::test]
async fn the_receiving_agent_rate_limits_its_caller_with_429_and_retry_after() {
    let at = workload().await;
    let policy = mesh_api::Policy {
        rate_limit: Some(mesh_api::RateLimit { requests_per_second: 1, burst: 2 }),
        ..Default::default()
    };
    let peers = peers(Peer::Real(routes_with_policy(at, Some(policy)))).await;
    for _ in 0..2 {
        let resp = peers.send(at, Version::Http1, get("/pay", Some("payments.shop"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let resp = peers.send(at, Version::Http1, get("/pay", Some("payments.shop"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "cart's burst of 2 is spent");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["x-mesh-error"], "agent");
    assert!(resp.headers().get(REASON_HEADER).is_none(), "not a refusal another endpoint could serve");

    // gRPC callers read grpc-status: trailers-only RESOURCE_EXHAUSTED.
    let mut grpc = get("/pkg.Svc/Call", Some("payments.shop"));
    grpc.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
    let resp = peers.send(at, Version::Http1, grpc).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "8");
    assert_eq!(resp.headers()["retry-after"], "1");
}
