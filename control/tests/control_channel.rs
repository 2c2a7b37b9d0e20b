//! The control channel as an attacker meets it, against a real `mesh-control`: gRPC
//! only over TLS with a certificate from the mesh CA, every discovery call needs a
//! node credential, and a node's credential reaches its own node's data only (its
//! workloads' placements, its identities' certificates), never another node's.
//! Needs no root.

mod common;

use std::time::Duration;

use common::{authorized, start_control, tls_channel, token};
use mesh_api::{self as api, certificates_client::CertificatesClient, discovery_client::DiscoveryClient};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const REGISTRY: &str = "\
services:
  - name: cart
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80}]
    endpoints:
      - {address: 10.1.0.5, service_account: cart, node: node-a, agent_address: 127.0.0.1:15008}
workloads:
  - {name: cart-1, namespace: shop, service_account: cart, node: node-a, addresses: [10.1.0.5]}
  - {name: vault-1, namespace: bank, service_account: vault, node: node-b, addresses: [10.1.0.9], labels: {app: vault}}
";

fn subscribe(node: &str) -> api::DiscoveryRequest {
    api::DiscoveryRequest {
        kind: Some(api::discovery_request::Kind::Subscribe(api::Subscribe {
            node: node.into(),
            ..Default::default()
        })),
    }
}

/// Opens a stream with `token` (none when `None`) subscribing as `node`; the first
/// response, or the refusal.
async fn first_response(
    channel: tonic::transport::Channel,
    token: Option<&str>,
    node: &str,
) -> Result<api::DiscoveryResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(subscribe(node)).await.unwrap();
    let stream = ReceiverStream::new(rx);
    let request = match token {
        Some(t) => authorized(stream, t),
        None => tonic::Request::new(stream),
    };
    let mut responses = DiscoveryClient::new(channel).stream(request).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message()).await.expect("an answer");
    drop(tx);
    first?.ok_or_else(|| tonic::Status::cancelled("closed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_without_a_valid_credential_is_refused() {
    let cp = start_control(REGISTRY, &[]);
    let channel = tls_channel(cp.grpc, &cp.ca_pem).await.expect("TLS to the control plane");

    let refused = first_response(channel.clone(), None, "node-a").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("authorization: Bearer <token>"), "{refused:?}");

    let refused = first_response(channel.clone(), Some("guessed"), "node-a").await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (Code::Unauthenticated, "invalid node token"));

    let refused = DiscoveryClient::new(channel.clone()).agents(api::AgentsRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "Agents needs a credential too");

    // The refusals left no trace among the agents, and the right token is let in.
    let ok = first_response(channel, Some(&token("node-a")), "node-a").await.expect("node-a's own stream");
    assert!(ok.version > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_s_credential_reaches_its_own_node_s_data_only() {
    let cp = start_control(REGISTRY, &[]);
    let channel = tls_channel(cp.grpc, &cp.ca_pem).await.expect("TLS to the control plane");

    // Subscribing as another node with one's own token.
    let refused = first_response(channel.clone(), Some(&token("node-a")), "node-b").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("belongs to node \"node-a\""), "{refused:?}");

    // Its own stream: the shared routing data, and node-a's workloads alone.
    let response = first_response(channel.clone(), Some(&token("node-a")), "node-a").await.unwrap();
    let snapshot = <api::Snapshot as prost::Message>::decode(response.snapshot.clone()).unwrap();
    assert_eq!(snapshot.services.len(), 1, "routing data is shared");
    let placed: Vec<_> = response.workloads.iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
    assert_eq!(placed, ["shop/cart-1"], "no other node's placements");
    assert_eq!(response.workloads[0].service_account, "cart");
    assert_eq!(response.workloads[0].addresses, ["10.1.0.5"]);
    let of_b = first_response(channel.clone(), Some(&token("node-b")), "node-b").await.unwrap();
    assert_eq!(of_b.workloads.len(), 1);
    assert_eq!(of_b.workloads[0].labels.get("app").map(String::as_str), Some("vault"));
    assert_eq!(of_b.snapshot, response.snapshot, "one encoding of the shared part");

    // Agents: node-a hears about itself, not about node-b.
    let mut client = DiscoveryClient::new(channel.clone());
    let agents =
        client.agents(authorized(api::AgentsRequest {}, &token("node-a"))).await.unwrap().into_inner();
    let nodes: Vec<_> = agents.agents.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["node-a"]);

    // Certificates: node-b's workload identity is not node-a's to have, whichever
    // node the request names.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = |uri: &str| {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    let vault = csr("spiffe://cluster.local/ns/bank/sa/vault");
    let mut ca = CertificatesClient::new(channel);
    for node in ["node-a", "node-b"] {
        let request = api::SignRequest {
            csr_pem: vault.clone(),
            namespace: "bank".into(),
            service_account: "vault".into(),
            node: node.into(),
            ..Default::default()
        };
        let refused = ca.sign(authorized(request, &token("node-a"))).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "as {node}: {refused:?}");
    }
    // ...while node-b gets it: the identity of a workload placed on node-b (no
    // endpoint of any service carries it).
    let request = api::SignRequest {
        csr_pem: vault,
        namespace: "bank".into(),
        service_account: "vault".into(),
        node: "node-b".into(),
        ..Default::default()
    };
    let signed = ca.sign(authorized(request, &token("node-b"))).await.expect("placed on node-b").into_inner();
    assert!(!signed.cert_chain_pem.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_speaks_tls_only_with_a_certificate_of_its_own_ca() {
    let cp = start_control(REGISTRY, &[]);
    // Plaintext HTTP/2 (what an agent would send over h2c) gets no gRPC answer.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    match plain.connect().await {
        Err(_) => {}
        Ok(channel) => {
            let answer = DiscoveryClient::new(channel)
                .agents(authorized(api::AgentsRequest {}, &token("node-a")))
                .await;
            assert!(answer.is_err(), "a plaintext call was answered: {answer:?}");
        }
    }
    // Another CA's root does not verify it.
    let other = start_control("", &[]);
    let refused = tls_channel(cp.grpc, &other.ca_pem).await;
    assert!(refused.is_err(), "verified against another mesh's root");
    // Its own does, for the address dialled.
    tls_channel(cp.grpc, &cp.ca_pem).await.expect("verified against its CA's root");
}
