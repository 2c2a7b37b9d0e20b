//! Agent-to-agent mTLS as the data path relies on it: handshakes between two
//! agents' configurations over in-memory pipes, and renewal under paused time.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::test_ca::{TestCa, TestSigner};
use super::*;

type Handshake =
    (std::io::Result<client::TlsStream<DuplexStream>>, std::io::Result<server::TlsStream<DuplexStream>>);

/// Runs both sides of a handshake over an in-memory pipe.
async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Handshake {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    tokio::join!(TlsConnector::from(client).connect(name, c), TlsAcceptor::from(server).accept(s))
}

/// The client refused the server; returns the client's error.
fn refused_by_client(result: Handshake) -> std::io::Error {
    match result {
        (Err(client), _) => client,
        (Ok(_), _) => panic!("the client accepted the server"),
    }
}

/// The server refused the client; returns the server's error. In TLS 1.3 the client
/// finishes before the server has checked its certificate, so the client may have
/// "connected": it must then find the connection dead on first read.
async fn refused_by_server(result: Handshake) -> std::io::Error {
    match result {
        (_, Ok(_)) => panic!("the server accepted the client"),
        (Err(_), Err(server)) => server,
        (Ok(mut client), Err(server)) => {
            let mut buf = [0u8; 1];
            let read = client.read(&mut buf).await;
            assert!(!matches!(read, Ok(n) if n > 0), "the refused client could read data");
            server
        }
    }
}

/// Whether a chain failed to reach the bundle: an unknown issuer, or (when a rogue CA
/// copies a trusted CA's name) a signature that the trusted key did not make.
fn not_chained(err: &rustls::CertificateError) -> bool {
    matches!(err, rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature)
}

/// The chain-verification failure behind a refused handshake, as rustls names it.
fn certificate_error(err: &std::io::Error) -> rustls::CertificateError {
    match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(e)) => e.clone(),
        other => panic!("not a certificate error: {other:?} ({err})"),
    }
}

async fn round_trip(
    client: &mut client::TlsStream<DuplexStream>,
    server: &mut server::TlsStream<DuplexStream>,
) {
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    server.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

fn tls(bundle: Arc<TrustBundle>) -> TlsConfigs {
    TlsConfigs::new(bundle, Arc::new(TokioClock::new()))
}

#[tokio::test]
async fn mutual_tls_shows_each_side_the_others_identity() {
    let ca = TestCa::new("cluster.local");
    let (cart, payments) = (ca.id("cart"), ca.id("payments"));
    let tls = tls(ca.bundle());
    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(ca.fresh(&payments)).unwrap();

    let (c, s) = handshake(client, server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(peer_identity_of_stream(&s).unwrap(), cart);
    assert_eq!(server_identity_of_stream(&c).unwrap(), payments);
    let conn = c.get_ref().1;
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        conn.negotiated_cipher_suite().map(|suite| suite.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    round_trip(&mut c, &mut s).await;
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = TestCa::new("cluster.local");
    let tls = tls(ca.bundle());
    // The client wants payments; the server proves it is cart.
    let client = tls.client_config(ca.fresh(&ca.id("frontend")), ca.id("payments")).unwrap();
    let server = tls.server_config(ca.fresh(&ca.id("cart"))).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    match identity_error_of(&err) {
        Some(IdentityError::UnexpectedPeer { expected, found }) => {
            assert_eq!(expected, "spiffe://cluster.local/ns/shop/sa/payments");
            assert_eq!(found, "spiffe://cluster.local/ns/shop/sa/cart");
        }
        other => panic!("{other:?} ({err})"),
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = TestCa::new("cluster.local");
    let tls = tls(ca.bundle());
    let anonymous = WorkloadIdentity::new(ca.id("cart"));
    let client = tls.client_config(anonymous, ca.id("payments")).unwrap();
    let server = tls.server_config(ca.fresh(&ca.id("payments"))).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(
        matches!(err.get_ref().and_then(|e| e.downcast_ref()), Some(rustls::Error::NoCertificatesPresented)),
        "{err}"
    );
}

#[tokio::test]
async fn certificates_of_another_ca_or_trust_domain_are_refused() {
    let ca = TestCa::new("cluster.local");
    let (cart, payments) = (ca.id("cart"), ca.id("payments"));
    let tls = tls(ca.bundle());
    // A CA nobody trusts, with the trusted CA's name, issuing identities that look like ours.
    let rogue = TestCa::new("cluster.local");

    let client = tls.client_config(rogue.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(ca.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(not_chained(&certificate_error(&err)), "{err}");

    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(rogue.fresh(&payments)).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(not_chained(&certificate_error(&err)), "{err}");

    // Even with the other domain's root in the bundle (a federation mistake), its
    // identities are not accepted as ours.
    let other = TestCa::new("other.example");
    let both = TrustBundle::new("cluster.local", vec![ca.root(), other.root()]).unwrap();
    let tls = TlsConfigs::new(both, Arc::new(TokioClock::new()));
    let client = tls.client_config(other.fresh(&other.id("cart")), payments.clone()).unwrap();
    let server = tls.server_config(ca.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(matches!(identity_error_of(&err), Some(IdentityError::ForeignTrustDomain { .. })), "{err}");

    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(other.fresh(&other.id("payments"))).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(
        matches!(identity_error_of(&err), Some(IdentityError::UnexpectedPeer { found, .. }) if found.contains("other.example")),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificates_are_refused() {
    let ca = TestCa::new("cluster.local");
    let (cart, payments) = (ca.id("cart"), ca.id("payments"));
    let tls = tls(ca.bundle());
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let expired = |id| ca.identity(id, now - 2 * hour, now - hour);

    let client = tls.client_config(expired(&cart), payments.clone()).unwrap();
    let server = tls.server_config(ca.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(matches!(certificate_error(&err), rustls::CertificateError::ExpiredContext { .. }), "{err}");

    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(expired(&payments)).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(matches!(certificate_error(&err), rustls::CertificateError::ExpiredContext { .. }), "{err}");

    // The same certificates are fine at a time when they were valid: the verifiers
    // follow the injected clock.
    let past = TlsConfigs::new(ca.bundle(), Arc::new(TokioClock::starting_at(now - hour - hour / 2)));
    let client = past.client_config(expired(&cart), payments.clone()).unwrap();
    let server = past.server_config(expired(&payments)).unwrap();
    let (c, s) = handshake(client, server).await;
    assert!(c.is_ok() && s.is_ok());
}

#[tokio::test]
async fn a_trust_bundle_update_admits_a_new_ca_without_new_configs() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let bundle = old.bundle();
    let tls = tls(bundle.clone());
    let (cart, payments) = (new.id("cart"), new.id("payments"));
    // Both workloads already hold certificates of the new CA.
    let client = tls.client_config(new.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(new.fresh(&payments)).unwrap();
    let err = refused_by_client(handshake(client.clone(), server.clone()).await);
    assert!(not_chained(&certificate_error(&err)), "{err}");

    // Refused updates leave the bundle as it was.
    assert!(bundle.replace(vec![]).is_err());
    assert!(bundle.replace_pem(&["not a certificate".into()]).is_err());
    assert_eq!(bundle.roots(), vec![old.root()]);

    bundle.replace(vec![old.root(), new.root()]).unwrap();
    let (c, s) = handshake(client, server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(peer_identity_of_stream(&s).unwrap(), cart);
    round_trip(&mut c, &mut s).await;
}

#[tokio::test]
async fn a_remembered_chain_is_still_refused_once_expired() {
    let ca = TestCa::new("cluster.local");
    let (cart, payments) = (ca.id("cart"), ca.id("payments"));
    let bundle = ca.bundle();
    let (cart_id, payments_id) = (ca.fresh(&cart), ca.fresh(&payments));
    let now = tls(bundle.clone());
    for _ in 0..2 {
        let client = now.client_config(cart_id.clone(), payments.clone()).unwrap();
        let server = now.server_config(payments_id.clone()).unwrap();
        let (c, s) = handshake(client, server).await;
        assert!(c.is_ok() && s.is_ok());
    }
    let snapshot = bundle.snapshot();
    assert_eq!((snapshot.client_verified.len(), snapshot.server_verified.len()), (1, 1));

    // Two hours on, the same chains (remembered by both sides) have expired; their
    // peers hold certificates valid then.
    let hour = Duration::from_secs(3600);
    let at = SystemTime::now() + 2 * hour;
    let later = TlsConfigs::new(bundle, Arc::new(TokioClock::starting_at(at)));
    let valid_then = |id| ca.identity(id, at - hour, at + hour);
    let client = later.client_config(cart_id.clone(), payments.clone()).unwrap();
    let server = later.server_config(valid_then(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(matches!(certificate_error(&err), rustls::CertificateError::ExpiredContext { .. }), "{err}");
    let client = later.client_config(valid_then(&cart), payments.clone()).unwrap();
    let server = later.server_config(payments_id).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(matches!(certificate_error(&err), rustls::CertificateError::ExpiredContext { .. }), "{err}");
}

#[tokio::test]
async fn a_remembered_chain_is_refused_once_its_root_is_removed() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let bundle = old.bundle();
    let tls = tls(bundle.clone());
    let (cart, payments) = (old.id("cart"), old.id("payments"));
    let client = tls.client_config(old.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(old.fresh(&payments)).unwrap();
    let (c, s) = handshake(client.clone(), server.clone()).await;
    assert!(c.is_ok() && s.is_ok());

    // The rotation is over: only the new root is trusted, and the old CA's chains,
    // verified a moment ago, are not.
    bundle.replace(vec![new.root()]).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(not_chained(&certificate_error(&err)), "{err}");
    let client = tls.client_config(old.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(new.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(not_chained(&certificate_error(&err)), "{err}");
}

#[tokio::test]
async fn a_forged_certificate_for_a_remembered_identity_is_verified_in_full() {
    let ca = TestCa::new("cluster.local");
    let (cart, payments) = (ca.id("cart"), ca.id("payments"));
    let tls = tls(ca.bundle());
    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(ca.fresh(&payments)).unwrap();
    let (c, s) = handshake(client, server.clone()).await;
    assert!(c.is_ok() && s.is_ok());

    // A CA with the trusted CA's name issues the same identities: other bytes, so
    // the chain is walked and leads nowhere.
    let rogue = TestCa::new("cluster.local");
    let client = tls.client_config(rogue.fresh(&cart), payments.clone()).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(not_chained(&certificate_error(&err)), "{err}");
    let client = tls.client_config(ca.fresh(&cart), payments.clone()).unwrap();
    let server = tls.server_config(rogue.fresh(&payments)).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(not_chained(&certificate_error(&err)), "{err}");
}

#[test]
fn spiffe_id_comes_from_exactly_one_uri_san() {
    let ca = TestCa::new("cluster.local");
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_pem(&ca.id("cart")).unwrap();
    let now = SystemTime::now();
    let one = ca.issue(&csr, "spiffe://cluster.local/ns/shop/sa/cart", now, now + Duration::from_secs(60));
    let cert = &trust::parse_pem_certs(&[one]).unwrap()[0];
    assert_eq!(spiffe_id_from_cert(cert).unwrap(), ca.id("cart"));

    let not_spiffe = ca.issue(&csr, "https://cart.shop", now, now + Duration::from_secs(60));
    let cert = &trust::parse_pem_certs(&[not_spiffe]).unwrap()[0];
    assert!(matches!(spiffe_id_from_cert(cert), Err(IdentityError::NotSpiffe(_))));
    assert!(spiffe_id_from_cert(&ca.root()).is_err(), "a certificate without SANs has no identity");
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn manager(signer: &Arc<TestSigner>, clock: &Arc<TokioClock>) -> CertManager {
    CertManager::new(signer.clone(), signer.ca.bundle(), clock.clone(), RenewalConfig::default()).unwrap()
}

fn within_a_second(actual: Duration, expected: Duration) -> bool {
    actual.abs_diff(expected) <= Duration::from_secs(1)
}

#[tokio::test(start_paused = true)]
async fn renews_at_80_percent_and_established_connections_keep_working() {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), DAY);
    let manager = manager(&signer, &clock);
    let (cart, payments) = (signer.ca.id("cart"), signer.ca.id("payments"));
    let client_identity = manager.identity(&cart).unwrap();
    let server_identity = manager.identity(&payments).unwrap();
    let first = client_identity.ready().await;
    server_identity.ready().await;
    let start = first.not_before();

    let client_config = manager.tls().client_config(client_identity.clone(), payments.clone()).unwrap();
    let server_config = manager.tls().server_config(server_identity.clone()).unwrap();
    let (c, s) = handshake(client_config.clone(), server_config.clone()).await;
    let (mut old_c, mut old_s) = (c.unwrap(), s.unwrap());

    let mut updates = client_identity.updates();
    updates.borrow_and_update();
    updates.changed().await.unwrap();
    let renewed_after = clock.now().duration_since(start).unwrap();
    assert!(within_a_second(renewed_after, DAY.mul_f64(0.8)), "renewed after {renewed_after:?}");
    let second = client_identity.current().unwrap();
    assert_ne!(second.chain(), first.chain());
    assert!(within_a_second(clock.now().duration_since(second.not_before()).unwrap(), Duration::ZERO));

    // The connection made with the old certificates is untouched.
    round_trip(&mut old_c, &mut old_s).await;
    // New handshakes (same configs) present the new certificate.
    let (c, s) = handshake(client_config, server_config).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(s.get_ref().1.peer_certificates().unwrap()[0], second.chain()[0]);
    round_trip(&mut c, &mut s).await;

    // And again at 80% of the new certificate's life.
    updates.changed().await.unwrap();
    let renewed_after = clock.now().duration_since(second.not_before()).unwrap();
    assert!(within_a_second(renewed_after, DAY.mul_f64(0.8)), "renewed after {renewed_after:?}");
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_back_off_while_the_current_certificate_stays() {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), DAY);
    let manager = manager(&signer, &clock);
    let identity = manager.identity(&signer.ca.id("cart")).unwrap();
    let first = identity.ready().await;

    signer.failures.store(4, Ordering::SeqCst);
    let calls = signer.wait_for_calls(5).await;
    // Retries after a doubling delay, jittered into its upper half: up to 1s, 2s, 4s.
    for (i, pair) in calls[1..].windows(2).enumerate() {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        let ceiling = Duration::from_secs(1 << i);
        assert!(gap >= ceiling / 2 && gap <= ceiling, "retry {i} after {gap:?}");
    }
    assert!(Arc::ptr_eq(&identity.current().unwrap(), &first), "failures must not drop the certificate");

    let calls = signer.wait_for_calls(6).await;
    identity.updates().wait_for(|_| !Arc::ptr_eq(&identity.current().unwrap(), &first)).await.unwrap();
    let issued = identity.current().unwrap().not_before();
    assert!(within_a_second(calls[5].duration_since(issued).unwrap(), Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_not_installed() {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), DAY);
    signer.wrong_identity.store(1, Ordering::SeqCst);
    let manager = manager(&signer, &clock);
    let cart = signer.ca.id("cart");
    let identity = manager.identity(&cart).unwrap();
    signer.wait_for_calls(1).await;
    assert!(identity.current().is_none());
    let cert = identity.ready().await;
    assert_eq!(cert.id(), &cart);
    assert_eq!(signer.calls.borrow().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn removed_identities_are_no_longer_renewed() {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), DAY);
    let manager = manager(&signer, &clock);
    let cart = signer.ca.id("cart");
    let identity = manager.identity(&cart).unwrap();
    identity.ready().await;
    assert!(Arc::ptr_eq(&manager.identity(&cart).unwrap(), &identity), "one task per identity");
    assert!(manager.remove(&cart));
    assert!(manager.identities().is_empty());
    tokio::time::sleep(3 * DAY).await;
    assert_eq!(signer.calls.borrow().len(), 1);
    assert!(identity.current().is_some(), "the last certificate stays with its holders");

    let foreign = SpiffeId::new("other.example", "shop", "cart").unwrap();
    assert!(matches!(manager.identity(&foreign), Err(IdentityError::ForeignTrustDomain { .. })));
}

#[tokio::test(start_paused = true)]
async fn the_ca_trust_bundle_in_a_sign_answer_replaces_the_local_one() {
    let clock = Arc::new(TokioClock::new());
    let signer = TestSigner::new(TestCa::new("cluster.local"), clock.clone(), DAY);
    let stale = TestCa::new("cluster.local").bundle();
    let manager =
        CertManager::new(signer.clone(), stale.clone(), clock.clone(), RenewalConfig::default()).unwrap();
    manager.identity(&signer.ca.id("cart")).unwrap().ready().await;
    assert_eq!(stale.roots(), vec![signer.ca.root()]);
}

/// Federation: a federated trust domain's workloads are accepted on their own
/// domain's roots, and only there; a domain that leaves the federation is refused
/// again at the next handshake.
#[tokio::test]
async fn federated_trust_domains_are_checked_against_their_own_roots_only() {
    let local = TestCa::new("cluster.local");
    let east = TestCa::new("east.example");
    let bundle = local.bundle();
    assert!(bundle.set_federated([("east.example", &[east.root_pem()][..])]).is_empty());
    assert_eq!(bundle.federated_domains(), vec!["east.example".to_owned()]);
    let tls = tls(bundle.clone());
    let (cart, payments) = (local.id("cart"), local.id("payments"));
    let remote_cart = east.id("cart");

    // East's workload calls ours: accepted, and seen as east's identity.
    let client = tls.client_config(east.fresh(&remote_cart), payments.clone()).unwrap();
    let server = tls.server_config(local.fresh(&payments)).unwrap();
    let (c, s) = handshake(client, server).await;
    let (_c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(peer_identity(s.get_ref().1).unwrap(), remote_cart);

    // Ours calls east's: the server is checked against east's roots.
    let remote_payments = east.id("payments");
    let client = tls.client_config(local.fresh(&cart), remote_payments.clone()).unwrap();
    let server = tls.server_config(east.fresh(&remote_payments)).unwrap();
    let (c, s) = handshake(client, server).await;
    assert!(c.is_ok() && s.is_ok());

    // East's CA cannot vouch for our trust domain, nor ours for east's.
    let forged_local = east.fresh(&cart);
    let client = tls.client_config(forged_local, payments.clone()).unwrap();
    let server = tls.server_config(local.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(not_chained(&certificate_error(&err)), "{err}");
    let forged_remote = local.fresh(&remote_cart);
    let client = tls.client_config(forged_remote, payments.clone()).unwrap();
    let server = tls.server_config(local.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(not_chained(&certificate_error(&err)), "{err}");
    let client = tls.client_config(local.fresh(&cart), remote_payments.clone()).unwrap();
    let server = tls.server_config(local.fresh(&remote_payments)).unwrap();
    let err = refused_by_client(handshake(client, server).await);
    assert!(not_chained(&certificate_error(&err)), "{err}");

    // Bad input is reported and changes nothing for the other domains.
    let problems = bundle.set_federated([
        ("east.example", &[east.root_pem()][..]),
        ("cluster.local", &[east.root_pem()][..]),
        ("west.example", &["not a certificate".to_owned()][..]),
    ]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(bundle.federated_domains(), vec!["east.example".to_owned()]);

    // East leaves the federation: its workloads are refused again.
    assert!(bundle.set_federated([]).is_empty());
    let client = tls.client_config(east.fresh(&remote_cart), payments.clone()).unwrap();
    let server = tls.server_config(local.fresh(&payments)).unwrap();
    let err = refused_by_server(handshake(client, server).await).await;
    assert!(matches!(identity_error_of(&err), Some(IdentityError::ForeignTrustDomain { .. })), "{err}");
}
