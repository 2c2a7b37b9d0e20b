//! A minimal HTTP/1 GET client for the admin endpoints (plain HTTP on a trusted
//! network or a port-forward; one connection per request is plenty for a CLI).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::error::{MeshctlError, Target, connect_reason, io_reason};

/// An admin endpoint's base URL, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// As given (without a trailing `/`), for messages.
    pub url: String,
    host: String,
    port: u16,
}

impl BaseUrl {
    /// Parses `http://host:port`; `flag` names the option in errors.
    pub fn parse(flag: &'static str, value: &str) -> Result<Self, MeshctlError> {
        let bad = |reason: &str| MeshctlError::BadUrl { flag, value: value.into(), reason: reason.into() };
        let uri: Uri = value.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(bad(&format!("scheme {other:?} is not supported, use http://"))),
            None => return Err(bad("no scheme, write http://host:port")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        // IPv6 literals come bracketed from the URI; the socket API wants them bare.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self { url: value.trim_end_matches('/').to_owned(), host, port })
    }

    /// GETs `path` and returns the status and body, within `timeout`.
    pub async fn get(
        &self,
        target: Target,
        path: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), MeshctlError> {
        let unreachable =
            |reason: String| MeshctlError::Unreachable { target, url: self.url.clone(), reason };
        let exchange = async {
            let stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| unreachable(io_reason(&e)))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(connect_reason(&e)))?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(header::HOST, format!("{}:{}", self.host, self.port))
                .header(header::USER_AGENT, concat!("meshctl/", env!("CARGO_PKG_VERSION")))
                .body(Empty::<Bytes>::new())
                .map_err(|e| MeshctlError::Usage(format!("bad request path {path:?}: {e}")))?;
            let resp = sender.send_request(req).await.map_err(|e| unreachable(connect_reason(&e)))?;
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(|e| unreachable(connect_reason(&e)))?;
            Ok((status, body.to_bytes()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(unreachable(format!("no answer within {}", humantime::format_duration(timeout)))),
        }
    }

    /// GETs `path` and decodes a successful JSON answer.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        target: Target,
        path: &str,
        timeout: Duration,
    ) -> Result<T, MeshctlError> {
        let (status, body) = self.get(target, path, timeout).await?;
        if !status.is_success() {
            return Err(MeshctlError::Status {
                target,
                url: self.url.clone(),
                path: path.into(),
                status: status.to_string(),
                body: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| MeshctlError::Decode {
            target,
            url: self.url.clone(),
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_v6() {
        let b = BaseUrl::parse("--agent", "http://[::1]:15000/").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.url.as_str()), ("::1", 15000, "http://[::1]:15000"));
        let b = BaseUrl::parse("--agent", "http://node-a").unwrap();
        assert_eq!(b.port, 80);
    }

    #[test]
    fn rejects_what_it_cannot_call() {
        for (v, want) in [("127.0.0.1:15000", "no scheme"), ("https://x:1", "not supported")] {
            let e = BaseUrl::parse("--agent", v).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("--agent"), "{v}: {e}");
        }
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable_with_a_hint() {
        // Bind then drop: the port is closed for the duration of the test.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let b = BaseUrl::parse("--agent", &format!("http://127.0.0.1:{port}")).unwrap();
        let e = b.get(Target::Agent, "/stats", Duration::from_secs(5)).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("connection refused — is mesh-agent running"), "{e}");
    }
}
