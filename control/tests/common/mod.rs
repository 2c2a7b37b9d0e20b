//! A real `mesh-control` on loopback for the control crate's integration tests: a
//! registry file, bootstrap tokens for two nodes, its CA in a temporary directory,
//! gRPC over TLS; and a gRPC client that verifies it against the CA's root as an
//! agent does. Needs no root.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

/// `mesh-control`, killed on drop.
pub struct ControlPlane {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The CA's root (the agents' --control-plane-ca).
    pub ca_pem: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bootstrap token of `node` (see [`start_control`]).
pub fn token(node: &str) -> String {
    format!("tok-{node}")
}

/// Starts `mesh-control` on ephemeral loopback ports with `registry`, tokens for
/// `node-a` and `node-b`, and reads the ports from its "serving" log line.
pub fn start_control(registry: &str, extra: &[&str]) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    std::fs::write(&path, registry).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{} node-a\n{} node-b\n", token("node-a"), token("node-b"))).unwrap();
    let ca = dir.path().join("ca");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .arg("--registry")
        .arg(&path)
        .arg("--bootstrap-tokens")
        .arg(&tokens)
        .arg("--ca-dir")
        .arg(&ca)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--settle",
            "10ms",
        ])
        .args(extra)
        .env_remove("MESH_KUBERNETES")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mesh-control");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["message"] == "control plane serving"
            {
                let _ = tx.send(v);
            }
        }
    });
    let serving = rx.recv_timeout(Duration::from_secs(30)).expect("mesh-control logs that it serves");
    let addr = |k: &str| serving[k].as_str().and_then(|s| s.parse().ok()).expect(k);
    ControlPlane { grpc: addr("grpc"), admin: addr("admin"), ca_pem: ca.join("ca.pem"), child, dir }
}

/// A TLS client configuration trusting the roots in `ca_pem` only.
pub fn client_config(ca_pem: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("CA file") {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A gRPC channel to `addr` over TLS, verifying the server as `addr`'s IP against
/// `ca_pem` (what an agent with `--control-plane-ca` does).
pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &std::path::Path,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem));
    let name = ServerName::IpAddress(addr.ip().into());
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connect)
        .await
}

/// `msg` with `authorization: Bearer <token>`.
pub fn authorized<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}
