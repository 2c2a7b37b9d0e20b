//! The source against a fake API server speaking the real list/watch protocol.

use std::time::Duration;

use mesh_api as api;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fake_api::{FakeApi, Gone, Kind};
use super::{KubernetesConfig, KubernetesSource};
use crate::registry::{Source, SourceView};

const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    api: FakeApi,
    views: watch::Receiver<SourceView>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    async fn start(api: FakeApi, debounce: Duration) -> Harness {
        let config = KubernetesConfig {
            cluster_domain: "corp.local".into(),
            trust_domain: "example.org".into(),
            agent_inbound_port: 15008,
            debounce,
        };
        let source = Box::new(KubernetesSource::new(api.client(), config));
        assert_eq!(source.name(), "kubernetes");
        let (tx, views) = watch::channel(SourceView::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Harness { api, views, shutdown, task }
    }

    /// Waits until the published view satisfies `want`, and returns it.
    async fn wait_for(&mut self, what: &str, want: impl Fn(&SourceView) -> bool) -> SourceView {
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let view = self.views.borrow_and_update();
                if want(&view) {
                    return view.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.views.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("source stopped while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}; last view: {:#?}", *self.views.borrow()),
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task).await.expect("source stops on shutdown").expect("no panic");
    }
}

fn service(annotations: Value) -> Value {
    json!({
        "metadata": {"name": "reviews", "namespace": "shop", "annotations": annotations},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00::a"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                {"name": "rpc", "port": 9090, "targetPort": 9091, "appProtocol": "grpc", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
            ],
        },
    })
}

fn headless() -> Value {
    json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "tcp-pg", "port": 5432}]},
    })
}

/// An endpoint: address, pod name (None: no target), ready, terminating.
type Ep<'a> = (&'a str, Option<&'a str>, bool, bool);

fn slice(endpoints: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready, terminating)| {
            let mut e = json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
                "nodeName": "node-a",
                "zone": "zone-1",
            });
            if let Some(pod) = pod {
                e["targetRef"] = json!({"kind": "Pod", "name": pod, "namespace": "shop"});
            }
            e
        })
        .collect();
    json!({
        "metadata": {
            "name": "reviews-abc12",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "rpc", "port": 9091, "protocol": "TCP"},
        ],
    })
}

fn pod(name: &str, host_ip: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        "spec": {
            "serviceAccountName": "reviews",
            "nodeName": "node-a",
            "containers": [{"name": "app", "image": "example/reviews:1"}],
        },
        "status": {"phase": "Running", "hostIP": host_ip, "podIP": "10.1.0.5"},
    })
}

/// A fake cluster with `reviews` (one meshed and one unmeshed pod) and a headless `db`.
async fn cluster(service_annotations: Value) -> FakeApi {
    let api = FakeApi::start().await;
    api.apply(Kind::Service, service(service_annotations));
    api.apply(Kind::Service, headless());
    api.apply(Kind::Pod, pod("reviews-1", "192.168.0.11", json!({})));
    api.apply(Kind::Pod, pod("reviews-2", "192.168.0.12", json!({"mesh.dev/inject": "false"})));
    api.apply(
        Kind::EndpointSlice,
        slice(&[("10.1.0.5", Some("reviews-1"), true, false), ("10.1.0.6", Some("reviews-2"), true, false)]),
    );
    api
}

fn reviews(view: &SourceView) -> Option<&api::Service> {
    view.services.iter().find(|s| s.namespace == "shop" && s.name == "reviews")
}

fn endpoint<'a>(view: &'a SourceView, address: &str) -> Option<&'a api::Endpoint> {
    reviews(view)?.endpoints.iter().find(|e| e.address == address)
}

#[tokio::test]
async fn initial_view_has_vips_ports_endpoints_identity_and_agent() {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(20)).await;
    let view = h.wait_for("ready view", |v| v.ready).await;
    assert_eq!(view.last_error, None);
    let names: Vec<_> = view.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db", "reviews"], "sorted by namespace and name");

    let svc = reviews(&view).expect("reviews service");
    assert_eq!(svc.vips, ["10.96.0.10", "fd00::a"]);
    assert_eq!(svc.hostnames, ["reviews.shop.svc.corp.local", "reviews.shop.svc", "reviews.shop"]);
    let ports: Vec<_> =
        svc.ports.iter().map(|p| (p.name.as_str(), p.port, p.target_port, p.protocol)).collect();
    assert_eq!(
        ports,
        [("http", 80, 0, api::Protocol::Http1 as i32), ("rpc", 9090, 9091, api::Protocol::Grpc as i32)],
        "UDP port left out, hints from name and appProtocol"
    );
    assert_eq!(svc.policy, None);

    let meshed = endpoint(&view, "10.1.0.5").expect("meshed endpoint");
    assert_eq!(meshed.named_ports.get("http"), Some(&8080), "named target port resolved from the slice");
    assert_eq!(meshed.health, api::Health::Healthy as i32);
    assert_eq!(meshed.identity, "spiffe://example.org/ns/shop/sa/reviews");
    assert_eq!(meshed.agent_address, "192.168.0.11:15008");
    assert_eq!((meshed.node.as_str(), meshed.workload.as_str(), meshed.weight), ("node-a", "reviews-1", 1));
    assert_eq!(meshed.locality.as_ref().map(|l| l.zone.as_str()), Some("zone-1"));

    let plain = endpoint(&view, "10.1.0.6").expect("unmeshed endpoint");
    assert_eq!(plain.agent_address, "", "mesh.dev/inject=false is outside the mesh");
    assert_eq!(plain.health, api::Health::Healthy as i32);

    let db = view.services.iter().find(|s| s.name == "db").expect("headless service");
    assert!(db.vips.is_empty());
    assert_eq!(db.ports[0].protocol, api::Protocol::Tcp as i32);
    h.stop().await;
}

#[tokio::test]
async fn meshed_pods_are_placed_on_their_nodes_and_follow_changes() {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(20)).await;
    let view = h.wait_for("ready view", |v| v.ready).await;
    // reviews-2 opted out of the mesh: not a workload of its node.
    let placed: Vec<_> = view.workloads.iter().map(|w| (w.name.as_str(), w.node.as_str())).collect();
    assert_eq!(placed, [("reviews-1", "node-a")]);
    let w = &view.workloads[0];
    assert_eq!((w.namespace.as_str(), w.service_account.as_str()), ("shop", "reviews"));
    assert_eq!(w.addresses, ["10.1.0.5"], "the pod's address, not its host's");

    // A new pod on another node, with labels; the view follows.
    let mut other = pod("ratings-1", "192.168.0.13", json!({}));
    other["metadata"]["name"] = json!("ratings-1");
    other["metadata"]["labels"] = json!({"app": "ratings"});
    other["spec"]["nodeName"] = json!("node-b");
    other["spec"]["serviceAccountName"] = json!("ratings");
    other["status"]["podIPs"] = json!([{"ip": "10.1.1.7"}, {"ip": "fd01::7"}]);
    h.api.apply(Kind::Pod, other);
    let view = h.wait_for("the new pod placed", |v| v.workloads.len() == 2).await;
    let ratings = view.workloads.iter().find(|w| w.name == "ratings-1").expect("ratings-1");
    assert_eq!((ratings.node.as_str(), ratings.service_account.as_str()), ("node-b", "ratings"));
    assert_eq!(ratings.addresses, ["10.1.1.7", "fd01::7"]);
    assert_eq!(ratings.labels.get("app").map(String::as_str), Some("ratings"));
    h.api.delete(Kind::Pod, "shop", "ratings-1");
    h.wait_for("the deleted pod gone", |v| v.workloads.len() == 1).await;
    h.stop().await;
}

#[tokio::test]
async fn endpoints_turning_not_ready_or_terminating_stay_as_unhealthy() {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(20)).await;
    h.wait_for("ready view", |v| v.ready && endpoint(v, "10.1.0.5").is_some()).await;

    h.api.apply(
        Kind::EndpointSlice,
        slice(&[("10.1.0.5", Some("reviews-1"), false, false), ("10.1.0.6", Some("reviews-2"), true, false)]),
    );
    let view = h
        .wait_for("10.1.0.5 unhealthy", |v| {
            endpoint(v, "10.1.0.5").is_some_and(|e| e.health == api::Health::Unhealthy as i32)
        })
        .await;
    assert_eq!(endpoint(&view, "10.1.0.5").map(|e| e.health_reason.as_str()), Some("not ready"));
    assert_eq!(reviews(&view).map(|s| s.endpoints.len()), Some(2), "not-ready endpoints are kept");

    h.api.apply(
        Kind::EndpointSlice,
        slice(&[("10.1.0.5", Some("reviews-1"), false, true), ("10.1.0.6", Some("reviews-2"), true, false)]),
    );
    h.wait_for("10.1.0.5 terminating", |v| {
        endpoint(v, "10.1.0.5").is_some_and(|e| e.health_reason == "terminating")
    })
    .await;

    h.api.delete(Kind::EndpointSlice, "shop", "reviews-abc12");
    h.wait_for("endpoints gone with their slice", |v| reviews(v).is_some_and(|s| s.endpoints.is_empty()))
        .await;
    h.stop().await;
}

#[tokio::test]
async fn changes_arrive_after_watches_drop_mid_stream() {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(20)).await;
    h.wait_for("ready view", |v| v.ready).await;
    let (lists, watches) = (h.api.lists(Kind::EndpointSlice), h.api.watches(Kind::EndpointSlice));

    h.api.cut_watches();
    h.api.apply(Kind::Pod, pod("reviews-3", "192.168.0.13", json!({"mesh.dev/weight": "4"})));
    h.api.apply(
        Kind::EndpointSlice,
        slice(&[
            ("10.1.0.5", Some("reviews-1"), true, false),
            ("10.1.0.6", Some("reviews-2"), true, false),
            ("10.1.0.7", Some("reviews-3"), true, false),
        ]),
    );
    let view = h
        .wait_for("new meshed endpoint", |v| {
            endpoint(v, "10.1.0.7").is_some_and(|e| e.agent_address == "192.168.0.13:15008")
        })
        .await;
    assert_eq!(endpoint(&view, "10.1.0.7").map(|e| e.weight), Some(4));
    assert!(h.api.watches(Kind::EndpointSlice) > watches, "the watch was re-opened");
    assert_eq!(h.api.lists(Kind::EndpointSlice), lists, "resumed from its resource version, no relist");
    assert_eq!(view.last_error, None, "a dropped watch is routine, not an error");
    h.stop().await;
}

async fn expired_history_forces_relist(gone: Gone) {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(20)).await;
    h.wait_for("ready view", |v| v.ready).await;
    let lists = [Kind::Service, Kind::EndpointSlice, Kind::Pod].map(|k| h.api.lists(k));

    // Only a relist can show these: the history holding them is gone.
    h.api.expire_with(
        gone,
        vec![
            (Kind::Service, service(json!({"mesh.dev/retries": "3"}))),
            (Kind::Pod, pod("reviews-3", "192.168.0.13", json!({}))),
            (
                Kind::EndpointSlice,
                slice(&[
                    ("10.1.0.5", Some("reviews-1"), true, false),
                    ("10.1.0.7", Some("reviews-3"), true, false),
                ]),
            ),
        ],
    );
    let view = h
        .wait_for("state after relist", |v| {
            endpoint(v, "10.1.0.7").is_some_and(|e| e.agent_address == "192.168.0.13:15008")
                && endpoint(v, "10.1.0.6").is_none()
                && reviews(v).and_then(|s| s.policy.as_ref()).is_some_and(|p| p.retries.is_some())
        })
        .await;
    for (kind, before) in [Kind::Service, Kind::EndpointSlice, Kind::Pod].into_iter().zip(lists) {
        assert!(h.api.lists(kind) > before, "{kind:?} relisted after 410");
    }
    assert_eq!(view.last_error, None, "410 is routine, not an error");

    // And the new watches deliver again.
    h.api.apply(Kind::EndpointSlice, slice(&[("10.1.0.7", Some("reviews-3"), false, false)]));
    h.wait_for("update after relist", |v| {
        endpoint(v, "10.1.0.7").is_some_and(|e| e.health == api::Health::Unhealthy as i32)
            && endpoint(v, "10.1.0.5").is_none()
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn gone_error_event_forces_relist() {
    expired_history_forces_relist(Gone::Event).await;
}

#[tokio::test]
async fn http_gone_on_watch_start_forces_relist() {
    expired_history_forces_relist(Gone::Http).await;
}

#[tokio::test]
async fn bad_annotation_is_reported_while_the_rest_is_served() {
    let annotations = json!({"mesh.dev/lb-algorithm": "fastest", "mesh.dev/retries": "2"});
    let mut h = Harness::start(cluster(annotations).await, Duration::from_millis(20)).await;
    let view = h.wait_for("ready view", |v| v.ready).await;
    let error = view.last_error.clone().expect("bad annotation reported");
    assert!(
        error.contains("service shop/reviews") && error.contains("mesh.dev/lb-algorithm=\"fastest\""),
        "{error}"
    );
    let svc = reviews(&view).expect("service still served");
    assert_eq!(svc.endpoints.len(), 2);
    let policy = svc.policy.as_ref().expect("valid annotations applied");
    assert_eq!(policy.load_balancer, None, "bad algorithm ignored: default balancer");
    assert_eq!(policy.retries.as_ref().map(|r| r.attempts), Some(2));

    h.api.apply(Kind::Service, service(json!({"mesh.dev/lb-algorithm": "least-request"})));
    let view = h.wait_for("fixed annotation", |v| v.last_error.is_none()).await;
    let lb = reviews(&view).and_then(|s| s.policy.as_ref()).and_then(|p| p.load_balancer.as_ref());
    assert_eq!(lb.map(|lb| lb.algorithm), Some(api::Algorithm::LeastRequest as i32));
    h.stop().await;
}

#[tokio::test]
async fn not_ready_until_every_list_succeeds() {
    let api = cluster(json!({})).await;
    api.refuse_lists(Kind::Pod, Some(403));
    let mut h = Harness::start(api, Duration::from_millis(20)).await;
    let view = h.wait_for("list error reported", |v| v.last_error.is_some()).await;
    let error = view.last_error.clone().unwrap_or_default();
    assert!(error.contains("watching pods") && error.contains("forbidden"), "{error}");
    assert!(!view.ready && view.services.is_empty(), "no partial view before all lists: {view:?}");

    h.api.refuse_lists(Kind::Pod, None);
    let view = h.wait_for("ready view", |v| v.ready).await;
    assert_eq!(view.last_error, None);
    assert_eq!(endpoint(&view, "10.1.0.5").map(|e| e.agent_address.as_str()), Some("192.168.0.11:15008"));
    h.stop().await;
}

#[tokio::test]
async fn burst_of_events_yields_one_view() {
    let mut h = Harness::start(cluster(json!({})).await, Duration::from_millis(500)).await;
    h.wait_for("ready view", |v| v.ready).await;

    let burst: Vec<_> = (1..=5)
        .map(|n| {
            let ips: Vec<String> = (0..=n).map(|i| format!("10.2.0.{i}")).collect();
            let eps: Vec<Ep<'_>> = ips.iter().map(|ip| (ip.as_str(), None, true, false)).collect();
            (Kind::EndpointSlice, slice(&eps))
        })
        .collect();
    h.views.borrow_and_update();
    // Spread over ~40 ms, well inside the 500 ms debounce window.
    let api = h.api.clone();
    tokio::spawn(async move { api.apply_paced(burst, Duration::from_millis(10)).await });
    tokio::time::timeout(PATIENCE, h.views.changed())
        .await
        .expect("a view after the burst")
        .expect("source alive");
    let view = h.views.borrow_and_update().clone();
    assert_eq!(
        reviews(&view).map(|s| s.endpoints.len()),
        Some(6),
        "the first view already has the last event"
    );
    h.stop().await;
}

fn http_route(weights: (u32, u32), path_type: &str) -> Value {
    json!({
        "metadata": {"name": "reviews-canary", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
            "rules": [{
                "matches": [{"path": {"type": path_type, "value": "/api"}}],
                "backendRefs": [
                    {"name": "reviews", "port": 80, "weight": weights.0},
                    {"name": "db", "port": 5432, "weight": weights.1},
                ],
            }],
        },
    })
}

fn route_weights(view: &SourceView) -> Option<Vec<u32>> {
    let routes = &reviews(view)?.routes;
    Some(routes.first()?.backends.iter().map(|b| b.weight).collect())
}

#[tokio::test]
async fn http_routes_are_created_updated_refused_and_deleted_through_the_api() {
    let api = cluster(json!({})).await;
    api.apply(Kind::HttpRoute, http_route((90, 10), "PathPrefix"));
    let mut h = Harness::start(api, Duration::from_millis(20)).await;
    let view = h.wait_for("the route attached", |v| route_weights(v).is_some()).await;
    assert_eq!(view.last_error, None);
    let route = &reviews(&view).expect("reviews").routes[0];
    assert_eq!(route.name, "shop.reviews-canary.0.0");
    assert_eq!(route.ports, vec![80]);
    assert_eq!(route_weights(&view), Some(vec![90, 10]));

    // New weights reach the view.
    h.api.apply(Kind::HttpRoute, http_route((0, 100), "PathPrefix"));
    h.wait_for("the weights changed", |v| route_weights(v) == Some(vec![0, 100])).await;

    // An invalid edit is reported by object and field; the last valid version stays.
    h.api.apply(Kind::HttpRoute, http_route((50, 50), "Glob"));
    let view = h.wait_for("the bad edit reported", |v| v.last_error.is_some()).await;
    let error = view.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("httproute shop/reviews-canary: spec.rules[0].matches[0].path.type: \"Glob\""),
        "{error}"
    );
    assert_eq!(route_weights(&view), Some(vec![0, 100]), "the last valid version stays");

    h.api.delete(Kind::HttpRoute, "shop", "reviews-canary");
    let view = h.wait_for("the route removed", |v| reviews(v).is_some_and(|s| s.routes.is_empty())).await;
    assert_eq!(view.last_error, None, "the deleted route's problem went with it");
    h.stop().await;
}

#[tokio::test]
async fn without_the_gateway_api_the_source_is_ready_without_routes_or_errors() {
    let api = cluster(json!({})).await;
    api.refuse_lists(Kind::HttpRoute, Some(404));
    let mut h = Harness::start(api, Duration::from_millis(20)).await;
    let view = h.wait_for("ready view", |v| v.ready).await;
    assert_eq!(view.last_error, None);
    assert!(reviews(&view).expect("reviews").routes.is_empty());
    h.stop().await;
}
