//! End to end: workload A on host `client` calls service `api` on host `server`
//! through both agents. The client agent carries the connection in the mTLS tunnel
//! with A's SPIFFE identity; the server agent checks it against the service's
//! authorization rules and connects to the local workload. Nothing crosses the wire
//! in plaintext.

use std::{sync::Arc, time::Duration};

use mesh_tests::{
    Agent, Host, MeshLab,
    agent::message,
    attacker::AnyServer,
    capture::{Capture, contains},
    eventually, servers,
};

const VIP: &str = "10.96.0.40";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

fn registry(allowed: &str) -> String {
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      authorization: [{{principals: [\"{allowed}\"]}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: echo
    namespace: shop
    vips: [10.96.0.41]
    ports: [{{port: 7000, protocol: tcp}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
"
    )
}

/// The lab with `api` (HTTP on 8080) and `echo` (TCP on 7000) served on `server`.
struct Mesh {
    lab: MeshLab,
    _api: servers::Server,
    _echo: servers::Server,
}

impl std::ops::Deref for Mesh {
    type Target = MeshLab;
    fn deref(&self) -> &MeshLab {
        &self.lab
    }
}

impl Mesh {
    fn new(mode: &str) -> Self {
        Self::with_agent_args(mode, &[])
    }

    fn with_agent_args(mode: &str, extra: &[&str]) -> Self {
        let lab =
            extra.iter().fold(MeshLab::builder(mode, registry(FRONTEND)), |b, a| b.agent_arg(*a)).start();
        let api = servers::http(lab.host("server"), 8080, "api").unwrap();
        let echo = servers::echo(lab.host("server"), 7000).unwrap();
        Self { lab, _api: api, _echo: echo }
    }

    fn curl(&self, path: &str) -> Result<String, String> {
        let out = self
            .workload_command("curl")
            .args(["-fsS", "--max-time", "5", &format!("http://{VIP}{path}")])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
    }
}

fn meshed_call_carries_identity_over_mtls_and_policy_is_enforced(mode: &str) {
    let m = Mesh::new(mode);
    let marker = "/plaintext-marker-7f3a9c";
    let cap = Capture::start(m.host("server")).expect("capture");
    let body = m.curl(marker).unwrap_or_else(|e| {
        panic!(
            "meshed call failed: {e}\nclient agent:\n{}\nserver agent:\n{}",
            m.client.log_text(),
            m.server.log_text()
        )
    });
    let wire = cap.stop();
    assert!(body.starts_with("server=api HTTP/1.1 GET /plaintext-marker-7f3a9c"), "{body}");

    // The client agent proxied the request through the tunnel as frontend, to the api
    // identity (an HTTP access record: the L7 proxy handles HTTP per request).
    let out = m.client.wait_log("outbound access record", |v| {
        v["kind"] == "http" && v["direction"] == "outbound" && v["path"] == marker
    });
    assert_eq!(out["source_identity"], FRONTEND);
    assert_eq!(out["destination_identity"], "spiffe://cluster.local/ns/shop/sa/api");
    assert_eq!(out["destination_service"], "shop/api");
    assert_eq!(out["protocol"], "http1");
    assert_eq!(out["response_code"], 200);
    // The server agent saw the caller's proven identity.
    let inbound = m.server.wait_log("inbound access record", |v| {
        v["kind"] == "http" && v["direction"] == "inbound" && v["path"] == marker
    });
    assert_eq!(inbound["source_identity"], FRONTEND);
    assert_eq!(inbound["response_code"], 200);
    assert_eq!(inbound["destination_endpoint"], "10.77.0.3:8080");

    // On the wire between the hosts: TLS to the tunnel port, and no plaintext.
    assert!(
        contains(&wire, &15008u16.to_be_bytes()),
        "capture saw no traffic to port 15008 ({} bytes)",
        wire.len()
    );
    assert!(!contains(&wire, marker.as_bytes()), "the request path crossed the wire in plaintext");
    assert!(!contains(&wire, b"server=api"), "the response crossed the wire in plaintext");

    // Policy change: only `payments` may call api now; frontend is refused within 5 s.
    m.set_registry(&registry("spiffe://cluster.local/ns/shop/sa/payments"));
    eventually(Duration::from_secs(5), "frontend denied after the policy change", || m.curl("/again").err());
    // The pooled tunnel stream admitted under the old policy is re-checked per request.
    let denied = m.server.wait_log("denial", |v| message(v) == "request denied by authorization policy");
    assert_eq!(denied["peer_identity"], FRONTEND);
    m.client.wait_log("client side refusal", |v| {
        v["kind"] == "http" && v["direction"] == "outbound" && v["response_code"] == 403
    });
}

fn traffic_crosses_certificate_rotations_without_failures(mode: &str) {
    // 30 s certificates renewed at 80%: a new certificate every ~24 s on both agents.
    let m = Mesh::with_agent_args(mode, &["--cert-ttl", "30s"]);
    let cert = |a: &Agent, host: &str| -> u64 {
        let (_, body) = m.host(host).http("GET", a.admin, "/config_dump").unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["certificates"][0]["not_after"]
            .as_u64()
            .unwrap()
    };
    let first = (cert(&m.client, "client"), cert(&m.server, "server"));

    // A long-lived TCP connection through the tunnel: one echoed line a second for 65 s.
    let long = m
        .workload_command("bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/10.96.0.41/7000 || exit 2; for i in $(seq 65); do echo ping$i >&3; \
             read -t 5 line <&3 || exit 3; [ \"$line\" = ping$i ] || exit 4; sleep 1; done",
        ])
        .spawn()
        .expect("long-lived client");
    let long = std::sync::Mutex::new(long);
    // Meanwhile, a request every 500 ms on new connections.
    let mut requests = 0;
    let mut failures = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(66) {
        requests += 1;
        if let Err(e) = m.curl("/rotation") {
            failures.push(e);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = eventually(Duration::from_secs(15), "long-lived client finishes", || {
        long.lock().unwrap().try_wait().ok().flatten()
    });
    let last = (cert(&m.client, "client"), cert(&m.server, "server"));
    assert!(
        last.0 >= first.0 + 40 && last.1 >= first.1 + 40,
        "both agents rotated at least twice: {first:?} -> {last:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed across rotations: {failures:?}",
        failures.len()
    );
    assert!(status.success(), "the long-lived connection survived every rotation: {status}");
}

/// A client certificate for `uri` valid from `from` to `until`, signed by `issuer`;
/// returns the chain (leaf first) and the key.
fn leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    uri: &str,
    (from, until): (i32, i32),
) -> (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let cert = params.signed_by(&key, issuer).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (vec![cert.der().clone()], der)
}

/// Connects from `host` to the tunnel port presenting `chain`, sends the HTTP/2
/// preface and reads: `Ok(n)` bytes of the server's answer, or the error (a TLS
/// alert) that ended the connection.
fn present(
    host: &Host,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<usize, String> {
    use std::io::{Read, Write};
    host.run_in(move || {
        // Any server: these tests are about what the *server* agent refuses.
        let verifier = AnyServer::new();
        let mut config = rustls::ClientConfig::builder_with_provider(verifier.provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("agent").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = std::net::TcpStream::connect("10.77.0.3:15008").map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf) {
            Ok(0) => Err("closed without answering".to_owned()),
            Ok(n) => Ok(n),
            Err(e) => Err(e.to_string()),
        }
    })
    .unwrap()
}

/// The server agent's tunnel port refuses, at the TLS layer, clients whose
/// certificate comes from another CA, names another trust domain, or has expired;
/// the same client with a valid certificate of the mesh's CA is answered.
fn certificates_of_another_ca_trust_domain_or_expired_are_refused(mode: &str) {
    let m = Mesh::new(mode);
    let ca = m.dir.path().join("ca");
    let ca_cert = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("ca-key.pem")).unwrap()).unwrap();
    let mesh_ca = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = rcgen::Issuer::new(other, rcgen::KeyPair::generate().unwrap());
    let client = m.host("client");
    // The current year, near enough for validity windows of whole years.
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let now = 1970 + (secs / 31_556_952) as i32;

    let (chain, key) = leaf(&mesh_ca, FRONTEND, (now - 1, now + 2));
    let answered = present(client, chain, key);
    assert!(answered.is_ok(), "a valid mesh certificate must be answered: {answered:?}");

    let cases = [
        ("another CA", leaf(&other_ca, FRONTEND, (now - 1, now + 2))),
        (
            "another trust domain",
            leaf(&mesh_ca, "spiffe://evil.example/ns/shop/sa/frontend", (now - 1, now + 2)),
        ),
        ("an expired certificate", leaf(&mesh_ca, FRONTEND, (now - 3, now - 1))),
    ];
    for (what, (chain, key)) in cases {
        let refused = present(client, chain, key);
        assert!(refused.is_err(), "{what} was answered: {refused:?}");
        let e = refused.unwrap_err();
        assert!(
            e.contains("alert") || e.contains("reset") || e.contains("closed"),
            "{what}: expected a TLS refusal, got {e}"
        );
    }
    // The agent logged why (no silent drops).
    eventually(Duration::from_secs(5), "refusals logged", || {
        let n = m.server.find_all(|v| v["error"].as_str().is_some_and(|e| e.contains("ertificate"))).len();
        (n >= 3).then_some(())
    });
}

mesh_tests::both_modes!(
    meshed_call_carries_identity_over_mtls_and_policy_is_enforced,
    traffic_crosses_certificate_rotations_without_failures,
    certificates_of_another_ca_trust_domain_or_expired_are_refused,
);
