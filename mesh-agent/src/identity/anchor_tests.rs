//! The trust anchor's rules, as an attacker would try them: roots the anchor does
//! not vouch for, cross-signatures by the wrong key or out of date, another trust
//! domain, and a control plane presenting a certificate of another CA.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::*;

/// A root CA for the tests (its key kept as PEM, so it can sign any number of times).
struct TestRoot {
    params: CertificateParams,
    key_pem: String,
    pem: String,
}

impl TestRoot {
    fn new(name: &str, trust_domain: &str) -> TestRoot {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into().unwrap())];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let pem = params.self_signed(&key).unwrap().pem();
        TestRoot { params, key_pem: key.serialize_pem(), pem }
    }

    fn key(&self) -> KeyPair {
        KeyPair::from_pem(&self.key_pem).unwrap()
    }

    fn issuer(&self) -> Issuer<'static, KeyPair> {
        Issuer::new(self.params.clone(), self.key())
    }

    /// This root's subject and key, certified by `by` (a rotation's cross-signature).
    fn cross_signed_by(&self, by: &TestRoot) -> String {
        self.params.signed_by(&self.key(), &by.issuer()).unwrap().pem()
    }

    /// A serving certificate for 127.0.0.1 and its key.
    fn serving(&self) -> (CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer()).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        (cert.der().clone(), der)
    }
}

fn anchor_file(dir: &Path, roots: &[&TestRoot]) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, roots.iter().map(|r| r.pem.as_str()).collect::<String>()).unwrap();
    path
}

fn pems(roots: &[&TestRoot]) -> Vec<String> {
    roots.iter().map(|r| r.pem.clone()).collect()
}

const TD: &str = "cluster.local";

#[test]
fn the_anchor_and_roots_cross_signed_by_it_are_accepted_through_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (TestRoot::new("root 1", TD), TestRoot::new("root 2", TD));
    let anchor = TrustAnchor::from_file(&anchor_file(dir.path(), &[&old])).unwrap();
    assert_eq!(anchor.trust_domain().as_deref(), Some(TD));
    assert_eq!(anchor.accept(TD, &pems(&[&old]), &[]).unwrap().len(), 1);

    // Rotation: the new root, vouched for by the old one, beside it.
    let cross = new.cross_signed_by(&old);
    let roots = anchor.accept(TD, &pems(&[&new, &old]), std::slice::from_ref(&cross)).unwrap();
    assert_eq!(roots.len(), 2);
    // The old root retired: the new one was accepted before, so it stands alone now.
    assert_eq!(anchor.accept(TD, &pems(&[&new]), &[]).unwrap().len(), 1);
    assert_eq!(anchor.accepted().len(), 1);
}

#[test]
fn a_chain_of_rotations_is_followed_whatever_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2, r3) =
        (TestRoot::new("root 1", TD), TestRoot::new("root 2", TD), TestRoot::new("root 3", TD));
    let anchor = TrustAnchor::from_file(&anchor_file(dir.path(), &[&r1])).unwrap();
    let cross = [r3.cross_signed_by(&r2), r2.cross_signed_by(&r1)];
    anchor.accept(TD, &pems(&[&r3, &r2, &r1]), &cross).expect("r1 vouches for r2, which vouches for r3");
}

#[test]
fn roots_the_anchor_does_not_vouch_for_are_refused_naming_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let anchor_root = TestRoot::new("root 1", TD);
    let rogue = TestRoot::new("rogue root", TD);
    let path = anchor_file(dir.path(), &[&anchor_root]);
    let anchor = TrustAnchor::from_file(&path).unwrap();
    anchor.accept(TD, &pems(&[&anchor_root]), &[]).unwrap();

    let unvouched = |roots: &[&TestRoot], cross: &[String]| {
        let err = anchor.accept(TD, &pems(roots), cross).unwrap_err();
        assert!(matches!(err, AnchorError::Unvouched { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("rogue root"), "names the root: {text}");
        assert!(text.contains(&format!("--control-plane-ca {}", path.display())), "names the anchor: {text}");
        assert!(text.contains("CN=root 1"), "names the anchor's root: {text}");
    };
    // Planted beside the real root, or alone.
    unvouched(&[&anchor_root, &rogue], &[]);
    unvouched(&[&rogue], &[]);
    // Cross-signed by itself, or by another untrusted root.
    unvouched(&[&rogue], &[rogue.cross_signed_by(&rogue)]);
    let accomplice = TestRoot::new("accomplice", TD);
    unvouched(&[&rogue, &accomplice], &[rogue.cross_signed_by(&accomplice)]);
    // A genuine cross-signature of the anchor's, for a root of the same name but
    // another key.
    let lookalike = TestRoot::new("rogue root", TD);
    let same_name_other_key = TestRoot {
        params: lookalike.params.clone(),
        key_pem: TestRoot::new("x", TD).key_pem,
        pem: String::new(),
    };
    unvouched(&[&lookalike], &[same_name_other_key.cross_signed_by(&anchor_root)]);
    // A cross-signature by the anchor that has expired.
    let mut expired = TestRoot::new("rogue root", TD);
    let valid_params = expired.params.clone();
    expired.params.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
    expired.params.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
    let stale = expired.cross_signed_by(&anchor_root);
    expired.params = valid_params;
    unvouched(&[&expired], &[stale]);

    // Nothing of it was taken.
    assert_eq!(anchor.accepted(), [CertificateDer::from_pem_slice(anchor_root.pem.as_bytes()).unwrap()]);
}

#[test]
fn another_trust_domain_or_an_empty_bundle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = TestRoot::new("root 1", TD);
    let anchor = TrustAnchor::from_file(&anchor_file(dir.path(), &[&root])).unwrap();
    let err = anchor.accept("evil.example", &pems(&[&root]), &[]).unwrap_err();
    assert!(err.to_string().contains("trust domain \"evil.example\" is not \"cluster.local\""), "{err}");
    assert!(matches!(anchor.accept(TD, &[], &[]), Err(AnchorError::Malformed(_))));
    assert!(matches!(anchor.accept(TD, &["garbage".into()], &[]), Err(AnchorError::Malformed(_))));
    assert!(anchor.accepted().is_empty());
}

#[test]
fn the_anchor_file_is_read_again_and_a_broken_one_keeps_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (TestRoot::new("root 1", TD), TestRoot::new("root 2", TD));
    let path = anchor_file(dir.path(), &[&r1]);
    let anchor = TrustAnchor::from_file(&path).unwrap();
    assert!(anchor.accept(TD, &pems(&[&r2]), &[]).is_err());
    // The operator publishes the new root as an anchor (a ConfigMap update).
    anchor_file(dir.path(), &[&r2, &r1]);
    anchor.accept(TD, &pems(&[&r2]), &[]).expect("now an anchor");
    std::fs::write(&path, "not PEM").unwrap();
    anchor.accept(TD, &pems(&[&r2]), &[]).expect("the last good anchors stay");
    assert!(anchor.describe().contains("CN=root 2"), "{}", anchor.describe());
}

#[test]
fn an_unusable_anchor_file_is_an_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.pem");
    let err = TrustAnchor::from_file(&missing).unwrap_err().to_string();
    assert!(err.starts_with(&format!("--control-plane-ca {}", missing.display())), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(TrustAnchor::from_file(&empty).unwrap_err().to_string().contains("holds no certificate"));
    let leaf = dir.path().join("leaf.pem");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(vec!["mesh-control".to_owned()]).unwrap();
    std::fs::write(&leaf, params.signed_by(&key, &TestRoot::new("root", TD).issuer()).unwrap().pem())
        .unwrap();
    assert!(TrustAnchor::from_file(&leaf).unwrap_err().to_string().contains("is not a CA certificate"));
}

#[test]
fn without_an_anchor_the_first_bundle_is_taken_and_later_ones_held_to_it() {
    let (r1, rogue) = (TestRoot::new("root 1", TD), TestRoot::new("rogue root", TD));
    let anchor = TrustAnchor::first_use();
    anchor.accept(TD, &pems(&[&r1]), &[]).expect("taken on first use");
    let err = anchor.accept(TD, &pems(&[&rogue]), &[]).unwrap_err().to_string();
    assert!(
        err.contains("rogue root") && err.contains("taken on first use: O=cluster.local, CN=root 1"),
        "{err}"
    );
}

/// A TLS server presenting `cert` on 127.0.0.1; the client's handshake result.
async fn handshake(
    anchor: &Arc<TrustAnchor>,
    served: (CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>),
) -> Result<(), std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![served.0], served.1)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(anchor.verifier())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.map(|_| ())
}

#[tokio::test]
async fn a_control_plane_with_another_ca_s_certificate_is_refused_naming_the_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let (mesh, other) = (TestRoot::new("mesh root", TD), TestRoot::new("stand-in root", TD));
    let path = anchor_file(dir.path(), &[&mesh]);
    let anchor = TrustAnchor::from_file(&path).unwrap();
    handshake(&anchor, mesh.serving()).await.expect("the mesh CA's certificate verifies");
    let err = handshake(&anchor, other.serving()).await.unwrap_err().to_string();
    assert!(err.contains("does not verify against the trust anchor"), "{err}");
    assert!(err.contains(&format!("--control-plane-ca {}", path.display())), "{err}");
    assert!(err.contains("CN=mesh root"), "{err}");

    // A root the anchor vouched for (a rotation) is trusted for the control plane too.
    let rotated = TestRoot::new("mesh root 2", TD);
    assert!(handshake(&anchor, rotated.serving()).await.is_err());
    anchor.accept(TD, &pems(&[&rotated, &mesh]), &[rotated.cross_signed_by(&mesh)]).unwrap();
    handshake(&anchor, rotated.serving()).await.expect("vouched for through the cross-signature");
}
