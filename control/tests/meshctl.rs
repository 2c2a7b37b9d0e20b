//! meshctl against a real `mesh-control` (registry file, ephemeral loopback ports),
//! one agent simulated on the gRPC stream (TLS, its node's token, subscribe + ACK)
//! and an agent admin endpoint serving `/stats`, `/ready` and `/config_dump` in the
//! agent's JSON shape. Needs no root.

mod common;

/// The fake Kubernetes API server of the crate's unit tests, shared as source.
#[allow(dead_code)]
#[path = "../src/registry/kubernetes/fake_api.rs"]
mod fake_api;

use std::{
    net::SocketAddr,
    process::Output,
    time::{Duration, Instant},
};

use common::{ControlPlane, authorized, start_control, tls_channel, token};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_api::{self as api, discovery_client::DiscoveryClient};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

const REGISTRY: &str = "\
services:
  - name: reviews
    vips: [10.96.0.10]
    hostnames: [reviews.default.svc.cluster.local]
    ports: [{port: 9080, protocol: http}]
    policy:
      load_balancer: {algorithm: least-request}
      authorization:
        - principals: [spiffe://cluster.local/ns/default/sa/productpage]
    endpoints:
      - {address: 10.1.0.5, service_account: reviews, node: node-a, agent_address: 127.0.0.1:15008}
      - {address: 10.1.0.6, service_account: reviews, node: node-b, health: unhealthy, health_reason: not ready}
  - name: productpage
    vips: [10.96.0.11]
    ports: [{port: 9080}]
    endpoints:
      - {address: 10.1.0.9, service_account: productpage, node: node-a, agent_address: 127.0.0.1:15008}
";

/// Runs meshctl with only the given flags (no MESHCTL_* from the environment).
async fn meshctl(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    for var in ["MESHCTL_CONTROL_ADMIN", "MESHCTL_AGENTS"] {
        cmd.env_remove(var);
    }
    cmd.args(args).output().await.expect("run meshctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), String::from_utf8_lossy(&o.stderr))
    })
}

/// A node agent on the discovery stream: subscribes, ACKs the first snapshot and
/// keeps the stream open (until dropped). Returns the version it applied.
async fn subscribe_agent(
    cp: &ControlPlane,
) -> (u64, tokio::sync::mpsc::Sender<api::DiscoveryRequest>, tonic::Streaming<api::DiscoveryResponse>) {
    let mut client = DiscoveryClient::new(tls_channel(cp.grpc, &cp.ca_pem).await.expect("connect"));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = api::Subscribe {
        node: "node-a".into(),
        agent_address: "127.0.0.1:15008".into(),
        mode: "ebpf".into(),
        // Ahead of the control plane: `meshctl version` must warn.
        agent_version: "0.9.0".into(),
        ..Default::default()
    };
    tx.send(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Subscribe(subscribe)) })
        .await
        .unwrap();
    let mut responses = client
        .stream(authorized(ReceiverStream::new(rx), &token("node-a")))
        .await
        .expect("stream")
        .into_inner();
    // The first answer may precede the registry's first load; wait for the snapshot with services.
    let version = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .expect("a snapshot within 10s")
            .expect("stream ok")
            .expect("stream open");
        if <api::Snapshot as prost::Message>::decode(r.snapshot.clone()).is_ok_and(|s| !s.services.is_empty())
        {
            break r.version;
        }
    };
    tx.send(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Ack(api::Ack { version })) })
        .await
        .unwrap();
    (version, tx, responses)
}

/// Serves an agent admin endpoint whose routes match the registry above.
async fn fake_agent_admin(applied_version: u64) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let discovery = json!({"control_plane": "http://mesh-control:15010", "connected": true,
        "applied_version": applied_version, "staleness_seconds": 0.0, "seconds_since_update": 1.0,
        "services": 2, "endpoints": 3});
    let endpoint = |addr: &str, healthy: bool, reason: &str, sa: &str, node: &str| {
        json!({"addr": addr, "healthy": healthy, "health_reason": reason, "weight": 1,
            "identity": format!("spiffe://cluster.local/ns/default/sa/{sa}"), "node": node,
            "agent_address": "127.0.0.1:15008", "zone": "", "region": ""})
    };
    let dump = json!({
        "mode": "ebpf", "mode_reason": "requested with --mode ebpf", "ready": true, "enrolled": [],
        "discovery": discovery,
        "routes": [
            {"service": "default/reviews", "port": 9080, "protocol": "http1", "endpoints": [
                endpoint("10.1.0.5:9080", true, "", "reviews", "node-a"),
                endpoint("10.1.0.6:9080", false, "not ready", "reviews", "node-b")]},
            {"service": "default/productpage", "port": 9080, "protocol": "detect", "endpoints": [
                endpoint("10.1.0.9:9080", true, "", "productpage", "node-a")]}
        ]
    });
    let stats = json!({"mode": "ebpf", "connections": {}, "ebpf": null, "discovery": discovery});
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { break };
            let (dump, stats) = (dump.to_string(), stats.to_string());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = match req.uri().path() {
                        "/config_dump" => (StatusCode::OK, dump.clone()),
                        "/stats" => (StatusCode::OK, stats.clone()),
                        "/ready" => (StatusCode::OK, "ready\n".into()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                    };
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_reports_a_running_control_plane_and_agent() {
    let cp = start_control(REGISTRY, &[]);
    let (version, _tx, _responses) = subscribe_agent(&cp).await;
    let agent = fake_agent_admin(version).await;
    let (admin, agent) = (format!("http://{}", cp.admin), format!("http://{agent}"));
    let base = ["--control-admin", admin.as_str(), "--agent", agent.as_str()];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();

    // The ACK is asynchronous: wait until the control plane records it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let out = meshctl(&with(&["status", "-o", "json"])).await;
        let v = json_of(&out);
        if v["control_plane"]["agents"][0]["state"] == "in sync" || Instant::now() > deadline {
            assert!(out.status.success(), "status failed: {v:#}");
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpv = &status["control_plane"];
    assert_eq!(cpv["ready"], true, "{status:#}");
    assert_eq!(cpv["current_version"], version);
    assert_eq!(cpv["services"], 2);
    let a = &cpv["agents"][0];
    assert_eq!(
        (a["node"].as_str(), a["mode"].as_str(), a["connected"].as_bool()),
        (Some("node-a"), Some("ebpf"), Some(true))
    );
    assert_eq!(
        (a["acked_version"].as_u64(), a["state"].as_str()),
        (Some(version), Some("in sync")),
        "{status:#}"
    );
    assert_eq!(status["agents"][0]["discovery"]["applied_version"], version);
    assert_eq!(status["agents"][0]["ready"], true);

    let human = meshctl(&with(&["status"])).await;
    let text = stdout(&human);
    assert!(human.status.success(), "{text}");
    assert!(text.contains(&format!("CONTROL PLANE  {admin}")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("node-a") && l.ends_with("in sync")), "{text}");

    let services = meshctl(&with(&["services"])).await;
    let text = stdout(&services);
    let reviews = text.lines().find(|l| l.starts_with("default/reviews")).unwrap_or_else(|| panic!("{text}"));
    for cell in [
        "10.96.0.10",
        "reviews.default.svc.cluster.local",
        "9080/http1",
        "least-request",
        "1/2 usable",
        "1 rule",
    ] {
        assert!(reviews.contains(cell), "{cell} missing from {reviews:?}");
    }
    let json = json_of(&meshctl(&with(&["services", "-o", "json"])).await);
    assert_eq!(json["version"], version);
    let reviews = json["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "reviews"));
    let reviews = reviews.unwrap_or_else(|| panic!("{json:#}"));
    assert_eq!(
        reviews["authorization"][0]["principals"][0],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );

    let endpoints =
        json_of(&meshctl(&with(&["endpoints", "reviews", "--from", "control", "-o", "json"])).await);
    let eps = &endpoints["services"][0]["endpoints"];
    assert_eq!(
        (eps[1]["address"].as_str(), eps[1]["health"].as_str()),
        (Some("10.1.0.6"), Some("HEALTH_UNHEALTHY"))
    );

    let explain = json_of(&meshctl(&with(&["explain", "10.1.0.9", "10.96.0.10:9080", "-o", "json"])).await);
    assert_eq!(explain["service"], "default/reviews", "{explain:#}");
    assert_eq!(explain["outcome"], "balanced");
    assert_eq!(explain["candidates"], json!(["10.1.0.5:9080"]));
    assert_eq!(explain["authorization"]["decision"], "allowed");
    assert_eq!(explain["source_identity"], "spiffe://cluster.local/ns/default/sa/productpage");

    let certs = meshctl(&with(&["certs"])).await;
    assert_eq!(stdout(&certs), format!("{agent}: no certificates yet: the CA is not enabled\n"));

    let dump = json_of(&meshctl(&with(&["config-dump", "control", "-o", "json"])).await);
    assert_eq!(dump["control"]["version"], version);
    assert!(dump.get("agents").is_none());

    // Releases: the control plane's own, node-a's as it subscribed (newer: a warning),
    // and the agent asked directly, whose dump names none (an older agent: a warning).
    let versions = json_of(&meshctl(&with(&["version", "-o", "json"])).await);
    let ours = env!("CARGO_PKG_VERSION");
    assert_eq!((versions["client"].as_str(), versions["control_plane"].as_str()), (Some(ours), Some(ours)));
    assert_eq!(versions["agents"][0]["agent"], "node-a", "{versions:#}");
    assert_eq!(versions["agents"][0]["version"], "0.9.0", "{versions:#}");
    assert_eq!(versions["agents"][1]["agent"], agent.as_str(), "{versions:#}");
    let warnings: Vec<&str> =
        versions["warnings"].as_array().unwrap().iter().filter_map(|w| w.as_str()).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("node-a") && warnings[0].contains("upgrade the control plane first"));
    assert!(warnings[1].contains(agent.as_str()) && warnings[1].contains("did not report"));
    let human = stdout(&meshctl(&with(&["version"])).await);
    assert!(human.starts_with("COMPONENT") && human.contains("warning: agent node-a runs 0.9.0"), "{human}");
}

#[tokio::test]
async fn unreachable_components_fail_with_what_to_do() {
    // Bind then drop: nothing listens on these ports while the test runs.
    let closed = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (admin, agent) = (closed(), closed());
    let (admin, agent) = (format!("http://{admin}"), format!("http://{agent}"));
    let base = ["--control-admin", admin.as_str(), "--timeout", "3s"];

    let out = meshctl(&[&base[..], &["--agent", agent.as_str(), "status"]].concat()).await;
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "cannot reach the control plane's admin endpoint at {admin}: connection refused — is mesh-control running"
        )),
        "{text}"
    );
    assert_eq!(text.matches("cannot reach the control plane").count(), 1, "said once: {text}");
    assert!(text.contains(&format!("cannot reach the agent at {agent}: connection refused")), "{text}");

    let out = meshctl(&[&base[..], &["services"]].concat()).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "meshctl: cannot reach the control plane's admin endpoint at {admin}: connection refused"
        )),
        "{err}"
    );

    let out = meshctl(&[&base[..], &["--agent", "localhost:15000", "certs"]].concat()).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--agent \"localhost:15000\" is not a URL"),
        "{out:?}"
    );
}

#[tokio::test]
async fn install_prints_a_profiles_manifests_and_refuses_unknown_settings() {
    let out = meshctl(&["install", "--profile", "production", "--set", "image.tag=9.9.9"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["Namespace", "Deployment", "DaemonSet", "PodDisruptionBudget", "ClusterRole"] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    assert!(text.contains("image: mesh-agent:9.9.9") && text.contains("image: mesh-control:9.9.9"), "{text}");

    let bad = meshctl(&["install", "--set", "controlPlane.replicas=zero"]).await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("controlPlane.replicas") && err.contains("a number from 1"), "{err}");
}

/// Runs meshctl with `kubeconfig` as its only way to a cluster (no in-cluster
/// credentials, a HOME without ~/.kube).
async fn meshctl_with_kubeconfig(
    args: &[&str],
    kubeconfig: &std::path::Path,
    home: &std::path::Path,
) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        cmd.env_remove(var);
    }
    cmd.env("KUBECONFIG", kubeconfig).env("HOME", home);
    cmd.args(args).output().await.expect("run meshctl")
}

#[tokio::test]
async fn install_apply_goes_through_the_kubeconfig_to_the_api_server() {
    let api = fake_api::FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: tester, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: tester}}}}]\n",
            api.url()
        ),
    )
    .unwrap();
    let install = [
        "install",
        "--profile",
        "production",
        "--set",
        "controlPlane.replicas=3",
        "--set",
        "image.tag=9.9.9",
    ];
    let run = |extra: &'static [&'static str]| {
        let args: Vec<&str> = install.iter().chain(extra).copied().collect();
        let (kubeconfig, home) = (kubeconfig.clone(), dir.path().to_owned());
        async move { meshctl_with_kubeconfig(&args, &kubeconfig, &home).await }
    };

    let dry = run(&["--apply", "--dry-run"]).await;
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(stdout(&dry).contains("(server dry run: nothing was changed)"), "{}", stdout(&dry));
    assert!(api.applied_objects().is_empty());

    let out = run(&["--apply"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    assert!(text.starts_with("namespace/mesh-system applied\n"), "{text}");
    assert!(
        text.ends_with(&format!("objects applied to {} as field manager meshctl\n", api.url())),
        "{text}"
    );
    let control = api.applied("deployments.apps", "mesh-system", "mesh-control").expect("deployment applied");
    assert_eq!(control["spec"]["replicas"], 3);
    assert_eq!(control["spec"]["template"]["spec"]["containers"][0]["image"], "mesh-control:9.9.9");
    assert_eq!(api.applied_objects().len(), text.lines().count() - 1);

    api.forbid("clusterroles.rbac.authorization.k8s.io", "mesh-control");
    let refused = run(&["--apply"]).await;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("patch clusterroles.rbac.authorization.k8s.io/mesh-control: 403 Forbidden"),
        "{err}"
    );

    let nowhere =
        meshctl_with_kubeconfig(&["install", "--apply"], &dir.path().join("absent"), dir.path()).await;
    assert!(!nowhere.status.success());
    let err = String::from_utf8_lossy(&nowhere.stderr);
    assert!(
        err.contains("install --apply needs a cluster") && err.contains("point KUBECONFIG at one"),
        "{err}"
    );
}
