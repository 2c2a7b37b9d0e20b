//! The calling side of a link: one `Federation.Exports` call to a peer's control
//! plane, over TLS 1.3 verified against the roots given (the peer's serving
//! certificate is issued by its CA for the addresses and names it is dialled by,
//! so the URL's host is the name checked), with the link's token.
//!
//! Each call dials a new connection: calls are seconds apart, and the roots to
//! verify with may have changed since the last one. The handshake is made here,
//! before tonic sees the connection, so a failure of the peer's certificate is
//! told apart from any other ([`FetchError::Tls`]): the importer then goes back to
//! the bundle file's roots too.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use mesh_api as api;
use mesh_api::federation_client::FederationClient;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Endpoint, Uri};

use super::{config::PeerConfig, exports::read_token, roots};

/// Why a call to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("token_file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The peer's certificate was not accepted (or the handshake failed).
    #[error("TLS with {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("{url} answered {code:?}: {message}")]
    Refused { url: String, code: tonic::Code, message: String },
}

/// Asks `peer` for its exports as cluster `own_cluster`, verifying it against
/// `roots` (PEM), within `timeout` in all.
pub async fn fetch(
    peer: &PeerConfig,
    own_cluster: &str,
    roots: &[String],
    timeout: Duration,
) -> Result<api::ExportsResponse, FetchError> {
    let token = read_token(&peer.token_file)
        .map_err(|reason| FetchError::Token { path: peer.token_file.display().to_string(), reason })?;
    let connect = |reason: String| FetchError::Connect { url: peer.url.clone(), reason };
    let call = async {
        let stream = dial(peer, roots, timeout).await?;
        // tonic takes the connection made above, once; a reconnection fails the call.
        let slot = Arc::new(Mutex::new(Some(stream)));
        let connector = tower::service_fn(move |_: Uri| {
            let stream = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            async move { stream.map(TokioIo::new).ok_or_else(|| std::io::Error::other("one connection per call")) }
        });
        let channel = Endpoint::from_shared(peer.url.clone())
            .map_err(|e| connect(e.to_string()))?
            .connect_with_connector(connector)
            .await
            .map_err(|e| connect(crate::registry::kubernetes::error_chain(&e)))?;
        let mut client = FederationClient::new(channel).max_decoding_message_size(super::MAX_RESPONSE_BYTES);
        let mut request = tonic::Request::new(api::ExportsRequest { cluster: own_cluster.to_owned() });
        let value = format!("Bearer {token}").parse().map_err(|_| FetchError::Token {
            path: peer.token_file.display().to_string(),
            reason: "not valid header text".into(),
        })?;
        request.metadata_mut().insert("authorization", value);
        client.exports(request).await.map(tonic::Response::into_inner).map_err(|s| FetchError::Refused {
            url: peer.url.clone(),
            code: s.code(),
            message: s.message().chars().take(256).collect(),
        })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(connect(format!("no answer within {}", humantime::format_duration(timeout)))),
    }
}

/// A TLS connection to the peer, its certificate checked against `roots`.
async fn dial(
    peer: &PeerConfig,
    roots: &[String],
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, FetchError> {
    let connect = |reason: String| FetchError::Connect { url: peer.url.clone(), reason };
    let tls = |reason: String| FetchError::Tls { url: peer.url.clone(), reason };
    let config = client_config(roots).map_err(tls)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((peer.host.as_str(), peer.port))
        .await
        .map_err(|e| connect(format!("{}: {e}", peer.host)))?
        .take(8)
        .collect();
    let mut last = format!("{}: no address", peer.host);
    let mut tcp = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out"),
        }
    }
    let tcp = tcp.ok_or_else(|| connect(last))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(peer.host.clone()).map_err(|e| tls(format!("{}: {e}", peer.host)))?;
    match tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(tls(crate::registry::kubernetes::error_chain(&e))),
        Err(_) => Err(tls("handshake timed out".into())),
    }
}

/// TLS 1.3, h2, the server checked against `roots` only; no client certificate
/// (the token authenticates this side).
fn client_config(roots: &[String]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots::der(roots) {
        store.add(der).map_err(|e| format!("a root cannot be used: {e}"))?;
    }
    if store.is_empty() {
        return Err("no root to verify the peer with (bundle_file not read yet)".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
