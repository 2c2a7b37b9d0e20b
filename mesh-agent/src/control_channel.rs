//! The channel to the control plane: gRPC over TLS verified against the trust
//! anchor, on the agent's marked sockets (interception never redirects the agent's
//! own control traffic back to itself), with the node's credential on every call.
//!
//! What the agent receives here decides where its workloads' traffic goes and which
//! roots it trusts, and what it sends includes its node's credential; so an
//! `https://` control plane must present a certificate that chains to the anchor
//! given out of band (`--control-plane-ca`) and names the host dialled, and the
//! credential is sent over plaintext only when `--insecure-control-plane` allows a
//! plaintext control plane at all (with a warning).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{identity::TrustAnchor, socket::SocketFactory};

/// The ALPN protocol gRPC runs over.
const ALPN_H2: &[u8] = b"h2";

/// Why a call to the control plane cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid control plane URL {0:?}: {1}")]
    Url(String, String),
    #[error("reading the node credential {path}: {reason}")]
    Credential { path: PathBuf, reason: String },
    #[error("refusing to send the node credential to {0} over plaintext without --insecure-control-plane")]
    Plaintext(String),
}

/// How to reach the control plane (from the agent's flags).
#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    /// `https://host:port` (or `http://` with `insecure`).
    pub url: String,
    /// The node credential's file (a bootstrap token or a projected service-account
    /// token), read on every call so a rotated token is picked up.
    pub token_file: PathBuf,
    /// `--insecure-control-plane`: a plaintext URL is allowed.
    pub insecure: bool,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
}

/// The control plane as the agent talks to it; shared by discovery and the CA client.
#[derive(Debug)]
pub struct ControlPlane {
    settings: ControlPlaneSettings,
    /// `None`: plaintext (`http://` with `--insecure-control-plane`).
    tls: Option<Arc<rustls::ClientConfig>>,
    anchor: Arc<TrustAnchor>,
    sockets: SocketFactory,
    warned_plaintext: AtomicBool,
}

impl ControlPlane {
    /// The control plane at `settings.url`, verified against `anchor` when it is
    /// `https://`.
    pub fn new(
        settings: ControlPlaneSettings,
        anchor: Arc<TrustAnchor>,
        sockets: SocketFactory,
    ) -> Result<Arc<ControlPlane>, ChannelError> {
        let uri: Uri = settings
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| ChannelError::Url(settings.url.clone(), e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(client_config(&anchor)),
            Some("http") if settings.insecure => None,
            Some("http") => return Err(ChannelError::Plaintext(settings.url.clone())),
            _ => return Err(ChannelError::Url(settings.url.clone(), "not http:// or https://".into())),
        };
        Ok(Arc::new(ControlPlane {
            settings,
            tls,
            anchor,
            sockets,
            warned_plaintext: AtomicBool::new(false),
        }))
    }

    /// The URL, for logs.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// The trust anchor the control plane and its bundles are checked against.
    pub fn anchor(&self) -> &Arc<TrustAnchor> {
        &self.anchor
    }

    /// Whether the channel is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn endpoint(&self) -> Result<Endpoint, ChannelError> {
        let uri: Uri = self.settings.url.parse().map_err(|e: http::uri::InvalidUri| {
            ChannelError::Url(self.settings.url.clone(), e.to_string())
        })?;
        Ok(Endpoint::from(uri)
            .connect_timeout(self.settings.connect_timeout)
            .http2_keep_alive_interval(self.settings.keepalive)
            .keep_alive_timeout(self.settings.keepalive)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true))
    }

    /// A channel that connects on first use and reconnects when needed.
    pub fn lazy_channel(&self) -> Result<Channel, ChannelError> {
        Ok(self.endpoint()?.connect_with_connector_lazy(self.connector()))
    }

    /// A channel connected now (the error says why not, the anchor included when the
    /// control plane's certificate is the problem).
    pub async fn connect(&self) -> Result<Channel, String> {
        let endpoint = self.endpoint().map_err(|e| e.to_string())?;
        endpoint.connect_with_connector(self.connector()).await.map_err(|e| error_chain(&e))
    }

    /// `msg` with the node's credential (`authorization: Bearer <token>`).
    pub fn authorize<T>(&self, msg: T) -> Result<tonic::Request<T>, ChannelError> {
        let path = &self.settings.token_file;
        if self.tls.is_none() {
            if !self.settings.insecure {
                return Err(ChannelError::Plaintext(self.settings.url.clone()));
            }
            if !self.warned_plaintext.swap(true, Ordering::Relaxed) {
                tracing::warn!(control_plane = %self.settings.url,
                    "sending the node credential over plaintext (--insecure-control-plane): anyone on the path can read it");
            }
        }
        let bad = |reason: String| ChannelError::Credential { path: path.clone(), reason };
        let token = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value =
            format!("Bearer {}", token.trim()).parse().map_err(|_| bad("not valid header text".into()))?;
        let mut request = tonic::Request::new(msg);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// Connects with marked sockets, trying each resolved address in turn, then runs
    /// the TLS handshake (unless plaintext) for the host of the URL.
    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<Conn>,
        Error = std::io::Error,
        Future = impl Future<Output = std::io::Result<TokioIo<Conn>>> + Send,
    > + Clone
    + Send
    + 'static {
        let (sockets, timeout, tls) = (self.sockets.clone(), self.settings.connect_timeout, self.tls.clone());
        tower::service_fn(move |uri: Uri| {
            let (tls, sockets) = (tls.clone(), sockets.clone());
            async move {
                let host =
                    uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_string();
                let default_port = if tls.is_some() { 443 } else { 80 };
                let port = uri.port_u16().unwrap_or(default_port);
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
                let mut last =
                    std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address"));
                let mut tcp = None;
                for addr in addrs {
                    match sockets.connect(addr, timeout).await {
                        Ok(s) => {
                            tcp = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let tcp = tcp.ok_or(last)?;
                let Some(config) = tls else { return Ok(TokioIo::new(Conn::Plain(tcp))) };
                let name = ServerName::try_from(host.clone()).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}"))
                })?;
                let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(stream)) => Ok(TokioIo::new(Conn::Tls(Box::new(stream)))),
                    // The rustls error (naming the anchor) as the message itself, so
                    // whatever shows only the top of the error chain still shows it.
                    Ok(Err(e)) => {
                        Err(std::io::Error::new(e.kind(), format!("TLS with {host}: {}", error_chain(&e))))
                    }
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("TLS with {host}: handshake timed out"),
                    )),
                }
            }
        })
    }
}

/// TLS 1.3 to the control plane, h2, the certificate checked by the anchor's verifier;
/// no client certificate (the node credential authenticates the agent).
fn client_config(anchor: &Arc<TrustAnchor>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(anchor.verifier())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// A connection to the control plane: TLS, or plaintext when insecure.
#[derive(Debug)]
pub enum Conn {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An error and its causes on one line, skipping causes its text already contains.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
