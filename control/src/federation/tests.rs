//! The federation's two sides together: the `Exports` service's refusals and what
//! it strips, and an in-process round trip — a peer's control plane serving
//! `Exports` over TLS with its CA's certificate, and this side's import source
//! calling it and publishing the view.

use std::{path::Path, sync::Arc, time::Duration};

use mesh_api as api;
use mesh_api::federation_server::Federation as _;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::Request;

use super::{
    Federation,
    config::{FederationConfig, PeerConfig},
    exports::{ExportsService, exported},
    source::PeerSource,
    status::LinkState,
};
use crate::{
    ca::{Ca, CaConfig, FileStore, serving::ServingNames},
    registry::{Source, SourceView},
    snapshot::Versioned,
    tls::{ServingCert, accept},
};

fn meshed(address: &str, td: &str) -> api::Endpoint {
    api::Endpoint {
        address: address.into(),
        identity: format!("spiffe://{td}/ns/shop/sa/web"),
        agent_address: "192.168.1.1:15008".into(),
        node: "node-1".into(),
        workload: "web-0".into(),
        labels: [("version".to_owned(), "v1".to_owned())].into(),
        weight: 1,
        health: api::Health::Healthy as i32,
        ..Default::default()
    }
}

/// West's snapshot: `web` exported (one meshed endpoint, one not), `db` not
/// exported, and `cart.north` exported but imported from elsewhere.
fn west_snapshot() -> watch::Receiver<Arc<Versioned>> {
    let port = api::ServicePort {
        name: "http".into(),
        port: 8080,
        target_port: 80,
        protocol: api::Protocol::Http1 as i32,
    };
    let web = api::Service {
        name: "web".into(),
        namespace: "shop".into(),
        vips: vec!["10.96.0.1".into()],
        allocated_vips: vec!["240.240.0.1".into()],
        hostnames: vec!["web.shop.svc.cluster.local".into()],
        ports: vec![port.clone()],
        policy: Some(api::Policy { mtls: api::MtlsMode::Strict as i32, ..Default::default() }),
        health_check: Some(api::HealthCheck::default()),
        routes: vec![api::HttpRoute::default()],
        endpoints: vec![
            meshed("10.1.0.5", "west.local"),
            api::Endpoint { agent_address: String::new(), ..meshed("10.1.0.6", "west.local") },
        ],
        exported: true,
        ..Default::default()
    };
    let db = api::Service { name: "db".into(), exported: false, ..web.clone() };
    let imported = api::Service { name: "cart.north".into(), cluster: "north".into(), ..web.clone() };
    let versioned = Versioned {
        version: 1,
        snapshot: Arc::new(api::Snapshot {
            services: vec![web, db, imported],
            trust_domain: "west.local".into(),
            ..Default::default()
        }),
        response: api::DiscoveryResponse::default(),
        placements: Arc::default(),
        source_errors: Vec::new(),
        ready: true,
    };
    watch::channel(Arc::new(versioned)).1
}

fn peer(name: &str, td: &str, url: &str, dir: &Path) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        trust_domain: td.into(),
        url: url.into(),
        host: "127.0.0.1".into(),
        port: url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(443),
        bundle_file: dir.join(format!("{name}-root.pem")),
        token_file: dir.join(format!("{name}.token")),
    }
}

/// West's federation config, with `east` as its one peer.
fn west_config(dir: &Path) -> FederationConfig {
    FederationConfig {
        cluster: "west".into(),
        trust_domain: "west.local".into(),
        gateways: vec!["10.77.0.9:15443".into()],
        refresh: Duration::from_millis(100),
        peers: vec![peer("east", "east.local", "https://127.0.0.1:1", dir)],
    }
}

fn call(cluster: &str, token: Option<&str>) -> Request<api::ExportsRequest> {
    let mut r = Request::new(api::ExportsRequest { cluster: cluster.into() });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test]
async fn exports_refuses_a_missing_or_wrong_token_and_an_unknown_cluster() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("east.token"), "s3cret\n").unwrap();
    let svc = ExportsService::new(Arc::new(west_config(dir.path())), vec!["root".into()], west_snapshot());
    for (cluster, token) in
        [("east", None), ("east", Some("wrong")), ("south", Some("s3cret")), ("east", Some(""))]
    {
        let status = svc.exports(call(cluster, token)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{cluster} {token:?}");
    }
    // An empty token file lets no one in.
    std::fs::write(dir.path().join("east.token"), "  \n").unwrap();
    let status = svc.exports(call("east", Some(""))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(svc.exports(call("east", Some("x"))).await.unwrap_err().code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn the_right_token_gets_only_exported_local_services_stripped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("east.token"), "s3cret\n").unwrap();
    let svc = ExportsService::new(Arc::new(west_config(dir.path())), vec!["root".into()], west_snapshot());
    let answer = svc.exports(call("east", Some("s3cret"))).await.unwrap().into_inner();
    assert_eq!((answer.cluster.as_str(), answer.trust_domain.as_str()), ("west", "west.local"));
    assert_eq!(answer.roots_pem, ["root"]);
    assert_eq!(answer.gateways, ["10.77.0.9:15443"]);
    let names: Vec<&str> = answer.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web"], "db is not exported; cart.north is not ours");
    let web = &answer.services[0];
    assert_eq!(web.ports[0].port, 8080);
    assert_eq!(web.ports[0].protocol, api::Protocol::Http1 as i32);
    assert!(web.policy.is_none() && web.routes.is_empty() && web.health_check.is_none());
    assert!(web.vips.is_empty() && web.allocated_vips.is_empty() && web.hostnames.is_empty());
    assert_eq!(web.endpoints.len(), 1, "the unmeshed endpoint is not offered");
    let e = &web.endpoints[0];
    assert_eq!((e.address.as_str(), e.agent_address.as_str()), ("10.1.0.5", "192.168.1.1:15008"));
    assert!(e.node.is_empty() && e.workload.is_empty() && e.labels.is_empty());
    assert_eq!(exported(&api::Snapshot::default()), Vec::new());
}

/// West's control plane on loopback: `Exports` over TLS with a certificate of
/// west's CA for 127.0.0.1; returns its URL and its CA's roots.
async fn serve_west(dir: &Path, stop: &CancellationToken) -> (String, Vec<String>) {
    let ca_dir = dir.join("west-ca");
    let ca = Ca::open(
        CaConfig { trust_domain: "west.local".into(), ..Default::default() },
        &FileStore::new(&ca_dir),
    )
    .await
    .unwrap();
    let names = ServingNames { dns: vec![], ips: vec!["127.0.0.1".parse().unwrap()] };
    let cert = ServingCert::issue(&ca, &names, Duration::from_secs(3600)).unwrap();
    let config = crate::tls::server_config(cert).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let svc =
        ExportsService::new(Arc::new(west_config(dir)), ca.trust_bundle_pem().to_vec(), west_snapshot());
    let incoming = accept::incoming(listener, config, Default::default(), stop.clone());
    let router = tonic::transport::Server::builder().add_service(svc.into_server());
    let stop = stop.clone();
    tokio::spawn(async move { router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await });
    (url, ca.trust_bundle_pem().to_vec())
}

/// East's import source of `west`, running; its views and the board.
fn import_west(west: PeerConfig, stop: &CancellationToken) -> (watch::Receiver<SourceView>, Federation) {
    let config = FederationConfig {
        cluster: "east".into(),
        trust_domain: "east.local".into(),
        gateways: vec![],
        refresh: Duration::from_millis(100),
        peers: vec![west.clone()],
    };
    let federation = Federation::new(config);
    let source = PeerSource::new(&federation.config, &west, federation.board.clone())
        .with_timeout(Duration::from_secs(5));
    assert_eq!(source.name(), "federation/west");
    let (tx, rx) = watch::channel(SourceView::default());
    tokio::spawn(Box::new(source).run(tx, stop.clone()));
    (rx, federation)
}

async fn wait_for(
    rx: &mut watch::Receiver<SourceView>,
    what: &str,
    f: impl Fn(&SourceView) -> bool,
) -> SourceView {
    let found = match tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| f(v))).await {
        Ok(Ok(v)) => Some(v.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("{what}: last view {:?}", rx.borrow()))
}

#[tokio::test]
async fn a_peer_s_exports_are_imported_over_tls_and_a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (url, west_roots) = serve_west(dir.path(), &stop).await;
    // West's file names east's token; east's names west's: the same content.
    std::fs::write(dir.path().join("east.token"), "s3cret\n").unwrap();
    std::fs::write(dir.path().join("west.token"), "s3cret").unwrap();
    let west = peer("west", "west.local", &url, dir.path());

    // No bundle file yet: ready, nothing trusted, the missing file reported.
    let (mut rx, federation) = import_west(west.clone(), &stop);
    let first = wait_for(&mut rx, "ready at once", |v| v.ready).await;
    assert!(first.federated.is_empty() && first.services.is_empty());
    wait_for(&mut rx, "missing bundle reported", |v| {
        v.last_error.as_deref().is_some_and(|e| e.contains("bundle_file"))
    })
    .await;

    // The bundle appears: the call succeeds and web.west is imported.
    std::fs::write(&west.bundle_file, west_roots.concat()).unwrap();
    let view = wait_for(&mut rx, "imported", |v| !v.services.is_empty()).await;
    assert_eq!(view.last_error, None);
    let s = &view.services[0];
    assert_eq!((s.namespace.as_str(), s.name.as_str(), s.cluster.as_str()), ("shop", "web.west", "west"));
    assert_eq!(s.hostnames, ["web.shop.svc.west.global"]);
    assert_eq!(s.endpoints.len(), 1);
    let d = &view.federated[0];
    assert_eq!((d.cluster.as_str(), d.trust_domain.as_str()), ("west", "west.local"));
    assert_eq!(d.gateways, ["10.77.0.9:15443"]);
    assert_eq!(d.roots_pem.len(), west_roots.len());
    let board = federation.board.snapshot();
    assert_eq!(board.peers[0].state, LinkState::Ok);
    assert_eq!(board.peers[0].imported_services, 1);
    assert!(board.peers[0].last_success_unix.is_some());

    // A token west does not know: refused; the last import is kept, the error shown.
    std::fs::write(&west.token_file, "guess").unwrap();
    let view = wait_for(&mut rx, "refusal reported", |v| {
        v.last_error.as_deref().is_some_and(|e| e.contains("Unauthenticated"))
    })
    .await;
    assert_eq!(view.services.len(), 1, "the last good import stays");
    assert_eq!(federation.board.snapshot().peers[0].state, LinkState::Error);

    // A source with a bundle of another CA: a TLS failure; the bundle roots stay
    // published for agents.
    let other = Ca::open(
        CaConfig { trust_domain: "west.local".into(), ..Default::default() },
        &FileStore::new(dir.path().join("other-ca")),
    )
    .await
    .unwrap();
    let mut wrong_root = peer("west", "west.local", &url, &dir.path().join("sub"));
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    std::fs::write(&wrong_root.bundle_file, other.trust_bundle_pem().concat()).unwrap();
    std::fs::write(&wrong_root.token_file, "s3cret").unwrap();
    wrong_root.name = "west".into();
    let (mut rx, _federation) = import_west(wrong_root, &stop);
    let view =
        wait_for(&mut rx, "TLS failure", |v| v.last_error.as_deref().is_some_and(|e| e.contains("TLS with")))
            .await;
    assert!(view.services.is_empty());
    assert_eq!(view.federated[0].roots_pem, other.trust_bundle_pem());
    stop.cancel();
}
