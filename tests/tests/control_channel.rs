//! End to end, the control channel as an attacker on the path meets it: agents talk
//! to the control plane over TLS only, so the node's token never crosses the link in
//! clear; a stand-in answering at the control plane's address with another
//! certificate is refused, naming the anchor the agent expected; a trust bundle
//! with a root the anchor does not vouch for is refused and logged; and rotating
//! the CA's root (the new one cross-signed by the old) keeps mutual TLS working for
//! agents still anchored on the old root. Each in both interception modes.
//!
//! Lab: the control plane on `control` (10.77.0.1); workload A and its agent on
//! `client` (10.77.0.2); the `api` server and its agent on `server` (10.77.0.3).

use std::{path::Path, sync::atomic::Ordering, time::Duration};

use mesh_tests::{
    Agent, Cgroup, Control, Lab,
    agent::message,
    bins,
    capture::{capture, contains},
    eventually, servers,
};
use serde_json::Value;

const VIP: &str = "10.96.0.40";

const REGISTRY: &str = "services:
  - name: api
    namespace: shop
    vips: [10.96.0.40]
    ports: [{port: 80, target_port: 8080, protocol: http}]
    endpoints:
      - {address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}
workloads:
  - {name: frontend-1, namespace: shop, service_account: frontend, node: client, addresses: [10.77.0.2]}
";

fn write_registry(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("registry.yaml");
    std::fs::write(&path, REGISTRY).unwrap();
    path
}

/// The agent's log line explaining why the control plane is unreachable.
fn unreachable(agent: &Agent) -> Value {
    agent.wait_log("control plane unreachable", |v| message(v) == "control plane unreachable")
}

/// The node token. HTTP/2 sends header values Huffman-coded (HPACK), so searching a
/// capture for the token's text alone would prove nothing: its characters have 5-bit
/// codes and come 8 at a time, so after "Bearer " (40 bits) its Huffman form is whole
/// bytes, searched for too ([`huffman`]).
const TOKEN: &str = "taste1202coasties2010toe";

/// `text`'s HPACK Huffman code (RFC 7541, Appendix B), for the symbols with 5-bit codes.
fn huffman(text: &str) -> Vec<u8> {
    // The symbols of codes 0b00000, 0b00001, ... 0b01001.
    const FIVE_BIT: &[u8] = b"012aceiost";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for b in text.bytes() {
        let code = FIVE_BIT.iter().position(|c| *c == b).expect("a symbol with a 5-bit code");
        acc = (acc << 5) | code as u32;
        bits += 5;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    assert_eq!(bits, 0, "a whole number of bytes");
    out
}

fn the_node_token_never_crosses_the_control_link_in_clear(mode: &str) {
    let lab = Lab::new(&["control", "client"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path());
    std::fs::write(dir.path().join("tokens"), format!("{TOKEN} client\n")).unwrap();
    std::fs::write(dir.path().join("client.token"), TOKEN).unwrap();
    let coded = huffman(TOKEN);
    let control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[]).expect("control plane");
    assert!(control.url.starts_with("https://"), "{}", control.url);
    let workload = Cgroup::new("wl").unwrap();
    // What enrolment sends besides the token: a CSR, and a certificate back.
    let (csr, cert) = (b"BEGIN CERTIFICATE REQUEST", b"BEGIN CERTIFICATE-----");

    let (stop, cap) = capture(lab.host("control"));
    let agent = Agent::start(
        lab.host("client"),
        control.agent_options(mode, "client", "shop/frontend").cgroup(&workload),
    )
    .expect("agent starts");
    agent.wait_enrolled();
    stop.store(true, Ordering::SeqCst);
    let wire = cap.join().expect("capture");
    assert!(wire.len() > 2000, "the capture saw the enrolment ({} bytes)", wire.len());
    assert!(!contains(&wire, TOKEN.as_bytes()), "the node token crossed the link in clear");
    assert!(!contains(&wire, &coded), "the node token crossed the link Huffman-coded");
    assert!(!contains(&wire, csr) && !contains(&wire, cert), "the CSR or certificate crossed in clear");
    drop(agent);
    control.terminate().expect("control plane stops");

    // The same capture does see all three when plaintext is asked for explicitly,
    // and the agent says what that costs.
    let control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &["--insecure-plaintext"])
            .expect("plaintext control plane");
    let url = control.url.replace("https://", "http://");
    let (stop, cap) = capture(lab.host("control"));
    let opts = mesh_tests::AgentOptions::new(mode)
        .cgroup(&workload)
        .arg("--control-plane")
        .arg(url)
        .arg("--insecure-control-plane")
        .arg("--control-plane-ca")
        .arg(control.ca_pem.display().to_string())
        .arg("--node")
        .arg("client")
        .arg("--identity")
        .arg("shop/frontend")
        .arg("--bootstrap-token-file")
        .arg(control.token_file("client").display().to_string());
    let agent = Agent::start(lab.host("client"), opts).expect("insecure agent starts");
    agent.wait_enrolled();
    stop.store(true, Ordering::SeqCst);
    let wire = cap.join().expect("capture");
    assert!(contains(&wire, &coded), "plaintext: the capture shows the token (Huffman-coded)");
    assert!(
        contains(&wire, csr) && contains(&wire, cert),
        "plaintext: the capture shows CSR and certificate"
    );
    agent.wait_log("plaintext warning", |v| {
        message(v).starts_with("sending the node credential over plaintext")
    });
}

fn an_on_path_stand_in_is_refused_naming_the_expected_anchor(mode: &str) {
    let lab = Lab::new(&["control", "client"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path());
    // The real control plane has run (its root is the agent's anchor), and is gone.
    let real = Control::start_with_ca(lab.host("control"), &registry, dir.path(), &["client"], &[])
        .expect("control plane");
    let opts = real.discovery_options(mode, "client").arg("--discovery-backoff-max").arg("300ms");
    let anchor = real.ca_pem.clone();
    real.terminate().expect("control plane stops");

    // At its address: a stand-in with a certificate of another CA, valid for that
    // address (a genuine mesh-control of another mesh).
    let stand_in = Control::start(lab.host("control"), &registry, &[]).expect("stand-in");
    let workload = Cgroup::new("wl").unwrap();
    let agent = Agent::start(lab.host("client"), opts.cgroup(&workload)).expect("agent starts");
    let line = unreachable(&agent);
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.contains("does not verify against the trust anchor"), "{line}");
    assert!(error.contains(&format!("--control-plane-ca {}", anchor.display())), "names the anchor: {line}");
    assert!(error.contains("CN=mesh root CA"), "names the anchor's root: {line}");
    // Nothing reached the stand-in past the handshake: no call, no token.
    assert!(stand_in.find(|v| message(v) == "agent subscribed").is_none(), "{}", stand_in.log_text());
    assert!(stand_in.find(|v| message(v) == "refused a discovery call").is_none());
    assert!(agent.find(|v| message(v) == "snapshot applied").is_none());
    stand_in.terminate().expect("stand-in stops");

    // The real one back at the address: the same agent connects.
    let _real =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[]).expect("control plane");
    agent.wait_log("snapshot from the real control plane", |v| message(v) == "snapshot applied");
}

/// A self-signed CA certificate (PEM) no mesh vouches for.
fn rogue_root() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "rogue root");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.self_signed(&key).unwrap().pem()
}

fn a_rogue_trust_bundle_is_refused_and_logged(mode: &str) {
    let lab = Lab::new(&["control", "client"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path());
    Control::start_with_ca(lab.host("control"), &registry, dir.path(), &["client"], &[])
        .expect("control plane")
        .terminate()
        .expect("control plane stops");
    // A root slipped into the CA's published bundle (a compromised or misconfigured
    // control plane: its serving certificate is genuine).
    let previous = dir.path().join("ca/ca-previous.pem");
    std::fs::write(&previous, rogue_root()).unwrap();
    let control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[]).expect("control plane");
    let workload = Cgroup::new("wl").unwrap();
    let opts = control.agent_options(mode, "client", "shop/frontend").cgroup(&workload);
    let agent = Agent::start(lab.host("client"), opts).expect("agent starts");
    let refused = agent.wait_log("bundle refusal", |v| message(v) == "refused the CA's trust bundle");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("CN=rogue root") && error.contains("is not vouched for"), "{refused}");
    assert!(
        error.contains(&format!("--control-plane-ca {}", control.ca_pem.display())),
        "names the anchor: {refused}"
    );
    // Routing still comes (the channel is genuine); no identity is built on the bundle.
    agent.wait_log("snapshot", |v| message(v) == "snapshot applied");
    let (_, dump) = lab.host("client").http("GET", agent.admin, "/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["certificates"], Value::Array(vec![]), "no certificate under a refused bundle");

    // The rogue root removed: the same agent accepts the bundle and is enrolled.
    control.terminate().expect("control plane stops");
    std::fs::remove_file(&previous).unwrap();
    let _control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[]).expect("control plane");
    agent.wait_log("certificate issued", |v| message(v) == "workload certificate issued");
}

/// One HTTP request from workload A to the api VIP through both agents (mTLS).
fn call(lab: &Lab, workload: &Cgroup) -> Result<String, String> {
    let out = lab
        .host("client")
        .command("curl", Some(workload.absolute()))
        .unwrap()
        .args(["-fsS", "--max-time", "5", &format!("http://{VIP}/rotation")])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

fn rotation_across_a_cross_signed_root_keeps_mtls_working(mode: &str) {
    let lab = Lab::new(&["control", "client", "server"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path());
    let mut control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &["client", "server"], &[])
            .expect("control plane");
    // The agents' anchor is the first root, as handed out before the rotation.
    let anchor = dir.path().join("anchor.pem");
    std::fs::copy(&control.ca_pem, &anchor).unwrap();
    control.ca_pem = anchor.clone();
    let _api = servers::http(lab.host("server"), 8080, "api").unwrap();
    let (workload, server_cg) = (Cgroup::new("wl").unwrap(), Cgroup::new("srv").unwrap());
    // Short certificates, so both are renewed under the new root within the test.
    let start = |host: &str, identity: &str, cg: &Cgroup| {
        let opts = control.agent_options(mode, host, identity).cgroup(cg).arg("--cert-ttl").arg("20s");
        let agent = Agent::start(lab.host(host), opts).expect("agent starts");
        agent.wait_enrolled();
        agent
    };
    let client = start("client", "shop/frontend", &workload);
    let server = start("server", "shop/api", &server_cg);
    assert!(call(&lab, &workload).is_ok_and(|b| b.starts_with("server=api")), "meshed before the rotation");

    control.terminate().expect("control plane stops");
    let out = lab
        .host("control")
        .command(bins::control(), None)
        .unwrap()
        .args(["rotate-root", "--ca-dir"])
        .arg(dir.path().join("ca"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate-root: {}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(dir.path().join("ca/ca.pem")).unwrap(), std::fs::read(&anchor).unwrap());
    // Meshed while the control plane is away: the agents keep their certificates.
    assert!(call(&lab, &workload).is_ok(), "meshed while the control plane restarts");

    let control =
        Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[]).expect("control plane");
    control.wait_log("the new root and the old one", |v| {
        message(v) == "CA ready" && v["roots"] == 2 && v["cross_signed"] == 1
    });
    // Both agents, anchored on the old root only, verify the control plane (its
    // certificate chains to the old root through the cross-signature), accept the
    // new bundle, and are issued certificates under the new root.
    for (name, agent) in [("client", &client), ("server", &server)] {
        agent.wait_log(&format!("{name} accepts the rotated bundle"), |v| {
            message(v).starts_with("trust bundle accepted") && v["roots"] == 2
        });
    }
    // Certificates issued after the restart are the new root's (the control plane's
    // log starts at the restart); each agent installs one after accepting the bundle.
    let issued =
        |node: &'static str| move |v: &Value| message(v) == "issued certificate" && v["node"] == node;
    let renewed = |agent: &Agent| {
        let lines = agent.find_all(|_| true);
        let accepted =
            lines.iter().position(|v| message(v).starts_with("trust bundle accepted") && v["roots"] == 2);
        accepted.is_some_and(|i| lines[i..].iter().any(|v| message(v) == "installed certificate"))
    };
    eventually(Duration::from_secs(45), "both agents renewed under the new root", || {
        let issued = control.find(issued("client")).is_some() && control.find(issued("server")).is_some();
        (issued && renewed(&client) && renewed(&server)).then_some(())
    });
    let body =
        eventually(Duration::from_secs(10), "meshed across the rotated root", || call(&lab, &workload).ok());
    assert!(body.starts_with("server=api"), "{body}");
    for agent in [&client, &server] {
        assert!(
            agent.find(|v| message(v) == "refused the CA's trust bundle").is_none(),
            "{}",
            agent.log_text()
        );
        assert!(!agent.log_text().contains("UnknownIssuer"), "a handshake was refused: {}", agent.log_text());
    }
}

mesh_tests::both_modes!(
    the_node_token_never_crosses_the_control_link_in_clear,
    an_on_path_stand_in_is_refused_naming_the_expected_anchor,
    a_rogue_trust_bundle_is_refused_and_logged,
    rotation_across_a_cross_signed_root_keeps_mtls_working
);
