//! The Consul source against the fake Consul agent: first load, changes pushed
//! through blocking queries, services coming and going, 5xx answers and an index
//! reset, ACL tokens, and the merge with another source.

use std::time::Duration;

use mesh_api as api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::fake::{FakeConsul, entry};
use super::*;

struct Running {
    rx: watch::Receiver<SourceView>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn config(consul: &FakeConsul) -> ConsulConfig {
    // A short wait, so a query held by an index reset ends soon.
    ConsulConfig { url: consul.url(), wait: Duration::from_secs(1), ..Default::default() }
}

fn start(config: ConsulConfig) -> Running {
    let source = Box::new(ConsulSource::new(config).unwrap());
    let (tx, rx) = watch::channel(SourceView::default());
    let stop = CancellationToken::new();
    tokio::spawn(source.run(tx, stop.clone()));
    Running { rx, stop }
}

/// Waits (at most 10 s) for a view satisfying `pred`.
async fn view_where(r: &mut Running, what: &str, pred: impl Fn(&SourceView) -> bool) -> SourceView {
    let found = tokio::time::timeout(Duration::from_secs(10), r.rx.wait_for(|v| pred(v)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|v| v.clone());
    found.unwrap_or_else(|| panic!("no view with {what} within 10s; last: {:#?}", *r.rx.borrow()))
}

fn service<'a>(v: &'a SourceView, name: &str) -> Option<&'a api::Service> {
    v.services.iter().find(|s| s.name == name)
}

fn healthy(s: &api::Service) -> Vec<&str> {
    s.endpoints.iter().filter(|e| e.health() != api::Health::Unhealthy).map(|e| e.address.as_str()).collect()
}

fn web(status_b: &str) -> Vec<serde_json::Value> {
    vec![
        entry("n1", "web-1", "10.0.0.1", 8080, &["version=v1"], &[("mesh-protocol", "http")], "passing"),
        entry("n2", "web-2", "10.0.0.2", 8080, &["version=v2"], &[], status_b),
    ]
}

#[tokio::test]
async fn the_catalog_loads_and_changes_arrive_through_blocking_queries() {
    let consul = FakeConsul::start().await;
    consul.set_service("web", web("passing"));
    consul.set_service("db", vec![entry("n3", "db-1", "10.0.0.3", 5432, &[], &[], "passing")]);
    let mut r = start(config(&consul));

    let v = view_where(&mut r, "both services, ready", |v| v.ready && v.services.len() == 2).await;
    assert_eq!(v.last_error, None);
    let s = service(&v, "web").unwrap();
    assert_eq!((s.namespace.as_str(), s.ports[0].port), ("consul", 8080));
    assert_eq!(s.ports[0].protocol(), api::Protocol::Http1);
    assert_eq!(healthy(s), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(s.endpoints[1].labels.get("version").map(String::as_str), Some("v2"));

    // A check turns critical: pushed by the held query well within its 1 s wait, and
    // the endpoint stays listed, unhealthy, with the check's reason.
    consul.set_service("web", web("critical"));
    let v = view_where(&mut r, "web-2 unhealthy", |v| {
        service(v, "web").is_some_and(|s| healthy(s) == ["10.0.0.1"])
    })
    .await;
    let down = &service(&v, "web").unwrap().endpoints[1];
    assert!(down.health_reason.contains("\"http\": critical: HTTP 503"), "{down:?}");

    // Services come and go with the catalog.
    consul.remove_service("db");
    consul.set_service("api", vec![entry("n4", "api-1", "10.0.0.4", 9000, &[], &[], "passing")]);
    view_where(&mut r, "db gone, api there", |v| service(v, "db").is_none() && service(v, "api").is_some())
        .await;

    // The source blocked: the queries after the first carried the index.
    let requests = consul.requests();
    assert!(requests.iter().any(|q| q.starts_with("/v1/health/service/web?index=")), "{requests:?}");
}

#[tokio::test]
async fn failures_keep_the_last_view_and_an_index_reset_is_followed() {
    let consul = FakeConsul::start().await;
    consul.set_service("web", web("passing"));
    let mut r = start(config(&consul));
    view_where(&mut r, "web loaded", |v| v.ready && service(v, "web").is_some()).await;

    // The agent answers 500 for a while: the error shows, the routes stay.
    consul.fail(6);
    consul.set_service("web", web("critical"));
    let v = view_where(&mut r, "an error reported", |v| v.last_error.is_some()).await;
    assert!(v.last_error.as_deref().unwrap().contains("500"), "{:?}", v.last_error);
    assert!(service(&v, "web").is_some(), "the last good view is kept");
    // Recovery: the change made meanwhile arrives and the error clears.
    let v = view_where(&mut r, "recovered", |v| {
        v.last_error.is_none() && service(v, "web").is_some_and(|s| healthy(s) == ["10.0.0.1"])
    })
    .await;
    assert!(v.ready);

    // A restored server: its index goes back below what the source holds, with new
    // content. The source starts over from 0 and sees it.
    consul.reset_index(3, |c| c.set_service("web", web("passing")));
    view_where(&mut r, "the reset's content", |v| service(v, "web").is_some_and(|s| healthy(s).len() == 2))
        .await;
}

#[tokio::test]
async fn the_acl_token_is_sent_and_re_read_from_its_file() {
    let consul = FakeConsul::start().await;
    consul.set_service("web", web("passing"));
    consul.require_token("s3cret");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "wrong\n").unwrap();
    let mut r = start(ConsulConfig { token_file: Some(token.clone()), ..config(&consul) });
    let v = view_where(&mut r, "the refusal reported", |v| v.last_error.is_some()).await;
    assert!(v.last_error.as_deref().unwrap().contains("403"), "{:?}", v.last_error);
    assert!(!v.ready && v.services.is_empty());
    std::fs::write(&token, "s3cret\n").unwrap();
    view_where(&mut r, "loaded with the right token", |v| v.ready && service(v, "web").is_some()).await;
}

#[tokio::test]
async fn instances_and_names_that_cannot_be_used_are_reported_not_fatal() {
    let consul = FakeConsul::start().await;
    consul.set_service(
        "web",
        vec![
            entry("n1", "web-1", "10.0.0.1", 8080, &[], &[], "passing"),
            entry("n2", "web-2", "not-an-ip", 8080, &[], &[], "passing"),
        ],
    );
    consul.set_service("bad name", vec![]);
    let mut r = start(config(&consul));
    let v = view_where(&mut r, "web loaded", |v| v.ready && service(v, "web").is_some()).await;
    assert_eq!(healthy(service(&v, "web").unwrap()), ["10.0.0.1"]);
    let error = v.last_error.expect("the left-out name and instance are reported");
    assert!(error.contains("\"bad name\" left out"), "{error}");
}

#[tokio::test]
async fn an_https_agent_is_verified_against_the_given_ca_only() {
    let (ca_pem, server) = super::fake::tls_material();
    let consul = FakeConsul::start_tls(server).await;
    consul.set_service("web", web("passing"));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("consul-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let mut r = start(ConsulConfig { url: consul.https_url(), ca: Some(ca), ..config(&consul) });
    view_where(&mut r, "web over https", |v| v.ready && service(v, "web").is_some()).await;

    // Another CA: the handshake fails and nothing is read.
    let (other_pem, _) = super::fake::tls_material();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_pem).unwrap();
    let mut r = start(ConsulConfig { url: consul.https_url(), ca: Some(other), ..config(&consul) });
    let v = view_where(&mut r, "the TLS failure reported", |v| v.last_error.is_some()).await;
    assert!(v.last_error.as_deref().unwrap().contains("TLS"), "{:?}", v.last_error);
    assert!(v.services.is_empty());
}

#[test]
fn positions_follow_consuls_index_rules() {
    let mut p = Position::default();
    assert_eq!(p.query("/v1/catalog/services", Duration::from_secs(30)), "/v1/catalog/services");
    p.advance(Some(42));
    assert_eq!(p.query("/v1/x?dc=a", Duration::from_secs(30)), "/v1/x?dc=a&index=42&wait=30000ms");
    p.advance(Some(7)); // went backwards: start over
    assert_eq!(p, Position::default());
    p.advance(Some(0)); // never block on 0
    assert_eq!(p.query("/p", Duration::from_secs(1)), "/p?index=1&wait=1000ms");
    p.advance(None); // not a blocking endpoint
    assert_eq!(p, Position::default());
}

#[test]
fn a_bad_url_namespace_or_missing_ca_is_refused_naming_the_flag() {
    for (config, want) in [
        (ConsulConfig { url: "127.0.0.1:8500".into(), ..Default::default() }, "--consul"),
        (ConsulConfig { url: "https://consul:8501".into(), ..Default::default() }, "--consul-ca"),
        (ConsulConfig { namespace: "Not_A_Label".into(), ..Default::default() }, "--consul-namespace"),
    ] {
        let err = ConsulSource::new(config).err().expect("refused").to_string();
        assert!(err.contains(want), "{err}");
    }
}
