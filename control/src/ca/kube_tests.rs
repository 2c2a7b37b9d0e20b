//! The CA's Kubernetes parts against the fake API server: the root in a Secret,
//! agents authenticated by TokenReview.

use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use serde_json::{Value, json};

use super::*;
use crate::registry::kubernetes::fake_api::FakeApi;

const DEFAULT_TRUST_DOMAIN_FOR_TESTS: &str = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN;

const NS: &str = "mesh-system";
const NAME: &str = "mesh-ca";

fn secret_json(data: &[(&str, &str)]) -> Value {
    let secret = Secret {
        metadata: ObjectMeta { name: Some(NAME.into()), namespace: Some(NS.into()), ..Default::default() },
        data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()),
        ..Default::default()
    };
    serde_json::to_value(secret).unwrap()
}

/// The root certificate and key another instance made (through a directory store).
async fn other_material() -> CaKeyMaterial {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    Ca::open(CaConfig::default(), &store).await.unwrap();
    store.load().await.unwrap().unwrap()
}

fn secret_of(material: &CaKeyMaterial) -> Value {
    secret_json(&[(CERT_FILE, &material.cert_pem), (KEY_FILE, &material.key_pem)])
}

/// The PEM text of `key` in the stored Secret.
fn stored(api: &FakeApi, key: &str) -> Option<String> {
    let secret: Secret = serde_json::from_value(api.secret(NS, NAME)?).unwrap();
    secret.data?.remove(key).map(|b| String::from_utf8(b.0).unwrap())
}

async fn open(api: &FakeApi) -> Result<Ca, CaError> {
    Ca::open(CaConfig::default(), &SecretStore::new(api.client(), NS, NAME)).await
}

#[tokio::test]
async fn an_absent_secret_is_created_once_and_reused_on_restart() {
    let api = FakeApi::start().await;
    let first = open(&api).await.unwrap();
    let cert = stored(&api, CERT_FILE).expect("ca.pem stored");
    assert!(stored(&api, KEY_FILE).expect("ca-key.pem stored").contains("PRIVATE KEY"));
    assert_eq!(first.trust_bundle_pem(), std::slice::from_ref(&cert));
    let secret = api.secret(NS, NAME).unwrap();
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["metadata"]["labels"]["app.kubernetes.io/name"], "mesh-control");
    // Created with a create (POST), never a replace.
    let calls = api.secret_calls();
    assert!(calls.contains(&format!("POST {NS}/{NAME}")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("PUT")), "{calls:?}");

    // A restart (a new store, a new CA) finds the same root and writes nothing.
    let before = api.secret_calls().len();
    let second = open(&api).await.unwrap();
    assert_eq!(second.trust_bundle_pem(), [cert]);
    assert_eq!(api.secret_calls()[before..], [format!("GET {NS}/{NAME}")]);
}

#[tokio::test]
async fn a_present_secret_is_used() {
    let api = FakeApi::start().await;
    let material = other_material().await;
    api.put_secret(secret_of(&material));
    let ca = open(&api).await.unwrap();
    assert_eq!(ca.trust_bundle_pem(), std::slice::from_ref(&material.cert_pem));
    assert_eq!(api.secret_calls(), [format!("GET {NS}/{NAME}")]);
    assert_eq!(stored(&api, KEY_FILE), Some(material.key_pem));
}

#[tokio::test]
async fn a_rotation_in_the_secret_keeps_the_old_root_and_its_cross_signature() {
    let api = FakeApi::start().await;
    let old = open(&api).await.unwrap().trust_bundle_pem()[0].clone();
    let store = SecretStore::new(api.client(), NS, NAME);
    rotation::rotate(&store, DEFAULT_TRUST_DOMAIN_FOR_TESTS, DEFAULT_ROOT_VALIDITY).await.unwrap();
    assert_eq!(stored(&api, PREVIOUS_ROOTS_FILE), Some(old.clone()), "the old root, under its own key");
    assert!(stored(&api, CROSS_SIGNED_FILE).is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    let ca = open(&api).await.unwrap();
    assert_eq!(ca.trust_bundle_pem().len(), 2);
    assert_eq!(ca.trust_bundle_pem()[1], old);
    assert_eq!(ca.trust_bundle_pem()[0], stored(&api, CERT_FILE).unwrap());
    assert_eq!(ca.cross_signed_pem().len(), 1);
}

#[tokio::test]
async fn losing_the_create_race_uses_the_winners_root() {
    let api = FakeApi::start().await;
    let winner = other_material().await;
    api.race_secret_create(secret_of(&winner));
    let ca = open(&api).await.unwrap();
    assert_eq!(
        ca.trust_bundle_pem(),
        std::slice::from_ref(&winner.cert_pem),
        "the other replica's root is used"
    );
    assert_eq!(stored(&api, CERT_FILE), Some(winner.cert_pem), "the winner's Secret is left alone");
    assert_eq!(
        api.secret_calls(),
        [
            format!("GET {NS}/{NAME}"),
            format!("GET {NS}/{NAME}"),
            format!("POST {NS}/{NAME}"),
            format!("GET {NS}/{NAME}")
        ]
    );
}

#[tokio::test]
async fn two_replicas_starting_together_share_one_root() {
    let api = FakeApi::start().await;
    let (a, b) = tokio::join!(open(&api), open(&api));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.trust_bundle_pem(), b.trust_bundle_pem());
    assert_eq!(a.trust_bundle_pem(), [stored(&api, CERT_FILE).unwrap()]);
}

#[tokio::test]
async fn an_empty_declared_secret_is_filled_with_a_conditional_update() {
    let api = FakeApi::start().await;
    api.put_secret(secret_json(&[]));
    let ca = open(&api).await.unwrap();
    assert_eq!(ca.trust_bundle_pem(), [stored(&api, CERT_FILE).unwrap()]);
    let calls = api.secret_calls();
    assert!(
        calls.contains(&format!("PUT {NS}/{NAME}")) && !calls.iter().any(|c| c.starts_with("POST")),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_certificate_without_its_key_names_the_secret_and_the_key() {
    let api = FakeApi::start().await;
    let material = other_material().await;
    api.put_secret(secret_json(&[(CERT_FILE, &material.cert_pem)]));
    let err = open(&api).await.unwrap_err().to_string();
    assert!(err.contains("mesh-system/mesh-ca") && err.contains("ca-key.pem"), "{err}");
    assert!(!api.secret_calls().iter().any(|c| c.starts_with("POST") || c.starts_with("PUT")));
}

#[tokio::test]
async fn a_forbidden_secret_names_the_secret_and_the_missing_permission() {
    let api = FakeApi::start().await;
    api.refuse_secrets(Some(403));
    let err = open(&api).await.unwrap_err().to_string();
    assert!(err.contains("Secret mesh-system/mesh-ca"), "{err}");
    assert!(err.contains("forbidden") && err.contains("\"get\""), "{err}");
}

#[test]
fn secret_references_are_namespace_slash_name() {
    assert_eq!(SecretStore::parse_ref("mesh-system/mesh-ca"), Ok(("mesh-system".into(), "mesh-ca".into())));
    for bad in ["mesh-ca", "/mesh-ca", "mesh-system/", "a/b/c", "Mesh/CA", ""] {
        assert!(SecretStore::parse_ref(bad).is_err(), "{bad:?}");
    }
}

// --- TokenReview ---------------------------------------------------------------

const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

fn review_status(username: &str, node: Option<&str>) -> Value {
    let mut extra = serde_json::Map::new();
    extra.insert("authentication.kubernetes.io/pod-name".into(), json!(["mesh-agent-x7k2p"]));
    if let Some(node) = node {
        extra.insert(NODE_NAME_EXTRA.into(), json!([node]));
    }
    json!({
        "authenticated": true,
        "audiences": ["mesh-control"],
        "user": {"username": username, "uid": "0c6f", "groups": ["system:serviceaccounts"], "extra": extra},
    })
}

fn reviewer(api: &FakeApi) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(
        api.client(),
        TokenReviewConfig::new("mesh-control", "mesh-system", "mesh-agent"),
    )
}

#[tokio::test]
async fn an_authenticated_agent_token_yields_its_node() {
    let api = FakeApi::start().await;
    api.review_token("tok-a", review_status(AGENT, Some("node-a")));
    assert_eq!(reviewer(&api).authenticate("tok-a").await.unwrap(), "node-a");
    let reviews = api.token_reviews();
    assert_eq!(reviews, [json!({"token": "tok-a", "audiences": ["mesh-control"]})]);
}

#[tokio::test]
async fn tokens_that_are_not_an_agents_bound_token_are_refused_with_the_reason() {
    let api = FakeApi::start().await;
    api.review_token("other-sa", review_status("system:serviceaccount:shop:cart", Some("node-a")));
    api.review_token("no-node", review_status(AGENT, None));
    let mut wrong_audience = review_status(AGENT, Some("node-a"));
    wrong_audience["audiences"] = json!([]);
    api.review_token("wrong-audience", wrong_audience);
    let auth = reviewer(&api);

    let refused = |e: AuthError| match e {
        AuthError::Refused(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let reason = refused(auth.authenticate("expired-or-forged").await.unwrap_err());
    assert!(reason.contains("not valid") && reason.contains("invalid bearer token"), "{reason}");
    let reason = refused(auth.authenticate("other-sa").await.unwrap_err());
    assert!(reason.contains("system:serviceaccount:shop:cart") && reason.contains(AGENT), "{reason}");
    let reason = refused(auth.authenticate("no-node").await.unwrap_err());
    assert!(reason.contains("names no node") && reason.contains(NODE_NAME_EXTRA), "{reason}");
    let reason = refused(auth.authenticate("wrong-audience").await.unwrap_err());
    assert!(reason.contains("audience \"mesh-control\""), "{reason}");

    // An unauthenticated answer without an error text is a plain invalid token.
    api.review_token("silent", json!({"authenticated": false}));
    assert!(matches!(auth.authenticate("silent").await, Err(AuthError::InvalidToken)));
    assert!(matches!(auth.authenticate("").await, Err(AuthError::InvalidToken)));
}

#[tokio::test]
async fn accepted_tokens_are_cached_and_refusals_for_less_long() {
    let api = FakeApi::start().await;
    api.review_token("tok-a", review_status(AGENT, Some("node-a")));
    api.review_token("tok-b", review_status(AGENT, Some("node-b")));
    let auth = reviewer(&api);
    for _ in 0..3 {
        assert_eq!(auth.authenticate("tok-a").await.unwrap(), "node-a");
    }
    assert_eq!(api.token_reviews().len(), 1, "one API call for three requests");
    assert_eq!(auth.authenticate("tok-b").await.unwrap(), "node-b");
    assert_eq!(api.token_reviews().len(), 2, "another token is reviewed");
    for _ in 0..5 {
        let e = auth.authenticate("bad").await.unwrap_err();
        assert!(
            matches!(&e, AuthError::Refused(r) if r.contains("not valid")),
            "the cached refusal keeps its reason: {e:?}"
        );
    }
    assert_eq!(api.token_reviews().len(), 3, "a refused token is reviewed once, not per attempt");
}

#[tokio::test]
async fn a_refused_token_is_asked_again_once_its_refusal_expires() {
    let api = FakeApi::start().await;
    let config = TokenReviewConfig {
        negative_cache_ttl: std::time::Duration::from_millis(200),
        ..TokenReviewConfig::new("mesh-control", "mesh-system", "mesh-agent")
    };
    let auth = TokenReviewAuthenticator::new(api.client(), config);
    assert!(auth.authenticate("late").await.is_err());
    // The pod gets bound: the same token becomes valid.
    api.review_token("late", review_status(AGENT, Some("node-l")));
    assert!(auth.authenticate("late").await.is_err(), "still the cached refusal");
    assert_eq!(api.token_reviews().len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(auth.authenticate("late").await.unwrap(), "node-l");
    assert_eq!(api.token_reviews().len(), 2);
}

#[tokio::test]
async fn the_cache_expires_and_stays_bounded() {
    let api = FakeApi::start().await;
    for n in 0..3 {
        api.review_token(&format!("tok-{n}"), review_status(AGENT, Some(&format!("node-{n}"))));
    }
    let config = TokenReviewConfig {
        cache_ttl: std::time::Duration::from_millis(200),
        cache_capacity: 2,
        ..TokenReviewConfig::new("mesh-control", "mesh-system", "mesh-agent")
    };
    let auth = TokenReviewAuthenticator::new(api.client(), config);
    for n in 0..3 {
        auth.authenticate(&format!("tok-{n}")).await.unwrap();
    }
    // tok-0 was evicted to make room (capacity 2); tok-2 is still cached.
    auth.authenticate("tok-2").await.unwrap();
    assert_eq!(api.token_reviews().len(), 3);
    auth.authenticate("tok-0").await.unwrap();
    assert_eq!(api.token_reviews().len(), 4);
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    auth.authenticate("tok-2").await.unwrap();
    assert_eq!(api.token_reviews().len(), 5, "expired entries are reviewed again");
}

#[tokio::test]
async fn an_unreachable_api_is_unavailable_not_invalid() {
    // Nothing listens on a just-closed port.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client =
        kube::Client::try_from(kube::Config::new(format!("http://{closed}").parse().unwrap())).unwrap();
    let auth = TokenReviewAuthenticator::new(
        client,
        TokenReviewConfig::new("mesh-control", "mesh-system", "mesh-agent"),
    );
    assert!(matches!(auth.authenticate("tok").await, Err(AuthError::Unavailable(_))));
}

#[tokio::test]
async fn bootstrap_tokens_and_token_review_work_side_by_side() {
    let api = FakeApi::start().await;
    api.review_token("sa-token", review_status(AGENT, Some("node-k8s")));
    api.review_token("no-node", review_status(AGENT, None));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "boot-token node-local\n").unwrap();
    let auth = FirstOf::new(vec![Arc::new(TokenFileAuthenticator::new(&path)), Arc::new(reviewer(&api))]);
    assert_eq!(auth.authenticate("boot-token").await.unwrap(), "node-local");
    assert!(api.token_reviews().is_empty(), "a bootstrap token needs no API call");
    assert_eq!(auth.authenticate("sa-token").await.unwrap(), "node-k8s");
    // The most telling refusal reaches the caller.
    assert!(
        matches!(auth.authenticate("no-node").await, Err(AuthError::Refused(r)) if r.contains("names no node"))
    );
}

#[tokio::test]
async fn the_certificates_service_reports_a_refusal_as_unauthenticated_with_its_reason() {
    use mesh_api::certificates_server::Certificates;
    let api = FakeApi::start().await;
    api.review_token("no-node", review_status(AGENT, None));
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(Ca::open(CaConfig::default(), &FileStore::new(dir.path())).await.unwrap());
    let service = CertificatesService::new(ca, Arc::new(reviewer(&api)), Arc::new(StaticAuthorizer::new()));
    let mut request = tonic::Request::new(mesh_api::TrustBundleRequest::default());
    request.metadata_mut().insert("authorization", "Bearer no-node".parse().unwrap());
    let status = service.trust_bundle(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("names no node"), "{}", status.message());
}

#[tokio::test]
async fn with_a_key_encryption_key_the_secret_holds_the_ca_key_sealed() {
    let api = FakeApi::start().await;
    // 32 zero bytes in base64.
    let kek = || SealingKey::from_base64(&format!("{}=", "A".repeat(43)), "test").unwrap();
    let sealed = |s: Sealer| SealedStore::new(Box::new(SecretStore::new(api.client(), NS, NAME)), s);
    let first = Ca::open(CaConfig::default(), &sealed(Sealer::new(Some(kek()), vec![]))).await.unwrap();
    let key = stored(&api, KEY_FILE).expect("ca-key.pem stored");
    assert!(key.contains("MESH SEALED CA KEY") && !key.contains("PRIVATE KEY"), "{key}");
    // The same root on restart with the key; without it, a clear refusal.
    let again = Ca::open(CaConfig::default(), &sealed(Sealer::new(Some(kek()), vec![]))).await.unwrap();
    assert_eq!(again.trust_bundle_pem(), first.trust_bundle_pem());
    let Err(err) = Ca::open(CaConfig::default(), &sealed(Sealer::default())).await else {
        panic!("the CA opened without its key-encryption key");
    };
    assert!(err.to_string().contains("encrypted"), "{err}");
}
