//! Service routes through the real L7 proxy in one process: weighted splits over
//! label subsets, header, path and method matches, faults, mirrors, per-route
//! timeouts, and a route change reaching a connection already open.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_api as api;

use super::tests::{Backend, Behaviour, agent, h1_client};
use crate::discovery::table::RouteTable;

type Client = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Service `default/web` over `backends`, each labelled `version: <its name>`, with
/// `routes`; plus `default/web-other` (another service, no VIP) over `others`.
fn routed(backends: &[(&Backend, &str)], others: &[&Backend], routes: Vec<api::HttpRoute>) -> api::Snapshot {
    let endpoint = |b: &Backend, version: &str| api::Endpoint {
        address: b.addr.ip().to_string(),
        port: b.addr.port().into(),
        weight: 1,
        labels: [("version".to_owned(), version.to_owned())].into(),
        ..Default::default()
    };
    let port = || vec![api::ServicePort { name: "http".into(), port: 80, ..Default::default() }];
    api::Snapshot {
        services: vec![
            api::Service {
                name: "web".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".into()],
                ports: port(),
                endpoints: backends.iter().map(|(b, v)| endpoint(b, v)).collect(),
                routes,
                ..Default::default()
            },
            api::Service {
                name: "web-other".into(),
                namespace: "default".into(),
                ports: port(),
                endpoints: others.iter().map(|b| endpoint(b, "other")).collect(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn subset(version: &str, weight: u32) -> api::RouteBackend {
    api::RouteBackend {
        subset: [("version".to_owned(), version.to_owned())].into(),
        weight,
        ..Default::default()
    }
}

fn exact(s: &str) -> Option<api::StringMatch> {
    Some(api::StringMatch { kind: Some(api::string_match::Kind::Exact(s.into())) })
}

async fn send(
    client: &mut Client,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, Bytes) {
    client.ready().await.unwrap();
    let mut req = Request::builder().method(method).uri(path).header("host", "web.default");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status();
    let backend = resp.headers().get("backend").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, backend, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_weighted_split_sends_each_subset_its_share() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let route = api::HttpRoute {
        name: "canary".into(),
        backends: vec![subset("v1", 90), subset("v2", 10)],
        ..Default::default()
    };
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1"), (&v2, "v2")], &[], vec![route])).await;
    let mut client = h1_client(agent).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..2000 {
        let (status, backend, _) = send(&mut client, "GET", "/", &[]).await;
        assert_eq!(status, StatusCode::OK);
        *seen.entry(backend).or_default() += 1;
    }
    let share = seen.get("v2").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.07..=0.13).contains(&share), "v2 got {share} of requests, configured 10 %: {seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn matches_pick_the_route_and_the_rest_falls_through_to_the_service() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let routes = vec![
        api::HttpRoute {
            name: "by-header".into(),
            matches: vec![api::RouteMatch {
                headers: vec![api::NamedMatch { name: "x-canary".into(), value: exact("1") }],
                ..Default::default()
            }],
            backends: vec![subset("v2", 1)],
            ..Default::default()
        },
        api::HttpRoute {
            name: "by-path".into(),
            matches: vec![api::RouteMatch {
                path: Some(api::StringMatch {
                    kind: Some(api::string_match::Kind::Regex("/api/v2/.*".into())),
                }),
                method: "POST".into(),
                ..Default::default()
            }],
            backends: vec![subset("v2", 1)],
            ..Default::default()
        },
        api::HttpRoute {
            name: "stable".into(),
            matches: vec![api::RouteMatch {
                path: Some(api::StringMatch { kind: Some(api::string_match::Kind::Prefix("/api".into())) }),
                ..Default::default()
            }],
            backends: vec![subset("v1", 1)],
            ..Default::default()
        },
    ];
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1"), (&v2, "v2")], &[], routes)).await;
    let mut client = h1_client(agent).await;
    for _ in 0..10 {
        assert_eq!(send(&mut client, "GET", "/api/x", &[("x-canary", "1")]).await.1, "v2");
        assert_eq!(send(&mut client, "GET", "/api/x", &[("x-canary", "0")]).await.1, "v1");
        assert_eq!(send(&mut client, "POST", "/api/v2/orders", &[]).await.1, "v2");
        assert_eq!(send(&mut client, "GET", "/api/v2/orders", &[]).await.1, "v1");
        // Normalised before matching: this is /api/v2/orders.
        assert_eq!(send(&mut client, "POST", "/api/v1/../v2/orders", &[]).await.1, "v2");
    }
    // No route matches /other: round robin over the whole service.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(send(&mut client, "GET", "/other", &[]).await.1);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn faults_abort_or_delay_their_share() {
    let v1 = Backend::start("v1").await;
    let routes = vec![
        api::HttpRoute {
            name: "abort".into(),
            matches: vec![api::RouteMatch { path: exact("/abort"), ..Default::default() }],
            fault: Some(api::FaultInjection {
                abort_http_status: 418,
                abort_percent: 100.0,
                ..Default::default()
            }),
            ..Default::default()
        },
        api::HttpRoute {
            name: "delay".into(),
            matches: vec![api::RouteMatch { path: exact("/delay"), ..Default::default() }],
            fault: Some(api::FaultInjection { delay_ms: 300, delay_percent: 100.0, ..Default::default() }),
            ..Default::default()
        },
    ];
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1")], &[], routes)).await;
    let mut client = h1_client(agent).await;
    let (status, backend, _) = send(&mut client, "GET", "/abort", &[]).await;
    assert_eq!((status, backend.as_str()), (StatusCode::IM_A_TEAPOT, ""));
    assert_eq!(v1.hits(), 0, "an aborted request is not sent");
    let start = Instant::now();
    let (status, backend, _) = send(&mut client, "GET", "/delay", &[]).await;
    let took = start.elapsed();
    assert_eq!((status, backend.as_str()), (StatusCode::OK, "v1"));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(330 + 200), "{took:?}");
}

#[tokio::test]
async fn a_grpc_request_aborted_by_a_fault_gets_the_grpc_status() {
    let v1 = Backend::start("v1").await;
    let route = api::HttpRoute {
        name: "unavailable".into(),
        fault: Some(api::FaultInjection {
            abort_http_status: 503,
            abort_grpc_status: 14,
            abort_percent: 100.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1")], &[], vec![route])).await;
    let mut client = h1_client(agent).await;
    client.ready().await.unwrap();
    let req = Request::post("/shop.Orders/Place")
        .header("host", "web.default")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "gRPC errors travel in grpc-status, not the HTTP status");
    assert_eq!(resp.headers()["grpc-status"], "14");
    // Plain HTTP on the same route gets the HTTP status.
    assert_eq!(send(&mut client, "GET", "/", &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn a_mirror_gets_a_shadow_copy_and_a_slow_mirror_does_not_slow_the_caller() {
    let (v1, shadow) = (Backend::start("v1").await, Backend::start("shadow").await);
    shadow.set(Behaviour::Slow(Duration::from_secs(5)));
    let route = api::HttpRoute {
        name: "mirrored".into(),
        backends: vec![subset("v1", 1)],
        mirror: Some(api::RouteMirror {
            backend: Some(api::RouteBackend { service: "default/web-other".into(), ..Default::default() }),
            percent: 100.0,
        }),
        ..Default::default()
    };
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1")], &[&shadow], vec![route])).await;
    let mut client = h1_client(agent).await;
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(send(&mut client, "GET", "/", &[]).await.1, "v1");
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the caller waited for the mirror: {:?}",
        start.elapsed()
    );
    crate::test_helpers::eventually(Duration::from_secs(5), || shadow.hits() == 5).await;
    assert_eq!(shadow.last_host.lock().unwrap().as_deref(), Some("web.default-shadow"));
    assert_eq!(v1.hits(), 5);
}

#[tokio::test]
async fn a_route_timeout_replaces_the_services_and_an_unknown_backend_gets_500() {
    let v1 = Backend::start("v1").await;
    v1.set(Behaviour::Slow(Duration::from_secs(30)));
    let routes = vec![
        api::HttpRoute {
            name: "gone".into(),
            matches: vec![api::RouteMatch { path: exact("/gone"), ..Default::default() }],
            backends: vec![api::RouteBackend {
                service: "default/missing".into(),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        },
        api::HttpRoute { name: "quick".into(), timeout_ms: 200, ..Default::default() },
    ];
    let (agent, _ctx) = agent(&routed(&[(&v1, "v1")], &[], routes)).await;
    let mut client = h1_client(agent).await;
    let (status, _, body) = send(&mut client, "GET", "/gone", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&body).contains("default/missing:80"), "{body:?}");
    let (status, _, _) = send(&mut client, "GET", "/", &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_new_route_applies_to_the_next_request_on_an_open_connection() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let blue = vec![api::HttpRoute {
        name: "switch".into(),
        backends: vec![subset("v1", 100), subset("v2", 0)],
        ..Default::default()
    }];
    let (agent, ctx) = agent(&routed(&[(&v1, "v1"), (&v2, "v2")], &[], blue)).await;
    let mut client = h1_client(agent).await;
    for _ in 0..5 {
        assert_eq!(send(&mut client, "GET", "/", &[]).await.1, "v1");
    }
    let green = vec![api::HttpRoute {
        name: "switch".into(),
        backends: vec![subset("v1", 0), subset("v2", 100)],
        ..Default::default()
    }];
    let version = ctx.routes.table().version + 1;
    ctx.routes
        .apply(RouteTable::build(version, &routed(&[(&v1, "v1"), (&v2, "v2")], &[], green), 1000).unwrap());
    for _ in 0..5 {
        assert_eq!(send(&mut client, "GET", "/", &[]).await.1, "v2");
    }
}

#[test]
fn an_invalid_route_refuses_the_snapshot_naming_the_field() {
    let route = api::HttpRoute {
        name: "bad".into(),
        matches: vec![api::RouteMatch {
            path: Some(api::StringMatch { kind: Some(api::string_match::Kind::Regex("(".into())) }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = RouteTable::build(1, &routed(&[], &[], vec![route]), 10).expect_err("refused").to_string();
    assert!(err.contains("default/web") && err.contains("routes[0].matches[0].path.regex"), "{err}");
}
