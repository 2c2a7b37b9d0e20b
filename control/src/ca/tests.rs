//! CA behaviour as agents and operators rely on it, checked with the `openssl` CLI
//! where an independent reading of the certificates matters.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::certificates_client::CertificatesClient;
use mesh_api::{SignRequest, TrustBundleRequest};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use super::*;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

/// A CSR for `sans` signed by `key`, as an agent would make it.
fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn csr_for(id: &SpiffeId) -> String {
    csr_for_key(&p256(), id)
}

fn csr_for_key(key: &KeyPair, id: &SpiffeId) -> String {
    csr_with(key, vec![SanType::URI(id.to_string().try_into().unwrap())])
}

async fn root_ca(dir: &Path, config: CaConfig) -> Ca {
    Ca::open(config, &FileStore::new(dir)).await.unwrap()
}

/// Runs `openssl` with `stdin`, returning (success, stdout + stderr).
fn openssl(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the openssl CLI is needed by these tests (apt-get install -y openssl)");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// notBefore and notAfter of a PEM certificate, as openssl reads them.
fn validity(cert_pem: &str) -> (SystemTime, SystemTime) {
    let (ok, text) = openssl(&["x509", "-noout", "-startdate", "-enddate", "-dateopt", "iso_8601"], cert_pem);
    assert!(ok, "{text}");
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    let field = |name: &str| {
        let line = text.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        let t = time::PrimitiveDateTime::parse(line.trim(), &format).unwrap().assume_utc();
        UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().try_into().unwrap())
    };
    (field("notBefore="), field("notAfter="))
}

fn assert_near(actual: SystemTime, expected: SystemTime, what: &str) {
    let diff = match actual.duration_since(expected) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(diff <= Duration::from_secs(10), "{what}: {actual:?} is {diff:?} away from {expected:?}");
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn issued_certificate_carries_the_identity_usages_and_backdated_validity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca(dir.path(), CaConfig::default()).await;
    let cart = id("shop", "cart");
    let issued = ca.sign(&csr_for(&cart), &cart, None).unwrap();
    let now = SystemTime::now();

    assert_eq!(issued.chain_pem.len(), 1, "root mode sends the leaf only");
    let leaf = &issued.chain_pem[0];
    let (ok, text) = openssl(&["x509", "-noout", "-text"], leaf);
    assert!(ok, "{text}");
    assert!(text.contains("URI:spiffe://cluster.local/ns/shop/sa/cart"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");

    let (not_before, not_after) = validity(leaf);
    assert_near(not_before, now - Duration::from_secs(300), "notBefore");
    assert_near(not_after, now + DEFAULT_TTL, "notAfter");
    assert_eq!((issued.not_before, issued.not_after), (not_before, not_after), "reported = encoded");

    let root = write(dir.path(), "bundle.pem", &issued.trust_bundle_pem.concat());
    let (ok, text) = openssl(&["verify", "-CAfile", &root], leaf);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn serials_differ_between_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca(dir.path(), CaConfig::default()).await;
    let cart = id("shop", "cart");
    let csr = csr_for(&cart);
    let serial = |pem: &str| openssl(&["x509", "-noout", "-serial"], pem).1;
    let a = serial(&ca.sign(&csr, &cart, None).unwrap().chain_pem[0]);
    let b = serial(&ca.sign(&csr, &cart, None).unwrap().chain_pem[0]);
    assert_ne!(a, b);
    // 16 random bytes: 32 hex digits.
    assert_eq!(a.trim().trim_start_matches("serial=").len(), 32, "{a}");
}

#[tokio::test]
async fn requested_lifetime_is_honoured_up_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let config = CaConfig {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(2 * 3600),
        ..CaConfig::default()
    };
    let ca = root_ca(dir.path(), config).await;
    let cart = id("shop", "cart");
    let now = SystemTime::now();
    for (asked, expected) in [
        (None, 3600),
        (Some(Duration::ZERO), 3600),
        (Some(Duration::from_secs(1800)), 1800),
        (Some(Duration::from_secs(48 * 3600)), 2 * 3600),
    ] {
        let issued = ca.sign(&csr_for(&cart), &cart, asked).unwrap();
        let (_, not_after) = validity(&issued.chain_pem[0]);
        assert_near(not_after, now + Duration::from_secs(expected), &format!("ttl {asked:?}"));
    }
}

#[tokio::test]
async fn a_certificate_never_outlives_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let config = CaConfig { root_validity: Duration::from_secs(3600), ..CaConfig::default() };
    let ca = root_ca(dir.path(), config).await;
    let (_, root_not_after) = validity(&ca.trust_bundle_pem()[0]);
    let cart = id("shop", "cart");
    let issued = ca.sign(&csr_for(&cart), &cart, None).unwrap();
    assert_eq!(validity(&issued.chain_pem[0]).1, root_not_after);
}

#[tokio::test]
async fn restart_keeps_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let cart = id("shop", "cart");
    let first = root_ca(dir.path(), CaConfig::default()).await;
    let before = first.sign(&csr_for(&cart), &cart, None).unwrap();
    drop(first);

    let second = root_ca(dir.path(), CaConfig::default()).await;
    assert_eq!(second.trust_bundle_pem(), before.trust_bundle_pem.as_slice());
    // A certificate from the restarted CA verifies under the root agents already hold.
    let after = second.sign(&csr_for(&cart), &cart, None).unwrap();
    let root = write(dir.path(), "old-root.pem", &before.trust_bundle_pem[0]);
    let (ok, text) = openssl(&["verify", "-CAfile", &root], &after.chain_pem[0]);
    assert!(ok, "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn a_stored_ca_of_another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    root_ca(dir.path(), CaConfig::default()).await;
    let other = CaConfig { trust_domain: "prod.example".into(), ..CaConfig::default() };
    let err = Ca::open(other, &FileStore::new(dir.path())).await.unwrap_err();
    assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let bad_td = CaConfig { trust_domain: "Not A Domain".into(), ..CaConfig::default() };
    assert!(matches!(Ca::open(bad_td, &store).await, Err(CaError::TrustDomain(_))));
    let bad_ttl = CaConfig {
        default_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(5),
        ..Default::default()
    };
    assert!(matches!(Ca::open(bad_ttl, &store).await, Err(CaError::Lifetimes(_))));
    assert!(!dir.path().join(CERT_FILE).exists(), "nothing generated for a refused configuration");
}

/// A root the operator made with openssl, as `(cert path, key path)`.
fn operator_root(dir: &Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.pem")).to_string_lossy().into_owned();
    let key = dir.join(format!("{name}-key.pem")).to_string_lossy().into_owned();
    let subject = format!("/O=example/CN={name}");
    let (ok, text) = openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &subject,
            "-keyout",
            &key,
            "-out",
            &cert,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        "",
    );
    assert!(ok, "{text}");
    (cert, key)
}

fn intermediate_config(root: &(String, String)) -> CaConfig {
    CaConfig {
        mode: CaMode::Intermediate { root_cert: root.0.clone().into(), root_key: root.1.clone().into() },
        ..CaConfig::default()
    }
}

#[tokio::test]
async fn intermediate_mode_chains_to_the_operator_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = operator_root(dir.path(), "root");
    let store_dir = dir.path().join("ca");
    let ca = root_ca(&store_dir, intermediate_config(&root)).await;
    let cart = id("shop", "cart");
    let issued = ca.sign(&csr_for(&cart), &cart, None).unwrap();

    assert_eq!(issued.chain_pem.len(), 2, "leaf then intermediate");
    let (ok, text) = openssl(&["x509", "-noout", "-text"], &issued.chain_pem[1]);
    assert!(ok && text.contains("CA:TRUE") && text.contains("Issuer: O = example, CN = root"), "{text}");
    let bundle = write(dir.path(), "bundle.pem", &issued.trust_bundle_pem.concat());
    let (ok, text) = openssl(&["x509", "-noout", "-subject"], &issued.trust_bundle_pem.concat());
    assert!(ok && text.contains("CN = root"), "the bundle is the operator's root: {text}");

    let inter = write(dir.path(), "inter.pem", &issued.chain_pem[1]);
    let (ok, text) = openssl(&["verify", "-CAfile", &bundle, "-untrusted", &inter], &issued.chain_pem[0]);
    assert!(ok, "{text}");
    let (ok, _) = openssl(&["verify", "-CAfile", &bundle], &issued.chain_pem[0]);
    assert!(!ok, "the leaf must need the intermediate to reach the root");

    // A restart reuses the stored intermediate.
    drop(ca);
    let again = root_ca(&store_dir, intermediate_config(&root)).await;
    let reissued = again.sign(&csr_for(&cart), &cart, None).unwrap();
    assert_eq!(reissued.chain_pem[1], issued.chain_pem[1]);
}

#[tokio::test]
async fn a_new_operator_root_gets_a_new_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("ca");
    let cart = id("shop", "cart");
    let old_root = operator_root(dir.path(), "old-root");
    let old = root_ca(&store_dir, intermediate_config(&old_root)).await;
    let old_inter = old.sign(&csr_for(&cart), &cart, None).unwrap().chain_pem[1].clone();

    let new_root = operator_root(dir.path(), "new-root");
    let new = root_ca(&store_dir, intermediate_config(&new_root)).await;
    let issued = new.sign(&csr_for(&cart), &cart, None).unwrap();
    assert_ne!(issued.chain_pem[1], old_inter);
    let inter = write(dir.path(), "inter.pem", &issued.chain_pem[1]);
    let (ok, text) = openssl(&["verify", "-CAfile", &new_root.0, "-untrusted", &inter], &issued.chain_pem[0]);
    assert!(ok, "{text}");
}

/// Flips one byte inside the SAN's namespace in the CSR's DER, leaving it well-formed.
fn tamper(csr_pem: &str) -> String {
    let block = pem::parse(csr_pem).unwrap();
    let mut der = block.contents().to_vec();
    let at = der.windows(4).position(|w| w == b"shop").unwrap();
    der[at + 3] = b'q';
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

fn openssl_csr(key_args: &[&str], san: &str) -> String {
    let mut args = vec!["req", "-new", "-nodes", "-keyout", "/dev/null", "-subj", "/CN=x"];
    args.extend_from_slice(key_args);
    let ext = format!("subjectAltName={san}");
    args.extend_from_slice(&["-addext", &ext]);
    let (ok, text) = openssl(&args, "");
    assert!(ok, "{text}");
    let start = text.find("-----BEGIN CERTIFICATE REQUEST-----").unwrap();
    let end = "-----END CERTIFICATE REQUEST-----\n";
    let len = text[start..].find(end).unwrap() + end.len();
    text[start..start + len].to_owned()
}

/// Whether a refusal is the one a case expects.
type IsExpected = fn(&SignError) -> bool;

#[tokio::test]
async fn bad_requests_are_refused_each_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca(dir.path(), CaConfig::default()).await;
    let cart = id("shop", "cart");
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let good = csr_for(&cart);

    let cases: Vec<(&str, String, IsExpected, tonic::Code)> = vec![
        ("tampered", tamper(&good), |e| matches!(e, SignError::BadSignature), tonic::Code::InvalidArgument),
        (
            "other identity",
            csr_for(&id("shop", "payments")),
            |e| matches!(e, SignError::IdentityMismatch { .. }),
            tonic::Code::PermissionDenied,
        ),
        (
            "extra DNS name",
            csr_with(
                &p256(),
                vec![
                    uri("spiffe://cluster.local/ns/shop/sa/cart"),
                    SanType::DnsName("evil.example".try_into().unwrap()),
                ],
            ),
            |e| matches!(e, SignError::IdentityMismatch { .. }),
            tonic::Code::PermissionDenied,
        ),
        (
            "two identities",
            csr_with(
                &p256(),
                vec![
                    uri("spiffe://cluster.local/ns/shop/sa/cart"),
                    uri("spiffe://cluster.local/ns/kube-system/sa/admin"),
                ],
            ),
            |e| matches!(e, SignError::IdentityMismatch { .. }),
            tonic::Code::PermissionDenied,
        ),
        (
            "no SAN",
            csr_with(&p256(), vec![]),
            |e| matches!(e, SignError::IdentityMismatch { .. }),
            tonic::Code::PermissionDenied,
        ),
        (
            "P-384 key",
            csr_with(&p384, vec![uri("spiffe://cluster.local/ns/shop/sa/cart")]),
            |e| matches!(e, SignError::UnsupportedKey(k) if k.contains("P-384")),
            tonic::Code::InvalidArgument,
        ),
        (
            "RSA key",
            openssl_csr(&["-newkey", "rsa:2048"], "URI:spiffe://cluster.local/ns/shop/sa/cart"),
            |e| matches!(e, SignError::UnsupportedKey(k) if k.contains("RSA")),
            tonic::Code::InvalidArgument,
        ),
        (
            "oversized",
            format!("{good}{}", " ".repeat(MAX_CSR_PEM_LEN)),
            |e| matches!(e, SignError::TooLarge { .. }),
            tonic::Code::InvalidArgument,
        ),
        (
            "garbage",
            "hello".into(),
            |e| matches!(e, SignError::MalformedPem(_)),
            tonic::Code::InvalidArgument,
        ),
        (
            "certificate instead of request",
            ca.trust_bundle_pem()[0].clone(),
            |e| matches!(e, SignError::MalformedPem(_)),
            tonic::Code::InvalidArgument,
        ),
        (
            "garbage inside the PEM",
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE REQUEST-----\n"
                .into(),
            |e| matches!(e, SignError::MalformedCsr(_)),
            tonic::Code::InvalidArgument,
        ),
    ];
    for (what, csr, expected, code) in cases {
        let err = ca.sign(&csr, &cart, None).expect_err(what);
        assert!(expected(&err), "{what}: wrong error {err:?}");
        assert_eq!(err.code(), code, "{what}");
    }

    let foreign = SpiffeId::new("prod.example", "shop", "cart").unwrap();
    let err = ca.sign(&csr_for(&foreign), &foreign, None).unwrap_err();
    assert!(matches!(err, SignError::ForeignTrustDomain { .. }), "{err:?}");
    // The untouched request is still fine: the refusals above are about the requests.
    ca.sign(&good, &cart, None).unwrap();
    // An openssl-made P-256 request is accepted too.
    ca.sign(
        &openssl_csr(
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "URI:spiffe://cluster.local/ns/shop/sa/cart",
        ),
        &cart,
        None,
    )
    .unwrap();
}

/// A DER length (definite form).
fn der_len(len: usize) -> Vec<u8> {
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => vec![short],
        _ => {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            let mut out = vec![0x80 | u8::try_from(bytes.len() - skip).unwrap()];
            out.extend(&bytes[skip..]);
            out
        }
    }
}

/// The whole TLV at the start of `der`.
fn first_tlv(der: &[u8]) -> &[u8] {
    let (header, len) = match der[1] {
        short @ 0..=0x7f => (2, usize::from(short)),
        long => {
            let n = usize::from(long & 0x7f);
            (2 + n, der[2..2 + n].iter().fold(0, |len, &b| len << 8 | usize::from(b)))
        }
    };
    &der[..header + len]
}

/// A request around `info`, signed (ECDSA P-256 with SHA-256) with `key`.
fn signed_request(key: &KeyPair, info: &[u8]) -> String {
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let signer =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der(), &rng).unwrap();
    let signature = signer.sign(&rng, info).unwrap();
    let mut body = info.to_vec();
    body.extend([0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
    body.push(0x03);
    body.extend(der_len(signature.as_ref().len() + 1));
    body.push(0);
    body.extend(signature.as_ref());
    let mut der = vec![0x30];
    der.extend(der_len(body.len()));
    der.extend(body);
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

/// Found by the `ca_csr` fuzz target: a request whose key is tagged as something other
/// than a SEQUENCE is read anyway by x509-parser, and its signature verifies; the CA
/// used to pass those bytes on to be parsed again when certifying. It now certifies the
/// key only in its one DER form, and refuses any other encoding.
#[tokio::test]
async fn a_request_whose_key_is_not_der_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = root_ca(dir.path(), CaConfig::default()).await;
    let cart = id("shop", "cart");
    let key = p256();
    let good = csr_for_key(&key, &cart);
    let outer = pem::parse(&good).unwrap().contents().to_vec();
    // The request is SEQUENCE { info, algorithm, signature }: info follows the header.
    let header = if outer[1] < 0x80 { 2 } else { 2 + usize::from(outer[1] & 0x7f) };
    let info = first_tlv(&outer[header..]).to_vec();
    // Re-signed as is, the request is still fine: the refusal below is about the tag.
    ca.sign(&signed_request(&key, &info), &cart, None).expect("the re-signed request");

    let mut bad = info.clone();
    let at = bad.windows(4).position(|w| w == [0x30, 0x59, 0x30, 0x13]).expect("the P-256 key");
    bad[at] = 0x70;
    let err = ca.sign(&signed_request(&key, &bad), &cart, None).unwrap_err();
    assert!(matches!(&err, SignError::MalformedCsr(m) if m.contains("public key")), "{err:?}");
}

/// A CA service on 127.0.0.1:0 where `node-a` (token `token-a`) hosts shop/cart and
/// `node-b` (token `token-b`) hosts nothing.
async fn serve(dir: &Path) -> (CertificatesService, CertificatesClient<tonic::transport::Channel>) {
    let ca = Arc::new(root_ca(&dir.join("ca"), CaConfig::default()).await);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "token-a node-a\ntoken-b node-b\n").unwrap();
    let service = CertificatesService::new(
        ca,
        Arc::new(TokenFileAuthenticator::new(tokens)),
        Arc::new(StaticAuthorizer::new().allow("node-a", "shop", "cart")),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = service.clone().into_server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(server, tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    let client = CertificatesClient::connect(format!("http://{addr}")).await.unwrap();
    (service, client)
}

fn sign_request(
    token: Option<&str>,
    node: &str,
    ns: &str,
    sa: &str,
    csr_pem: String,
) -> tonic::Request<SignRequest> {
    let mut request = tonic::Request::new(SignRequest {
        csr_pem,
        namespace: ns.into(),
        service_account: sa.into(),
        ttl_seconds: 0,
        node: node.into(),
    });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test]
async fn service_refuses_callers_without_a_valid_token() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut client) = serve(dir.path()).await;
    let csr = csr_for(&id("shop", "cart"));
    for token in [None, Some("wrong"), Some("")] {
        let status =
            client.sign(sign_request(token, "node-a", "shop", "cart", csr.clone())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}: {status:?}");
    }
    let status = client.trust_bundle(TrustBundleRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(service.counts(), SignCounts { issued: 0, refused: 3 });
}

#[tokio::test]
async fn service_refuses_identities_the_node_may_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut client) = serve(dir.path()).await;
    let cases = [
        // node-b is authenticated but does not host shop/cart.
        (Some("token-b"), "node-b", "shop", "cart", tonic::Code::PermissionDenied),
        // node-b's token cannot be used to speak for node-a.
        (Some("token-b"), "node-a", "shop", "cart", tonic::Code::PermissionDenied),
        // node-a asks for a workload it does not host.
        (Some("token-a"), "node-a", "shop", "payments", tonic::Code::PermissionDenied),
        // Not a valid identity at all.
        (Some("token-a"), "node-a", "shop", "../cart", tonic::Code::InvalidArgument),
    ];
    for (token, node, ns, sa, code) in cases {
        let csr = csr_for(&id(ns, sa.trim_start_matches("../")));
        let status = client.sign(sign_request(token, node, ns, sa, csr)).await.unwrap_err();
        assert_eq!(status.code(), code, "{node} {ns}/{sa}: {status:?}");
    }
    // Authorized identity, but the CSR names another one.
    let csr = csr_for(&id("shop", "payments"));
    let status = client.sign(sign_request(Some("token-a"), "node-a", "shop", "cart", csr)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let csr = tamper(&csr_for(&id("shop", "cart")));
    let status = client.sign(sign_request(Some("token-a"), "node-a", "shop", "cart", csr)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(service.counts(), SignCounts { issued: 0, refused: 6 });
}

#[tokio::test]
async fn service_signs_for_an_authorized_node() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut client) = serve(dir.path()).await;
    let csr = csr_for(&id("shop", "cart"));
    let mut request = sign_request(Some("token-a"), "node-a", "shop", "cart", csr);
    request.get_mut().ttl_seconds = 600;
    let response = client.sign(request).await.unwrap().into_inner();

    assert_eq!(response.cert_chain_pem.len(), 1);
    let (ok, text) = openssl(&["x509", "-noout", "-ext", "subjectAltName"], &response.cert_chain_pem[0]);
    assert!(ok && text.contains("URI:spiffe://cluster.local/ns/shop/sa/cart"), "{text}");
    let (_, not_after) = validity(&response.cert_chain_pem[0]);
    assert_eq!(UNIX_EPOCH + Duration::from_secs(response.not_after as u64), not_after);
    assert_near(not_after, SystemTime::now() + Duration::from_secs(600), "notAfter");

    let mut bundle_request = tonic::Request::new(TrustBundleRequest {});
    bundle_request.metadata_mut().insert("authorization", "bearer token-b".parse().unwrap());
    let bundle = client.trust_bundle(bundle_request).await.unwrap().into_inner();
    assert_eq!(bundle.trust_domain, "cluster.local");
    assert_eq!(bundle.roots_pem, response.trust_bundle_pem);
    let root = write(dir.path(), "root.pem", &bundle.roots_pem.concat());
    let (ok, text) = openssl(&["verify", "-CAfile", &root], &response.cert_chain_pem[0]);
    assert!(ok, "{text}");
    assert_eq!(service.counts(), SignCounts { issued: 1, refused: 0 });
}
