//! The gRPC channel to the control plane, over the agent's marked sockets so
//! interception never redirects the agent's own control traffic back to itself.

use std::{net::SocketAddr, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::socket::SocketFactory;

/// A channel that connects on first use and reconnects when needed.
pub fn lazy_channel(
    url: &str,
    sockets: SocketFactory,
    keepalive: Duration,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    Ok(endpoint(url, keepalive, connect_timeout)?
        .connect_with_connector_lazy(connector(sockets, connect_timeout)))
}

/// The tonic endpoint for `url` with the agent's keepalive and timeouts.
pub fn endpoint(url: &str, keepalive: Duration, connect_timeout: Duration) -> Result<Endpoint, String> {
    let uri: Uri =
        url.parse().map_err(|e: http::uri::InvalidUri| format!("invalid control plane URL {url:?}: {e}"))?;
    Ok(Endpoint::from(uri)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

/// Connects with marked sockets, trying each resolved address in turn.
pub fn connector(
    sockets: SocketFactory,
    connect_timeout: Duration,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<tokio::net::TcpStream>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: Uri| {
        let sockets = sockets.clone();
        async move {
            let host = uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host}: no address"));
            for addr in addrs {
                match sockets.connect(addr, connect_timeout).await {
                    Ok(s) => return Ok(TokioIo::new(s)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    })
}
