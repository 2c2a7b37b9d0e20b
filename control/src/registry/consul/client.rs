//! A small client of Consul's HTTP API: blocking GETs over HTTP or HTTPS (verified
//! against `--consul-ca`), with the ACL token re-read from its file on every call.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// Largest answer read: a catalog of thousands of services or instances fits.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// Where and how to reach the Consul agent.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    scheme_tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    /// The URL as given, for errors.
    pub url: String,
    token_file: Option<PathBuf>,
    datacenter: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Config(String),
    #[error("GET {path}: {reason}")]
    Transport { path: String, reason: String },
    #[error("GET {path}: {status}: {body}")]
    Status { path: String, status: StatusCode, body: String },
}

/// A successful answer: its body and `X-Consul-Index` (absent: `None`).
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    pub index: Option<u64>,
}

impl ConsulClient {
    /// `url` is `http://host:port` or `https://host:port`; `ca` verifies HTTPS.
    pub fn new(
        url: &str,
        ca: Option<&std::path::Path>,
        token_file: Option<PathBuf>,
        datacenter: Option<String>,
    ) -> Result<Self, CallError> {
        let bad = |why: &str| CallError::Config(format!("--consul {url:?}: {why}"));
        let (tls, rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest, 443)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest, 80)
        } else {
            return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad("expected no path"));
        }
        let uri: hyper::Uri = format!("http://{authority}/").parse().map_err(|_| bad("not a host:port"))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?.trim_matches(['[', ']']).to_owned();
        let port = uri.port_u16().unwrap_or(default_port);
        let scheme_tls = if tls {
            let mut roots = rustls::RootCertStore::empty();
            let ca = ca
                .ok_or_else(|| bad("https needs --consul-ca (the CA that signed the agent's certificate)"))?;
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| CallError::Config(format!("--consul-ca {}: {e}", ca.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| CallError::Config(format!("--consul-ca {}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| CallError::Config(format!("--consul-ca {}: {e}", ca.display())))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| CallError::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Self { scheme_tls, host, port, url: url.to_owned(), token_file, datacenter })
    }

    /// GETs `path` (a query string may follow; `dc` is added), waiting at most
    /// `timeout` for the whole answer.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<Answer, CallError> {
        let path = match &self.datacenter {
            Some(dc) if path.contains('?') => format!("{path}&dc={dc}"),
            Some(dc) => format!("{path}?dc={dc}"),
            None => path.to_owned(),
        };
        let transport = |reason: String| CallError::Transport { path: path.clone(), reason };
        let token = match &self.token_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| transport(format!("ACL token file {}: {e}", file.display())))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| transport(format!("connecting to {}: {e}", self.url)))?;
            let _ = tcp.set_nodelay(true);
            let mut req = Request::get(path.as_str())
                .header(header::HOST, format!("{}:{}", self.host, self.port))
                .header(header::USER_AGENT, concat!("mesh-control/", env!("CARGO_PKG_VERSION")));
            if let Some(token) = &token {
                req = req.header("x-consul-token", token.as_str());
            }
            let req = req.body(Empty::<Bytes>::new()).map_err(|e| transport(e.to_string()))?;
            let resp = match &self.scheme_tls {
                Some(config) => {
                    let name = ServerName::try_from(self.host.clone())
                        .map_err(|e| transport(format!("server name {:?}: {e}", self.host)))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| transport(format!("TLS with {}: {e}", self.url)))?;
                    send(TokioIo::new(tls), req).await
                }
                None => send(TokioIo::new(tcp), req).await,
            }
            .map_err(transport)?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let text: String = String::from_utf8_lossy(&body).trim().chars().take(300).collect();
                return Err(CallError::Status { path: path.clone(), status, body: text });
            }
            Ok(Answer { body, index })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(transport(format!("no answer within {}", humantime::format_duration(timeout)))),
        }
    }
}

async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}
